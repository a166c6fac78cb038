"""KeepFIT V2 (docs/methods.md, "KeepFIT V2"): whole-word masking, the token losses (padding ignored, global
normalisation equal on 1 and 8 devices), the caption decoder and its greedy / beam-search
generation, modality-aware prompts, the config and both stages in the trainer."""
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from test_keepfit import TINY as KEEPFIT_TINY
from test_train import REPO, assert_trees_equal, train_rows

from retina_jax import checkpointing, config as config_lib, losses
from retina_jax.config import ConfigError, validate
from retina_jax.data import pipeline
from retina_jax.evals import base
from retina_jax.data.text_corpus import TextSource, WholeWordMask, read_text_folder
from retina_jax.data.tokenizer import learn_wordpiece, load_tokenizer
from retina_jax.models import caption_decoder
from retina_jax.models.caption_decoder import CaptionDecoder
from retina_jax.train import Trainer

TEXTS = [
    "Moderate nonproliferative diabetic retinopathy with scattered microaneurysms and haemorrhages.",
    "The optic disc shows an enlarged cup-to-disc ratio of about 0.7, suggesting glaucoma.",
    "Drusen at the macula; no haemorrhages, no exudates.",
    "Fluorescein angiography of the left eye showing leakage from neovascularisation at the disc.",
    "Normal retina.",
] * 8


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    # A vocabulary of characters plus very few words: most words split into several pieces, so
    # "whole word" is a real constraint.
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    chars = {c for text in TEXTS for c in text.lower() if not c.isspace()}
    learn_wordpiece(TEXTS, path, vocab_size=5 + 2 * len(chars) + 8, lowercase=True, max_len=64)
    return path


# ---------------------------------------------------------------------------- whole-word masking

