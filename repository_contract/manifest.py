"""The manifest: what the export tells everything downstream about one exported model.

The export writes one `embedding_manifest.json` next to the model's text ensemble, last of all its files; the
gateway serves a model only once its manifest is there. This module is its only writer (`write`) and its only
reader (`read`, `read_all`), so the format lives in one place: a frozen structure with a format version. A manifest
of another version is refused with a clear error rather than read by guess. (deploy/images/build_tensorrt_plans.py
runs alone in the GPU image and reads the few keys it needs from the JSON itself.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from repository_contract import targets
from repository_contract.naming import image_ensembles, text_ensemble

MANIFEST_FILE = "embedding_manifest.json"
# 1: the layout since attention controls. Manifests written before the version was recorded are of this layout too,
# so a missing version reads as 1; those from before attention controls lack "controls" and are refused. A null
# "compression" (a model narrower than the compression size) kept the version: every manifest written before it reads
# as it did, and older code refuses such a manifest as broken rather than misreading it.
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that cannot be served from: another format version, or a key missing or of the wrong type."""


@dataclass(frozen=True)
class EnsembleNames:
    """One pipeline's entry points: raw text (tokenized in Triton), token ids, and token ids with attention controls."""

    text: str
    token_ids: str
    controlled: str


@dataclass(frozen=True)
class Compression:
    """The fitted projection to `size` dimensions, and the ensembles that apply it."""

    size: int
    method: str
    digest: str  # of the projection: compressed vectors depend on it, so their model version carries it
    ensembles: EnsembleNames

    def model_version(self, uncompressed: str) -> str:
        """The model version of the compressed vectors of the model whose own vectors are of `uncompressed`."""
        return f"{uncompressed}-{self.method}{self.size}-{self.digest}"


@dataclass(frozen=True)
class Layers:
    """Every layer's hidden states pooled, in the order of `poolings`."""

    poolings: tuple[str, ...]
    ensembles: EnsembleNames


@dataclass(frozen=True)
class Controls:
    token_embeddings: str  # the input embedding matrix (.npy) for contextual attention controls, repository-relative


@dataclass(frozen=True)
class ImageEnsembles:
    """The entry points for encoded images (IMAGE, IMAGE_CROP): the image vector, that vector compressed, and every
    layer of the vision tower pooled (POOLED [Vision.num_layers + 1, len(Layers.poolings), Vision.hidden_size], in
    the order of the manifest's `layers.poolings`)."""

    embedding: str
    compressed: str | None  # None for a model without compression
    layers: str

    @classmethod
    def named(cls, model: str, compress_to: int | None, controlled: bool = False) -> ImageEnsembles:
        """The entry points repository_contract.naming.image_ensembles names."""
        names = image_ensembles(model, compress_to, controlled)
        return cls(names["embedding"], names.get("compressed"), names["layers"])


@dataclass(frozen=True)
class Vision:
    """A dual encoder's vision tower: images land in the text vectors' space."""

    ensembles: ImageEnsembles
    # The same entry points with attention controls on the image (IMAGE_CONTROLS and CONTROL_LOG_ADDITIVE besides).
    controlled: ImageEnsembles
    image_tokens: int  # patches plus the class token: what each image counts as
    image_size: int  # the side of the square the model sees
    max_image_pixels: int  # width * height of a decoded image above which it is refused unread (a decompression bomb)
    formats: tuple[str, ...]  # the PIL format names accepted
    # The vision tower's transformer layers and width: the image layers ensemble's POOLED has num_layers + 1 layers
    # (0: the patch and position embeddings after CLIP's pre-layernorm, 1..num_layers: each layer's output, the last
    # before the post-layernorm), each hidden_size wide.
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class Manifest:
    name: str
    model_version: str
    fingerprint: str  # of the weights, the options and the export's code: an unchanged one is not exported again
    source: str
    architecture: str  # encoder or decoder
    precision: str
    target: str
    dimensions: int
    hidden_size: int
    num_layers: int
    max_sequence_length: int
    max_batch_size: int
    poolings: tuple[str, ...]
    head: tuple[str, ...]
    prefixes: Mapping[str, str]  # per representation (query, document, symmetric) and the default
    pad_token_id: int
    tokenizer: str  # tokenizer.json, repository-relative
    steps: Mapping[str, str]  # step role -> Triton model name
    directories: tuple[str, ...]  # every Triton model directory of this model: steps and ensembles
    ensembles: EnsembleNames
    # None (null in the JSON) for a model narrower than the export's --compress-to: it serves no compress_to_size.
    compression: Compression | None
    layers: Layers
    controls: Controls
    # Only for a model with a vision tower; absent from the JSON of text-only models, so their manifests read as before.
    vision: Vision | None = None
    # onnxruntime's providers the text encoder asks for, most wanted first (repository_contract.targets); manifests
    # written before GPU targets of the Python-backend step lack it and read as their target's.
    execution_providers: tuple[str, ...] = ()
    format_version: int = field(default=FORMAT_VERSION)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["vision"] is None:
            del data["vision"]
        return {"format_version": data.pop("format_version"), **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the manifest") -> Manifest:
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where} has format version {version!r}; this code reads version {FORMAT_VERSION}: export "
                f"{data.get('name', 'the model')} again with this code, or serve it with the code that exported it"
            )
        if "controls" not in data:
            raise ManifestError(
                f"{where} was written by an older export, without attention controls: export {data.get('name')} again"
            )
        try:
            return cls(
                name=_typed(data["name"], str),
                model_version=_typed(data["model_version"], str),
                fingerprint=_typed(data["fingerprint"], str),
                source=_typed(data["source"], str),
                architecture=_typed(data["architecture"], str),
                precision=_typed(data["precision"], str),
                target=_typed(data["target"], str),
                dimensions=_typed(data["dimensions"], int),
                hidden_size=_typed(data["hidden_size"], int),
                num_layers=_typed(data["num_layers"], int),
                max_sequence_length=_typed(data["max_sequence_length"], int),
                max_batch_size=_typed(data["max_batch_size"], int),
                poolings=_strings(data["poolings"]),
                head=_strings(data["head"]),
                prefixes=_string_map(data["prefixes"]),
                pad_token_id=_typed(data["pad_token_id"], int),
                tokenizer=_typed(data["tokenizer"], str),
                steps=_string_map(data["steps"]),
                directories=_strings(data["directories"]),
                ensembles=_ensembles(data["ensembles"]),
                compression=_compression(data["compression"]),
                layers=Layers(_strings(data["layers"]["poolings"]), _ensembles(data["layers"]["ensembles"])),
                controls=Controls(_typed(data["controls"]["token_embeddings"], str)),
                vision=_vision(data["vision"], data["compression"] is not None) if "vision" in data else None,
                execution_providers=_strings(data["execution_providers"])
                if "execution_providers" in data
                else targets.target(data["target"]).execution_providers,
            )
        except KeyError as error:
            raise ManifestError(f"{where} lacks {error}: export {data.get('name', 'the model')} again") from None
        except (TypeError, ValueError) as error:
            raise ManifestError(f"{where}: {error}") from None


