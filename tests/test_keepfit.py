"""KeepFIT (docs/methods.md, "KeepFIT"): the loss and its terms against a NumPy reference, the knowledge
attention's softmax switch, the expert stream (uniform draws with replacement, zipped with the
public stream and resumed exactly), BatchNorm's public-then-expert update order and the method in
the trainer."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import REPO, assert_trees_equal, crash_and_resume, leaves, train_rows
from test_train import TINY as TRAIN_TINY

from retina_jax import config as config_lib, losses
from retina_jax.config import ConfigError, validate
from retina_jax.data import pipeline
from retina_jax.data.tokenizer import Tokenize
from retina_jax.models.knowledge_attention import KnowledgeAttention
from retina_jax.train import Trainer

KEEPFIT = os.path.join(REPO, "configs", "keepfit.py")

# test_train's tiny run (32 px, public batch 16) + expert batch 8; 8 steps, checkpoints every 4.
TINY = {
    **TRAIN_TINY,
    "data.expert.batch_size": 8,
    "data.expert.size": 24,
    "text.max_len": 48,  # the expert captions
    "train.epochs": 2.0,
    "optim.schedule_epochs": 2.0,
    "train.async_checkpoint": False,
}


def tiny_keepfit(arg="demo", **extra):
    return config_lib.override(config_lib.load(f"{KEEPFIT}:{arg}"), {**TINY, **extra})


# ------------------------------------------------------------------------------ NumPy reference

def np_log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_softmax(x, axis):
    return np.exp(np_log_softmax(x, axis))


def np_knowledge(q, k, v, w, heads, softmax_axis, keep, rate):
    """The original's d2l MultiHeadAttention on one sequence, float64; `keep` the dropout keep-mask."""
    b, d = q.shape
    hd = d // heads
    split = lambda x: x.reshape(x.shape[0], heads, hd).transpose(1, 0, 2)  # noqa: E731
    qh, kh, vh = split(q @ w["q"]), split(k @ w["k"]), split(v @ w["v"])
    scores = np.einsum("hqd,hkd->hqk", qh, kh) / np.sqrt(hd)
    weights = np_softmax(scores, axis=0 if softmax_axis == "heads" else -1)
    weights = np.where(keep, weights / (1 - rate), 0.0)
    out = np.einsum("hqk,hkd->hqd", weights, vh).transpose(1, 0, 2).reshape(b, d)
    return out @ w["out"]


def np_terms(zimg, ztxt, cats, kimg, ktxt, revised, logit_scale):
    s = np.exp(np.clip(logit_scale, 0, np.log(100)))
    same = (cats[:, None] == cats[None, :]).astype(np.float64)
    target = same / same.sum(1, keepdims=True)
    soft = lambda logits, t: -np.mean(np.sum(t * np_log_softmax(logits), 1))  # noqa: E731
    l_pub = 0.5 * (soft(s * ztxt @ zimg.T, target) + soft(s * zimg @ ztxt.T, target))
    eye = np.eye(len(kimg))
    l_mm = 0.5 * (soft(s * ktxt @ kimg.T, eye) + soft(s * kimg @ ktxt.T, eye))
    return {"pub": l_pub, "mm": l_mm, "rev": np.mean((ztxt - revised) ** 2)}


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def problem(seed, b=6, bk=4, d=8, heads=2, rate=0.5):
    rng = np.random.default_rng(seed)
    inputs = {"zimg": unit(rng.normal(size=(b, d))), "ztxt": unit(rng.normal(size=(b, d))),
              "kimg": unit(rng.normal(size=(bk, d))), "ktxt": unit(rng.normal(size=(bk, d))),
              "w": {n: rng.normal(size=(d, d)) / np.sqrt(d) for n in ("q", "k", "v", "out")},
              "logit_scale": np.float64(np.log(1 / 0.07))}
    cats = np.array([0, 1, 0, 2, 1, 3][:b])
    keep = rng.random((heads, b, bk)) > rate
    return inputs, cats, keep


def np_total(inputs, cats, keep, softmax_axis, mm_weight, rev_weight, rate=0.5, heads=2):
    x = inputs
    revised = np_knowledge(x["zimg"], x["kimg"], x["ktxt"], x["w"], heads, softmax_axis, keep, rate)
    t = np_terms(x["zimg"], x["ztxt"], cats, x["kimg"], x["ktxt"], revised, x["logit_scale"])
    return t["pub"] + mm_weight * t["mm"] + rev_weight * t["rev"], t


