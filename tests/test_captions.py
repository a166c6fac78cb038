"""Caption metrics of KeepFIT V2 (docs/methods.md, "KeepFIT V2"): BLEU, ROUGE-L, CIDEr-D."""
import math

import numpy as np
import pytest

from retina_jax.evals.captions import bleu, caption_metrics, cider_d, rouge_l, tokenize

SENTENCES = ["the optic disc is pale with sharp margins",
             "there are hard exudates near the fovea",
             "a normal fundus with a clear macular reflex"]


def test_tokenize_lowercases_and_drops_punctuation():
    # Inside a word punctuation is deleted (PTB keeps "cup-to-disc" and "0.5" as one token each).
    assert tokenize("A Cup-to-disc ratio of 0.5, (well-defined) margins.") == [
        "a", "cuptodisc", "ratio", "of", "05", "welldefined", "margins"]
    assert tokenize("  ...  ") == []


def test_identical_captions_score_perfectly():
    out = caption_metrics([s.upper() + "." for s in SENTENCES], [[s] for s in SENTENCES])
    for n in range(1, 5):
        assert out[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert out["rouge_l"] == pytest.approx(1.0)
    # Each caption's n-grams of every order include one missing from the other reference sets, so
    # every order has a non-zero tf-idf norm and cosine 1: CIDEr-D = 10 * mean over orders of 1.
    assert out["cider"] == pytest.approx(10.0)
    assert set(out) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"}
    assert all(type(v) is float for v in out.values())


def test_one_string_reference_equals_a_list_of_one():
    hyps = ["a b c d", "b c d e f"]
    assert caption_metrics(hyps, ["a b c e", "b c d"]) == caption_metrics(hyps, [["a b c e"], ["b c d"]])


def test_bleu_clips_counts_to_the_max_reference_count():
    # Unigrams: "the" x4 in the hypothesis, at most 2 in one reference -> p1 = 2/4. Bigrams: "the the"
    # x3, at most 1 in one reference -> p2 = 1/3. Length 4, closest reference length 3: no penalty.
    b1, b2, _, _ = bleu(["the the the the"], [["the cat", "the the mat"]])
    assert b1 == pytest.approx(0.5, rel=1e-6)
    assert b2 == pytest.approx(math.sqrt(0.5 / 3), rel=1e-6)


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
    # Length 3 against references of lengths 1 and 4: closest is 4 (shortest or average would give no
    # penalty), so BP = exp(1 - 4/3); every unigram matches.
    assert bleu(["a b c"], [["a", "a b c d"]], max_n=1)[0] == pytest.approx(math.exp(-1 / 3), rel=1e-6)
    # A tie (lengths 2 and 4 are both 1 away from 3) takes the shorter one: no penalty.
    assert bleu(["a b c"], [["a b", "a b c d"]], max_n=1)[0] == pytest.approx(1.0, rel=1e-6)


def test_bleu_is_corpus_level():
    # Counts are summed before dividing: unigrams 4 + 1 matched of 4 + 2, bigrams 3 + 0 of 3 + 1;
    # lengths 6 against 4 + 4, BP = exp(1 - 8/6). (The mean of sentence BLEU-1 would be (1 + e^-1 / 2) / 2.)
    b1, b2, _, _ = bleu(["a b c d", "x y"], ["a b c d", "x z w v"])
    assert b1 == pytest.approx(5 / 6 * math.exp(-1 / 3), rel=1e-6)
    assert b2 == pytest.approx(math.sqrt(5 / 6 * 3 / 4) * math.exp(-1 / 3), rel=1e-6)


def test_bleu_keeps_the_pycocoevalcap_epsilon_for_orders_with_no_ngram():
    # Two tokens have no trigram: p3 = (0 + 1e-15) / (0 + 1e-9) = 1e-6, not 0 (which would zero BLEU-3).
    _, b2, b3, b4 = bleu(["a b"], ["a b"])
    assert b2 == pytest.approx(1.0)
    assert b3 == pytest.approx(1e-6 ** (1 / 3), rel=1e-6)
    assert b4 == pytest.approx(1e-12 ** (1 / 4), rel=1e-6)


def test_rouge_l_hand_computed():
    # LCS of "a b c d e" and "a x c y e z" is "a c e" (3): P = 3/5, R = 3/6, beta = 1.2.
    p, r = 3 / 5, 3 / 6
    f = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert rouge_l(["a b c d e"], ["a x c y e z"]) == pytest.approx(f)
    # Precision and recall are maxed separately over references: P = 4/4 from the long one, R = 2/2
    # from the short one, so F = 1 though neither reference alone gives it. The empty second
    # hypothesis scores 0 and the corpus value is the mean.
    assert rouge_l(["a b c d", ""], [["a b", "a x b y c z d w"], "q"]) == pytest.approx(0.5)


def test_cider_d_hand_computed():
    # Three captions, so idf = log 3 - log df. df counts reference sets: "a" is in two (idf log 1.5),
    # every other reference n-gram in one (idf log 3); hypothesis n-grams in no reference set count as
    # df 1 (idf log 3). Orders 3 and 4 have no n-gram here and add 0 to the mean over 4 orders.
    hyps = ["a b", "c c d", "e"]
    refs = ["a b", "c d", "a e"]
    l3, l15 = math.log(3), math.log(1.5)
    penalty = math.exp(-1 / (2 * 6.0 ** 2))  # length difference 1, sigma 6
    # 1: identical, cosine 1 on unigrams and bigrams, length difference 0 -> 10 * 2/4.
    first = 5.0
    # 2: unigrams hyp (c: 2*l3, d: l3), ref (c: l3, d: l3); clipping: min(2*l3, l3)*l3 + l3*l3 = 2*l3^2
    #    over norms sqrt(5)*l3 * sqrt(2)*l3 -> 2/sqrt(10). Bigrams hyp (cc: l3, cd: l3), ref (cd: l3):
    #    l3^2 / (sqrt(2)*l3 * l3) = 1/sqrt(2).
    second = 10 / 4 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) * penalty
    # 3: unigram hyp (e: l3), ref (a: l15, e: l3): cosine l3 / sqrt(l15^2 + l3^2); no hyp bigram.
    third = 10 / 4 * l3 / math.sqrt(l15 ** 2 + l3 ** 2) * penalty
    assert cider_d(hyps, refs) == pytest.approx((first + second + third) / 3, rel=1e-9)
    # A corpus of one caption has idf log 1 - log 1 = 0 for every n-gram.
    assert cider_d(["a b"], ["a b"]) == 0.0


