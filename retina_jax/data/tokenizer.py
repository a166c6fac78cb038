"""Tokenisation for the BERT text tower (METHODS.md sections 1 and 4).

Real runs point `config.text.tokenizer` at a Hugging Face tokenizer directory (Bio_ClinicalBERT's
cased WordPiece, Chinese RoBERTa's vocabulary). With no hub access, the demo learns a WordPiece
vocabulary from the corpus with `tokenizers` and saves it in the run directory, so the run's
checkpoints and its vocabulary always travel together.

`BertTokenizerFast(vocab_file=...)` silently maps every word to [UNK] in transformers 5, so
tokenizers are always loaded with `from_pretrained(dir)`, which reads `tokenizer.json`.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def learn_wordpiece(texts: Iterable[str], out_dir: str, *, vocab_size: int, lowercase: bool,
                    max_len: int) -> str:
    """Train a BERT WordPiece vocabulary on `texts` and save a loadable tokenizer directory."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=lowercase)
    tok.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    tok.save_model(tmp)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizerFast", "do_lower_case": lowercase,
                   "model_max_length": max_len}, f, indent=2)
    # Rename last so a run killed mid-write never leaves a half-written vocabulary behind.
    os.replace(tmp, out_dir)
    return out_dir


def load_tokenizer(path: str):
    from transformers import BertTokenizerFast

    if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(os.path.join(path, "vocab.txt")):
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in tokenizer directory {path}")
    return BertTokenizerFast.from_pretrained(path)


class Tokenize:
    """Picklable text -> fixed-length (input_ids, attention_mask) int32 arrays.

    The tokenizer loads lazily so grain can ship this object to worker processes by path.
    """

    def __init__(self, path: str, max_len: int):
        self.path = path
        self.max_len = max_len
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.path)
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __getstate__(self):
        return {"path": self.path, "max_len": self.max_len, "_tok": None}

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
