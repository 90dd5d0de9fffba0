"""Checks the exported ONNX against the original sentence-transformers model on real sentences, and a dual encoder's
vision graph, behind the serving image preprocessing, on real photographs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from export.source_model import SourceModel, UnsupportedModel
from export.steps.image_processing import ImageProcessor
from export.steps.sentence_head import SentenceHead
from repository_contract.tensors import (
    ATTENTION_MASK,
    CONTROL_FACTORS,
    CONTROL_LOG_ADDITIVE,
    EMBEDDING,
    HIDDEN_STATES,
    INPUT_IDS,
    PIXEL_VALUES,
    TOKEN_EMBEDDINGS,
    onnx_name,
)

# Cosine to the original model that each precision must reach: (on every sentence, on average).
# fp32 must be exact up to float rounding; int8 trades a little accuracy for ~2x CPU speed.
# fp16, measured in onnxruntime on the CPU against sentence-transformers in fp32 on the 1030 STS sentences: all-MiniLM
# min 0.999998, mean 0.999999; the tiny random models of tests/tiny_models.py and harness/tiny_models.py, whose large
# initializer range makes them far touchier than trained ones, down to min 0.99953 (BERT, CLS pooling and a tanh
# Dense head), mean 0.999986; the tiny CLIP's 11 photos and their pooled vision layers 1.000000 to six places. The bound
# leaves twice the worst of those on every sentence and seven times it on average, for GPU kernels that round otherwise;
# an overflow (inf, then NaN) or a broken conversion fails it by far.
MIN_COSINE = {"fp32": (0.9999, 0.9999), "fp16": (0.999, 0.9999), "int8": (0.95, 0.98)}
# The exported graph's names for what is fed to it and read from it here.
IDS, MASK, TOKENS = onnx_name(INPUT_IDS), onnx_name(ATTENTION_MASK), onnx_name(TOKEN_EMBEDDINGS)


@dataclass(frozen=True)
class ValidationReport:
    sentences: int
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float

    def passes(self, precision: str) -> bool:
        least, mean = MIN_COSINE[precision]
        return self.min_cosine >= least and self.mean_cosine >= mean


def padded_batch(tokenizer: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """The texts tokenized as one batch right-padded to its longest, as serving pads."""
    encodings = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    return {IDS: ids, MASK: mask}


def head_embeddings(session: ort.InferenceSession, tokenizer: Tokenizer, texts: list[str], head: SentenceHead) -> np.ndarray:
    feeds = padded_batch(tokenizer, texts)
    (tokens,) = session.run([TOKENS], feeds)
    return head(tokens, feeds[MASK])


def uncontrolled_agreement(
    plain_path: Path, controlled_path: Path, tokenizer: Tokenizer, texts: list[str], head: SentenceHead
) -> tuple[float, float]:
    """(max abs difference, min cosine) of the sentence vectors of the two graphs when no position is controlled, in
    both modes: what a controlled request with factors of 1 gets against the fast path. int8 graphs quantize their
    activations per batch, so a rounding step that the other mode's shift flips shows here as int8's usual noise."""
    feeds = padded_batch(tokenizer, texts)
    (tokens,) = ort.InferenceSession(str(plain_path), providers=["CPUExecutionProvider"]).run([TOKENS], feeds)
    plain = head(tokens, feeds[MASK])
    controlled = ort.InferenceSession(str(controlled_path), providers=["CPUExecutionProvider"])
    difference, least = 0.0, 1.0
    for mode in (True, False):
        control = {
            onnx_name(CONTROL_FACTORS): np.ones(feeds[IDS].shape, dtype=np.float32),
            onnx_name(CONTROL_LOG_ADDITIVE): np.full((len(texts), 1), mode),
        }
        (tokens,) = controlled.run([TOKENS], feeds | control)
        vectors = head(tokens, feeds[MASK])
        cosine = (vectors * plain).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(plain, axis=1))
        difference, least = max(difference, float(np.abs(vectors - plain).max())), min(least, float(cosine.min()))
    return difference, least


def onnx_sentence_embeddings(onnx_path: Path, tokenizer: Tokenizer, texts: list[str], head: SentenceHead, rows_per_run: int):
    """The texts' vectors from the graph, run `rows_per_run` rows at a time as the encoder step runs them: int8 scales
    each run's activations together, so its figures hold only for the runs it will be served in."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [head_embeddings(session, tokenizer, texts[s : s + rows_per_run], head) for s in range(0, len(texts), rows_per_run)]
    )


def _check_tokenizer(reference, tokenizer: Tokenizer, texts: list[str]) -> None:
    """Serving tokenizes with `tokenizers` alone; refuse a model whose transformers tokenizer frames or splits differently
    (an end-of-sequence token that only tokenizer_config.json adds, say), since its vectors would not match."""
    expected = reference.tokenizer(texts, truncation=True, max_length=reference.max_seq_length)["input_ids"]
    served = [e.ids for e in tokenizer.encode_batch(texts)]
    differ = [i for i, (a, b) in enumerate(zip(expected, served)) if a != b]
    if differ:
        i = differ[0]
        raise UnsupportedModel(
            f"tokenizer.json, loaded with `tokenizers`, tokenizes {len(differ)} of {len(texts)} validation texts differently from "
            f"the model's own tokenizer; e.g. {texts[i]!r}: {served[i][:12]} against {expected[i][:12]}"
        )


def _report(reference: np.ndarray, exported: np.ndarray) -> ValidationReport:
    cosine = (reference * exported).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(exported, axis=1))
    return ValidationReport(
        sentences=len(reference),
        max_abs_diff=float(np.abs(reference - exported).max()),
        min_cosine=float(cosine.min()),
        mean_cosine=float(cosine.mean()),
    )


