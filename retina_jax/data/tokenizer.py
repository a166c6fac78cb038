"""Tokenisation for the BERT text tower (docs/methods.md, "FLAIR" and "ViLReF").

Real runs point `config.text.tokenizer` at a Hugging Face tokenizer directory (Bio_ClinicalBERT's
cased WordPiece, Chinese RoBERTa's vocabulary). With no hub access, the demo learns a WordPiece
vocabulary from the corpus with `tokenizers` and saves it in the run directory, so the run's
checkpoints and its vocabulary always travel together.

A tokenizer directory is read from its `tokenizer.json` (or `vocab.txt`); transformers 5's
`BertTokenizerFast(vocab_file=...)` would silently map every word to [UNK].
"""
from __future__ import annotations

import collections
import json
import os
from typing import Iterable

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def learn_wordpiece(texts: Iterable[str], out_dir: str, *, vocab_size: int, lowercase: bool,
                    max_len: int) -> str:
    """Learn a BERT WordPiece vocabulary from `texts` and save a loadable tokenizer directory.

    The vocabulary is every character (word-initial and `##` continuation, so any word of the
    corpus tokenises without [UNK]) plus the most frequent whole words, ties broken
    alphabetically. `tokenizers`' own WordPiece trainer breaks ties in hash-map order, which
    differs between processes, so two runs of the same config would learn different vocabularies;
    a run must be reproducible from its config. Normalisation, pre-tokenisation, the WordPiece model
    and the [CLS]/[SEP] template are `tokenizers`' BERT components.
    """
    from tokenizers import normalizers, pre_tokenizers
    from tokenizers.implementations import BertWordPieceTokenizer

    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    if len(vocab) > vocab_size:
        raise ValueError(f"config.text.vocab_size={vocab_size} is smaller than the {len(vocab)} special and "
                         f"character tokens the corpus needs")
    known = set(vocab)
    for word in sorted(counts, key=lambda w: (-counts[w], w)):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
            known.add(word)
    tok = BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=lowercase)
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizerFast", "do_lower_case": lowercase,
                   "model_max_length": max_len}, f, indent=2)
    # Rename last so a run killed mid-write never leaves a half-written vocabulary behind.
    os.replace(tmp, out_dir)
    return out_dir


def load_tokenizer(path: str, max_len: int):
    """A `tokenizers.Tokenizer` padding/truncating to `max_len`, from a HF tokenizer directory.

    Reads `tokenizer.json` when present (it carries the normaliser and the [CLS]/[SEP] template),
    else builds BERT WordPiece from `vocab.txt` with `do_lower_case` from `tokenizer_config.json`.
    The `tokenizers` library is used directly (not transformers' wrappers): it is what those
    wrappers run, and it imports cleanly inside grain's worker processes.
    """
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    tokenizer_json, vocab = os.path.join(path, "tokenizer.json"), os.path.join(path, "vocab.txt")
    if os.path.isfile(tokenizer_json):
        tok = Tokenizer.from_file(tokenizer_json)
    elif os.path.isfile(vocab):
        cfg_path = os.path.join(path, "tokenizer_config.json")
        cfg = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else {}
        tok = BertWordPieceTokenizer(vocab, lowercase=cfg.get("do_lower_case", True))._tokenizer
    else:
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in tokenizer directory {path}")
    pad_id = tok.token_to_id("[PAD]")
    if pad_id is None:
        raise ValueError(f"tokenizer in {path} has no [PAD] token")
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(length=max_len, pad_id=pad_id, pad_token="[PAD]")
    return tok


class Tokenize:
    """Picklable text -> fixed-length (input_ids, attention_mask) int32 arrays.

    The tokenizer loads lazily so grain can ship this object to worker processes by path.
    """

    # Texts whose encodings are kept (about 0.6 KB each at 77 tokens): a report or prompt recurs
    # every epoch, and encoding a batch of 64 reports cost the ViLReF demo's pipeline 6 ms.
    CACHE_SIZE = 32768

    def __init__(self, path: str, max_len: int):
        self.path = path
        self.max_len = max_len
        self._tok = None
        self._cache = {}

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.path, self.max_len)
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __getstate__(self):
        return {"path": self.path, "max_len": self.max_len, "_tok": None, "_cache": {}}

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """[B, max_len] input ids and attention mask; a text seen before is not encoded again."""
        texts = list(texts)
        # Rows are looked up once into a local dict: grain may batch in several threads at once, and
        # another thread may clear the shared cache between this call's lookups.
        rows = {t: self._cache.get(t) for t in dict.fromkeys(texts)}
        new = [t for t, row in rows.items() if row is None]
        if new:
            for text, e in zip(new, self.tokenizer.encode_batch(new)):
                rows[text] = np.asarray([e.ids, e.attention_mask], np.int32)
            if len(self._cache) + len(new) > self.CACHE_SIZE:
                self._cache.clear()  # simplest bound: a corpus with more distinct texts re-encodes them
            self._cache.update((t, rows[t]) for t in new)
        out = np.stack([rows[t] for t in texts]) if texts else np.zeros((0, 2, self.max_len), np.int32)
        return out[:, 0], out[:, 1]
