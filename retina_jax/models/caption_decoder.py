"""KeepFIT V2's generative knowledge injection (docs/methods.md, "KeepFIT V2"): a CoCa-style caption decoder,
its loss and greedy / beam-search generation.

`CaptionDecoder`: token embedding + learned positions, `layers` pre-LN blocks of causal
self-attention, cross-attention to the image tower's spatial tokens (the 7x7x2048 map of a
ResNet-50 at 224, flattened, projected to `width` and normalised) and an MLP, then a LayerNorm and
the vocabulary projection (float32 logits). It reads the text tower's tokenizer ids: the input is
`[CLS] w1 .. wn` and the target the same sequence shifted by one, ending in [SEP] (the end token).

Generation works on any `log_probs(tokens [N, L], t) -> [N, V]` (the next-token distribution after
position t-1), recomputing the prefix each step: captions are short and the decoder small, so a
key/value cache is not worth its complexity here.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retina_jax.models import maybe_remat


class DecoderBlock(nn.Module):
    width: int
    heads: int
    mlp_dim: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, memory, causal_mask, deterministic: bool):
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)  # noqa: E731
        attention = lambda name: nn.MultiHeadDotProductAttention(  # noqa: E731
            num_heads=self.heads, dtype=self.dtype, dropout_rate=self.dropout, deterministic=deterministic, name=name)
        h = nn.LayerNorm(dtype=self.dtype, name="ln_self")(x)
        x = x + drop(attention("self_attn")(h, h, mask=causal_mask))
        h = nn.LayerNorm(dtype=self.dtype, name="ln_cross")(x)
        x = x + drop(attention("cross_attn")(h, memory))
        h = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(h)
        h = nn.Dense(self.width, dtype=self.dtype, name="mlp_out")(jax.nn.gelu(h))
        return x + drop(h)


class CaptionDecoder(nn.Module):
    vocab_size: int
    max_len: int
    width: int = 512
    layers: int = 3
    heads: int = 8
    mlp_dim: int = 2048
    dropout: float = 0.1
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each block (models.maybe_remat)

    @nn.compact
    def __call__(self, tokens, image_tokens, deterministic: bool = True):
        """tokens [B, L] (L <= max_len), image_tokens [B, N, F] -> logits [B, L, vocab] float32."""
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the decoder's max_len {self.max_len}")
        memory = nn.Dense(self.width, dtype=self.dtype, name="memory_proj")(image_tokens.astype(self.dtype))
        memory = nn.LayerNorm(dtype=self.dtype, name="memory_ln")(memory)
        x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embed")(tokens)
        positions = self.param("positions", nn.initializers.normal(0.02), (self.max_len, self.width), jnp.float32)
        x = x + positions[None, :tokens.shape[1]].astype(self.dtype)
        # Padding after the end token needs no key mask: causality already hides it from every real
        # position, and the loss ignores the padded positions themselves.
        causal = nn.make_causal_mask(tokens)  # [B, 1, L, L]
        block_cls = maybe_remat(DecoderBlock, self.remat, static_argnums=(4,))
        for i in range(self.layers):
            x = block_cls(self.width, self.heads, self.mlp_dim, self.dropout, self.dtype, name=f"block_{i}")(
                x, memory, causal, deterministic)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
        return nn.Dense(self.vocab_size, dtype=jnp.float32, name="logits")(x.astype(jnp.float32))


def shift_tokens(input_ids, attention_mask):
    """Teacher forcing: (decoder inputs, targets, target weights) from `[CLS] w1 .. wn [SEP] [PAD]..`."""
    return input_ids[:, :-1], input_ids[:, 1:], attention_mask[:, 1:]


LogProbs = Callable[[jax.Array, int], jax.Array]


def greedy_decode(log_probs: LogProbs, batch_size: int, max_len: int, bos_id: int, eos_id: int,
                  pad_id: int) -> np.ndarray:
    """[B, max_len] token ids: [CLS], then the argmax token until [SEP] (then padding)."""
    tokens = np.full((batch_size, max_len), pad_id, np.int32)
    tokens[:, 0] = bos_id
    done = np.zeros(batch_size, bool)
    for t in range(1, max_len):
        best = np.asarray(jnp.argmax(log_probs(jnp.asarray(tokens), t), axis=-1))
        tokens[:, t] = np.where(done, pad_id, best)
        done |= best == eos_id
        if done.all():
            break
    return tokens


def beam_search(log_probs: LogProbs, batch_size: int, max_len: int, bos_id: int, eos_id: int, pad_id: int,
                beam_size: int, length_penalty: float = 1.0) -> np.ndarray:
    """[B, max_len] token ids of the best of `beam_size` beams per row.

    Beams are ranked by summed log-probability during the search; a finished beam (it emitted
    [SEP]) keeps its score and extends only with padding. The final pick divides each beam's score
    by (generated length) ** length_penalty (Hugging Face's default form). `log_probs` is called
    on the B * beam_size rows, beam-major within each example (row b * K + k).
    """
    K = beam_size
    tokens = np.full((batch_size, K, max_len), pad_id, np.int32)
    tokens[:, :, 0] = bos_id
    scores = np.full((batch_size, K), -np.inf, np.float64)
    scores[:, 0] = 0.0  # identical beams at the start: only the first may expand
    done = np.zeros((batch_size, K), bool)
    lengths = np.ones((batch_size, K), np.int32)
    for t in range(1, max_len):
        lp = np.asarray(log_probs(jnp.asarray(tokens.reshape(batch_size * K, max_len)), t), np.float64)
        lp = lp.reshape(batch_size, K, -1)
        V = lp.shape[-1]
        # A finished beam has exactly one continuation, [PAD], at no cost.
        finished = np.full(V, -np.inf)
        finished[pad_id] = 0.0
        lp = np.where(done[..., None], finished, lp)
        total = (scores[..., None] + lp).reshape(batch_size, K * V)
        best = np.argsort(-total, axis=-1, kind="stable")[:, :K]  # [B, K]
        parent, token = best // V, best % V
        rows = np.arange(batch_size)[:, None]
        tokens = tokens[rows, parent]
        tokens[:, :, t] = token
        was_done = done[rows, parent]
        scores = total[rows, best]
        lengths = lengths[rows, parent] + (~was_done)
        done = was_done | (token == eos_id)
        if done.all():
            break
    normalised = scores / np.maximum(lengths - 1, 1) ** length_penalty
    pick = np.argmax(normalised, axis=-1)
    return tokens[np.arange(batch_size), pick]
