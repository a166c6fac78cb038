"""Tests for ViLReF's CLIP-layout image towers (docs/methods.md, "ViLReF" and
"Checkpoint interoperability"): the ViT
(`models/vit.py`), the ModifiedResNet (`models/clip_resnet.py`), their importers
(`models/importers.py`) and position resampling, against the PyTorch layouts of ViLReF's
`clip/model.py` re-typed in torch_references.py.

Checkpoints go through `torch.save` / `torch.load` so the importers see the real format. Full-size
parity (ViT-B/16 and RN50 at 224, batch 1) runs in a few seconds each on CPU.
"""
from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax.models import clip_resnet, importers as convert, vit

import torch  # noqa: E402

# after the skip: torch_references imports torch
from torch_references import (TorchModifiedResNet, TorchVisionTransformer,  # noqa: E402
                              assert_parity, randomize_norms)

F = torch.nn.functional


def _num_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _torch_num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomize(model, seed=0):
    """Random norms and BN stats (torch_references), non-zero biases (torch MHA inits its packed
    and output biases to 0) and large class/positional embeddings, so every tensor matters."""
    randomize_norms(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            if name.endswith(("class_embedding", "positional_embedding")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _torch_vit(image_size=32, patch=8, width=64, layers=2, heads=4, seed=0):
    torch.manual_seed(seed)
    return _randomize(TorchVisionTransformer(image_size, patch, width, layers, heads), seed)


def _torch_rn(layers=(1, 1, 1, 1), output_dim=64, heads=4, image_size=64, width=16, seed=0):
    torch.manual_seed(seed)
    return _randomize(TorchModifiedResNet(layers, output_dim, heads, image_size, width), seed)


def _saved_state(tmodel, tmp_path) -> dict[str, np.ndarray]:
    """The torch model's state dict after a torch.save / torch.load round trip, as NumPy."""
    path = tmp_path / "visual.pt"
    torch.save(tmodel.state_dict(), path)
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}


def _images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)  # NCHW for torch


def _compare(model, variables, tmodel, x_nchw, tokens=True):
    """Runs both on the same images (NCHW for torch, NHWC for jax) and checks pooled (+ tokens)."""
    with torch.no_grad():
        want = tmodel(torch.tensor(x_nchw), return_tokens=tokens)
    apply = jax.jit(model.apply, static_argnames="return_tokens")
    got = apply(variables, x_nchw.transpose(0, 2, 3, 1), return_tokens=tokens)
    if not tokens:
        got, want = (got,), (want,)
    for g, w in zip(got, want):
        assert_parity(g, w.numpy())


# ----------------------------------------------------------------------------- parameter counts


def test_vit_b16_param_count():
    model = vit.vit_b16()
    x = jnp.zeros((1, 224, 224, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    with torch.device("meta"):  # shapes only
        ref = TorchVisionTransformer(224, 16, 768, 12, 12)
        ref_with_proj = TorchVisionTransformer(224, 16, 768, 12, 12, output_dim=512)
    assert _num_params(variables["params"]) == _torch_num_params(ref) == 85_799_424
    assert _torch_num_params(ref_with_proj) == 86_192_640  # OpenAI ViT-B/16 `visual`, incl. proj
    assert variables["params"]["positional_embedding"].shape == (197, 768)
    assert model.features_dim == 768
    bf16 = jax.eval_shape(lambda v: vit.vit_b16(dtype=jnp.bfloat16).apply(v, x), variables)
    assert bf16.shape == (1, 768) and bf16.dtype == jnp.float32


def test_clip_rn50_param_count():
    model = clip_resnet.clip_rn50()
    x = jnp.zeros((1, 224, 224, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    with torch.device("meta"):
        ref = TorchModifiedResNet((3, 4, 6, 3), 1024, 32, 224, 64)
    assert _num_params(variables["params"]) == _torch_num_params(ref) == 38_316_896
    stats = sum(b.numel() for n, b in ref.named_buffers() if not n.endswith("num_batches_tracked"))
    assert _num_params(variables["batch_stats"]) == stats
    assert variables["params"]["attnpool"]["positional_embedding"].shape == (50, 2048)
    assert model.features_dim == 1024
    bf16 = jax.eval_shape(lambda v: clip_resnet.clip_rn50(dtype=jnp.bfloat16).apply(v, x),
                          variables)
    assert bf16.shape == (1, 1024) and bf16.dtype == jnp.float32


# ----------------------------------------------------------------------------- parity


def test_vit_tiny_parity(tmp_path):
    tmodel = _torch_vit()
    model = vit.vit_tiny()
    variables = convert.vit_from_clip_state_dict(_saved_state(tmodel, tmp_path), model)
    assert set(variables) == {"params"}
    # 35x37 is not a multiple of the 8 px patch: both drop the remainder (same 4x4 grid)
    _compare(model, variables, tmodel, _images((2, 3, 35, 37)))


def test_clip_resnet_tiny_parity(tmp_path):
    tmodel = _torch_rn()
    model = clip_resnet.clip_resnet_tiny()
    variables = convert.modified_resnet_from_clip_state_dict(_saved_state(tmodel, tmp_path), model)
    assert set(variables) == {"params", "batch_stats"}
    assert variables["batch_stats"]["layer1_0"]["downsample_1"]["var"].shape == (64,)
    # 70x66: odd maps along the way exercise the floor-mode average pools; both end at 2x2
    _compare(model, variables, tmodel, _images((2, 3, 70, 66)))


def test_vit_b16_parity_full_size(tmp_path):
    tmodel = _torch_vit(224, 16, 768, 12, 12)
    model = vit.vit_b16()
    variables = convert.vit_from_clip_state_dict(_saved_state(tmodel, tmp_path), model)
    _compare(model, variables, tmodel, _images((1, 3, 224, 224)), tokens=False)


def test_clip_rn50_parity_full_size(tmp_path):
    tmodel = _torch_rn((3, 4, 6, 3), 1024, 32, 224, 64)
    model = clip_resnet.clip_rn50()
    variables = convert.modified_resnet_from_clip_state_dict(_saved_state(tmodel, tmp_path), model)
    _compare(model, variables, tmodel, _images((1, 3, 224, 224)), tokens=False)


def test_vit_flash_attention_keys():
    # Chinese-CLIP's flash-attention variant saves the same packed q/k/v as attn.Wqkv.
    state = {k: v.numpy() for k, v in _torch_vit().state_dict().items()}
    flash = {k.replace("attn.in_proj_", "attn.Wqkv."): v for k, v in state.items()}
    model = vit.vit_tiny()
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           convert.vit_from_clip_state_dict(flash, model),
                           convert.vit_from_clip_state_dict(state, model))


# ----------------------------------------------------------------------------- position resampling


def _torch_resize_positions(pe, new_grid, align_corners=False):
    """Position resizing as open_clip / Chinese-CLIP `resize_pos_embed` do it, in torch."""
    g = math.isqrt(pe.shape[0] - 1)
    grid = pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, w, g, g]
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic",
                         align_corners=align_corners)
    return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1)])


