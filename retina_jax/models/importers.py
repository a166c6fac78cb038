"""Checkpoint importers: PyTorch state dicts (as NumPy arrays) -> flax variables (docs/methods.md,
"Checkpoint interoperability").

Two levels: tower importers (`bert_from_hf_state_dict`, `resnet_from_torchvision_state_dict`,
`vit_from_clip_state_dict`, `modified_resnet_from_clip_state_dict`) and whole-checkpoint importers
of the original methods (`import_flair` for FLAIR and KeepFIT, `import_vilref`, `import_openai_clip`,
`import_hf_bert`, `import_torchvision_resnet`), which infer the architecture from the shapes and
return a `Converted` (variables, the config values they need, keys left out on purpose).

Every importer is strict: it walks the abstract variables of the target model
(`jax.eval_shape` of its init), fills each leaf from exactly one state-dict key, checks shapes,
and raises ValueError listing any leaf left unfilled or any key left unconsumed. A silent partial
load would train from a half-random tower without any sign, so it is never allowed.

Layout rules: Linear `weight [out, in]` -> `kernel [in, out]`; conv `OIHW` -> `HWIO`;
LayerNorm / BatchNorm `weight, bias` -> `scale, bias`; BN `running_mean, running_var` ->
`batch_stats/.../mean, var`; Embedding `weight` -> `embedding`; torch MultiheadAttention's packed
`in_proj_weight [3w, w]` / `in_proj_bias [3w]` -> separate `query`, `key`, `value` Dense layers.

The importers need only NumPy (no torch): pass `{k: v.numpy() for k, v in sd.items()}` or arrays
read from safetensors. Returned variables are float32 NumPy arrays in nested dicts.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from retina_jax.models.bert import BertConfig, BertModel
from retina_jax.models.clip_resnet import ModifiedResNet
from retina_jax.models.resnet import _BOTTLENECK_DEPTHS, _STAGE_SIZES, ResNet
from retina_jax.models.vit import VisionTransformer, resample_positional_embedding

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
    # CLIP ViT: the flax module flattens CLIP's `Transformer` wrapper (resblocks_3 ->
    # transformer.resblocks.3)
    name = re.sub(r"^resblocks_(\d+)$", r"transformer.resblocks.\1", name)
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


def _fill(abstract: Mapping, state: dict[str, np.ndarray], what: str,
          describe: Callable[[str], str] = lambda key: key) -> tuple[dict, list[str]]:
    """Fills the abstract collections from `state` (consumed keys are popped).

    Returns (variables, errors) where errors lists missing keys and shape mismatches.
    `describe` maps a key of `state` to the checkpoint key it was derived from (for messages, when
    an importer has split or renamed keys before filling).
    """
    variables, errors = {}, []
    for collection, tree in abstract.items():
        flat_out = {}
        for path, leaf in _flatten(tree).items():
            module = ".".join(_to_torch_module_name(p) for p in path[:-1])
            names = _LEAF_TO_TORCH.get(path[-1], (path[-1],))
            if path[-1] == "bias" and "LayerNorm" in path:
                names = _BIAS_ALIASES
            candidates = [f"{module}.{n}" if module else n for n in names]  # top-level params
            key = next((c for c in candidates if c in state), None)
            if key is None:
                errors.append(f"missing {describe(candidates[0])} "
                              f"(for {collection}/{'/'.join(path)})")
                continue
            value = _transform(path[-1], np.asarray(state.pop(key), dtype=np.float32))
            if value.shape != tuple(leaf.shape):
                errors.append(f"shape of {describe(key)}: checkpoint {value.shape} "
                              f"(after layout change) vs "
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


# torch nn.MultiheadAttention packs q, k, v along the output dim: in_proj_weight [3w, w],
# in_proj_bias [3w]; Chinese-CLIP's flash-attention variant names the same packing attn.Wqkv.
_PACKED_QKV = re.compile(r"^(.*\.attn)\.(?:in_proj_|Wqkv\.)(weight|bias)$")


def _split_packed_attention(state: dict[str, object]) -> None:
    """In place: `*.attn.in_proj_{weight,bias}` -> `*.attn.{query,key,value}.{weight,bias}` and
    `*.attn.out_proj.*` -> `*.attn.out.*`, the names of `vit.MultiheadAttention`'s Dense layers."""
    for key in [k for k in state if _PACKED_QKV.match(k)]:
        module, leaf = _PACKED_QKV.match(key).groups()
        packed = np.asarray(state.pop(key))  # [3w, w] or [3w]
        if packed.shape[0] % 3:
            raise ValueError(f"{key} has {packed.shape[0]} rows, not 3 x width (packed q, k, v)")
        for name, part in zip(("query", "key", "value"), np.split(packed, 3)):
            state[f"{module}.{name}.{leaf}"] = part
    for key in [k for k in state if ".attn.out_proj." in k]:
        state[key.replace(".attn.out_proj.", ".attn.out.")] = state.pop(key)


