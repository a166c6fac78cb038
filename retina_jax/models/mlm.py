"""KeepFIT V2's stage `text` model (docs/methods.md, "KeepFIT V2"): the BERT text tower with a masked-LM head.

`MaskedLM` holds the tower under the param tree `txt`, the same tree (and names) as `TwoTower.txt`,
and the head under `mlm_head`, so stage `vl` carries the encoder over with
`config.model_init_trees=('txt',)` and drops the head, as the paper carries only the encoder.

The head is Hugging Face's `BertLMPredictionHead`: dense -> erf GELU -> LayerNorm, then the output
projection TIED to the word embeddings plus a per-token bias (`cls.predictions.*` in HF checkpoints).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retina_jax.models.bert import BertConfig, BertModel


class MlmHead(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, word_embeddings):
        c = self.config
        x = nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02),
                     name="transform_dense")(hidden)
        x = jax.nn.gelu(x, approximate=False)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="transform_LayerNorm")(x)
        bias = self.param("bias", nn.initializers.zeros, (c.vocab_size,), jnp.float32)
        # Logits in float32: the softmax over the vocabulary is where bf16 would lose the most.
        return jnp.einsum("blh,vh->blv", x.astype(jnp.float32), word_embeddings.astype(jnp.float32)) + bias


class MaskedLM(nn.Module):
    """Token ids [B, L] (some replaced by [MASK]) -> vocabulary logits [B, L, V]."""

    txt_config: BertConfig
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.txt = BertModel(self.txt_config, self.dtype, self.remat)
        self.mlm_head = MlmHead(self.txt_config, self.dtype)

    def __call__(self, input_ids, attention_mask, train: bool = False):
        hidden = self.txt(input_ids, attention_mask, deterministic=not train)["last_hidden_state"]
        embedding = self.txt.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
        return self.mlm_head(hidden, embedding)
