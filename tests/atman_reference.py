"""Reference implementation of attention controls (AtMan), written from the definition and independent of the export.

The service is checked against these vectors, so this module follows the definition literally and in float64:

* `content_and_factors` turns a prompt (Aleph Alpha item dicts), a representation prefix and an optional contextual
  control threshold into the model's full input ids (special tokens included) and one attention factor per position.
* `controlled_softmax` is the attention definition itself: the model's pre-softmax logits s[q, k], the keys A_q each
  query may attend and the per-key factors f_k give the attention weights.
* `controlled_attention` is a context manager that, for one loaded model, routes every attention layer's
  score -> softmax step through `controlled_softmax` (BERT, DistilBERT, Qwen3, and the vision tower of a CLIP dual
  encoder) and removes itself on exit.
* `reference_embedding`, `reference_hidden_states` and `reference_attention_weights` run one prompt through the
  sentence-transformers pipeline (or its underlying transformer) under those controls.
* `image_factors` turns an image item (the Aleph Alpha `Image` with its `ImageControl`s) into one factor per token of
  the vision tower (class token, then the patches), from the share of each patch that each control's rectangle covers
  as the model sees the image; `reference_image_embedding`, `reference_image_hidden_states` and
  `reference_image_attention_weights` run that image through the pipeline under those controls.

Only `export.source_model.default_model_path()` is used from the project, to find the packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Name under which the controlled attention function is registered while a control context is open. Qwen3Attention
# and CLIPAttention look their attention function up by config._attn_implementation on every forward, so pointing the
# config at this name is how the controlled attention reaches them without touching the model's code.
_ATTENTION_NAME = "atman_reference"


# --------------------------------------------------------------------------------------------------------------------
# Loading (cached per directory)
# --------------------------------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (the only use of the export package, to locate the files)."""
    from export.source_model import default_model_path

    return Path(default_model_path())