def _clip_attention_key(key: str) -> str:
    """The checkpoint key a `_split_packed_attention` key came from (for error messages)."""
    key = re.sub(r"\.attn\.(?:query|key|value)\.(weight|bias)$", r".attn.in_proj_\1", key)
    return key.replace(".attn.out.", ".attn.out_proj.")


def _resample_positions(state: dict[str, object], key: str, target_shape: tuple[int, ...],
                        resample: bool, align_corners: bool) -> None:
    """In place: resizes the learned position grid at `key` to `target_shape` when only the grid
    differs. Anything else (or resample=False) is left for the strict fill to report."""
    if not resample or key not in state:
        return
    pe = np.asarray(state[key], np.float32)
    if pe.shape == target_shape or pe.ndim != 2 or pe.shape[1] != target_shape[1]:
        return
    old_grid, new_grid = math.isqrt(pe.shape[0] - 1), math.isqrt(target_shape[0] - 1)
    logging.info("Resampling %s from a %dx%d to a %dx%d grid (bicubic, align_corners=%s)",
                 key, old_grid, old_grid, new_grid, new_grid, align_corners)
    state[key] = resample_positional_embedding(pe, new_grid, align_corners=align_corners)


def vit_from_clip_state_dict(state_dict: Mapping[str, np.ndarray], model: VisionTransformer, *,
                             resample_positions: bool = True, align_corners: bool = False) -> dict:
    """CLIP / Chinese-CLIP `VisualTransformer` state dict -> {'params'} for `vit.VisionTransformer`.

    Keys are without the `visual.` prefix; the caller strips prefixes and takes `proj` (the
    two-tower model's `img_proj`), which is otherwise reported as unexpected. When the checkpoint's
    position grid differs from `model.image_size // model.patch_size`, it is resampled bicubically
    (`vit.resample_positional_embedding`; `align_corners=True` is Chinese-CLIP's own loader) unless
    `resample_positions=False`, which makes it a shape error.
    """
    state = _as_numpy_dict(state_dict)
    _split_packed_attention(state)
    x = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    _resample_positions(state, "positional_embedding",
                        tuple(abstract["params"]["positional_embedding"].shape),
                        resample_positions, align_corners)
    variables, errors = _fill(abstract, state, "VisionTransformer", describe=_clip_attention_key)
    _check(errors, {_clip_attention_key(k) for k in state}, "CLIP ViT")
    return variables


def modified_resnet_from_clip_state_dict(state_dict: Mapping[str, np.ndarray],
                                         model: ModifiedResNet, *, resample_positions: bool = True,
                                         align_corners: bool = False) -> dict:
    """CLIP / Chinese-CLIP `ModifiedResNet` state dict -> {'params', 'batch_stats'} for
    `clip_resnet.ModifiedResNet`.

    Keys are without the `visual.` prefix. `*.num_batches_tracked` is dropped. The attention pool's
    positions are resampled like the ViT's when the checkpoint's grid differs from
    `model.image_size // 32` (Chinese-CLIP's loader resizes only ViT positions; ours does both).
    """
    state = {k: v for k, v in _as_numpy_dict(state_dict).items()
             if not k.endswith(_RESNET_IGNORED_SUFFIX)}
    x = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    _resample_positions(state, "attnpool.positional_embedding",
                        tuple(abstract["params"]["attnpool"]["positional_embedding"].shape),
                        resample_positions, align_corners)
    variables, errors = _fill(abstract, state, "ModifiedResNet")
    _check(errors, state, "CLIP ModifiedResNet")
    return variables


# --------------------------------------------------------------------------------------------------
# Whole checkpoints of the original methods (docs/methods.md, "Checkpoint interoperability").
# Each importer takes a flat
# state dict (NumPy arrays; `module.` prefixes and `{"state_dict": ...}` wrappers already removed by
# `checkpoint_io.read_state_dict`), infers the architecture from the shapes, converts every tower
# with the strict importers above, and returns a `Converted`: the variables, the config values the
# model needs to receive them, and the keys deliberately left out with the reason (never silent).


