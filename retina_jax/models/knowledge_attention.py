"""KeepFIT's knowledge attention, "image-similarity-guided text revision" (docs/methods.md, "KeepFIT").

`o = knowledge(q=img, k=kimg, v=ktxt)`: the public batch's image embeddings query the expert
batch's image embeddings, and the expert captions' embeddings are mixed accordingly; KeepFIT then
pulls the public text embeddings towards `o` (`L_rev`, losses in the KeepFIT work).

The original is d2l's `MultiHeadAttention` (4 bias-free Linear layers `W_q, W_k, W_v, W_o`,
heads = 2, head dim = D / 2, scores `q k^T / sqrt(head_dim)`, dropout 0.5 on the weights), called
with a batch of ONE sequence: scores are `[heads, B, Bk]`.

Quirk (switch `softmax_axis`, default 'heads' = faithful): the original normalises the scores over
the HEADS axis instead of over the keys, so each (query, key) weight is a softmax across the 2
heads and `o` grows with Bk. 'keys' is textbook attention: a different model.

Param names (`convert.keepfit_*` map the torch keys): `q/kernel` <- `attention.W_q.weight`,
`k`, `v`, `out` likewise (`W_k`, `W_v`, `W_o`), all [D, D] without bias.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

KNOWLEDGE_SOFTMAX_AXES = ("heads", "keys")


class KnowledgeAttention(nn.Module):
    heads: int = 2
    dropout: float = 0.5
    softmax_axis: str = "heads"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q, k, v, deterministic: bool = True, dropout_mask=None):
        """q [B, D], k [Bk, D], v [Bk, D] -> [B, D]. Dropout uses the 'dropout' rng, or, when given,
        the fixed keep-mask `dropout_mask` [heads, B, Bk] (inverted dropout: kept weights / (1 - p);
        for tests against a reference)."""
        if self.softmax_axis not in KNOWLEDGE_SOFTMAX_AXES:
            raise ValueError(f"knowledge softmax_axis {self.softmax_axis!r} not in {KNOWLEDGE_SOFTMAX_AXES}")
        dim = q.shape[-1]
        if dim % self.heads:
            raise ValueError(f"knowledge attention: embedding dim {dim} not divisible by {self.heads} heads")
        head_dim = dim // self.heads
        dense = lambda name: nn.Dense(dim, use_bias=False, dtype=self.dtype, name=name)
        # d2l transpose_qkv: [N, D] -> [heads, N, head_dim]
        split = lambda x: x.reshape(x.shape[0], self.heads, head_dim).transpose(1, 0, 2)
        qh, kh, vh = split(dense("q")(q)), split(dense("k")(k)), split(dense("v")(v))
        scores = jnp.einsum("hqd,hkd->hqk", qh, kh) / jnp.sqrt(head_dim).astype(self.dtype)  # [H, B, Bk]
        axis = 0 if self.softmax_axis == "heads" else -1
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=axis).astype(self.dtype)
        if dropout_mask is not None:
            weights = jnp.where(dropout_mask, weights / (1.0 - self.dropout), 0.0).astype(self.dtype)
        else:
            weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("hqk,hkd->hqd", weights, vh)  # [H, B, head_dim]
        out = out.transpose(1, 0, 2).reshape(q.shape[0], dim)  # d2l transpose_output: [B, D]
        return dense("out")(out)
