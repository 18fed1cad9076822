"""Tokenizer and vocabulary.

Tokenization mimics what pycocoevalcap's PTBTokenizer leaves after it drops
punctuation (lower case, words and contractions split the PTB way), so the
model is trained on the same units the metrics count.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# PTB splits clitics off ("don't" -> "do n't", "dog's" -> "dog 's").
_CLITIC = re.compile(r"(?i)\b(\w+)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_WORD = re.compile(r"n't|[a-z0-9]+|'[a-z]+")


def tokenize(caption: str) -> list[str]:
    """Lower-cased PTB-style word tokens with punctuation removed."""
    text = _CLITIC.sub(r"\1 \2", caption.lower())
    return _WORD.findall(text)


class Vocab:
    """Maps tokens to ids; ids 0-3 are the special tokens."""

    def __init__(self, itos: Sequence[str]) -> None:
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {list(itos[:4])}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate tokens")

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> "Vocab":
        counts = Counter(tok for c in captions for tok in tokenize(c))
        # Sorted by frequency then alphabetically so the same captions always give the same ids.
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def encode(self, caption: str, max_len: int) -> list[int]:
        """BOS + token ids + EOS, truncated so that the whole fits in max_len."""
        ids = [self.stoi.get(t, UNK_ID) for t in tokenize(caption)][: max_len - 2]
        return [BOS_ID] + ids + [EOS_ID]

    def decode(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def extended(self, captions: Iterable[str], min_count: int = 1) -> "Vocab":
        """This vocabulary plus the new words of `captions`; old ids keep their meaning."""
        new = Vocab.build(captions, min_count)
        return Vocab(self.itos + [w for w in new.itos[len(SPECIALS):] if w not in self.stoi])