@functools.cache
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@functools.cache
def _model(model_dir: str):
    """The sentence-transformers model in float64 with eager attention (the implementation whose modules are patched)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu", model_kwargs={"attn_implementation": "eager"})
    return model.double().eval()


def _key(model_dir) -> str:
    return str(Path(model_dir).resolve())


# --------------------------------------------------------------------------------------------------------------------
# Token positions and factors
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """A run of content positions: their ids, and for text their char offsets into `text` (None for token ids)."""

    ids: list[int]
    offsets: list[tuple[int, int]] | None


def _tokenize(tokenizer, text: str) -> _Piece:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _Piece(list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]])


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] / [SEP] for BERT, a trailing
    <|endoftext|> for the Qwen3 tiny model), found by comparing its output with and without special tokens."""
    probe = "hello world"
    framed = list(tokenizer(probe)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    starts = [i for i in range(len(framed) - len(bare) + 1) if framed[i : i + len(bare)] == bare]
    if len(starts) != 1:
        raise ValueError(f"cannot locate the content inside the tokenizer's special tokens: {framed} vs {bare}")
    return framed[: starts[0]], framed[starts[0] + len(bare) :]


def _text_positions(offsets: list[tuple[int, int]], start: int, length: int, overlap: str) -> list[int]:
    """Indices of the tokens a character span [start, start + length) controls."""
    end = start + length
    if overlap == "partial":
        # Any overlap of the token's [a, b) with the span.
        return [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if overlap == "complete":
        # The token lies entirely inside the span.
        return [i for i, (a, b) in enumerate(offsets) if start <= a and b <= end]
    raise ValueError(f"token_overlap must be 'partial' or 'complete', not {overlap!r}")


def _content(tokenizer, items: list[dict], prefix: str) -> tuple[list[int], list[tuple[list[int], float]]]:
    """Content ids (prefix and items, no special tokens) and each control as (its explicit content positions, factor)."""
    controls: list[tuple[list[int], float]] = []
    if len(items) == 1 and items[0]["type"] == "text":
        # A single text item is tokenized together with the prefix, as one string: the spans refer to the item's
        # own text, so they move right by the prefix's length.
        item = items[0]
        piece = _tokenize(tokenizer, prefix + item["data"])
        for control in item.get("controls") or []:
            positions = _text_positions(
                piece.offsets, len(prefix) + control["start"], control["length"], control.get("token_overlap", "partial")
            )
            controls.append((positions, float(control["factor"])))
        return piece.ids, controls

    # Otherwise every part is tokenized (or taken) on its own and the parts are concatenated; a control's positions are
    # those within its item, moved by the number of content positions before the item.
    ids: list[int] = []
    if prefix:
        ids += _tokenize(tokenizer, prefix).ids
    for item in items:
        base = len(ids)
        if item["type"] == "text":
            piece = _tokenize(tokenizer, item["data"])
            for control in item.get("controls") or []:
                positions = _text_positions(
                    piece.offsets, control["start"], control["length"], control.get("token_overlap", "partial")
                )
                controls.append(([base + p for p in positions], float(control["factor"])))
        elif item["type"] == "token_ids":
            piece = _Piece([int(i) for i in item["data"]], None)
            for control in item.get("controls") or []:
                index = int(control["index"])
                if not 0 <= index < len(piece.ids):
                    raise ValueError(f"control index {index} is outside a token_ids item of {len(piece.ids)} tokens")
                controls.append(([base + index], float(control["factor"])))
        else:
            raise ValueError(f"unsupported item type {item['type']!r}")
        ids += piece.ids
    return ids, controls


def _cosine_matrix(embeddings: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """cos(E[rows[i]], E[cols[j]]) in float64; a zero embedding has cosine 0 with everything (it has no direction)."""
    e = embeddings.detach().to(torch.float64)
    a, b = e[rows], e[cols]
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a @ b.T) / (na[:, None] * nb[None, :])
    return torch.nan_to_num(cos, nan=0.0, posinf=0.0, neginf=0.0)


def _resolve(model_dir: str, items: list[dict], prefix: str, threshold: float | None) -> tuple[list[int], list[float], int]:
    tokenizer = _tokenizer(model_dir)
    content, controls = _content(tokenizer, items, prefix)
    n = len(content)

    # Which controls apply to which content position. A control applies at most once to a position, whether it
    # reaches it explicitly, contextually, or both, so membership is a set per control.
    applies = [set(positions) for positions, _ in controls]
    if threshold is not None and n:
        embeddings = _model(model_dir)[0].auto_model.get_input_embeddings().weight
        for reached, (positions, _) in zip(applies, controls):
            if not positions:
                continue  # no explicit position, so nothing for a position to be similar to
            # max over the control's explicit positions of the cosine between layer-0 token embeddings.
            similarity = _cosine_matrix(embeddings, content, [content[p] for p in positions]).max(dim=1).values
            reached.update(j for j in range(n) if similarity[j].item() >= threshold)

    factors = [1.0] * n
    for reached, (_, factor) in zip(applies, controls):
        for j in reached:
            factors[j] *= factor  # several controls on one position: the product of their factors

    head, tail = special_frame(tokenizer)
    # Special tokens frame the content and are never controlled.
    return head + content + tail, [1.0] * len(head) + factors + [1.0] * len(tail), len(head)


def content_and_factors(
    model_dir, items: list[dict], prefix: str = "", threshold: float | None = None
) -> tuple[list[int], list[float]]:
    """The full input ids (special tokens included) and the attention factor of every position."""
    ids, factors, _ = _resolve(_key(model_dir), items, prefix, threshold)
    return ids, factors


# --------------------------------------------------------------------------------------------------------------------
# The attention definition
# --------------------------------------------------------------------------------------------------------------------


def controlled_softmax(scores: torch.Tensor, allowed: torch.Tensor, factors: torch.Tensor, log_additive: bool) -> torch.Tensor:
    """Attention weights under controls.

    scores: [..., q, k] the model's own pre-softmax logits (after its scaling, before any mask);
    allowed: [q, k] bool, the keys A_q each query may attend; factors: [k] per-key factors.
    """
    factors = factors.to(dtype=scores.dtype, device=scores.device)
    if log_additive:
        if (factors < 0).any():
            raise ValueError("log-additive controls need factors >= 0 (log of a negative factor is undefined)")
        # s'[q, k] = s[q, k] + log(f_k); log(0) = -inf, so a factor 0 gives exactly weight 0 after the softmax.
        bias = torch.log(factors).expand(allowed.shape)
        # A row whose every attendable key has factor 0 would have no finite logit left: by definition it is then
        # left uncontrolled (s' = s).
        all_zero = ~((factors != 0) & allowed).any(dim=-1, keepdim=True)
        bias = torch.where(all_zero, torch.zeros_like(bias), bias)
        controlled = scores + bias
    else:
        # m_q = min over A_q of s[q, k]; s'[q, k] = (s[q, k] - m_q) * f_k. Keys outside A_q do not take part in the
        # minimum, hence the +inf fill.
        m = scores.masked_fill(~allowed, math.inf).amin(dim=-1, keepdim=True)
        controlled = (scores - m) * factors
    # Softmax over A_q only: keys outside it get weight 0.
    controlled = controlled.masked_fill(~allowed, -math.inf)
    return torch.softmax(controlled, dim=-1)


@dataclass
class _Active:
    factors: torch.Tensor  # [seq]
    log_additive: bool
    record: list | None  # attention weights per layer call, [heads, q, k], when asked for


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("atman_reference_controls", default=None)


def _attend(
    scores: torch.Tensor, value: torch.Tensor, causal: bool, model_allows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """weights @ V for scores [batch, heads, q, k] under the active controls. The batch is one unpadded prompt, so A_q
    is every key (k <= q for a decoder); `model_allows` ([q, k] or None), what the model's own mask lets through, must
    agree, which guards that assumption."""
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError("controlled attention ran outside controlled_attention()")
    batch, _, q_len, k_len = scores.shape
    if batch != 1 or q_len != k_len or k_len != active.factors.numel():
        raise ValueError(f"expected one prompt of {active.factors.numel()} tokens, got scores {tuple(scores.shape)}")
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device)
    if causal:
        allowed = torch.tril(allowed)
    if model_allows is not None and not torch.equal(model_allows.expand(q_len, k_len), allowed):
        raise ValueError("the model's attention mask is not the one of a single unpadded prompt")
    weights = controlled_softmax(scores, allowed, active.factors, active.log_additive)
    if active.record is not None:
        active.record.append(weights[0].detach().cpu().numpy())
    return torch.matmul(weights, value), weights


def _bert_forward(
    self,
    hidden_states,
    attention_mask=None,
    head_mask=None,
    encoder_hidden_states=None,
    past_key_values=None,
    output_attentions=False,
    cache_position=None,
    **kwargs,
):
    """BertSelfAttention.forward for plain self-attention, with the softmax replaced by the controlled one."""
    if encoder_hidden_states is not None or head_mask is not None or self.position_embedding_type != "absolute":
        raise NotImplementedError("the reference covers BERT self-attention with absolute positions, no head mask")
    batch, seq, _ = hidden_states.shape

    def heads(x):
        return x.view(batch, -1, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    query, key, value = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
    # The model's logits: q . k, scaled by 1/sqrt(head size), as BertSelfAttention computes them.
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
    # BERT's extended mask is additive: 0 where attended, the dtype's minimum where masked.
    allows = None if attention_mask is None else (attention_mask[0, 0] == 0)
    context, weights = _attend(scores, value, causal=self.is_decoder, model_allows=allows)
    context = context.permute(0, 2, 1, 3).contiguous().view(batch, seq, self.all_head_size)
    return context, weights


def _distilbert_forward(self, query, key, value, mask, head_mask=None, output_attentions=False):
    """DistilBERT's MultiHeadSelfAttention.forward with the softmax replaced by the controlled one."""
    if head_mask is not None:
        raise NotImplementedError("the reference covers DistilBERT attention without a head mask")
    batch = query.shape[0]
    per_head = self.dim // self.n_heads

    def heads(x):
        return x.view(batch, -1, self.n_heads, per_head).transpose(1, 2)

    q, k, v = heads(self.q_lin(query)), heads(self.k_lin(key)), heads(self.v_lin(value))
    # DistilBERT scales the queries before the product; same logits as the model's own.
    scores = torch.matmul(q / math.sqrt(per_head), k.transpose(2, 3))
    allows = None if mask is None else (mask[0] != 0)[None, :]  # 2D padding mask, 1 = attend
    context, weights = _attend(scores, v, causal=False, model_allows=allows)
    context = self.out_lin(context.transpose(1, 2).contiguous().view(batch, -1, self.n_heads * per_head))
    return (context, weights) if output_attentions else (context,)


def _attention_function(module, query, key, value, attention_mask, scaling, dropout=0.0, sliding_window=None, **kwargs):
    """An attention function in transformers' ALL_ATTENTION_FUNCTIONS form (the eager_attention_forward of Qwen3 and of
    CLIP), with the softmax replaced by the controlled one and computed in the model's dtype (float64 here)."""
    if sliding_window is not None:
        raise NotImplementedError("the reference covers full attention, not a sliding window")
    # Grouped-query attention (Qwen3): each key/value head serves num_key_value_groups query heads. CLIP has one
    # key/value head per query head.
    groups = getattr(module, "num_key_value_groups", 1)
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    allows = None if attention_mask is None else (attention_mask[0, 0] == 0)
    context, weights = _attend(scores, value, causal=getattr(module, "is_causal", True), model_allows=allows)
    return context.transpose(1, 2).contiguous(), weights


def _attention_classes() -> tuple[type, ...]:
    from transformers.models.bert.modeling_bert import BertSelfAttention
    from transformers.models.clip.modeling_clip import CLIPAttention
    from transformers.models.distilbert.modeling_distilbert import MultiHeadSelfAttention
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    return BertSelfAttention, MultiHeadSelfAttention, Qwen3Attention, CLIPAttention


def _controlled_part(hf_model):
    """The modules the controls reach: of a CLIP dual encoder its vision tower only (what is controlled there is an
    image prompt; its text tower stays as it is), of any other model all of it."""
    from transformers import CLIPModel

    return hf_model.vision_model if isinstance(hf_model, CLIPModel) else hf_model


@contextlib.contextmanager
def controlled_attention(st_model, factors, log_additive: bool, record: list | None = None):
    """Within the block, every attention layer of `st_model` (of a CLIP dual encoder: of its vision tower) applies
    `factors` (one per position) in the given mode; attention weights are appended to `record` ([heads, q, k] per
    layer) when it is a list. Everything is restored on exit, also on an exception."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    BertSelfAttention, MultiHeadSelfAttention, Qwen3Attention, CLIPAttention = _attention_classes()
    hf_model = st_model[0].auto_model
    patched, function_configs = [], []
    for module in _controlled_part(hf_model).modules():
        if isinstance(module, BertSelfAttention):
            patched.append(module)
            module.forward = _bert_forward.__get__(module)  # instance attribute: this model only, removed on exit
        elif isinstance(module, MultiHeadSelfAttention):
            patched.append(module)
            module.forward = _distilbert_forward.__get__(module)
        elif isinstance(module, (Qwen3Attention, CLIPAttention)):
            patched.append(module)
            if all(c is not module.config for c in function_configs):
                function_configs.append(module.config)
    if not patched:
        raise NotImplementedError(f"no supported attention module in {type(hf_model).__name__}")
    previous = [c._attn_implementation for c in function_configs]
    token = _ACTIVE.set(_Active(torch.as_tensor(factors, dtype=torch.float64), log_additive, record))
    try:
        if function_configs:
            ALL_ATTENTION_FUNCTIONS[_ATTENTION_NAME] = _attention_function
            for config in function_configs:
                # Set the stored value directly: the public setter validates names against the built-in ones.
                config._attn_implementation_internal = _ATTENTION_NAME
        yield
    finally:
        _ACTIVE.reset(token)
        for config, name in zip(function_configs, previous):
            config._attn_implementation_internal = name
        if function_configs:
            del ALL_ATTENTION_FUNCTIONS[_ATTENTION_NAME]
        for module in patched:
            module.__dict__.pop("forward", None)


def is_patched(st_model) -> bool:
    """Whether any part of the controlled attention is still installed on `st_model` (it must never be after a call)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = [m for m in st_model[0].auto_model.modules() if isinstance(m, _attention_classes())]
    return (
        _ATTENTION_NAME in ALL_ATTENTION_FUNCTIONS
        or any("forward" in m.__dict__ for m in attention)
        or any(getattr(m, "config", None) is not None and m.config._attn_implementation == _ATTENTION_NAME for m in attention)
    )


# --------------------------------------------------------------------------------------------------------------------
# Running a prompt
# --------------------------------------------------------------------------------------------------------------------


def _features(model_dir: str, ids: list[int]) -> dict[str, torch.Tensor]:
    """The features sentence-transformers' tokenization would give for these ids: the same keys as the tokenizer
    returns, one unpadded row (attention mask all ones, token types all zero for a single sequence)."""
    keys = set(_tokenizer(model_dir)("hello").keys())
    input_ids = torch.tensor([ids], dtype=torch.long)
    features = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if "token_type_ids" in keys:
        features["token_type_ids"] = torch.zeros_like(input_ids)
    return features


def _run(model_dir, items, prefix, threshold, log_additive, what: str):
    model_dir = _key(model_dir)
    ids, factors, _ = _resolve(model_dir, items, prefix, threshold)
    model = _model(model_dir)
    features = _features(model_dir, ids)
    record: list | None = [] if what == "weights" else None
    with torch.inference_mode(), controlled_attention(model, factors, log_additive, record):
        if what == "embedding":
            # The whole module pipeline: Transformer, Pooling, any Dense, Normalize.
            return model(features)["sentence_embedding"][0].numpy()
        transformer = model[0]
        inputs = {k: v for k, v in features.items() if k in transformer.model_forward_params}
        output = transformer.auto_model(**inputs, output_hidden_states=True, return_dict=True)
        if what == "hidden":
            return torch.stack([h[0] for h in output.hidden_states]).numpy()
    return record


def reference_embedding(
    model_dir, items: list[dict], prefix: str = "", threshold: float | None = None, log_additive: bool = True
) -> np.ndarray:
    """The sentence-transformers vector of one prompt under attention controls, in float64."""
    return _run(model_dir, items, prefix, threshold, log_additive, "embedding")


def reference_hidden_states(
    model_dir, items: list[dict], prefix: str = "", threshold: float | None = None, log_additive: bool = True
) -> np.ndarray:
    """The underlying transformer's hidden states [num_layers + 1, seq, hidden] (embedding output first), as
    transformers returns them with output_hidden_states=True, under attention controls, in float64."""
    return _run(model_dir, items, prefix, threshold, log_additive, "hidden")


def reference_attention_weights(
    model_dir, items: list[dict], prefix: str = "", threshold: float | None = None, log_additive: bool = True
) -> list[np.ndarray]:
    """The attention weights [heads, seq, seq] of every layer, in order, under attention controls."""
    return _run(model_dir, items, prefix, threshold, log_additive, "weights")


def text(data: str, *controls: dict) -> dict:
    """A text item (a convenience for tests)."""
    return {"type": "text", "data": data, "controls": list(controls)}


# --------------------------------------------------------------------------------------------------------------------
# Images: the vision tower of a CLIP-style dual encoder
# --------------------------------------------------------------------------------------------------------------------

# A patch whose covered share is below this is not reached by a `complete` control: a share that small is float32
# rounding of the resampled coverage plane, not coverage.
_NOISE = 1e-6
# The product of several factors on one patch is capped here, so that it stays a finite float.
_FACTOR_CAP = 1e30


def image(data: bytes, *controls: dict, x: int | None = None, y: int | None = None, size: int | None = None) -> dict:
    """An image item as the Aleph Alpha client sends it: the file base64-encoded, an optional square crop (x, y, size)
    and its controls."""
    return {
        "type": "image",
        "data": base64.b64encode(data).decode("ascii"),
        "x": x,
        "y": y,
        "size": size,
        "controls": list(controls),
    }


def image_control(left, top, width, height, factor, token_overlap=None) -> dict:
    """A control of an image item: a rectangle in logical coordinates ([0, 1] of the whole upright image) and its
    factor; token_overlap is left out when None (the default, partial)."""
    control = {"rect": {"left": left, "top": top, "width": width, "height": height}, "factor": factor}
    if token_overlap is not None:
        control["token_overlap"] = token_overlap
    return control


def _upright(item: dict) -> Image.Image:
    """The item's image as the definition decodes it: the first frame, turned upright by its EXIF orientation, in RGB."""
    with Image.open(io.BytesIO(base64.b64decode(item["data"]))) as file:
        file.seek(0)  # the first frame of an animated GIF or WebP
        return ImageOps.exif_transpose(file).convert("RGB")


def _crop_box(item: dict) -> tuple[int, int, int, int] | None:
    """The square (x, y, x + size, y + size) of the upright image that the item keeps, or None for all of it."""
    cut = (item.get("x"), item.get("y"), item.get("size"))
    if cut == (None, None, None):
        return None
    if None in cut:
        raise ValueError(f"x, y and size crop together, all three or none: got {cut}")
    x, y, size = (int(v) for v in cut)
    if size < 1:
        raise ValueError(f"a crop of size {size}")
    return x, y, x + size, y + size


def _resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after CLIP's resize: the shortest edge to `shortest_edge`, the long edge
    int(shortest_edge * long / short), as transformers' get_resize_output_image_size computes it."""
    short, long = min(width, height), max(width, height)
    resized_long = int(shortest_edge * long / short)
    return (shortest_edge, resized_long) if width <= height else (resized_long, shortest_edge)


def _coverage(width: int, height: int, rect: dict) -> np.ndarray:
    """[height, width]: the share of each pixel of the upright image that the rectangle covers. Per axis the exact
    length of [i, i + 1) inside [start, end), clip(min(i + 1, end) - max(i, start), 0, 1); the product of both axes is
    the area share, so the rectangle's edges are anti-aliased rather than rounded to whole pixels."""

    def axis(n: int, start: float, length: float) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        return np.clip(np.minimum(i + 1, (start + length) * n) - np.maximum(i, start * n), 0, 1)

    return np.outer(axis(height, rect["top"], rect["height"]), axis(width, rect["left"], rect["width"]))


def _area_weights(n: int, m: int) -> np.ndarray:
    """[m, n]: resizing an axis of n pixels to m, the share of resized pixel i ([i, i + 1) * n / m in source pixels)
    that source pixel j ([j, j + 1)) covers; rows sum to 1. (PIL's BOX filter is not this: it weighs alike the source
    pixels whose centres fall inside the resized pixel, so at a scale that is not whole it misses the area of a
    rectangle's edge by up to a source pixel.)"""
    scale = n / m
    starts = np.arange(m, dtype=np.float64)[:, None] * scale
    j = np.arange(n, dtype=np.float64)[None, :]
    return np.clip(np.minimum(starts + scale, j + 1) - np.maximum(starts, j), 0, None) / scale


def _as_seen(coverage: np.ndarray, box: tuple[int, int, int, int] | None, st_model) -> np.ndarray:
    """A coverage plane of the upright image taken through the item's crop and the processor's geometry (CLIP: resize
    of the shortest edge, then center crop), area-averaged: [crop height, crop width], what each pixel the model sees
    holds of the rectangle."""
    processor = st_model[0].processor.image_processor  # the CLIPProcessor's, which encode() uses
    if not (processor.do_resize and processor.do_center_crop and "shortest_edge" in processor.size):
        raise NotImplementedError("the reference covers CLIP's geometry: resize of the shortest edge, then center crop")
    plane = Image.fromarray(coverage.astype(np.float32))  # mode "F"
    if box is not None:
        plane = plane.crop(box)  # PIL fills what lies outside the image with 0, as it does for the image itself
    # The exact area average of the plane over each resized pixel: the share of that pixel the rectangle covers.
    new_width, new_height = _resized_size(*plane.size, processor.size["shortest_edge"])
    source = np.asarray(plane, dtype=np.float64)
    values = _area_weights(source.shape[0], new_height) @ source @ _area_weights(source.shape[1], new_width).T
    height, width = processor.crop_size["height"], processor.crop_size["width"]
    if height > values.shape[0] or width > values.shape[1]:
        raise NotImplementedError("the reference covers a center crop inside the resized image")
    # transformers' center_crop: offsets (size - crop) // 2.
    top, left = (values.shape[0] - height) // 2, (values.shape[1] - width) // 2
    return values[top : top + height, left : left + width]


def _image_factors(st_model, upright: Image.Image, box, controls: list[dict]) -> np.ndarray:
    """One factor per vision token for the controls of an image whose upright form is `upright`, cut to `box`."""
    config = st_model[0].auto_model.config.vision_config
    grid, patch = config.image_size // config.patch_size, config.patch_size
    factors = np.ones(grid * grid, dtype=np.float64)
    for control in controls:
        seen = _as_seen(_coverage(*upright.size, control["rect"]), box, st_model)
        if seen.shape != (grid * patch, grid * patch):
            raise ValueError(f"the processor gives {seen.shape} pixels, the vision tower takes {config.image_size}")
        # The covered share of each patch, in the row-major order of CLIPVisionEmbeddings' patch sequence.
        # Clipped: the sums of the area average can pass 1 (or 0) by a rounding step, and a fully covered patch under
        # a factor 0 would then get a factor of -1e-15.
        fraction = np.clip(seen.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1), 0.0, 1.0)
        factor = float(control["factor"])
        overlap = control.get("token_overlap", "partial")
        if overlap == "partial":
            # In proportion to the share covered: half a patch under a factor 2 gets 1.5.
            factors *= 1 + (factor - 1) * fraction
        elif overlap == "complete":
            # The full factor wherever the rectangle reaches the patch at all.
            factors *= np.where(fraction >= _NOISE, factor, 1.0)
        else:
            raise ValueError(f"token_overlap must be 'partial' or 'complete', not {overlap!r}")
    # The class token is never controlled.
    return np.concatenate([[1.0], np.minimum(factors, _FACTOR_CAP)])


def image_factors(model_dir, item: dict) -> np.ndarray:
    """The attention factor of every token of the vision tower, [1 + patches] in float64, class token first."""
    return _image_factors(_model(_key(model_dir)), _upright(item), _crop_box(item), item.get("controls") or [])


def _run_image(model_dir, item: dict, log_additive: bool, what: str):
    model = _model(_key(model_dir))
    upright, box = _upright(item), _crop_box(item)
    factors = _image_factors(model, upright, box, item.get("controls") or [])
    # The model's own processor makes the pixel values, from the image as the item keeps it.
    features = model[0].preprocess([upright if box is None else upright.crop(box)])
    features["pixel_values"] = features["pixel_values"].to(torch.float64)
    record: list | None = [] if what == "weights" else None
    with torch.inference_mode(), controlled_attention(model, factors, log_additive, record):
        if what == "embedding":
            # The whole module pipeline: get_image_features, then any module after it (Normalize).
            return model(features)["sentence_embedding"][0].numpy()
        output = model[0].auto_model.vision_model(pixel_values=features["pixel_values"], output_hidden_states=True)
        if what == "hidden":
            return torch.stack([h[0] for h in output.hidden_states]).numpy()
    return record


def reference_image_embedding(model_dir, item: dict, log_additive: bool = True) -> np.ndarray:
    """The sentence-transformers vector of one image item under its controls, in float64."""
    return _run_image(model_dir, item, log_additive, "embedding")


def reference_image_hidden_states(model_dir, item: dict, log_additive: bool = True) -> np.ndarray:
    """The vision tower's hidden states [num_layers + 1, 1 + patches, hidden] (embedding output first), as
    transformers returns them with output_hidden_states=True, under the item's controls, in float64."""
    return _run_image(model_dir, item, log_additive, "hidden")


def reference_image_attention_weights(model_dir, item: dict, log_additive: bool = True) -> list[np.ndarray]:
    """The vision tower's attention weights [heads, tokens, tokens] of every layer, in order, under the item's
    controls."""
    return _run_image(model_dir, item, log_additive, "weights")
