"""The models this gateway serves, read from the manifests the export wrote into the model repository."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from gateway.core.controls import TokenSimilarity
from gateway.core.errors import ErrorKind, ServiceError

MANIFEST = "embedding_manifest.json"
REPRESENTATIONS = ("query", "document", "symmetric")


@dataclass(frozen=True)
class Ensembles:
    """One pipeline's entry points: raw text (tokenized in Triton), token ids, and token ids with attention controls."""

    text: str
    token_ids: str
    controlled: str

    @classmethod
    def of(cls, names: dict) -> Ensembles:
        return cls(names["text"], names["token_ids"], names["controlled"])


@dataclass(frozen=True)
class ServedModel:
    name: str
    model_version: str
    dimensions: int
    num_layers: int
    max_sequence_length: int
    max_batch_size: int
    prefixes: dict[str, str]  # per representation: query, document, symmetric
    default_prefix: str  # what sentence-transformers' encode() prepends without a prompt_name; the OpenAI contract's
    embedding: Ensembles
    tokenizer: Tokenizer
    token_similarity: TokenSimilarity  # for contextual attention controls
    compress_to_size: int
    compressed_model_version: str
    compressed: Ensembles
    layer_poolings: tuple[str, ...]
    layers: Ensembles
    triton_models: tuple[str, ...]  # every Triton model it takes: steps and ensembles

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def _load(manifest_path: Path) -> ServedModel:
    manifest = json.loads(manifest_path.read_text())
    if "controls" not in manifest:
        raise ValueError(
            f"{manifest_path} was written by an older export, without attention controls: export {manifest['name']} again"
        )
    repository = manifest_path.parent.parent
    tokenizer = Tokenizer.from_file(str(repository / manifest["tokenizer"]))
    return ServedModel(
        name=manifest["name"],
        model_version=manifest["model_version"],
        dimensions=manifest["dimensions"],
        num_layers=manifest["num_layers"],
        max_sequence_length=manifest["max_sequence_length"],
        max_batch_size=manifest["max_batch_size"],
        prefixes={r: manifest["prefixes"][r] for r in REPRESENTATIONS},
        default_prefix=manifest["prefixes"]["default"],
        embedding=Ensembles.of(manifest["ensembles"]),
        tokenizer=tokenizer,
        token_similarity=TokenSimilarity(repository / manifest["controls"]["token_embeddings"]),
        compress_to_size=manifest["compression"]["size"],
        compressed_model_version=(
            f"{manifest['model_version']}-{manifest['compression']['method']}{manifest['compression']['size']}"
            f"-{manifest['compression']['digest']}"
        ),
        compressed=Ensembles.of(manifest["compression"]["ensembles"]),
        layer_poolings=tuple(manifest["layers"]["poolings"]),
        layers=Ensembles.of(manifest["layers"]["ensembles"]),
        triton_models=tuple(manifest["directories"]),
    )


class Catalog:
    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("no exported model found: run `python -m export` first")
        self.models = {m.name: m for m in models}

    @classmethod
    def from_repository(cls, repository: Path) -> Catalog:
        return cls([_load(path) for path in sorted(repository.glob(f"*/{MANIFEST}"))])

    @property
    def triton_models(self) -> list[str]:
        """What Triton loads: the models the manifests name, and nothing else left in the repository."""
        return sorted(name for model in self.models.values() for name in model.triton_models)

    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise ServiceError(
                ErrorKind.NOT_FOUND, f"model '{name}' is not served here; available: {sorted(self.models)}", "model"
            ) from None
