"""Attention controls (AtMan) traced into the encoder graph: a factor per key position and a mode per row.

Every eager attention of the families served here (BERT, DistilBERT, Qwen2/3) ends in
`torch.nn.functional.softmax(scores, dim=-1)` over [batch, heads, query, key] scores that already hold the
model's padding (and causal) mask. Rewriting those scores just before that softmax is therefore "every layer
and head, key side, before the softmax", for every family, without a copy of each architecture's attention.
The README's "Attention controls" section is the definition followed here.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# Masked positions hold about finfo.min in fp32 graphs and -65504 plus the score in fp16 ones (the conversion turns
# finfo.min into fp16's lowest); real attention scores stay within a few hundred of 0.
MASKED_BELOW = -5.0e3


def controlled_scores(scores: torch.Tensor, factors: torch.Tensor, log_additive: torch.Tensor) -> torch.Tensor:
    """scores [batch, heads, query, key] with the mask added; factors [batch, key]; log_additive [batch] bool."""
    allowed = scores > MASKED_BELOW
    factor = factors[:, None, None, :].to(scores.dtype)
    # log(factor) added; a factor of 0 masks the key like padding. A row with no key left stays as it was.
    kept = allowed & (factor > 0)
    masked = torch.full_like(scores, torch.finfo(scores.dtype).min)
    additive = torch.where(kept, scores + torch.log(factor.clamp_min(torch.finfo(scores.dtype).tiny)), masked)
    additive = torch.where(kept.any(dim=-1, keepdim=True), additive, scores)
    # The contract's other mode: shift each row so that its smallest real score is 0, then scale by the factor.
    row_min = torch.where(allowed, scores, torch.full_like(scores, torch.finfo(scores.dtype).max)).amin(dim=-1, keepdim=True)
    scaled = torch.where(allowed, (scores - row_min) * factor, scores)
    return torch.where(log_additive[:, None, None, None], additive, scaled)


@contextmanager
def attention_controls(factors: torch.Tensor, log_additive: torch.Tensor):
    """While active, every attention softmax of the model takes the controls; restored afterwards."""
    original = torch.nn.functional.softmax

    def softmax(scores, dim=None, _stacklevel=3, dtype=None):
        if scores.dim() == 4 and dim in (-1, 3) and scores.shape[-1] == factors.shape[-1]:
            scores = controlled_scores(scores, factors, log_additive)
        return original(scores, dim=dim, dtype=dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original