def jax_total(inputs, cats, keep, softmax_axis, mm_weight, rev_weight, rate=0.5, heads=2):
    module = KnowledgeAttention(heads=heads, dropout=rate, softmax_axis=softmax_axis)
    params = {name: {"kernel": inputs["w"][name]} for name in ("q", "k", "v", "out")}
    revised = module.apply({"params": params}, inputs["zimg"], inputs["kimg"], inputs["ktxt"],
                           dropout_mask=jnp.asarray(keep))
    return losses.keepfit_loss(inputs["zimg"], inputs["ztxt"], jnp.asarray(cats), inputs["kimg"], inputs["ktxt"],
                               revised, inputs["logit_scale"], mm_weight=mm_weight, rev_weight=rev_weight)


def finite_differences(f, inputs, eps=1e-6):
    """Central differences of the float64 reference with respect to every input element."""
    flat, treedef = jax.tree.flatten(inputs)
    grads = []
    for i, leaf in enumerate(flat):
        leaf = np.asarray(leaf, np.float64)
        g = np.zeros_like(leaf)
        for j in np.ndindex(leaf.shape):
            for sign in (1, -1):
                bumped = leaf.copy()
                bumped[j] += sign * eps
                g[j] += sign * f(jax.tree.unflatten(treedef, flat[:i] + [bumped] + flat[i + 1:])) / (2 * eps)
        grads.append(g)
    return jax.tree.unflatten(treedef, grads)


@pytest.mark.parametrize("softmax_axis", ["heads", "keys"])
@pytest.mark.parametrize("mm_weight,rev_weight", [(1.0, 100.0), (0.0, 1.0)], ids=["keepfit", "revision_only"])
def test_keepfit_loss_and_terms_match_numpy_values_and_gradients(softmax_axis, mm_weight, rev_weight):
    inputs, cats, keep = problem(0)
    want_total, want_terms = np_total(inputs, cats, keep, softmax_axis, mm_weight, rev_weight)
    f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), inputs)
    total, terms = jax_total(f32, cats, keep, softmax_axis, mm_weight, rev_weight)
    np.testing.assert_allclose(total, want_total, rtol=2e-5)
    for name in ("pub", "mm", "rev"):
        np.testing.assert_allclose(terms[name], want_terms[name], rtol=2e-5, err_msg=name)

    grads = jax.grad(lambda x: jax_total(x, cats, keep, softmax_axis, mm_weight, rev_weight)[0])(f32)
    want = finite_differences(lambda x: np_total(x, cats, keep, softmax_axis, mm_weight, rev_weight)[0], inputs)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        w = dict(jax.tree_util.tree_flatten_with_path(want)[0])[path]
        np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-5 * max(1.0, np.abs(w).max()),
                                   err_msg=jax.tree_util.keystr(path))
    # Every weight matrix of the attention and both towers' embeddings receive gradient.
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))


def test_knowledge_softmax_over_heads_is_the_originals_quirk():
    """'heads' normalises each (query, key) score across the 2 heads, so per query the two heads'
    weights add up to the number of expert keys and the output grows with it; 'keys' is textbook
    attention, each head's weights summing to 1 over the keys."""
    inputs, _, _ = problem(1, bk=4)
    module = lambda axis: KnowledgeAttention(heads=2, dropout=0.0, softmax_axis=axis)  # noqa: E731
    ident = {name: {"kernel": np.eye(8)} for name in ("q", "k", "v", "out")}

    def head_weight_sums(axis, kimg):
        # With the same value vector for every key, each head's half of the output is (the sum of
        # that head's weights) x that half of the value.
        v = np.ones((len(kimg), 8))
        out = np.asarray(module(axis).apply({"params": ident}, inputs["zimg"], kimg, v))
        return out[:, :4].mean(1), out[:, 4:].mean(1)  # [B] each

    h0, h1 = head_weight_sums("heads", inputs["kimg"])
    np.testing.assert_allclose(h0 + h1, 4.0, rtol=1e-5)
    assert not np.allclose(h0, h1)
    h0, h1 = head_weight_sums("heads", np.concatenate([inputs["kimg"]] * 2))
    np.testing.assert_allclose(h0 + h1, 8.0, rtol=1e-5)
    for h in head_weight_sums("keys", inputs["kimg"]):
        np.testing.assert_allclose(h, 1.0, rtol=1e-5)


def test_knowledge_dropout_draws_a_mask_in_train_mode_only():
    inputs, _, _ = problem(2)
    module = KnowledgeAttention(heads=2, dropout=0.5)
    params = module.init(jax.random.key(0), inputs["zimg"], inputs["kimg"], inputs["ktxt"])
    run = lambda det, key=1: module.apply(params, inputs["zimg"], inputs["kimg"], inputs["ktxt"],  # noqa: E731
                                          deterministic=det, rngs={"dropout": jax.random.key(key)})
    np.testing.assert_array_equal(run(True, 1), run(True, 2))
    assert not np.allclose(run(False, 1), run(False, 2))
    assert not np.allclose(run(False, 1), run(True))