def test_resample_identity_on_equal_grid():
    pe = _images((1 + 7 * 7, 16))
    out = vit.resample_positional_embedding(pe, 7)
    np.testing.assert_array_equal(out, pe)
    assert out is not pe


@pytest.mark.parametrize("old, new", [(7, 10), (10, 7), (4, 6), (14, 16)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_resample_matches_torch_bicubic(old, new, align_corners):
    pe = _images((1 + old * old, 8), seed=old)
    got = vit.resample_positional_embedding(pe, new, align_corners=align_corners)
    want = _torch_resize_positions(torch.tensor(pe), new, align_corners).numpy()
    assert got.shape == (1 + new * new, 8) and got.dtype == pe.dtype
    np.testing.assert_array_equal(got[0], pe[0])  # the class position is kept
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_resample_rejects_non_square():
    with pytest.raises(ValueError, match="not 1 \\+ a square grid"):
        vit.resample_positional_embedding(np.zeros((1 + 12, 4)), 4)


@pytest.mark.parametrize("align_corners", [False, True])
def test_vit_converted_to_larger_image(tmp_path, caplog, align_corners):
    tmodel = _torch_vit(32)  # checkpoint for 32 px: 4x4 grid
    state = _saved_state(tmodel, tmp_path)
    model = vit.vit_tiny(image_size=48)  # 6x6 grid
    with caplog.at_level(logging.INFO, logger="absl"):
        variables = convert.vit_from_clip_state_dict(state, model, align_corners=align_corners)
    assert "Resampling positional_embedding from a 4x4 to a 6x6 grid" in caplog.text
    # the torch original at 48 px with torch-resized positions
    big = TorchVisionTransformer(48, 8, 64, 2, 4).eval()
    sd = {k: torch.tensor(v) for k, v in state.items()}
    sd["positional_embedding"] = _torch_resize_positions(sd["positional_embedding"], 6,
                                                         align_corners)
    big.load_state_dict(sd)
    _compare(model, variables, big, _images((2, 3, 48, 48)))

    with pytest.raises(ValueError, match=r"shape of positional_embedding: checkpoint \(17, 64\)"):
        convert.vit_from_clip_state_dict(state, model, resample_positions=False)


def test_clip_resnet_converted_to_larger_image(tmp_path):
    tmodel = _torch_rn(image_size=64)  # 2x2 attention-pool grid
    state = _saved_state(tmodel, tmp_path)
    model = clip_resnet.clip_resnet_tiny(image_size=96)  # 3x3
    variables = convert.modified_resnet_from_clip_state_dict(state, model)
    big = TorchModifiedResNet((1, 1, 1, 1), 64, 4, 96, 16).eval()
    sd = {k: torch.tensor(v) for k, v in state.items()}
    sd["attnpool.positional_embedding"] = _torch_resize_positions(
        sd["attnpool.positional_embedding"], 3)
    big.load_state_dict(sd)
    _compare(model, variables, big, _images((2, 3, 96, 96)), tokens=False)


def test_towers_reject_other_grids():
    x = jnp.zeros((1, 48, 48, 3))
    with pytest.raises(ValueError, match="4x4 grid but the input 48x48 gives 6x6.*resampl"):
        jax.eval_shape(lambda: vit.vit_tiny().init(jax.random.PRNGKey(0), x))
    x = jnp.zeros((1, 96, 96, 3))
    with pytest.raises(ValueError, match="2x2 map but the input gives 3x3.*resampl"):
        jax.eval_shape(lambda: clip_resnet.clip_resnet_tiny().init(jax.random.PRNGKey(0), x))


# ----------------------------------------------------------------------------- importer strictness


def test_vit_importer_strict():
    state = {k: v.numpy() for k, v in _torch_vit().state_dict().items()}
    model = vit.vit_tiny()
    extra = dict(state, **{"transformer.resblocks.9.mlp.c_fc.weight": np.zeros((256, 64))})
    with pytest.raises(ValueError, match=r"unexpected key transformer\.resblocks\.9\.mlp\.c_fc"):
        convert.vit_from_clip_state_dict(extra, model)
    with pytest.raises(ValueError, match=r"unexpected key proj\b"):  # the caller pops `proj`
        convert.vit_from_clip_state_dict(dict(state, proj=np.zeros((64, 32))), model)
    for key in ("transformer.resblocks.1.attn.in_proj_bias", "ln_post.weight",
                "class_embedding", "transformer.resblocks.0.attn.out_proj.weight"):
        missing = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ValueError, match=rf"missing {key.replace('.', '[.]')} "):
            convert.vit_from_clip_state_dict(missing, model)
    # a checkpoint one block deeper than the model: the packed leftovers are named once, as saved
    deeper = {k: v.numpy() for k, v in _torch_vit(layers=3).state_dict().items()}
    with pytest.raises(ValueError, match=r"0 missing/mismatched, 12 unexpected") as err:
        convert.vit_from_clip_state_dict(deeper, model)
    assert "unexpected key transformer.resblocks.2.attn.in_proj_weight" in str(err.value)
    assert "attn.query" not in str(err.value)


def test_clip_resnet_importer_strict():
    state = {k: v.numpy() for k, v in _torch_rn().state_dict().items()}
    assert "layer1.0.downsample.0.weight" in state  # the "-1" AvgPool has no state
    model = clip_resnet.clip_resnet_tiny()
    extra = dict(state, **{"attnpool.extra.weight": np.zeros((4, 4))})
    with pytest.raises(ValueError, match=r"unexpected key attnpool\.extra\.weight"):
        convert.modified_resnet_from_clip_state_dict(extra, model)
    for key in ("layer2.0.downsample.1.running_var", "attnpool.q_proj.bias",
                "attnpool.positional_embedding"):
        missing = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ValueError, match=rf"missing {key.replace('.', '[.]')} "):
            convert.modified_resnet_from_clip_state_dict(missing, model)


