"""Tests for the ResNet and BERT towers, text pooling and the strict NumPy importers.

Full-size models are only traced (`jax.eval_shape`); parity runs tiny random models against the
PyTorch originals (HF `transformers.BertModel`, and the torchvision-layout ResNet in
torch_references.py because torchvision is not installable here).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax.models import bert as bert_lib
from retina_jax.models import importers as convert
from retina_jax.models import resnet as resnet_lib

import torch  # noqa: E402
import transformers  # noqa: E402

# after the skips: torch_references imports torch
from torch_references import TorchBasicBlock, TorchBottleneck, random_torch_resnet  # noqa: E402


def _num_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _assert_close(got, want, tol=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want)
    # max abs error, or relative error where values are large
    assert np.all(err <= tol * np.maximum(1.0, np.abs(want))), f"max abs err {err.max():.3g}"


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("depth, expected", [(50, 23_508_032), (18, 11_176_512)])
def test_resnet_param_count(depth, expected):
    model = resnet_lib.ResNet(depth=depth)
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    assert _num_params(variables["params"]) == expected
    assert model.features_dim == (2048 if depth == 50 else 512)
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert out.shape == (1, model.features_dim)
    bf16 = jax.eval_shape(lambda v: resnet_lib.ResNet(depth=depth, dtype=jnp.bfloat16).apply(
        v, x, train=False), variables)
    assert bf16.shape == out.shape and bf16.dtype == jnp.float32  # pooled features in float32


@pytest.mark.parametrize("add_pooler, expected", [(True, 108_310_272), (False, 107_719_680)])
def test_bert_base_param_count(add_pooler, expected):
    config = bert_lib.BertConfig(add_pooler=add_pooler)
    ids = jnp.zeros((1, 8), jnp.int32)
    variables = jax.eval_shape(
        lambda: bert_lib.BertModel(config).init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)))
    assert _num_params(variables["params"]) == expected
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    out = jax.eval_shape(lambda v: bert_lib.BertModel(config, dtype=jnp.bfloat16).apply(
        v, ids, jnp.ones_like(ids)), variables)
    assert out["last_hidden_state"].dtype == jnp.bfloat16 and len(out["hidden_states"]) == 13


@pytest.mark.parametrize("add_pooler, expected", [(True, 102_267_648), (False, 101_677_056)])
def test_chinese_roberta_wwm_ext_base_param_count(add_pooler, expected):
    """ViLReF's text tower: Chinese RoBERTa-wwm-ext-base is BERT-layout with a 21,128-token vocabulary
    (102.3M parameters with the pooler, as its Hugging Face card states)."""
    config = bert_lib.BertConfig(vocab_size=21128, add_pooler=add_pooler)
    ids = jnp.zeros((1, 8), jnp.int32)
    variables = jax.eval_shape(
        lambda: bert_lib.BertModel(config).init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)))
    assert _num_params(variables["params"]) == expected


def test_tiny_variants_forward():
    model = resnet_lib.resnet_tiny()
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 64, 64, 3))
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    feats = model.apply(variables, x, train=False)
    assert feats.shape == (2, 512) == (2, model.features_dim)
    assert np.all(np.isfinite(feats))

    config = bert_lib.bert_tiny_config(vocab_size=100)
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 1, 100)
    mask = jnp.array([[1] * 16, [1] * 5 + [0] * 11])
    enc = bert_lib.TextEncoder(config)
    params = enc.init(jax.random.PRNGKey(3), ids, mask)
    z = jax.jit(lambda p: enc.apply(p, ids, mask))(params)
    assert z.shape == (2, 128) and np.all(np.isfinite(z))
    # TextEncoder's tree is BertModel's: the same variables run both.
    out = bert_lib.BertModel(config).apply(params, ids, mask)
    assert len(out["hidden_states"]) == 3 and out["pooler_output"].shape == (2, 128)
    # dropout path needs the 'dropout' rng and changes the output
    z_train = enc.apply(params, ids, mask, deterministic=False,
                        rngs={"dropout": jax.random.PRNGKey(4)})
    assert not np.allclose(z_train, z)


def test_bert_config_from_hf(tmp_path):
    hf = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128)
    hf.save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json", hf.to_dict()):
        config = bert_lib.BertConfig.from_hf(source)
        assert (config.vocab_size, config.hidden_size, config.num_hidden_layers,
                config.num_attention_heads, config.intermediate_size) == (100, 64, 2, 4, 128)
        assert config.layer_norm_eps == 1e-12


# ----------------------------------------------------------------------------- BERT parity


def _torch_bert(add_pooler=True):
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, type_vocab_size=2,
        attn_implementation="eager")
    model = transformers.BertModel(hf_config, add_pooling_layer=add_pooler).eval()
    with torch.no_grad():  # HF inits LN to (1, 0) and biases to 0: randomise so they are tested
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    config = bert_lib.BertConfig.from_hf(hf_config.to_dict())
    config = bert_lib.BertConfig(**{**config.__dict__, "add_pooler": add_pooler})
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, config, state


def test_bert_parity_with_hf():
    model, config, state = _torch_bert()
    variables = convert.bert_from_hf_state_dict(state, config)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids = ids * mask  # pad id 0 on pads, as a tokenizer would
    types = np.zeros_like(ids)
    types[0, 6:] = 1
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types), output_hidden_states=True)
    out = bert_lib.BertModel(config).apply(variables, jnp.asarray(ids), jnp.asarray(mask),
                                           jnp.asarray(types))
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 4
    for got, want in zip(out["hidden_states"], ref.hidden_states):
        _assert_close(got, want.numpy())
    _assert_close(out["last_hidden_state"], ref.last_hidden_state.numpy())
    _assert_close(out["pooler_output"], ref.pooler_output.numpy())

    # FLAIR's pooling on the HF model, computed the way FLAIR does it: pad to the longest prompt
    # in the batch (here: row 0 is full length), average every position incl. pads.
    hs = ref.hidden_states
    flair_ref = torch.stack([hs[1], hs[2], hs[-1]]).permute(1, 0, 2, 3).mean(2).mean(1)
    enc = bert_lib.TextEncoder(config, pooling="flair")
    got = enc.apply(variables, jnp.asarray(ids), jnp.asarray(mask),
                    token_type_ids=jnp.asarray(types))
    _assert_close(got, flair_ref.numpy())

    # Fixed-length padding (12) with every row shorter (L_b = 9) must equal FLAIR's dynamic
    # padding to the longest prompt: the HF model run on the first 9 positions only.
    mask2 = np.zeros((2, 12), np.int64)
    mask2[0, :9] = 1
    mask2[1, :4] = 1
    ids2 = rng.integers(1, 100, size=(2, 12)) * mask2
    with torch.no_grad():
        hs = model(input_ids=torch.tensor(ids2[:, :9]), attention_mask=torch.tensor(mask2[:, :9]),
                   output_hidden_states=True).hidden_states
    flair_ref = torch.stack([hs[1], hs[2], hs[-1]]).permute(1, 0, 2, 3).mean(2).mean(1)
    got = jax.jit(enc.apply)(variables, jnp.asarray(ids2), jnp.asarray(mask2))
    _assert_close(got, flair_ref.numpy())


def test_bert_import_prefix_and_no_pooler():
    model, config, state = _torch_bert(add_pooler=False)
    prefixed = {f"bert.{k}": v for k, v in state.items()}
    prefixed["cls.predictions.bias"] = np.zeros(100, np.float32)  # an MLM head
    with pytest.raises(ValueError, match="cls.predictions.bias"):
        convert.bert_from_hf_state_dict(prefixed, config)
    variables = convert.bert_from_hf_state_dict(prefixed, config, ignore_prefixes=("cls.",))
    assert "pooler" not in variables["params"]
    ids = np.array([[5, 6, 7, 0]])
    mask = np.array([[1, 1, 1, 0]])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = bert_lib.BertModel(config).apply(variables, jnp.asarray(ids), jnp.asarray(mask))
    _assert_close(out["last_hidden_state"], ref.last_hidden_state.numpy())
    assert "pooler_output" not in out


# ----------------------------------------------------------------------------- ResNet parity


@pytest.mark.parametrize("bottleneck, stage_sizes, width", [
    (True, (1, 1, 1, 1), 16),   # resnet_tiny
    (False, (2, 1, 1, 1), 8),   # basic blocks (ResNet-18 layout), incl. an identity shortcut
])
def test_resnet_parity_with_torch(bottleneck, stage_sizes, width):
    block = TorchBottleneck if bottleneck else TorchBasicBlock
    tmodel = random_torch_resnet(block, stage_sizes, width)
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    state["fc.weight"] = np.zeros((10, 4), np.float32)  # classifier head is dropped on purpose
    state["fc.bias"] = np.zeros((10,), np.float32)
    model = resnet_lib.ResNet(width=width, stage_sizes=stage_sizes, bottleneck=bottleneck)
    variables = convert.resnet_from_torchvision_state_dict(state, model)
    assert set(variables) == {"params", "batch_stats"}
    assert variables["batch_stats"]["layer2_0"]["downsample_1"]["mean"].shape == (
        width * 2 * block.expansion,)
    x = np.random.default_rng(0).uniform(size=(2, 3, 66, 50)).astype(np.float32)  # odd sizes
    with torch.no_grad():
        want = tmodel(torch.tensor(x)).numpy()
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.transpose(0, 2, 3, 1))
    _assert_close(got, want)


def test_wide_resnet_parity_with_torch_and_its_width_read_from_the_shapes():
    # Review defect: the bottleneck's inner width was tied to the stem's, so torchvision's wide
    # ResNets (width_per_group=128, wide_resnet50_2) could not be built or imported.
    tmodel = random_torch_resnet(TorchBottleneck, (1, 2, 1, 1), 16, base_width=128)
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    assert state["layer1.0.conv1.weight"].shape[0] == 32 and state["layer1.0.conv3.weight"].shape[0] == 64
    model = convert.infer_resnet(state)
    assert (model.width, model.width_per_group, model.stage_sizes) == (16, 128, (1, 2, 1, 1))
    assert convert.resnet_config_fields(model)["model.img.width_per_group"] == 128
    variables = convert.resnet_from_torchvision_state_dict(state, model)
    x = np.random.default_rng(1).uniform(size=(2, 3, 64, 48)).astype(np.float32)
    with torch.no_grad():
        want = tmodel(torch.tensor(x)).numpy()
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.transpose(0, 2, 3, 1))
    _assert_close(got, want)
    with pytest.raises(ValueError, match="basic blocks"):
        resnet_lib.ResNet(depth=18, width_per_group=128).init(jax.random.PRNGKey(0), x[:, :, :32, :32].transpose(
            0, 2, 3, 1), train=False)


def test_resnet_batchnorm_train_updates_stats():
    model = resnet_lib.resnet_tiny()
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    stats0 = variables["batch_stats"]
    feats, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    stats1 = updates["batch_stats"]
    # torch momentum 0.1: running_mean = 0.9 * 0 + 0.1 * batch mean (init mean is 0)
    assert not np.allclose(stats1["bn1"]["mean"], stats0["bn1"]["mean"])
    assert not np.allclose(stats1["layer4_0"]["bn3"]["var"], stats0["layer4_0"]["bn3"]["var"])
    # eval uses the running stats: different stats -> different eval features
    eval0 = model.apply(variables, x, train=False)
    eval1 = model.apply({"params": variables["params"], "batch_stats": stats1}, x, train=False)
    assert not np.allclose(eval0, eval1)
    # train mode normalises with the batch statistics, so it differs from eval with init stats
    assert not np.allclose(feats, eval0)


# ----------------------------------------------------------------------------- pooling


def _np_flair(hidden_states, mask):
    batch_len = int(mask.sum(1).max())
    layers = [np.asarray(hidden_states[i])[:, :batch_len] for i in (1, 2, -1)]
    return np.mean([h.mean(axis=1) for h in layers], axis=0)


def _random_hidden(seed=0, num_layers=4, shape=(3, 10, 6)):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=shape).astype(np.float32) for _ in range(num_layers + 1))


def test_pool_text_modes_match_numpy():
    hs = _random_hidden()
    mask = np.zeros((3, 10), np.int32)
    for row, n in enumerate((4, 7, 2)):
        mask[row, :n] = 1
    pool = jax.jit(bert_lib.pool_text, static_argnums=2)
    _assert_close(pool(hs, mask, "flair"), _np_flair(hs, mask), 1e-6)
    _assert_close(pool(hs, mask, "cls"), hs[-1][:, 0], 1e-6)
    want = np.stack([hs[-1][r, :n].mean(0) for r, n in enumerate((4, 7, 2))])
    _assert_close(pool(hs, mask, "masked_mean"), want, 1e-6)


def test_flair_pooling_depends_on_batch_longest_length():
    # The faithful quirk: row 0's 'flair' feature changes when a longer row joins the batch,
    # because FLAIR averages pad positions up to the batch's longest prompt.
    hs = _random_hidden(seed=1, shape=(2, 10, 6))
    short = np.array([[1] * 3 + [0] * 7, [1] * 3 + [0] * 7])
    longer = np.array([[1] * 3 + [0] * 7, [1] * 8 + [0] * 2])
    f_short = bert_lib.pool_text(hs, short, "flair")[0]
    f_long = bert_lib.pool_text(hs, longer, "flair")[0]
    assert not np.allclose(f_short, f_long)
    m_short = bert_lib.pool_text(hs, short, "masked_mean")[0]
    m_long = bert_lib.pool_text(hs, longer, "masked_mean")[0]
    _assert_close(m_short, m_long, 1e-6)


def test_pool_text_unknown_mode():
    hs = _random_hidden()
    with pytest.raises(ValueError, match="'mean'.*flair"):
        bert_lib.pool_text(hs, np.ones((3, 10)), "mean")
    enc = bert_lib.TextEncoder(bert_lib.bert_tiny_config(50), pooling="avg")
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="'avg'"):
        enc.init(jax.random.PRNGKey(0), ids, ids)


# ----------------------------------------------------------------------------- importer strictness


def test_bert_importer_strict():
    _, config, state = _torch_bert()
    extra = dict(state, **{"encoder.layer.9.output.dense.weight": np.zeros((64, 128))})
    with pytest.raises(ValueError, match=r"unexpected key encoder\.layer\.9\.output\.dense"):
        convert.bert_from_hf_state_dict(extra, config)
    missing = {k: v for k, v in state.items() if k != "encoder.layer.1.attention.self.key.bias"}
    with pytest.raises(ValueError, match=r"missing encoder\.layer\.1\.attention\.self\.key\.bias"):
        convert.bert_from_hf_state_dict(missing, config)
    wrong = dict(state, **{"pooler.dense.weight": np.zeros((64, 32), np.float32)})
    with pytest.raises(ValueError, match=r"shape of pooler\.dense\.weight"):
        convert.bert_from_hf_state_dict(wrong, config)


def test_resnet_importer_strict():
    tmodel = random_torch_resnet(TorchBottleneck, (1, 1, 1, 1), 16)
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    model = resnet_lib.resnet_tiny()
    extra = dict(state, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1))})
    with pytest.raises(ValueError, match=r"unexpected key layer5\.0\.conv1\.weight"):
        convert.resnet_from_torchvision_state_dict(extra, model)
    missing = {k: v for k, v in state.items() if k != "layer3.0.downsample.1.running_var"}
    with pytest.raises(ValueError, match=r"missing layer3\.0\.downsample\.1\.running_var"):
        convert.resnet_from_torchvision_state_dict(missing, model)
    # a bigger model than the checkpoint: every unfilled leaf is named
    with pytest.raises(ValueError, match=r"missing layer1\.1\.conv1\.weight"):
        convert.resnet_from_torchvision_state_dict(
            state, resnet_lib.resnet_tiny(stage_sizes=(2, 1, 1, 1)))


@pytest.mark.parametrize("axis", ["heads", "keys"])
def test_knowledge_attention_softmax_axis(axis):
    """KeepFIT's knowledge attention: the faithful 'heads' softmax (weights sum to 1 across the two
    heads, so the output grows with the number of keys) vs textbook 'keys' attention."""
    from retina_jax.models.knowledge_attention import KnowledgeAttention
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(n, 8)).astype(np.float32) for n in (3, 5, 5))
    module = KnowledgeAttention(heads=2, dropout=0.5, softmax_axis=axis)
    variables = module.init(jax.random.PRNGKey(0), q, k, v)
    w = {n: np.asarray(variables["params"][n]["kernel"]) for n in ("q", "k", "v", "out")}
    split = lambda x: x.reshape(x.shape[0], 2, 4).transpose(1, 0, 2)  # [heads, N, 4]
    scores = np.einsum("hqd,hkd->hqk", split(q @ w["q"]), split(k @ w["k"])) / 2.0  # sqrt(head_dim 4)
    e = np.exp(scores - scores.max(axis=0 if axis == "heads" else -1, keepdims=True))
    weights = e / e.sum(axis=0 if axis == "heads" else -1, keepdims=True)
    want = np.einsum("hqk,hkd->hqd", weights, split(v @ w["v"])).transpose(1, 0, 2).reshape(3, 8) @ w["out"]
    got = module.apply(variables, q, k, v)  # deterministic: no dropout
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dropped = module.apply(variables, q, k, v, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(dropped, got)  # dropout 0.5 on the weights in training