def _typed(value: Any, kind: type) -> Any:
    # bool is an int to Python, never a count or a size here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, found {value!r}")
    return value


def _strings(values: Any) -> tuple[str, ...]:
    if not isinstance(values, list):
        raise TypeError(f"expected a list of strings, found {values!r}")
    return tuple(_typed(value, str) for value in values)


def _string_map(values: Any) -> dict[str, str]:
    if not isinstance(values, dict):
        raise TypeError(f"expected an object of strings, found {values!r}")
    return {_typed(key, str): _typed(value, str) for key, value in values.items()}


def _ensembles(names: Any) -> EnsembleNames:
    return EnsembleNames(_typed(names["text"], str), _typed(names["token_ids"], str), _typed(names["controlled"], str))


def _compression(data: Any) -> Compression | None:
    if data is None:
        return None
    return Compression(
        size=_typed(data["size"], int),
        method=_typed(data["method"], str),
        digest=_typed(data["digest"], str),
        ensembles=_ensembles(data["ensembles"]),
    )


def _image_ensembles(names: Any, compression: bool) -> ImageEnsembles:
    # The compressed image ensemble ends in the model's compression step: there is one exactly when that step is.
    compressed = names["compressed"]
    if (compressed is not None) != compression:
        raise ValueError(
            f"compressed image ensemble {compressed!r} for a model {'with' if compression else 'without'} compression"
        )
    return ImageEnsembles(
        _typed(names["embedding"], str), _typed(compressed, str) if compression else None, _typed(names["layers"], str)
    )


def _vision(data: Any, compression: bool) -> Vision:
    return Vision(
        ensembles=_image_ensembles(data["ensembles"], compression),
        controlled=_image_ensembles(data["controlled"], compression),
        image_tokens=_typed(data["image_tokens"], int),
        image_size=_typed(data["image_size"], int),
        max_image_pixels=_typed(data["max_image_pixels"], int),
        formats=_strings(data["formats"]),
        num_layers=_typed(data["num_layers"], int),
        hidden_size=_typed(data["hidden_size"], int),
    )


def manifest_paths(repository: Path) -> list[Path]:
    """Every manifest in a model repository, in name order."""
    return sorted(repository.glob(f"*/{MANIFEST_FILE}"))


def read(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not JSON ({error}): export the model again") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object: export the model again")
    return Manifest.from_dict(data, str(path))


def read_all(repository: Path) -> list[Manifest]:
    return [read(path) for path in manifest_paths(repository)]


def write(manifest: Manifest, repository: Path) -> Path:
    """Writes the manifest into its model's text-ensemble directory; the export calls it after every other file."""
    path = repository / manifest.ensembles.text / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def owned_directories(repository: Path) -> dict[str, tuple[str, ...]]:
    """Model name -> its Triton model directories, from every manifest of any format version: what the export needs
    to remove a model, or to refuse a name another model's directories would clash with, even one exported by older
    code that `read` refuses."""
    owned = {}
    for path in manifest_paths(repository):
        data = json.loads(path.read_text())
        owned[data["name"]] = tuple(data.get("directories", ()))
    return owned


def manifest_path(repository: Path, name: str) -> Path:
    """Where the manifest of the model `name` is, or will be: in its text ensemble's directory."""
    return repository / text_ensemble(name) / MANIFEST_FILE


def recorded_fingerprint(repository: Path, name: str) -> str | None:
    """The fingerprint in the manifest of the model `name`, whatever its format version, or None without one: the
    export compares it with its own to skip an export that would write the same repository again."""
    path = manifest_path(repository, name)
    return json.loads(path.read_text()).get("fingerprint") if path.exists() else None