# ----------------------------------------------------------------------------- batch norm


def test_clip_resnet_train_updates_batch_stats():
    model = clip_resnet.clip_resnet_tiny()
    x = _images((4, 3, 64, 64))
    tmodel = _torch_rn()
    # variables from the importer: compiling flax's random init takes ~25 s on this CPU
    variables = convert.modified_resnet_from_clip_state_dict(
        {k: v.numpy() for k, v in tmodel.state_dict().items()}, model)  # copies, not views
    stats0 = variables["batch_stats"]
    feats, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x.transpose(0, 2, 3, 1))
    stats1 = updates["batch_stats"]
    assert jax.tree_util.tree_structure(stats1) == jax.tree_util.tree_structure(stats0)
    with torch.no_grad():
        tmodel.train()(torch.tensor(x))  # torch momentum 0.1 == flax momentum 0.9
    for path in (("bn1",), ("layer4_0", "bn3"), ("layer2_0", "downsample_1")):
        old, new = stats0, stats1
        for p in path:
            old, new = old[p], new[p]
        assert not np.allclose(new["mean"], old["mean"]) and not np.allclose(new["var"], old["var"])
        bn = tmodel.get_submodule(".".join(path).replace("_", "."))  # layer4_0 -> layer4.0
        assert_parity(new["mean"], bn.running_mean.numpy())
    # flax updates the running var with the biased batch variance, torch with the unbiased one:
    # equal where a BN sees many values per channel (bn1: 4 x 32 x 32), off by n / (n - 1) else.
    assert_parity(stats1["bn1"]["var"], tmodel.bn1.running_var.numpy())
    apply = jax.jit(model.apply)
    eval0 = apply(variables, x.transpose(0, 2, 3, 1))
    eval1 = apply({"params": variables["params"], "batch_stats": stats1}, x.transpose(0, 2, 3, 1))
    assert not np.allclose(eval0, eval1)
    assert not np.allclose(feats, eval0)  # train mode normalises with the batch statistics