@dataclasses.dataclass
class Converted:
    variables: dict  # {'params': {tree: ...}, 'batch_stats': {tree: ...}}
    config: dict  # dotted config values the trees require (manifest "config"), e.g. 'model.img.name'
    suggested: dict  # the original's preprocessing / pooling / lengths (manifest "suggested")
    dropped: dict  # {key prefix: reason} for keys not imported on purpose
    assumed: dict = dataclasses.field(default_factory=dict)  # {config field: why}: values not in the weights


def _take(state: dict, prefix: str) -> dict:
    """Pop every key under `prefix` from `state` and return them with the prefix stripped."""
    keys = [k for k in state if k.startswith(prefix)]
    return {k[len(prefix):]: state.pop(k) for k in keys}


def _require(state: dict, key: str, what: str) -> np.ndarray:
    if key not in state:
        raise ValueError(f"{what}: expected key {key!r} not found (keys start with: "
                         f"{sorted({k.split('.')[0] for k in state})})")
    return np.asarray(state.pop(key), np.float32)


def _count(state: Mapping, pattern: str) -> int:
    """Number of distinct indices N in keys matching `pattern` (a regex with one (\\d+) group)."""
    return len({m.group(1) for k in state for m in [re.match(pattern, k)] if m})


def infer_bert_config(state: Mapping, hf_config: Mapping | None = None, heads: int | None = None,
                      assumed: dict | None = None) -> BertConfig:
    """BertConfig from a BERT state dict's shapes; `hf_config` (config.json) wins where given.

    The head count is not in the shapes: it comes from `hf_config`, else from `heads`, else BERT's
    head dim of 64 is assumed (Bio_ClinicalBERT, RoBERTa-wwm-ext-base) and recorded in `assumed`.
    """
    if hf_config is not None:
        config = BertConfig.from_hf(hf_config)
        if heads is not None and heads != config.num_attention_heads:
            raise ValueError(f"text heads {heads} given, but config.json says num_attention_heads="
                             f"{config.num_attention_heads}")
        return dataclasses.replace(config, add_pooler="pooler.dense.weight" in state)
    vocab, hidden = np.shape(state["embeddings.word_embeddings.weight"])
    heads = _heads(heads, hidden, hidden // 64, "model.txt.num_attention_heads", f"hidden size {hidden} / head dim 64",
                   "--text_heads N or --text_config config.json", assumed)
    return BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_count(state, r"encoder\.layer\.(\d+)\."),
        num_attention_heads=heads,
        intermediate_size=np.shape(state["encoder.layer.0.intermediate.dense.weight"])[0],
        max_position_embeddings=np.shape(state["embeddings.position_embeddings.weight"])[0],
        type_vocab_size=np.shape(state["embeddings.token_type_embeddings.weight"])[0],
        add_pooler="pooler.dense.weight" in state)


def _heads(given: int | None, width: int, rule: int, field: str, why: str, flag: str, assumed: dict | None) -> int:
    """The attention head count: `given` (checked against `width`), else `rule`, recorded in `assumed`."""
    if given is None:
        given = max(1, rule)
        if assumed is not None:
            assumed[field] = f"{given} ({why}; not in the weights: pass {flag} if the original differs)"
    if given < 1 or width % given:
        raise ValueError(f"{field}: {given} heads do not divide the width {width}")
    return given


def bert_config_fields(config: BertConfig) -> dict:
    """`config.model.txt.*` values of a BertConfig (vocab size comes from the tokenizer)."""
    return {f"model.txt.{f}": getattr(config, f) for f in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "add_pooler")}