def test_empty_hypothesis_scores_zero():
    out = caption_metrics([""], ["a normal fundus"])
    assert out == {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "rouge_l": 0.0, "cider": 0.0}


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference sets"):
        caption_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        caption_metrics(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match=r"references\[1\]\[0\] is empty after tokenisation: '\?!'"):
        rouge_l(["a", "b"], ["a", ["?!", "b"]])
    with pytest.raises(ValueError, match="no captions"):
        bleu([], [])
    with pytest.raises(TypeError, match="not one string"):
        cider_d("a b", ["a b"])
    with pytest.raises(TypeError, match=r"hypotheses\[0\] is list"):
        caption_metrics([["a"]], ["a"])


def _random_corpus(rng):
    # A six-word vocabulary so that n-grams up to 4 repeat within and across captions; empty
    # hypotheses and corpora of one caption are included.
    vocab = np.array(["disc", "cup", "pale", "the", "fovea", "exudate"])

    def sentence(lo):
        return " ".join(rng.choice(vocab, size=rng.integers(lo, 13)))

    size = int(rng.integers(1, 25))
    return ([sentence(0) for _ in range(size)],
            [[sentence(1) for _ in range(rng.integers(1, 6))] for _ in range(size)])


def test_matches_pycocoevalcap_on_random_corpora():
    from pycocoevalcap.bleu.bleu import Bleu as coco_bleu
    from pycocoevalcap.rouge.rouge import Rouge as coco_rouge
    from pycocoevalcap.cider.cider import Cider as coco_cider
    rng = np.random.default_rng(0)
    for _ in range(40):
        hyps, refs = _random_corpus(rng)
        # pycocoevalcap's input is already tokenised; ours is the identity on this text.
        gts = {i: r for i, r in enumerate(refs)}
        res = {i: [h] for i, h in enumerate(hyps)}
        expected = coco_bleu(4).compute_score(gts, res, verbose=0)[0]
        expected += [coco_rouge().compute_score(gts, res)[0], coco_cider().compute_score(gts, res)[0]]
        out = caption_metrics(hyps, refs)
        got = [out["bleu_1"], out["bleu_2"], out["bleu_3"], out["bleu_4"], out["rouge_l"], out["cider"]]
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15, err_msg=f"{hyps} {refs}")