def test_whole_word_masking_takes_whole_words_at_15_percent_and_never_special_tokens(wordpiece):
    mask = WholeWordMask(wordpiece, 64, 0.15)
    tok = load_tokenizer(wordpiece, 64)
    special_ids = {tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")}
    masked = real = 0
    kinds = {"mask": 0, "random": 0, "same": 0}
    split_words = 0
    for i, text in enumerate(TEXTS * 5):
        out = mask(text, np.random.default_rng(i))
        enc = tok.encode(text)
        ids = np.asarray(enc.ids)
        np.testing.assert_array_equal(out["mlm_labels"], ids)  # targets: the original tokens
        w = out["mlm_weights"].astype(bool)
        assert not np.any(w & np.asarray(enc.special_tokens_mask, bool)), "a special token was selected"
        words = {}
        for pos, word in enumerate(enc.word_ids):
            if word is not None:
                words.setdefault(word, []).append(pos)
        for positions in words.values():
            split_words += len(positions) > 1
            assert len(set(w[positions])) == 1, f"word at {positions} partly masked in {text!r}"
        n_real = len([p for ps in words.values() for p in ps])
        assert 1 <= w.sum() <= max(1, round(0.15 * n_real))
        masked, real = masked + w.sum(), real + n_real
        # Unselected positions are untouched; selected ones are [MASK], a random non-special token or kept.
        np.testing.assert_array_equal(out["input_ids"][~w], ids[~w])
        for got, want in zip(out["input_ids"][w], ids[w]):
            if got == tok.token_to_id("[MASK]"):
                kinds["mask"] += 1
            elif got == want:
                kinds["same"] += 1
            else:
                assert got not in special_ids
                kinds["random"] += 1
    assert split_words > 100, "the vocabulary should split many words into pieces"
    assert 0.12 < masked / real <= 0.15, masked / real
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.06, kinds
    assert kinds["random"] > 0 and kinds["same"] > 0, kinds


def test_whole_word_masking_is_reproducible_per_generator_and_rejects_empty_text(wordpiece):
    mask = WholeWordMask(wordpiece, 64)
    a, b = mask(TEXTS[0], np.random.default_rng(3)), mask(TEXTS[0], np.random.default_rng(3))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = mask(TEXTS[0], np.random.default_rng(4))
    assert not np.array_equal(a["mlm_weights"], c["mlm_weights"])
    with pytest.raises(ValueError, match="empty text"):
        mask("   ", np.random.default_rng(0))


def test_text_folder_corpus(tmp_path):
    (tmp_path / "b.txt").write_text("second file line\n\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first line\n   \nsecond line\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert read_text_folder(str(tmp_path)) == ["first line", "second line", "second file line"]
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="c.txt: not UTF-8"):
        read_text_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mlm.corpus"):
        read_text_folder(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        read_text_folder(str(empty))
    source = TextSource(["x", "y"], name="two")
    assert len(source) == 2 and source[1] == "y"


# -------------------------------------------------------------------------------- token losses

def np_token_ce(logits, targets, weights):
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (nll * weights).sum() / weights.sum()


def caption_problem(seed=0, b=16, length=10, vocab=12):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, length, vocab)).astype(np.float32)
    targets = rng.integers(vocab, size=(b, length))
    # Very different real lengths per row, so per-device means differ from the global mean.
    real = np.concatenate([rng.integers(1, 3, b // 2), rng.integers(8, length + 1, b - b // 2)])
    weights = (np.arange(length)[None] < real[:, None]).astype(np.float32)
    return logits, targets, weights


def test_token_cross_entropy_matches_reference_and_ignores_padding():
    logits, targets, weights = caption_problem()
    loss, accuracy = losses.token_cross_entropy(logits, targets, weights)
    np.testing.assert_allclose(loss, np_token_ce(logits, targets, weights), rtol=1e-5)
    want_acc = ((logits.argmax(-1) == targets) * weights).sum() / weights.sum()
    np.testing.assert_allclose(accuracy, want_acc, rtol=1e-6)
    # Anything at padded positions (logits or targets) changes nothing, value or gradient.
    noisy = np.where(weights[..., None] > 0, logits, 100 * np.random.default_rng(1).normal(size=logits.shape))
    other_targets = np.where(weights > 0, targets, 0)
    grad = lambda lg, t: jax.grad(lambda x: losses.token_cross_entropy(x, t, weights)[0])(lg)  # noqa: E731
    np.testing.assert_allclose(losses.token_cross_entropy(noisy.astype(np.float32), other_targets, weights)[0], loss,
                               rtol=1e-6)
    g = grad(logits, targets)
    np.testing.assert_array_equal(np.asarray(g)[weights == 0], 0.0)
    assert float(losses.token_cross_entropy(logits, targets, np.zeros_like(weights))[0]) == 0.0


def test_caption_loss_is_normalised_by_the_global_token_count_on_1_and_8_devices(devices):
    logits, targets, weights = caption_problem(b=16)
    fn = lambda lg, t, w: losses.token_cross_entropy(lg, t, w)[0]  # noqa: E731
    grad_fn = jax.grad(fn)
    one = jax.jit(fn)(logits, targets, weights), jax.jit(grad_fn)(logits, targets, weights)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    rows = NamedSharding(mesh, P("data"))
    put = lambda x: jax.device_put(x, rows)  # noqa: E731
    eight = (jax.jit(fn)(put(logits), put(targets), put(weights)), jax.jit(grad_fn)(put(logits), put(targets),
                                                                                   put(weights)))
    np.testing.assert_allclose(eight[0], one[0], rtol=1e-6)
    np.testing.assert_allclose(eight[1], one[1], rtol=1e-5, atol=1e-9)
    # The per-device mean of means (each device normalising by its own tokens) is a different number.
    rows_of = lambda i: slice(2 * i, 2 * i + 2)  # noqa: E731  device i's rows
    per_device = np.mean([np_token_ce(logits[rows_of(i)], targets[rows_of(i)], weights[rows_of(i)])
                          for i in range(8)])
    assert abs(per_device - float(one[0])) > 1e-3


# ------------------------------------------------------------------------- decoder and generation

def tiny_decoder(vocab=7, max_len=6):
    model = CaptionDecoder(vocab_size=vocab, max_len=max_len, width=16, layers=2, heads=2, mlp_dim=32, dropout=0.0)
    memory = np.random.default_rng(0).normal(size=(3, 4, 10)).astype(np.float32)
    params = model.init(jax.random.key(1), jnp.zeros((3, max_len), jnp.int32), memory)
    # Sharper, less uniform next-token distributions than the small default init gives.
    params = jax.tree.map(lambda x: x * 4.0, params)
    return model, params, memory


def test_decoder_is_causal():
    model, params, memory = tiny_decoder()
    tokens = np.random.default_rng(2).integers(7, size=(3, 6))
    changed = tokens.copy()
    changed[:, 4:] = (changed[:, 4:] + 1) % 7
    apply = jax.jit(model.apply)
    a, b = apply(params, tokens, memory), apply(params, changed, memory)
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[:, 4:], b[:, 4:])


def log_probs_fn(model, params, memory):
    apply = jax.jit(model.apply)

    def log_probs(tokens, t):
        mem = jnp.repeat(memory, tokens.shape[0] // memory.shape[0], axis=0)
        return jax.nn.log_softmax(apply(params, tokens, mem)[:, t - 1], axis=-1)
    return log_probs


IDS = dict(bos_id=1, eos_id=2, pad_id=0)


def test_beam_search_at_width_1_is_greedy():
    model, params, memory = tiny_decoder()
    lp = log_probs_fn(model, params, memory)
    greedy = caption_decoder.greedy_decode(lp, batch_size=3, max_len=6, **IDS)
    beam = caption_decoder.beam_search(lp, batch_size=3, max_len=6, beam_size=1, **IDS)
    np.testing.assert_array_equal(beam, greedy)
    assert np.all(greedy[:, 0] == 1)


def test_wide_beam_search_finds_the_exhaustive_optimum():
    """With a beam as wide as the search space, beam search is exact: compare with enumerating every
    sequence (vocabulary 7, 3 generated tokens; after [SEP] only padding), length_penalty 0."""
    model, params, memory = tiny_decoder(max_len=4)
    seqs = np.array([[1, *seq] for seq in itertools.product(range(7), repeat=3)], np.int32)  # [343, 4]
    valid = np.ones(len(seqs), bool)
    for i, s in enumerate(seqs):
        ends = np.flatnonzero(s[1:] == IDS["eos_id"])
        if len(ends):
            valid[i] = np.all(s[ends[0] + 2:] == IDS["pad_id"])
    for row in range(3):
        lp = log_probs_fn(model, params, memory[row:row + 1])
        # The decoder is causal, so one pass over every full sequence gives every prefix's next-token
        # distribution: position t - 1 scores token t.
        table = np.stack([np.asarray(lp(jnp.asarray(seqs), t)) for t in range(1, 4)], axis=1)  # [343, 3, V]
        scores = np.zeros(len(seqs))
        for i, s in enumerate(seqs):
            for t in range(1, 4):
                scores[i] += table[i, t - 1, s[t]]
                if s[t] == IDS["eos_id"]:
                    break
        best = seqs[np.argmax(np.where(valid, scores, -np.inf))]
        got = caption_decoder.beam_search(lp, batch_size=1, max_len=4, beam_size=7 ** 3, length_penalty=0.0, **IDS)[0]
        np.testing.assert_array_equal(got, best)


# --------------------------------------------------------------------------------------- prompts

def test_modality_aware_prompts():
    template = "A {atr} {modality} of {cls}"
    assert pipeline.make_prompt(template, "", "drusen", "FFA") == "A fluorescein angiography of drusen"
    assert pipeline.make_prompt(template, "noisy", "glaucoma", "OCT") == "A noisy OCT scan of glaucoma"
    assert pipeline.make_prompt(template, "", "glaucoma") == "A fundus photograph of glaucoma"
    assert pipeline.make_prompt("A {atr} fundus photograph of {cls}", "", "x", "FFA") == "A fundus photograph of x"
    with pytest.raises(ValueError, match="unknown modality 'MRI'"):
        pipeline.make_prompt(template, "", "x", "MRI")


# ------------------------------------------------------------------------------- config and runs

V2 = os.path.join(REPO, "configs", "keepfit_v2.py")
STAGE_TEXT_TINY = {
    **{k: v for k, v in KEEPFIT_TINY.items() if not k.startswith("data.expert.batch")},
    "mlm.heldout_size": 16,  # 64 reports + 24 captions - 16 held out = 72 texts: 4 steps per epoch
    "heldout.batch_size": 16,
}
STAGE_VL_TINY = {
    **KEEPFIT_TINY,
    "train.epochs": 1.0,  # 4 steps
    "optim.schedule_epochs": 1.0,
    "model.decoder.width": 16,
    "model.decoder.layers": 1,
    "model.decoder.heads": 2,
    "model.decoder.mlp_dim": 32,
    "heldout.captions.size": 16,
    "evals.captions.max_len": 24,
}


def test_paper_config_of_both_stages():
    text = config_lib.load(f"{V2}:stage=text")
    assert text.mlm.enabled and text.mlm.mask_prob == 0.15 and text.text.max_len == 112
    assert (text.optim.lr, text.optim.b1, text.optim.b2, text.optim.weight_decay) == (1e-5, 0.9, 0.95, 0.05)
    assert not text.data.expert.enabled and not text.model.knowledge.enabled and not text.model.decoder.enabled
    vl = config_lib.load(f"{V2}:stage=vl")
    assert vl.model_init == "workdirs/keepfit_v2_text" and vl.model_init_trees == ("txt",)
    assert vl.text.tokenizer == "workdirs/keepfit_v2_text/tokenizer"
    assert vl.data.expert.modalities == ("CFP", "FFA", "OCT")
    assert vl.data.expert.modality_weights == (2169.0, 1947.0, 233.0) and vl.data.expert.size == 4349
    assert vl.data.prompt_template == "A {atr} {modality} of {cls}"
    assert (vl.loss.keepfit.mm_weight, vl.loss.keepfit.rev_weight, vl.loss.keepfit.gen_weight) == (1.0, 100.0, 1.0)
    assert vl.model.decoder.enabled and vl.evals.captions.at_end
    assert (vl.data.batch_size, vl.data.expert.batch_size, vl.optim.lr) == (24, 24, 1e-4)  # KeepFIT's
    with pytest.raises(ValueError, match="stage=text or :stage=vl"):
        config_lib.load(V2)


@pytest.mark.parametrize("fields, message", [
    ({"loss.keepfit.gen_weight": 0.0}, "config.loss.keepfit.gen_weight: 0.0 with model.decoder.enabled=True"),
    ({"model.decoder.heads": 3}, "config.model.decoder.heads: width 16 is not divisible by 3 heads"),
    ({"model.img.name": "vit", "model.img.vit.patch_size": 8}, "config.model.decoder.enabled: its spatial image "
                                                                "tokens are implemented for model.img.name='resnet'"),
    ({"evals.captions.beam_size": 0}, "config.evals.captions.beam_size: 0 must be >= 1"),
    ({"evals.captions.max_len": 100}, "config.evals.captions.max_len: 100 must be in [2, text.max_len=48]"),
    ({"heldout.captions.seed": 1}, "config.heldout.captions.seed: 1 must differ"),
    ({"data.expert.modalities": ("CFP", "MRI")}, "config.data.expert.modalities"),
    ({"data.expert.modality_weights": (1.0,)}, "config.data.expert.modality_weights: 1 weights for 3 modalities"),
    ({"model_init": "", "model_init_trees": ("txt",)}, "config.model_init_trees: ('txt',) given without model_init"),
])
def test_stage_vl_validation_names_the_field(fields, message, tmp_path):
    c = config_lib.load(f"{V2}:stage=vl,demo,text_workdir={tmp_path}")
    c = config_lib.override(c, {**STAGE_VL_TINY, "text.tokenizer": "learn", "model_init": str(tmp_path), **fields})
    with pytest.raises(ConfigError) as e:
        validate(c, 8)
    assert message in str(e.value)


def test_stage_text_validation_names_the_field(tmp_path):
    c = config_lib.override(config_lib.load(f"{V2}:stage=text,demo"),
                            {"mlm.mask_prob": 1.5, "mlm.corpus": str(tmp_path / "nowhere"), "data.expert.enabled": True})
    with pytest.raises(ConfigError) as e:
        validate(c, 8)
    for message in ("config.mlm.mask_prob: 1.5 must be in (0, 1)", "config.mlm.corpus:",
                    "config.mlm.enabled: stage `text` trains the text tower alone"):
        assert message in str(e.value)


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    """Stage `text` for 8 steps, then stage `vl` from its encoder for 4 steps."""
    text_dir = str(tmp_path_factory.mktemp("v2_text"))
    text = Trainer(config_lib.override(config_lib.load(f"{V2}:stage=text,demo"), STAGE_TEXT_TINY), text_dir)
    text.train()
    vl_dir = str(tmp_path_factory.mktemp("v2_vl"))
    vl = Trainer(config_lib.override(config_lib.load(f"{V2}:stage=vl,demo,text_workdir={text_dir}"), STAGE_VL_TINY),
                 vl_dir)
    mngr = checkpointing.manager(checkpointing.checkpoint_dir(vl_dir))
    start = vl.restore_or_init(mngr, None)  # no checkpoint yet: fresh state + model_init
    mngr.close()
    start = jax.device_get(start.params)
    vl.train()
    return text, text_dir, vl, vl_dir, start


def test_stage_text_trains_the_masked_lm_and_reports_heldout_accuracy(two_stages):
    text, text_dir, *_ = two_stages
    rows = train_rows(text_dir)
    assert len(rows) == 8 and "train/mlm_accuracy" in rows[0]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert "train/logit_scale" not in rows[0]
    with open(os.path.join(text_dir, "eval_mlm_heldout.json")) as f:
        report = json.load(f)
    state = text.restore_latest()
    assert sorted(state.params) == ["mlm_head", "txt"]
    # The report against NumPy over the same held-out masks: every masked token pooled.
    encoder = text.encoder.at(state.params, state.batch_stats)
    nll, hits, count = [], 0, 0
    for batch in pipeline.mlm_heldout_batches(text.config, text.tokenize.path, text.config.heldout.batch_size):
        logits = np.asarray(encoder.mlm_logits(batch["input_ids"], batch["attention_mask"]), np.float64)
        at = batch["mlm_weights"] > 0
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        target = batch["mlm_labels"][at]
        nll += list(-logp[at][np.arange(len(target)), target])
        hits += int((logits[at].argmax(-1) == target).sum())
        count += int(at.sum())
    assert report["num_masked_tokens"] == count > 16
    np.testing.assert_allclose(report["loss"], np.mean(nll), rtol=1e-4)
    assert report["accuracy"] == pytest.approx(hits / count, abs=1e-6)


def test_stage_vl_starts_from_the_text_encoder_only(two_stages):
    text, text_dir, vl, _, start = two_stages
    assert vl.tokenize.path == os.path.join(text_dir, "tokenizer")  # the encoder's own vocabulary
    assert "mlm_head" not in start
    assert_trees_equal(start["txt"], jax.device_get(text.restore_latest().params["txt"]))
    fresh = jax.device_get(vl.init_state().params)
    for tree in ("img", "decoder", "knowledge", "img_proj", "txt_proj"):
        assert_trees_equal(start[tree], fresh[tree])


def test_stage_vl_loss_adds_the_caption_term_and_reports_caption_metrics(two_stages):
    _, _, vl, vl_dir, _ = two_stages
    rows = train_rows(vl_dir)
    assert len(rows) == 4
    for r in rows:
        want = r["train/loss_pub"] + r["train/loss_mm"] + 100 * r["train/loss_rev"] + r["train/loss_cap"]
        np.testing.assert_allclose(r["train/loss"], want, rtol=1e-5)
        assert r["train/loss_cap"] > 0
    with open(os.path.join(vl_dir, "eval_captions.json")) as f:
        report = json.load(f)
    assert report["num_examples"] == 16 and report["beam_size"] == 1
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"):
        assert np.isfinite(report[key])
    assert report["examples"][0]["reference"] == pipeline.caption_source(vl.config).record(
        report["examples"][0]["index"])["caption"]
    modalities = {pipeline.caption_source(vl.config).record(i)["modality"] for i in range(16)}
    assert modalities >= {"CFP", "FFA"}, modalities
    # The greedy captions are the argmax continuation of the decoder, token by token (NumPy loop).
    encoder = vl.encoder.at(vl.state.params, vl.state.batch_stats)
    source = pipeline.caption_source(vl.config)
    memory, _ = encoder.image_tokens(pipeline.heldout_batches(vl.config, vl.config.heldout.batch_size, source,
                                                              lambda example: example["index"]))
    tok = vl.tokenize.tokenizer
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    max_len = vl.config.evals.captions.max_len
    tokens = np.full((1, max_len), tok.token_to_id("[PAD]"), np.int32)
    tokens[0, 0] = cls
    for t in range(1, max_len):
        tokens[0, t] = int(np.argmax(np.asarray(encoder.caption_logits(memory[:1], tokens))[0, t - 1]))
        if tokens[0, t] == sep:
            break
    assert report["examples"][0]["generated"] == tok.decode(tokens[0].tolist(), skip_special_tokens=True)
    # Beam search through the same evaluator, against a beam search written out here over the decoder's
    # log-probabilities: beams ranked by summed log-probability, a finished beam carried on unchanged,
    # the final pick by score / generated length.
    result, extra = base.make(vl.config, "captions", beam_size=3, max_len=max_len).run(encoder)
    assert result["num_examples"] == 16 and extra["beam_size"] == 3
    beams = [([cls], 0.0, False)]
    for t in range(1, max_len):
        candidates = []
        for toks, score, done in beams:
            if done:
                candidates.append((toks, score, True))
                continue
            padded = np.array([toks + [tok.token_to_id("[PAD]")] * (max_len - len(toks))], np.int32)
            logits = np.asarray(encoder.caption_logits(memory[:1], padded), np.float64)[0, t - 1]
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            candidates += [(toks + [int(v)], score + logp[v], int(v) == sep) for v in np.argsort(-logp)[:3]]
        beams = sorted(candidates, key=lambda c: -c[1])[:3]
        if all(done for _, _, done in beams):
            break
    best = max(beams, key=lambda b: b[1] / max(len(b[0]) - 1, 1))[0]
    assert extra["examples"][0]["generated"] == tok.decode(best, skip_special_tokens=True)


def test_stage_text_reads_a_folder_of_txt_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"Subretinal fluid case {i}: choroidal neovascularisation treated with anti-VEGF." for i in range(40)]
    (corpus / "a.txt").write_text("\n".join(lines[:25]) + "\n", encoding="utf-8")
    (corpus / "b.txt").write_text("\n".join(lines[25:]) + "\n", encoding="utf-8")
    c = config_lib.override(config_lib.load(f"{V2}:stage=text,demo"), {
        **STAGE_TEXT_TINY, "mlm.corpus": str(corpus), "mlm.heldout_size": 8})
    validate(c, 8)
    path = pipeline.prepare_tokenizer(c, str(tmp_path / "run"))
    vocab = load_tokenizer(path, 48).get_vocab()
    assert "subretinal" in vocab or "Subretinal" in vocab  # the folder's words are in the learned vocabulary
    assert [pipeline.text_source(c)[i] for i in (0, 39)] == [lines[0], lines[39]]
    batch = next(iter(pipeline.mlm_dataset(c, path)))
    assert batch["input_ids"].shape == batch["mlm_weights"].shape == (16, 48)
    assert batch["mlm_weights"].sum() >= 16  # at least one masked token per text
    heldout = list(pipeline.mlm_heldout_batches(c, path, 16))
    assert len(heldout) == 1 and heldout[0]["mlm_weights"][8:].sum() == 0  # 8 texts, 8 padded rows
