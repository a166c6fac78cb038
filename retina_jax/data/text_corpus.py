"""KeepFIT V2 stage `text` input (docs/methods.md, "KeepFIT V2"): a plain-text corpus and whole-word masking.

Corpus (`config.mlm.corpus`): 'synthetic' = the synthetic corpus's English reports followed by the
expert captions of the expert corpus (MM-Retinal-Text's role); or a folder of UTF-8 `.txt` files,
one text per non-blank line, files in sorted order. The last `mlm.heldout_size` texts are held out
for the masked-token accuracy evaluation and never trained on.

Whole-word masking (BERT-wwm / Hugging Face `DataCollatorForWholeWordMask`): the words of a text
(WordPiece tokens grouped by the pre-tokeniser's word index, so "haemorrhages" -> "haem ##or
##rhages" is one word) are shuffled and taken whole while the masked-token count stays within
round(mask_prob * real tokens), at least 1; each selected token becomes [MASK] with probability
0.8, a random non-special token with 0.1, and stays itself with 0.1. Special tokens ([CLS], [SEP],
[PAD]) are never selected, and never drawn as the random replacement. The rate is taken over the
text's real tokens (HF counts [CLS]/[SEP] too, which only shifts rounding).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from retina_jax.data.synthetic import SyntheticFundus
from retina_jax.data.tokenizer import SPECIAL_TOKENS, load_tokenizer


class TextSource:
    """grain random-access source of strings: a list, or reports + captions generated on demand."""

    def __init__(self, texts=None, *, reports: SyntheticFundus | None = None, captions: SyntheticFundus | None = None,
                 name: str = "texts"):
        self.texts, self.reports, self.captions, self.name = texts, reports, captions, name

    def __len__(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        return len(self.reports) + len(self.captions)

    def __getitem__(self, index: int) -> str:
        index = int(index)
        if self.texts is not None:
            return self.texts[index]
        if index < len(self.reports):
            return self.reports.record(index)["report_en"]
        return self.captions.record(index - len(self.reports))["caption"]

    def __repr__(self):
        return f"TextSource({self.name}, {len(self)} texts)"


def read_text_folder(path: str) -> list[str]:
    """Every non-blank line of the `.txt` files under `path` (sorted, recursive), stripped."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.mlm.corpus={path!r} is neither 'synthetic' nor a folder of .txt files")
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith(".txt"))
    if not files:
        raise ValueError(f"config.mlm.corpus={path!r}: no .txt files in the folder")
    texts = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text ({e})") from None
        texts += [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"config.mlm.corpus={path!r}: the .txt files hold no text")
    return texts


@dataclasses.dataclass
class WholeWordMask:
    """Text -> fixed-length `input_ids`, `attention_mask` and the MLM targets `mlm_labels` (the
    original token ids) with `mlm_weights` (1 at the selected tokens, else 0). Picklable; the
    tokenizer loads lazily in each worker."""

    tokenizer_path: str
    max_len: int
    mask_prob: float = 0.15

    def __post_init__(self):
        self._tok = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_path, self.max_len)
            self._mask_id = self._tok.token_to_id("[MASK]")
            if self._mask_id is None:
                raise ValueError(f"tokenizer in {self.tokenizer_path} has no [MASK] token")
            special = {self._tok.token_to_id(t) for t in SPECIAL_TOKENS} - {None}
            vocab = self._tok.get_vocab_size(with_added_tokens=True)
            self._replacements = np.asarray(sorted(set(range(vocab)) - special), np.int32)
        return self._tok

    def __call__(self, text: str, rng: np.random.Generator) -> dict:
        if not text.strip():
            raise ValueError("an empty text in the MLM corpus")
        enc = self.tokenizer.encode(text)
        ids = np.asarray(enc.ids, np.int32)
        words: dict[int, list[int]] = {}
        for position, (word, special) in enumerate(zip(enc.word_ids, enc.special_tokens_mask)):
            if word is not None and not special:
                words.setdefault(word, []).append(position)
        groups = list(words.values())
        num_real = sum(len(g) for g in groups)
        target = max(1, int(round(num_real * self.mask_prob)))
        selected: list[int] = []
        for g in rng.permutation(len(groups)):
            if len(selected) >= target:
                break
            if len(selected) + len(groups[g]) > target:
                continue  # take words whole or not at all
            selected += groups[g]
        labels = ids.copy()
        weights = np.zeros_like(ids)
        weights[selected] = 1
        inputs = ids.copy()
        roll = rng.random(len(selected))
        for position, r in zip(selected, roll):
            if r < 0.8:
                inputs[position] = self._mask_id
            elif r < 0.9:
                inputs[position] = rng.choice(self._replacements)
        return {"input_ids": inputs, "attention_mask": np.asarray(enc.attention_mask, np.int32),
                "mlm_labels": labels, "mlm_weights": weights}
