"""The models this gateway serves, read from the manifests the export wrote into the model repository."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from gateway.core.controls import TokenSimilarity
from gateway.core.errors import ErrorKind, ServiceError
from repository_contract.manifest import Compression, EnsembleNames, Vision, manifest_paths
from repository_contract.manifest import read as read_manifest

REPRESENTATIONS = ("query", "document", "symmetric")


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
    embedding: EnsembleNames
    tokenizer: Tokenizer
    special_tokens: int  # how many the model frames a sequence with ([CLS] and [SEP]: 2)
    token_similarity: TokenSimilarity  # for contextual attention controls
    # The projection compress_to_size serves, and its ensembles; None for a model narrower than the export's
    # --compress-to, which refuses compress_to_size.
    compression: Compression | None
    layer_poolings: tuple[str, ...]
    layers: EnsembleNames
    triton_models: tuple[str, ...]  # every Triton model it takes: steps and ensembles
    vision: Vision | None = None  # its image tower (a dual encoder such as CLIP); None: texts only
    # How the export built it: fp32, fp16 or int8, the target (repository_contract.targets) and the onnxruntime
    # providers its text encoder asks for, most wanted first.
    precision: str = "fp32"
    target: str = "cpu"
    execution_providers: tuple[str, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def compress_to_sizes(self) -> tuple[int, ...]:
        """The sizes compress_to_size takes for this model, as the model listings say them."""
        return () if self.compression is None else (self.compression.size,)


def _load(manifest_path: Path) -> ServedModel:
    manifest = read_manifest(manifest_path)
    repository = manifest_path.parent.parent
    tokenizer = Tokenizer.from_file(str(repository / manifest.tokenizer))
    return ServedModel(
        name=manifest.name,
        model_version=manifest.model_version,
        dimensions=manifest.dimensions,
        num_layers=manifest.num_layers,
        max_sequence_length=manifest.max_sequence_length,
        max_batch_size=manifest.max_batch_size,
        prefixes={r: manifest.prefixes[r] for r in REPRESENTATIONS},
        default_prefix=manifest.prefixes["default"],
        embedding=manifest.ensembles,
        tokenizer=tokenizer,
        special_tokens=0 if tokenizer.post_processor is None else tokenizer.post_processor.num_special_tokens_to_add(False),
        token_similarity=TokenSimilarity(repository / manifest.controls.token_embeddings),
        compression=manifest.compression,
        layer_poolings=manifest.layers.poolings,
        layers=manifest.layers.ensembles,
        triton_models=manifest.directories,
        vision=manifest.vision,
        precision=manifest.precision,
        target=manifest.target,
        execution_providers=manifest.execution_providers,
    )


class Catalog:
    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("no exported model found: run `python -m export` first")
        self.models = {m.name: m for m in models}

    @classmethod
    def from_repository(cls, repository: Path) -> Catalog:
        return cls([_load(path) for path in manifest_paths(repository)])

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