def test_local_scope_computes_both_contrastive_terms_per_device_group():
    inputs, cats, keep = problem(3, b=8, bk=4)
    cats = np.array([0, 1, 0, 2, 1, 1, 3, 3])
    x = inputs
    total, terms = losses.keepfit_loss(x["zimg"], x["ztxt"], cats, x["kimg"], x["ktxt"], None, x["logit_scale"],
                                       mm_weight=1.0, rev_weight=0.0, num_groups=2)
    halves = [np_terms(x["zimg"][s], x["ztxt"][s], cats[s], x["kimg"][t], x["ktxt"][t], x["ztxt"][s], x["logit_scale"])
              for s, t in ((slice(0, 4), slice(0, 2)), (slice(4, 8), slice(2, 4)))]
    for name in ("pub", "mm"):
        np.testing.assert_allclose(terms[name], np.mean([h[name] for h in halves]), rtol=2e-5)
    assert "rev" not in terms
    with pytest.raises(ValueError, match="rev_weight"):
        losses.keepfit_loss(x["zimg"], x["ztxt"], cats, x["kimg"], x["ktxt"], None, x["logit_scale"], rev_weight=1.0)


# ------------------------------------------------------------------------------------ config

def test_paper_config_and_ablations():
    c = config_lib.load(KEEPFIT)
    assert (c.data.batch_size, c.data.expert.batch_size, c.text.max_len) == (24, 24, 256)
    assert (c.optim.lr, c.optim.weight_decay) == (1e-4, 1e-5)
    assert (c.model.knowledge.heads, c.model.knowledge.dropout, c.model.knowledge.softmax_axis) == (2, 0.5, "heads")
    assert (c.loss.keepfit.mm_weight, c.loss.keepfit.rev_weight) == (1.0, 100.0)
    assert c.loss.name == "flair" and c.data.stream == "flair" and c.model.img.depth == 50
    rev = config_lib.load(KEEPFIT + ":ablation=revision_only")
    assert (rev.loss.keepfit.mm_weight, rev.loss.keepfit.rev_weight) == (0.0, 1.0)
    mixed = config_lib.load(KEEPFIT + ":ablation=mixed_only")
    assert mixed.loss.keepfit.rev_weight == 0.0 and not mixed.model.knowledge.enabled
    with pytest.raises(ValueError, match="ablation"):
        config_lib.load(KEEPFIT + ":ablation=nothing")


@pytest.mark.parametrize("override,field", [
    ({"data.expert.batch_size": 12}, "data.expert.batch_size"),
    ({"data.expert.size": 4}, "data.expert.size"),
    ({"data.expert.seed": 0}, "data.expert.seed"),
    ({"loss.name": "clip"}, "data.expert.enabled"),
    ({"model.knowledge.enabled": False}, "loss.keepfit.rev_weight"),
    ({"loss.keepfit.mm_weight": 0.0, "loss.keepfit.rev_weight": 0.0}, "loss.keepfit"),
])
def test_validate_names_the_keepfit_field(override, field):
    with pytest.raises(ConfigError, match=f"config.{field}:"):
        validate(tiny_keepfit(**override), 8)


# --------------------------------------------------------------------------------- expert stream

class IndexedCaptions:
    """A source whose captions name their index, to see which examples the expert stream draws."""

    def __init__(self, n, empty=()):
        self.n, self.empty = n, set(empty)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.zeros((8, 8, 3), np.uint8), "caption": "" if i in self.empty else f"caption {i}"}


def collect(examples):
    return {"examples": examples}


def drawn(draw, positions):
    return [int(e["prompt"].split()[1]) for p in positions
            for e in draw(p, np.random.default_rng(p))["examples"]]


def test_expert_draws_are_uniform_with_replacement_and_split_over_processes():
    def draw(process, count):
        return pipeline.DrawExpertBatch(IndexedCaptions(10), process_index=process, process_count=count,
                                        global_batch=8, image_size=8, preprocess="flair", collate=collect)

    indices = drawn(draw(0, 1), range(500))
    assert set(indices) == set(range(10))
    counts = np.bincount(indices, minlength=10)
    # 4000 draws over 10 examples: a chi-square far beyond the 0.999 quantile (27.9, 9 dof) would fail.
    chi2 = ((counts - 400) ** 2 / 400).sum()
    assert chi2 < 27.9, counts
    batches = np.reshape(indices, (500, 8))
    # With replacement: 8 draws from 10 give a repeated example in most batches (P = 0.98).
    assert np.mean([len(set(b)) < 8 for b in batches]) > 0.9
    assert drawn(draw(0, 1), [7]) == drawn(draw(0, 1), [7])  # a position always yields the same batch
    # Two processes read the two halves of the same global batch.
    for p in (3, 7):
        halves = [drawn(draw(k, 2), [p]) for k in (0, 1)]
        assert len(halves[0]) == 4 and halves[0] + halves[1] == drawn(draw(0, 1), [p])