def infer_resnet(state: Mapping) -> ResNet:
    """torchvision ResNet (any depth, width or block counts) from its state dict's shapes."""
    width = np.shape(state["conv1.weight"])[0]
    stage_sizes = tuple(_count(state, rf"layer{i}\.(\d+)\.") for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    depth = next((d for d, s in _STAGE_SIZES.items() if s == stage_sizes and (d in _BOTTLENECK_DEPTHS) == bottleneck),
                 50 if bottleneck else 18)
    # torchvision's base_width: layer1's bottleneck is width * width_per_group / 64 channels wide.
    width_per_group = np.shape(state["layer1.0.conv1.weight"])[0] * 64 // width if bottleneck else 64
    return ResNet(depth=depth, width=width, width_per_group=width_per_group, stage_sizes=stage_sizes,
                  bottleneck=bottleneck)


def resnet_config_fields(model: ResNet) -> dict:
    # infer_resnet picks a depth whose block type matches, so config.model.img can express it.
    return {"model.img.name": "resnet", "model.img.depth": model.depth, "model.img.width": model.width,
            "model.img.width_per_group": model.width_per_group, "model.img.stage_sizes": list(model.stage_sizes)}


def infer_clip_vision(state: Mapping, image_size: int | None = None, heads: int | None = None,
                      assumed: dict | None = None):
    """CLIP visual tower (ViT or ModifiedResNet) from `visual.*` keys (prefix stripped).

    Heads are not in the shapes: `heads`, else CLIP's rules (ViT: width / 64; RN: width * 32 / 64),
    recorded in `assumed`. `image_size` (default: the checkpoint's own) sets the position grid;
    importing then resamples.
    """
    if "class_embedding" in state:
        patch = np.shape(state["conv1.weight"])[-1]
        width = np.shape(state["conv1.weight"])[0]
        grid = int(round(math.sqrt(np.shape(state["positional_embedding"])[0] - 1)))
        heads = _heads(heads, width, width // 64, "model.img.vit.heads", f"CLIP's rule: width {width} / 64",
                       "--image_heads N", assumed)
        model = VisionTransformer(patch_size=patch, width=width,
                                  layers=_count(state, r"transformer\.resblocks\.(\d+)\."), heads=heads,
                                  mlp_dim=np.shape(state["transformer.resblocks.0.mlp.c_fc.weight"])[0],
                                  image_size=image_size or grid * patch)
        fields = {"model.img.name": "vit", "model.img.vit.patch_size": patch, "model.img.vit.width": width,
                  "model.img.vit.layers": model.layers, "model.img.vit.heads": model.heads,
                  "model.img.vit.mlp_dim": model.mlp_dim}
        return model, fields
    if "attnpool.c_proj.weight" in state:
        width = np.shape(state["conv3.weight"])[0]
        layers = tuple(_count(state, rf"layer{i}\.(\d+)\.") for i in range(1, 5))
        grid = int(round(math.sqrt(np.shape(state["attnpool.positional_embedding"])[0] - 1)))
        heads = _heads(heads, width * 32, width * 32 // 64, "model.img.clip_resnet.heads",
                       f"CLIP's rule: width {width} x 32 / 64", "--image_heads N", assumed)
        model = ModifiedResNet(layers=layers, width=width, heads=heads,
                               output_dim=np.shape(state["attnpool.c_proj.weight"])[0],
                               image_size=image_size or grid * 32)
        fields = {"model.img.name": "clip_resnet", "model.img.clip_resnet.layers": list(layers),
                  "model.img.clip_resnet.width": width, "model.img.clip_resnet.heads": model.heads,
                  "model.img.clip_resnet.output_dim": model.output_dim}
        return model, fields
    raise ValueError("not a CLIP visual tower: neither `class_embedding` (ViT) nor `attnpool.*` (ModifiedResNet) "
                     f"found among {len(state)} keys, e.g. {sorted(state)[:5]}")


def _linear(weight: np.ndarray) -> dict:
    return {"dense": {"kernel": np.asarray(weight, np.float32).T}}  # torch Linear [out, in] -> [in, out]


def import_flair(state: dict, *, knowledge: bool = False, text_config: Mapping | None = None,
                 text_heads: int | None = None) -> Converted:
    """FLAIR's `FLAIRModel.state_dict()` (KeepFIT's with `knowledge=True`, which adds `attention.W_*`).

    vision_model.model.*                         -> img (torchvision ResNet-50, `fc` = Identity)
    vision_model.projection_head_vision.projection.weight -> img_proj/dense/kernel
    text_model.model.*                           -> txt (HF BERT, output_hidden_states)
    text_model.projection_head_text.projection.weight -> txt_proj/dense/kernel
    logit_scale                                  -> logit_scale
    attention.W_{q,k,v,o}.weight (KeepFIT)       -> knowledge/{q,k,v,out}/kernel
    """
    what = "KeepFIT" if knowledge else "FLAIR"
    state = dict(state)
    img_state = _take(state, "vision_model.model.")
    txt_state = _take(state, "text_model.model.")
    img_proj = _require(state, "vision_model.projection_head_vision.projection.weight", what)
    txt_proj = _require(state, "text_model.projection_head_text.projection.weight", what)
    logit_scale = _require(state, "logit_scale", what).reshape(())
    knowledge_params = None
    if knowledge:
        knowledge_params = {name: {"kernel": _require(state, f"attention.W_{src}.weight", what).T}
                            for name, src in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o"))}
    _check([], state, what)
    if not img_state or not txt_state:
        raise ValueError(f"{what}: no vision_model.model.* or text_model.model.* keys: not a {what} checkpoint")
    resnet = infer_resnet(img_state)
    img = resnet_from_torchvision_state_dict(img_state, resnet)
    assumed = {}
    bert_config = infer_bert_config(txt_state, text_config, text_heads, assumed)
    txt = bert_from_hf_state_dict(txt_state, bert_config)
    params = {"img": img["params"], "txt": txt["params"], "img_proj": _linear(img_proj),
              "txt_proj": _linear(txt_proj), "logit_scale": logit_scale}
    config = {**resnet_config_fields(resnet), **bert_config_fields(bert_config),
              "model.img_projection": "flair", "model.txt_projection": "flair",
              "model.embed_dim": img_proj.shape[0], "model.knowledge.enabled": knowledge}
    if knowledge:
        params["knowledge"] = knowledge_params
        config["model.knowledge.heads"] = 2  # KeepFIT's MultiHeadAttention(num_heads=2)
    suggested = {"data.preprocess": "flair", "data.image_size": 512, "model.txt.pooling": "flair",
                 "text.max_len": min(256 if knowledge else 77, bert_config.max_position_embeddings)}
    return Converted({"params": params, "batch_stats": {"img": img["batch_stats"]}}, config, suggested,
                     {"text_model.model.embeddings.position_ids": "HF buffer (arange), recomputed"}, assumed)


def import_clip_vision(state: dict, *, what: str, image_size: int | None = None, align_corners: bool = False,
                       heads: int | None = None, assumed: dict | None = None) -> tuple[dict, dict, dict, dict]:
    """`visual.*` of a CLIP-layout checkpoint -> (params, batch_stats, config fields, suggested).

    ViT: `visual.proj` [width, D] (used as `x @ proj`, so NOT transposed) -> img_proj/dense/kernel,
    projection 'linear'. ModifiedResNet: the attention pool already outputs D, projection 'none'.
    """
    vis = _take(state, "visual.")
    if not vis:
        raise ValueError(f"{what}: no visual.* keys found (keys start with: {sorted({k.split('.')[0] for k in state})})")
    proj = vis.pop("proj", None)
    model, fields = infer_clip_vision(vis, image_size, heads, assumed)
    params, batch_stats = {}, {}
    if isinstance(model, VisionTransformer):
        if proj is None:
            raise ValueError(f"{what}: ViT checkpoint without visual.proj")
        params["img"] = vit_from_clip_state_dict(vis, model, align_corners=align_corners)["params"]
        params["img_proj"] = {"dense": {"kernel": np.asarray(proj, np.float32)}}
        fields.update({"model.img_projection": "linear", "model.embed_dim": np.shape(proj)[1]})
    else:
        if proj is not None:
            raise ValueError(f"{what}: unexpected visual.proj next to a ModifiedResNet tower")
        converted = modified_resnet_from_clip_state_dict(vis, model, align_corners=align_corners)
        params["img"], batch_stats["img"] = converted["params"], converted["batch_stats"]
        fields.update({"model.img_projection": "none", "model.embed_dim": model.output_dim})
    suggested = {"data.preprocess": "clip", "data.image_size": model.image_size}
    return params, batch_stats, fields, suggested


def import_vilref(state: dict, *, image_size: int | None = None, image_heads: int | None = None,
                  text_config: Mapping | None = None, text_heads: int | None = None) -> Converted:
    """ViLReF / Chinese-CLIP `CLIP.state_dict()` (the `module.` prefix already stripped).

    visual.* -> img (+ img_proj for ViT), bert.* -> txt (BERT layout, RoBERTa-wwm-ext),
    text_projection [768, D] (`x[:, 0] @ text_projection`) -> txt_proj/dense/kernel, logit_scale.
    """
    state = dict(state)
    # Resampling as Chinese-CLIP's own `resize_pos_embed` does it (bicubic, align_corners=True).
    assumed = {}
    params, batch_stats, config, suggested = import_clip_vision(state, what="ViLReF", image_size=image_size,
                                                                align_corners=True, heads=image_heads, assumed=assumed)
    txt_state = _take(state, "bert.")
    if not txt_state:
        raise ValueError("ViLReF: no bert.* keys found: not a ViLReF / Chinese-CLIP checkpoint")
    text_projection = _require(state, "text_projection", "ViLReF")
    params["logit_scale"] = _require(state, "logit_scale", "ViLReF").reshape(())
    _check([], state, "ViLReF")
    bert_config = infer_bert_config(txt_state, text_config, text_heads, assumed)
    params["txt"] = bert_from_hf_state_dict(txt_state, bert_config)["params"]
    params["txt_proj"] = {"dense": {"kernel": text_projection}}
    config.update(bert_config_fields(bert_config))
    config["model.txt_projection"] = "linear"
    if text_projection.shape[1] != config["model.embed_dim"]:
        raise ValueError(f"ViLReF: text_projection outputs {text_projection.shape[1]}, image embedding "
                         f"{config['model.embed_dim']}")
    # Chinese-CLIP: [CLS] of the last layer, context length 100 (ViLReF's train.sh), LN eps 1e-12.
    suggested.update({"model.txt.pooling": "cls", "text.max_len": min(100, bert_config.max_position_embeddings)})
    return Converted({"params": params, "batch_stats": batch_stats}, config, suggested,
                     {"bert.embeddings.position_ids": "HF buffer (arange), recomputed"}, assumed)


# OpenAI CLIP's text tower is a causal GPT-style Transformer with a BPE tokenizer: not a retina_jax
# text tower. Its keys are left out on purpose (recorded in the manifest); the image tower,
# its projection and the temperature are imported.
_OPENAI_TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.",
                         "text_projection")
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints in the JIT archives


def import_openai_clip(state: dict, *, image_size: int | None = None, image_heads: int | None = None) -> Converted:
    """OpenAI CLIP `state_dict()` (ViT-B/16, RN50, ...): the image tower, its projection, logit_scale."""
    state = dict(state)
    dropped = {}
    for prefix in _OPENAI_TEXT_PREFIXES:
        taken = _take(state, prefix)
        if taken:
            dropped[prefix + "*"] = f"{len(taken)} keys of OpenAI CLIP's causal text Transformer (not a retina_jax tower)"
    for key in _OPENAI_META_KEYS:
        if state.pop(key, None) is not None:
            dropped[key] = "JIT archive metadata, not a weight"
    # OpenAI ships no resampling; open_clip's `resize_pos_embed` (align_corners=False) is the convention.
    assumed = {}
    params, batch_stats, config, suggested = import_clip_vision(state, what="OpenAI CLIP", image_size=image_size,
                                                                align_corners=False, heads=image_heads,
                                                                assumed=assumed)
    params["logit_scale"] = _require(state, "logit_scale", "OpenAI CLIP").reshape(())
    _check([], state, "OpenAI CLIP")
    return Converted({"params": params, "batch_stats": batch_stats}, config, suggested, dropped, assumed)


def import_hf_bert(state: dict, hf_config: Mapping, text_heads: int | None = None) -> Converted:
    """A Hugging Face BERT (BertModel / BertForMaskedLM / BertForPreTraining weights) -> txt.

    Pre-training heads (`cls.*`) are dropped on purpose and recorded; everything else is strict.
    """
    model_type = hf_config.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"config.json model_type={model_type!r}: only BERT-layout checkpoints are supported "
                         "(Chinese RoBERTa-wwm-ext is BERT-layout, model_type 'bert'); RoBERTa proper uses "
                         "offset positions that retina_jax's text tower does not implement")
    state = dict(state)
    heads = _take(state, "cls.")
    dropped = {"cls.*": f"{len(heads)} keys of the pre-training heads"} if heads else {}
    state = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
    bert_config = infer_bert_config(state, hf_config, text_heads)
    txt = bert_from_hf_state_dict(state, bert_config)
    if "embeddings.position_ids" in state:
        dropped["embeddings.position_ids"] = "HF buffer (arange), recomputed"
    return Converted({"params": {"txt": txt["params"]}, "batch_stats": {}}, bert_config_fields(bert_config),
                     {}, dropped)


def import_torchvision_resnet(state: dict) -> Converted:
    """A torchvision ResNet state dict (e.g. ImageNet ResNet-50) -> img (`fc.*` dropped, recorded)."""
    state = dict(state)
    fc = _take(state, "fc.")
    resnet = infer_resnet(state)
    img = resnet_from_torchvision_state_dict(state, resnet)
    dropped = {"fc.*": "the ImageNet classifier (FLAIR replaces it by Identity)"} if fc else {}
    return Converted({"params": {"img": img["params"]}, "batch_stats": {"img": img["batch_stats"]}},
                     resnet_config_fields(resnet), {"data.preprocess": "flair"}, dropped)
