"""Hugging Face-layout BERT: the text tower of FLAIR/KeepFIT (docs/methods.md, "FLAIR") and ViLReF's
RoBERTa-wwm-ext text encoder ("ViLReF", BERT layout without pooler).

Post-LN Transformer encoder, erf GELU, LayerNorm eps from the config, additive attention mask
with the dtype's minimum on padded keys, exactly as `transformers.BertModel` (eager attention).
Parameter names follow the HF state dict (`encoder.layer.3.attention.self.query.weight` ->
`params/encoder/layer_3/attention/self/query/kernel`), so `convert.bert_from_hf_state_dict` is a
mechanical rename + transpose.

`pool_text` implements the text pooling switch of docs/methods.md, "FLAIR" ('flair' | 'cls' | 'masked_mean').
`TextEncoder` is a `BertModel` subclass that adds the pooling: its parameter tree is IDENTICAL to
`BertModel`'s (no extra 'bert' level), so converted HF weights load into either.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from retina_jax.models import maybe_remat
from retina_jax.models.dropout import Dropout

TEXT_POOLING_MODES = ("flair", "cls", "masked_mean")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters; field names match HF `config.json` (defaults: Bio_ClinicalBERT)."""

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    add_pooler: bool = True
    pad_token_id: int = 0
    # How dropout masks are drawn (not an HF field; retina_jax/models/dropout.py): 'packed' | 'flax'.
    dropout_draw: str = "packed"

    @classmethod
    def from_hf(cls, config_json: Mapping[str, Any] | str | os.PathLike) -> "BertConfig":
        """Builds from a HF config dict or a path to `config.json` (or its folder).

        Unknown keys are ignored. `hidden_act` must be erf GELU ('gelu'), the only one implemented.
        """
        if not isinstance(config_json, Mapping):
            path = os.fspath(config_json)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                config_json = json.load(f)
        act = config_json.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"hidden_act={act!r} not supported (only erf 'gelu')")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config_json.items() if k in names}
        return cls(**kwargs)


def bert_tiny_config(vocab_size: int, **kw) -> BertConfig:
    """2 layers, 128 hidden, 2 heads, 512 intermediate: CPU tests and demos."""
    kw = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 512, **kw}
    return BertConfig(vocab_size=vocab_size, **kw)


# HF `_init_weights`: normal(0, initializer_range=0.02) for Linear and Embedding, zero bias,
# LayerNorm scale 1 / bias 0 (flax defaults).
_init = nn.initializers.normal(stddev=0.02)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=_init, name=name)


def _layer_norm(config: BertConfig, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name=name)


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        c = self.config
        seq_len = input_ids.shape[1]
        embed = lambda n, name: nn.Embed(n, c.hidden_size, embedding_init=_init, dtype=self.dtype,
                                         name=name)
        x = embed(c.vocab_size, "word_embeddings")(input_ids)  # [B, L, H]
        # Absolute positions 0..L-1 (HF `position_ids` buffer), shared over the batch.
        x = x + embed(c.max_position_embeddings, "position_embeddings")(
            jnp.arange(seq_len)[None, :])  # [1, L, H]
        x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = _layer_norm(c, self.dtype, "LayerNorm")(x)
        return Dropout(c.hidden_dropout_prob, draw=c.dropout_draw)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool):
        c = self.config
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"hidden_size {c.hidden_size} not divisible by "
                             f"num_attention_heads {c.num_attention_heads}")
        head_dim = c.hidden_size // c.num_attention_heads
        split = lambda t: t.reshape(t.shape[:2] + (c.num_attention_heads, head_dim))
        q = split(_dense(c.hidden_size, self.dtype, "query")(x))  # [B, L, N, Dh]
        k = split(_dense(c.hidden_size, self.dtype, "key")(x))
        v = split(_dense(c.hidden_size, self.dtype, "value")(x))
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(head_dim).astype(self.dtype)
        scores = scores + mask_bias  # [B, N, Lq, Lk]; pad keys get the dtype's min
        # Softmax in float32 for stability under bf16 compute (identical in float32).
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = Dropout(c.attention_probs_dropout_prob, draw=c.dropout_draw)(probs, deterministic=deterministic)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v)  # [B, L, N, Dh]
        return out.reshape(out.shape[:2] + (c.hidden_size,))  # [B, L, H]


