"""How the Triton models of one served model are named, from the model's name and each one's role.

The export names every model directory with these functions and records the names in the manifest, where the gateway
reads them. Scripts and tests that find a model without its manifest at hand (a step's stub by its command line, the
steps a removed model left on disk) build the name here rather than spell the pattern out again.
"""

from __future__ import annotations


def step_name(model: str, role: str) -> str:
    """`<model>-<role>`: each model gets its own copy of each step, so that models in one repository never share a
    step and each batches on its own."""
    return f"{model}-{role}"


def text_ensemble(model: str) -> str:
    """The plain embedding of raw text goes by the model's own name: what a bare tritonclient call asks for, and the
    directory that holds the model's manifest."""
    return model


def ensemble_names(model: str, compress_to: int | None) -> dict[str, dict[str, str]]:
    """Per pipeline (embedding, compression, layers), its entry points: raw text, token ids, and token ids with
    attention controls. No compression pipeline when `compress_to` is None: a model narrower than the compression
    size."""
    entries = {"text": text_ensemble(model), "token_ids": f"{model}-ids", "controlled": f"{model}-ids-controlled"}
    compression = {} if compress_to is None else {"compression": f"-c{compress_to}"}
    pipelines = {"embedding": "", **compression, "layers": "-layers"}
    return {pipeline: {kind: entry + suffix for kind, entry in entries.items()} for pipeline, suffix in pipelines.items()}


def image_ensembles(model: str, compress_to: int | None, controlled: bool = False) -> dict[str, str]:
    """The entry points of a model with a vision tower for encoded images: its image vector, that vector compressed by
    the model's compression step (none when `compress_to` is None), and every layer of the vision tower pooled;
    `controlled`: the same with attention controls on the image. Their steps are step_name(model, role) for the roles
    "image-preprocess", "vision-encoder", "vision-layers-encoder", "vision-controlled-encoder" and
    "vision-layer-pooling"."""
    entry = f"{model}-image-controlled" if controlled else f"{model}-image"
    compressed = {} if compress_to is None else {"compressed": f"{entry}-c{compress_to}"}
    return {"embedding": entry, **compressed, "layers": f"{entry}-layers"}
