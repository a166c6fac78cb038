"""Checkpoint importers: PyTorch state dicts (as NumPy arrays) -> flax variables (METHODS.md
section 5, checkpoint interoperability).

Every importer is strict: it walks the abstract variables of the target model
(`jax.eval_shape` of its init), fills each leaf from exactly one state-dict key, checks shapes,
and raises ValueError listing any leaf left unfilled or any key left unconsumed. A silent partial
load would train from a half-random tower without any sign, so it is never allowed.

Layout rules: Linear `weight [out, in]` -> `kernel [in, out]`; conv `OIHW` -> `HWIO`;
LayerNorm / BatchNorm `weight, bias` -> `scale, bias`; BN `running_mean, running_var` ->
`batch_stats/.../mean, var`; Embedding `weight` -> `embedding`.

The importers need only NumPy (no torch): pass `{k: v.numpy() for k, v in sd.items()}` or arrays
read from safetensors. Returned variables are float32 NumPy arrays in nested dicts.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from retina_jax.models.bert import BertConfig, BertModel
from retina_jax.models.resnet import ResNet

# Keys that carry no learnable state and are dropped on purpose.
_BERT_IGNORED = ("embeddings.position_ids",)  # HF buffer (arange), recomputed in BertModel
_RESNET_IGNORED_SUFFIX = ".num_batches_tracked"  # only used by torch's momentum=None mode


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _to_torch_module_name(name: str) -> str:
    # flax submodule names that stand for torch ModuleList / Sequential indices.
    name = re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", name)  # resnet layer1_0 -> layer1.0
    name = re.sub(r"^(downsample)_(\d+)$", r"\1.\2", name)  # downsample_0 -> downsample.0
    name = re.sub(r"^layer_(\d+)$", r"layer.\1", name)  # bert encoder layer_3 -> layer.3
    return name


def _transform(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 2:  # Linear [out, in] -> [in, out]
            return value.T
        if value.ndim == 4:  # conv OIHW -> HWIO
            return value.transpose(2, 3, 1, 0)
    return value


_LEAF_TO_TORCH = {"kernel": ("weight",), "bias": ("bias",), "embedding": ("weight",),
                  "mean": ("running_mean",), "var": ("running_var",),
                  # old TF-ported BERT checkpoints name LayerNorm params gamma / beta
                  "scale": ("weight", "gamma")}
_BIAS_ALIASES = ("bias", "beta")


def _fill(abstract: Mapping, state: dict[str, np.ndarray], what: str) -> tuple[dict, list[str]]:
    """Fills the abstract collections from `state` (consumed keys are popped).

    Returns (variables, errors) where errors lists missing keys and shape mismatches.
    """
    variables, errors = {}, []
    for collection, tree in abstract.items():
        flat_out = {}
        for path, leaf in _flatten(tree).items():
            module = ".".join(_to_torch_module_name(p) for p in path[:-1])
            names = _LEAF_TO_TORCH.get(path[-1], (path[-1],))
            if path[-1] == "bias" and "LayerNorm" in path:
                names = _BIAS_ALIASES
            candidates = [f"{module}.{n}" for n in names]
            key = next((c for c in candidates if c in state), None)
            if key is None:
                errors.append(f"missing {candidates[0]} (for {collection}/{'/'.join(path)})")
                continue
            value = _transform(path[-1], np.asarray(state.pop(key), dtype=np.float32))
            if value.shape != tuple(leaf.shape):
                errors.append(f"shape of {key}: checkpoint {value.shape} (after layout change) vs "
                              f"{what} {tuple(leaf.shape)} at {collection}/{'/'.join(path)}")
                continue
            flat_out[path] = value.astype(leaf.dtype)
        variables[collection] = _unflatten(flat_out)
    return variables, errors


def _check(errors: list[str], leftover: Iterable[str], what: str) -> None:
    leftover = sorted(leftover)
    if errors or leftover:
        lines = list(errors) + [f"unexpected key {k}" for k in leftover]
        raise ValueError(f"{what} import failed ({len(errors)} missing/mismatched, "
                         f"{len(leftover)} unexpected):\n  " + "\n  ".join(lines))


def _as_numpy_dict(state_dict: Mapping[str, object]) -> dict[str, object]:
    return {str(k): v for k, v in state_dict.items()}


def bert_from_hf_state_dict(state_dict: Mapping[str, np.ndarray], config: BertConfig,
                            ignore_prefixes: tuple[str, ...] = ()) -> dict:
    """HF `BertModel` state dict -> {'params': ...} for `bert.BertModel` / `bert.TextEncoder`.

    Keys may carry a 'bert.' prefix (BertForMaskedLM / BertForPreTraining checkpoints). Heads such
    as 'cls.*' are NOT silently dropped: pass `ignore_prefixes=('cls.',)` to drop them explicitly.
    """
    state = {}
    for k, v in _as_numpy_dict(state_dict).items():
        if any(k.startswith(p) for p in ignore_prefixes):
            continue
        k = k[len("bert."):] if k.startswith("bert.") else k
        if k in _BERT_IGNORED:
            continue
        state[k] = v
    model = BertModel(config)
    ids = jnp.zeros((1, 2), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)))
    variables, errors = _fill(abstract, state, "BertModel")
    _check(errors, state, "BERT")
    return variables


def resnet_from_torchvision_state_dict(state_dict: Mapping[str, np.ndarray], model: ResNet,
                                       ignore_prefixes: tuple[str, ...] = ()) -> dict:
    """torchvision ResNet state dict -> {'params': ..., 'batch_stats': ...} for `resnet.ResNet`.

    `fc.*` (the ImageNet classifier, absent from our trunk) and `*.num_batches_tracked` are dropped.
    """
    state = {}
    for k, v in _as_numpy_dict(state_dict).items():
        if k.startswith("fc.") or k.endswith(_RESNET_IGNORED_SUFFIX):
            continue
        if any(k.startswith(p) for p in ignore_prefixes):
            continue
        state[k] = v
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    variables, errors = _fill(abstract, state, "ResNet")
    _check(errors, state, "ResNet")
    return variables
