"""A byte-level-safe sentencepiece BPE tokenizer: decode(encode(text)) == text for ordinary text.

Byte fallback means no character is ever unknown; the identity normalisation, no dummy prefix and kept
whitespace mean nothing is rewritten, so code indentation, tabs, newlines, digits and non-ASCII survive
the round trip. (The one exception is sentencepiece's own space marker U+2581 "▁", which decodes as a
space; it does not occur in ordinary text.)
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
from datasets import Dataset

from ..errors import ConfigError, DataError
from .corpora import iter_texts

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# Everything here changes the tokenizer, so all of it goes into the cache key and meta.json.
TRAINER_SETTINGS = {
    "model_type": "bpe",
    "byte_fallback": True,  # every byte is a piece: no <unk> for unseen characters
    "split_digits": True,  # numbers become digit sequences, which models learn arithmetic-like patterns from
    "normalization_rule_name": "identity",  # NFKC would rewrite text and break the exact round trip
    "remove_extra_whitespaces": False,  # indentation and double spaces are content (code!)
    "add_dummy_prefix": False,  # no invented leading space: documents are concatenated verbatim
    "allow_whitespace_only_pieces": True,  # runs of spaces (indentation) become single pieces
    "character_coverage": 0.9995,  # rarer characters go through byte fallback
    "max_sentence_length": 1 << 14,  # bytes; longer lines are left out of training (not of encoding)
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_id": -1,  # no padding piece: batches are packed windows
}


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(path)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


MAX_LINE_CHARS = 4000  # at most 16,000 UTF-8 bytes: under sentencepiece's 16,384-byte line limit


def sample_lines(train: Dataset, max_mb: float, seed: int = 0) -> list[str]:
    # Sentencepiece trains on lines, so documents are cut at newlines (indentation kept); the documents
    # are taken in a fixed pseudo-random order so a budget smaller than the corpus still sees all of it.
    budget = int(max_mb * 1e6)
    order = np.random.default_rng(seed).permutation(len(train))
    lines: list[str] = []
    for texts in iter_texts(train.select(order), batch_size=256):
        for text in texts:
            for line in text.split("\n"):
                # sentencepiece drops lines over its max_sentence_length (16,384 bytes): feed pieces instead
                for start in range(0, len(line), MAX_LINE_CHARS):
                    piece = line[start : start + MAX_LINE_CHARS]
                    if piece.strip():
                        lines.append(piece)
                        budget -= len(piece.encode("utf-8")) + 1
                        if budget <= 0:
                            return lines
    return lines


MIN_AUTO_VOCAB, MAX_AUTO_VOCAB = 512, 8192


def auto_vocab_size(corpus_bytes: int) -> int:
    """Tokenizer pieces for a corpus: about 4 x sqrt(bytes), a power of two from 512 to 8192. A small
    corpus cannot teach a large vocabulary (rare pieces are seen a few times), and a small model trained on
    it would be mostly embedding table: 60 KB -> 1024, 1 MB -> 4096, 4 MB and more -> 8192."""
    want = 4 * math.sqrt(max(1, corpus_bytes))
    return int(min(MAX_AUTO_VOCAB, max(MIN_AUTO_VOCAB, 2 ** round(math.log2(want)))))


def _train_bytes(lines: list[str], vocab_size: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,  # quiet: sentencepiece logs every step to stderr otherwise
        **TRAINER_SETTINGS,
    )
    return model.getvalue()


def train_tokenizer(lines: list[str], path: Path, vocab_size: int) -> Tokenizer:
    if not lines:
        raise DataError("the tokenizer has no training text: the training split has no non-blank lines")
    try:
        model = _train_bytes(lines, vocab_size)
    except RuntimeError as e:
        too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e))
        too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if too_high:  # a small corpus has fewer distinct merges than asked for: use as many as it has
            reduced = int(too_high.group(1))
            print(
                f"note: data.vocab_size={vocab_size} is more than this corpus supports; using {reduced}",
                file=sys.stderr,
            )
            model = _train_bytes(lines, reduced)
        elif too_low:
            raise ConfigError(
                f"data.vocab_size={vocab_size} is too small for this corpus: its characters and the 256 byte "
                f"pieces need at least {too_low.group(2)}; use a larger data.vocab_size"
            ) from e
        else:
            raise
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(model)
    os.replace(tmp, path)  # atomic: a half-written model is never found under the real name
    return Tokenizer(path)