class BertResidualOutput(nn.Module):
    """HF BertSelfOutput / BertOutput: dense -> dropout -> LayerNorm(x + residual) (post-LN)."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        c = self.config
        x = _dense(c.hidden_size, self.dtype, "dense")(x)
        x = Dropout(c.hidden_dropout_prob, draw=c.dropout_draw)(x, deterministic=deterministic)
        return _layer_norm(c, self.dtype, "LayerNorm")(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool):
        a = BertSelfAttention(self.config, self.dtype, name="self")(x, mask_bias, deterministic)
        return BertResidualOutput(self.config, self.dtype, name="output")(a, x, deterministic)


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _dense(self.config.intermediate_size, self.dtype, "dense")(x)
        return jax.nn.gelu(x, approximate=False)  # HF 'gelu' is the exact erf form


class BertLayer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool):
        a = BertAttention(self.config, self.dtype, name="attention")(x, mask_bias, deterministic)
        h = BertIntermediate(self.config, self.dtype, name="intermediate")(a)
        return BertResidualOutput(self.config, self.dtype, name="output")(h, a, deterministic)


class BertEncoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each layer (models.maybe_remat)

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool):
        hidden_states = [x]
        layer_cls = maybe_remat(BertLayer, self.remat, static_argnums=(3,))
        for i in range(self.config.num_hidden_layers):
            x = layer_cls(self.config, self.dtype, name=f"layer_{i}")(x, mask_bias, deterministic)
            hidden_states.append(x)
        return tuple(hidden_states)


class BertPooler(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(_dense(self.config.hidden_size, self.dtype, "dense")(x[:, 0]))  # [B, H]


class BertModel(nn.Module):
    """`transformers.BertModel` with `output_hidden_states=True`.

    Returns {'hidden_states': (embeddings, layer 1, ..., layer N) each [B, L, H],
             'last_hidden_state': [B, L, H], 'pooler_output': [B, H] (only if config.add_pooler)}.
    Dropout uses the 'dropout' rng when `deterministic=False`.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.embeddings = BertEmbeddings(self.config, self.dtype)
        self.encoder = BertEncoder(self.config, self.dtype, self.remat)
        if self.config.add_pooler:
            self.pooler = BertPooler(self.config, self.dtype)

    def encode(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)  # [B, L, H]
        # HF extended attention mask: (1 - mask) * finfo(dtype).min added to every query row.
        keep = attention_mask[:, None, None, :].astype(self.dtype)  # [B, 1, 1, L]
        mask_bias = (1.0 - keep) * jnp.finfo(self.dtype).min
        hidden_states = self.encoder(x, mask_bias, deterministic)
        out = {"hidden_states": hidden_states, "last_hidden_state": hidden_states[-1]}
        if self.config.add_pooler:
            out["pooler_output"] = self.pooler(hidden_states[-1])
        return out

    def __call__(self, input_ids, attention_mask, token_type_ids=None,
                 deterministic: bool = True) -> dict:
        return self.encode(input_ids, attention_mask, token_type_ids, deterministic)


def pool_text(hidden_states: tuple, attention_mask, mode: str) -> jnp.ndarray:
    """Sentence feature [B, H] from BERT hidden states (docs/methods.md, "FLAIR": `model.txt.pooling`).

    'flair' (faithful default): FLAIR's `stack([hs[1], hs[2], hs[-1]]).mean(seq).mean(layers)`.
      FLAIR pads every batch to its longest prompt and averages over ALL positions, pads included,
      so a row's feature depends on the other rows' lengths. With fixed-length padding we
      reproduce it by averaging positions [0, L_b), L_b = max real length in the batch (a mask,
      not a slice, so it works under jit).
    'cls': last_hidden_state[:, 0].
    'masked_mean': mean of last_hidden_state over real tokens only.
    """
    if mode not in TEXT_POOLING_MODES:
        raise ValueError(f"unknown text pooling mode {mode!r}; allowed: {TEXT_POOLING_MODES}")
    last = hidden_states[-1]  # [B, L, H]
    if mode == "cls":
        return last[:, 0]
    mask = attention_mask.astype(jnp.float32)  # [B, L]
    if mode == "masked_mean":
        denom = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)  # [B, 1]
        return (last.astype(jnp.float32) * mask[..., None]).sum(axis=1) / denom
    # 'flair'
    if len(hidden_states) < 3:
        raise ValueError("'flair' pooling needs at least 2 encoder layers (hidden_states[1], [2])")
    seq_len = last.shape[1]
    batch_len = jnp.max(mask.sum(axis=1))  # L_b, scalar
    window = (jnp.arange(seq_len) < batch_len).astype(jnp.float32)  # [L], same for every row
    layers = jnp.stack([hidden_states[1], hidden_states[2], last]).astype(jnp.float32)  # [3,B,L,H]
    seq_mean = (layers * window[None, None, :, None]).sum(axis=2) / jnp.maximum(batch_len, 1.0)
    return seq_mean.mean(axis=0)  # [B, H]


class TextEncoder(BertModel):
    """BertModel + `pool_text`: token ids [B, L] -> sentence features [B, H].

    A subclass (not a wrapper) so the parameter tree is exactly `BertModel`'s: HF weights from
    `convert.bert_from_hf_state_dict` load directly. The pooler (if `config.add_pooler`) is still
    computed so the tree matches the checkpoint, but unused by the pooling modes.
    """

    pooling: str = "flair"

    def __call__(self, input_ids, attention_mask, deterministic: bool = True,
                 token_type_ids=None) -> jnp.ndarray:
        if self.pooling not in TEXT_POOLING_MODES:  # fail at build, not deep in a trace
            raise ValueError(f"unknown text pooling mode {self.pooling!r}; "
                             f"allowed: {TEXT_POOLING_MODES}")
        out = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        return pool_text(out["hidden_states"], attention_mask, self.pooling)  # [B, H]