def validate_images(
    source: SourceModel, vision_path: Path, processor: ImageProcessor, files: dict[str, bytes]
) -> ValidationReport:
    """The image files through the serving preprocessing and the vision graph, against encode() of each image as PIL
    opens it and turns it upright: what the image-preprocess and vision-encoder steps will answer."""
    import io

    from PIL import Image, ImageOps
    from sentence_transformers import SentenceTransformer

    images = [ImageOps.exif_transpose(Image.open(io.BytesIO(data))) for data in files.values()]
    reference = SentenceTransformer(str(source.path), device="cpu").encode(images, batch_size=16, convert_to_numpy=True)
    session = ort.InferenceSession(str(vision_path), providers=["CPUExecutionProvider"])
    pixels = np.stack([processor(data) for data in files.values()])
    (exported,) = session.run([onnx_name(EMBEDDING)], {onnx_name(PIXEL_VALUES): pixels})
    return _report(reference, exported)


def uncontrolled_image_agreement(
    plain_path: Path, controlled_path: Path, processor: ImageProcessor, files: dict[str, bytes]
) -> tuple[float, float]:
    """(max abs difference, min cosine) of the image vectors of the plain and the attention-controlled vision graphs when
    no image token is controlled, in both modes: what an image control of factor 1 gets against the plain path."""
    pixels = np.stack([processor(data) for data in files.values()])
    (plain,) = ort.InferenceSession(str(plain_path), providers=["CPUExecutionProvider"]).run(
        [onnx_name(EMBEDDING)], {onnx_name(PIXEL_VALUES): pixels}
    )
    controlled = ort.InferenceSession(str(controlled_path), providers=["CPUExecutionProvider"])
    tokens = next(i.shape[1] for i in controlled.get_inputs() if i.name == onnx_name(CONTROL_FACTORS))
    difference, least = 0.0, 1.0
    for mode in (True, False):
        feeds = {
            onnx_name(PIXEL_VALUES): pixels,
            onnx_name(CONTROL_FACTORS): np.ones((len(pixels), tokens), dtype=np.float32),
            onnx_name(CONTROL_LOG_ADDITIVE): np.full((len(pixels), 1), mode),
        }
        (vectors,) = controlled.run([onnx_name(EMBEDDING)], feeds)
        report = _report(plain, vectors)
        difference, least = max(difference, report.max_abs_diff), min(least, report.min_cosine)
    return difference, least


def pooled_layers(states, poolings: tuple[str, ...]):
    """torch: hidden states [batch, layers + 1, tokens, hidden] of sequences without padding (an image's tokens) ->
    [batch, layers + 1, len(poolings), hidden], each pooling over all the tokens as the layer-pooling step defines it:
    mean; weighted_mean, token i (1-based) weighing i; max; last_token; abs_max."""
    import torch

    states = torch.as_tensor(states, dtype=torch.float32)
    weights = torch.arange(1, states.shape[2] + 1, dtype=torch.float32)[None, None, :, None]
    pooled = {
        "mean": lambda: states.mean(dim=2),
        "weighted_mean": lambda: (states * weights).sum(dim=2) / weights.sum(),
        "max": lambda: states.amax(dim=2),
        "last_token": lambda: states[:, :, -1],
        "abs_max": lambda: states.abs().amax(dim=2),
    }
    return torch.stack([pooled[name]() for name in poolings], dim=2)


def vision_layers_reference(source: SourceModel, images: list, poolings: tuple[str, ...]) -> np.ndarray:
    """What the image layers ensemble must answer for these PIL images, computed in torch from the model's own files:
    its image processor (transformers' CLIPImageProcessor), its vision tower (CLIPVisionModel) with
    output_hidden_states, pooled by pooled_layers: [images, layers + 1, len(poolings), hidden]."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModel

    directory = str(source.path / source.transformer_path)
    pixels = CLIPImageProcessor.from_pretrained(directory)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = CLIPVisionModel.from_pretrained(directory).eval()(pixel_values=pixels, output_hidden_states=True).hidden_states
        return pooled_layers(torch.stack(states, dim=1), poolings).numpy()


def validate_image_layers(
    source: SourceModel, layers_path: Path, processor: ImageProcessor, files: dict[str, bytes], poolings: tuple[str, ...]
) -> ValidationReport:
    """The image files through the serving preprocessing and the vision hidden-states graph, every layer pooled,
    against vision_layers_reference of each image as PIL opens it and turns it upright; one row per image, layer and
    pooling."""
    import io

    from PIL import Image, ImageOps

    images = [ImageOps.exif_transpose(Image.open(io.BytesIO(data))) for data in files.values()]
    reference = vision_layers_reference(source, images, poolings)
    session = ort.InferenceSession(str(layers_path), providers=["CPUExecutionProvider"])
    pixels = np.stack([processor(data) for data in files.values()])
    (states,) = session.run([onnx_name(HIDDEN_STATES)], {onnx_name(PIXEL_VALUES): pixels})
    exported = pooled_layers(states, poolings).numpy()
    width = reference.shape[-1]
    return _report(reference.reshape(-1, width), exported.reshape(-1, width))


def validate(
    source: SourceModel, onnx_path: Path, tokenizer: Tokenizer, texts: list[str], head: SentenceHead, rows_per_run: int
) -> ValidationReport:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(source.path), device="cpu")
    _check_tokenizer(model, tokenizer, texts)
    # prompt="": the bare texts, not the model's default prompt, which serving adds as a prefix of its own.
    reference = model.encode(texts, batch_size=32, convert_to_numpy=True, prompt="")
    return _report(reference, onnx_sentence_embeddings(onnx_path, tokenizer, texts, head, rows_per_run))
