"""Caption-generation metrics for KeepFIT V2 (docs/methods.md, "KeepFIT V2": caption generation
(greedy or beam) with BLEU/ROUGE-L/CIDEr).

Captioning papers report the COCO-caption numbers of pycocoevalcap, so these are its definitions:
- `bleu`: its `Bleu(4)`. Corpus BLEU: clipped n-gram matches and candidate n-gram counts are summed
  over the corpus before the precisions are taken, BLEU-n is the geometric mean of precisions 1..n,
  and the brevity penalty uses, per caption, the reference length closest to the hypothesis length
  (the shorter one on a tie), summed over the corpus. Its epsilons (1e-15 added to matches, 1e-9 to
  counts) are kept, so an order with no candidate n-gram gives a precision of 1e-6, not 0 or NaN.
- `rouge_l`: its `Rouge`. LCS F-measure with beta = 1.2, where precision and recall are each the max
  over the references (possibly from different references), averaged over captions.
- `cider_d`: its `Cider`, which is CIDEr-D: n-grams 1..4 weighted by tf-idf, the document frequency
  counted over the evaluated corpus's reference sets and the idf taken as log(number of captions),
  hypothesis weights clipped at the reference's, a Gaussian length penalty (sigma = 6), mean over
  orders and references, times 10. Since the idf comes from the corpus itself, a corpus of one
  caption always scores 0, and scores are comparable only across runs on the same reference set.

pycocoevalcap tokenises with the Java PTB tokenizer of Stanford CoreNLP and then drops punctuation
tokens; `tokenize` approximates that in Python (see there). On text that is already lowercase, space
separated and free of punctuation the two agree and so do the scores.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

_INTRA_WORD_PUNCT = re.compile(r"(?<=\w)[^\w\s](?=\w)")
_PUNCT = re.compile(r"[^\w\s]")
_BETA = 1.2  # ROUGE-L recall weight, pycocoevalcap's value
_SIGMA = 6.0  # CIDEr-D length-penalty width, pycocoevalcap's value

Tokens = list[str]


def tokenize(text: str) -> list[str]:
    """Lowercase, drop punctuation, split on whitespace.

    Punctuation inside a word is deleted rather than turned into a space, because PTB keeps
    "cup-to-disc", "0.5" and "well-defined" as one token each: deleting keeps the token count (and so
    BLEU's brevity penalty and CIDEr-D's length penalty) in line with pycocoevalcap. Known gap: PTB
    splits clitics ("don't" -> "do n't"), here they become one token ("dont").
    """
    return _PUNCT.sub(" ", _INTRA_WORD_PUNCT.sub("", text.lower())).split()


def _prepare(hypotheses: Sequence[str],
             references: Sequence[Sequence[str] | str]) -> tuple[list[Tokens], list[list[Tokens]]]:
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of captions, not one string")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("no captions to score")
    hyps, refs = [], []
    for i, (hyp, ref_set) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise TypeError(f"hypotheses[{i}] is {type(hyp).__name__}, not str")
        ref_set = [ref_set] if isinstance(ref_set, str) else list(ref_set)
        if not ref_set:
            raise ValueError(f"references[{i}] is empty: every caption needs at least one reference")
        tokenized = []
        for j, ref in enumerate(ref_set):
            tokens = tokenize(ref)
            # An empty reference is an eval-set bug, and it would divide by zero in ROUGE-L's recall.
            if not tokens:
                raise ValueError(f"references[{i}][{j}] is empty after tokenisation: {ref!r}")
            tokenized.append(tokens)
        hyps.append(tokenize(hyp))
        refs.append(tokenized)
    return hyps, refs


def _ngram_counts(tokens: Tokens, max_n: int) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, max_n + 1) for i in range(len(tokens) - k + 1))


def _bleu(hyps: list[Tokens], refs: list[list[Tokens]], max_n: int) -> list[float]:
    matches, guesses = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref_set in zip(hyps, refs):
        max_ref_counts = Counter()
        for ref in ref_set:
            max_ref_counts |= _ngram_counts(ref, max_n)
        for gram, count in _ngram_counts(hyp, max_n).items():
            matches[len(gram) - 1] += min(count, max_ref_counts[gram])
        for k in range(max_n):
            guesses[k] += max(0, len(hyp) - k)
        hyp_len += len(hyp)
        ref_len += min((abs(len(ref) - len(hyp)), len(ref)) for ref in ref_set)[1]
    # Same running product and epsilons as pycocoevalcap, so the floats agree to rounding.
    tiny, small = 1e-15, 1e-9
    scores, product = [], 1.0
    for k in range(max_n):
        product *= (matches[k] + tiny) / (guesses[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: Tokens, b: Tokens) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_l(hyps: list[Tokens], refs: list[list[Tokens]], beta: float) -> float:
    scores = []
    for hyp, ref_set in zip(hyps, refs):
        if not hyp:
            scores.append(0.0)
            continue
        lcs = [_lcs_length(ref, hyp) for ref in ref_set]
        precision = max(lcs) / len(hyp)
        recall = max(m / len(ref) for m, ref in zip(lcs, ref_set))
        if precision and recall:
            scores.append((1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision))
        else:
            scores.append(0.0)
    return float(np.mean(scores))


def _cider_d(hyps: list[Tokens], refs: list[list[Tokens]], max_n: int, sigma: float) -> float:
    hyp_counts = [_ngram_counts(hyp, max_n) for hyp in hyps]
    ref_counts = [[_ngram_counts(ref, max_n) for ref in ref_set] for ref_set in refs]
    doc_freq = Counter(gram for counts in ref_counts for gram in set().union(*counts))
    log_corpus = math.log(len(hyps))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float]]:
        # An n-gram absent from every reference set gets df 1 (idf log N), as pycocoevalcap does.
        vec = [{} for _ in range(max_n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_corpus - math.log(max(1.0, doc_freq[gram])))
        return vec, [math.sqrt(sum(w * w for w in order.values())) for order in vec]

    scores = []
    for hyp, counts, ref_set, ref_set_counts in zip(hyps, hyp_counts, refs, ref_counts):
        hyp_vec, hyp_norm = tfidf(counts)
        total = 0.0
        for ref, ref_c in zip(ref_set, ref_set_counts):
            ref_vec, ref_norm = tfidf(ref_c)
            # pycocoevalcap measures length in bigrams (len - 1); that equals the token-length
            # difference whenever the hypothesis is non-empty, and an empty one scores 0 anyway.
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma ** 2))
            for k in range(max_n):
                # Weights are non-negative, so a zero norm means a zero dot product: skip it.
                if hyp_norm[k] and ref_norm[k]:
                    dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0)
                              for g, w in hyp_vec[k].items())
                    total += penalty * dot / (hyp_norm[k] * ref_norm[k])
        scores.append(10.0 * total / max_n / len(ref_set))
    return float(np.mean(scores))


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str] | str], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n as pycocoevalcap's `Bleu(max_n)`; one or more references per caption."""
    return _bleu(*_prepare(hypotheses, references), max_n)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str] | str], beta: float = _BETA) -> float:
    """Mean ROUGE-L F-measure as pycocoevalcap's `Rouge`."""
    return _rouge_l(*_prepare(hypotheses, references), beta)


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str] | str], max_n: int = 4,
            sigma: float = _SIGMA) -> float:
    """CIDEr-D as pycocoevalcap's `Cider` (the idf comes from this corpus's references)."""
    return _cider_d(*_prepare(hypotheses, references), max_n, sigma)


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr-D of generated captions against one or more references each.

    A reference entry may be a string (one reference) or a sequence of strings. An empty hypothesis
    is allowed and scores 0; an empty reference set or a reference with no token is a ValueError.
    """
    hyps, refs = _prepare(hypotheses, references)
    out = {f"bleu_{k + 1}": float(s) for k, s in enumerate(_bleu(hyps, refs, 4))}
    out["rouge_l"] = _rouge_l(hyps, refs, _BETA)
    out["cider"] = _cider_d(hyps, refs, 4, _SIGMA)
    return out
