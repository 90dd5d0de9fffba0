"""Reference implementation of attention controls (AtMan), written from the definition and independent of the export.

The service is checked against these vectors, so this module follows the definition literally and in float64:

* `content_and_factors` turns a prompt (Aleph Alpha item dicts), a representation prefix and an optional contextual
  control threshold into the model's full input ids (special tokens included) and one attention factor per position.
* `controlled_softmax` is the attention definition itself: the model's pre-softmax logits s[q, k], the keys A_q each
  query may attend and the per-key factors f_k give the attention weights.
* `controlled_attention` is a context manager that, for one loaded model, routes every attention layer's
  score -> softmax step through `controlled_softmax` (BERT, DistilBERT, Qwen3) and removes itself on exit.
* `reference_embedding`, `reference_hidden_states` and `reference_attention_weights` run one prompt through the
  sentence-transformers pipeline (or its underlying transformer) under those controls.

Only `export.source_model.default_model_path()` is used from the project, to find the packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Name under which the Qwen3 attention function is registered while a control context is open. Qwen3Attention looks
# its attention function up by config._attn_implementation on every forward, so pointing the config at this name is
# how the controlled attention reaches a decoder without touching the model's code.
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


def _decoder_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, sliding_window=None, **kwargs):
    """An attention function in transformers' ALL_ATTENTION_FUNCTIONS form (Qwen3's eager_attention_forward), with
    the softmax replaced by the controlled one and computed in the model's dtype (float64 here)."""
    if sliding_window is not None:
        raise NotImplementedError("the reference covers full causal attention, not a sliding window")
    # Grouped-query attention: each key/value head serves num_key_value_groups query heads.
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    allows = None if attention_mask is None else (attention_mask[0, 0] == 0)
    context, weights = _attend(scores, value, causal=getattr(module, "is_causal", True), model_allows=allows)
    return context.transpose(1, 2).contiguous(), weights


def _attention_classes() -> tuple[type, ...]:
    from transformers.models.bert.modeling_bert import BertSelfAttention
    from transformers.models.distilbert.modeling_distilbert import MultiHeadSelfAttention
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    return BertSelfAttention, MultiHeadSelfAttention, Qwen3Attention


@contextlib.contextmanager
def controlled_attention(st_model, factors, log_additive: bool, record: list | None = None):
    """Within the block, every attention layer of `st_model` applies `factors` (one per position) in the given mode;
    attention weights are appended to `record` ([heads, q, k] per layer) when it is a list. Everything is restored on
    exit, also on an exception."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    BertSelfAttention, MultiHeadSelfAttention, Qwen3Attention = _attention_classes()
    hf_model = st_model[0].auto_model
    patched, decoder_configs = [], []
    for module in hf_model.modules():
        if isinstance(module, BertSelfAttention):
            patched.append(module)
            module.forward = _bert_forward.__get__(module)  # instance attribute: this model only, removed on exit
        elif isinstance(module, MultiHeadSelfAttention):
            patched.append(module)
            module.forward = _distilbert_forward.__get__(module)
        elif isinstance(module, Qwen3Attention):
            patched.append(module)
            if all(c is not module.config for c in decoder_configs):
                decoder_configs.append(module.config)
    if not patched:
        raise NotImplementedError(f"no supported attention module in {type(hf_model).__name__}")
    previous = [c._attn_implementation for c in decoder_configs]
    token = _ACTIVE.set(_Active(torch.as_tensor(factors, dtype=torch.float64), log_additive, record))
    try:
        if decoder_configs:
            ALL_ATTENTION_FUNCTIONS[_ATTENTION_NAME] = _decoder_attention
            for config in decoder_configs:
                # Set the stored value directly: the public setter validates names against the built-in ones.
                config._attn_implementation_internal = _ATTENTION_NAME
        yield
    finally:
        _ACTIVE.reset(token)
        for config, name in zip(decoder_configs, previous):
            config._attn_implementation_internal = name
        if decoder_configs:
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