def test_empty_expert_caption_is_an_error_naming_the_example():
    draw = pipeline.DrawExpertBatch(IndexedCaptions(4, empty={0, 1, 2, 3}), process_index=0, process_count=1,
                                    global_batch=2, image_size=8, preprocess="flair", collate=collect)
    with pytest.raises(ValueError, match=r"expert example \d of .* empty caption"):
        draw(0, np.random.default_rng(0))


@pytest.fixture(scope="module")
def tokenize(tmp_path_factory):
    path = pipeline.prepare_tokenizer(tiny_keepfit(), str(tmp_path_factory.mktemp("tok")))
    return Tokenize(path, TINY["text.max_len"])


def test_two_stream_iterator_resumes_both_streams_exactly(tokenize):
    config = tiny_keepfit()
    it = iter(pipeline.train_dataset(config, tokenize))
    first = next(it)
    assert first["image"].shape[0] == 16 and first["expert_image"].shape[0] == 8
    assert first["expert_input_ids"].shape == (8, TINY["text.max_len"])
    # The expert captions go in as they are (no FLAIR prompt template), from the expert corpus.
    texts = tokenize.tokenizer.decode_batch(first["expert_input_ids"].tolist(), skip_special_tokens=True)
    source = pipeline.expert_source(config)
    openings = {" ".join(source.record(i)["caption"].split()[:5]) for i in range(len(source))}
    assert all(" ".join(t.split()[:5]) in openings for t in texts), texts
    for _ in range(2):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    resumed = iter(pipeline.train_dataset(config, tokenize))
    resumed.set_state(state)
    for w in want:
        g = next(resumed)
        assert sorted(g) == sorted(w)
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)
    # The expert stream does not follow the public stream's order: another seed, another draw.
    other = iter(pipeline.train_dataset(config_lib.override(tiny_keepfit(), {"seed": 5}), tokenize))
    assert not np.array_equal(next(other)["expert_input_ids"], first["expert_input_ids"])


# ----------------------------------------------------------------------------------- trainer

@pytest.fixture(scope="module")
def keepfit_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("keepfit"))
    trainer = Trainer(tiny_keepfit(), workdir)
    result = trainer.train()
    return trainer, result, workdir


def test_keepfit_trains_and_logs_every_term(keepfit_run):
    trainer, result, workdir = keepfit_run
    rows = train_rows(workdir)
    assert len(rows) == trainer.total_steps == 8
    for r in rows:
        total = r["train/loss_pub"] + r["train/loss_mm"] + 100 * r["train/loss_rev"]
        np.testing.assert_allclose(r["train/loss"], total, rtol=1e-5)
    assert "aca" in result and "knowledge" in trainer.state.params


def test_batchnorm_is_updated_by_the_public_then_the_expert_pass(keepfit_run):
    trainer, _, _ = keepfit_run
    state = jax.tree.map(jnp.copy, trainer.state)  # the step donates its input
    batch = next(iter(pipeline.train_dataset(trainer.config, trainer.tokenize)))
    stepped, _ = trainer.train_step(state, pipeline.make_global(batch, trainer.batch_sharding))
    params, stats = trainer.state.params, trainer.state.batch_stats

    @jax.jit
    def forward(stats, image, ids, mask):
        _, updates = trainer.model.apply({"params": params, "batch_stats": stats}, image, ids, mask, train=True,
                                         rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
        return updates["batch_stats"]

    def apply(stats, prefix):
        return forward(stats, batch[f"{prefix}image"], batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])

    in_order = apply(apply(stats, ""), "expert_")
    reverse = apply(apply(stats, "expert_"), "")
    public_only = apply(stats, "")
    for got, want in zip(leaves(stepped.batch_stats), leaves(in_order)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    for other in (reverse, public_only):
        assert not all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(leaves(in_order), leaves(other)))


def test_crashed_keepfit_run_resumes_both_streams_exactly(keepfit_run, tmp_path):
    reference, _, _ = keepfit_run
    resumed = crash_and_resume(tiny_keepfit(**{"train.eval_at_end": False}), str(tmp_path), crash_at=6, last_checkpoint=4)
    for field in ("params", "opt_state", "batch_stats"):
        assert_trees_equal(getattr(resumed.state, field), getattr(reference.state, field))
    assert resumed.data_iter.get_state() == reference.data_iter.get_state()
