"""Passkey retrieval examples (Mohtashami & Jaggi 2023; YaRN paper §4): a random 5-digit key hidden at a given
depth of filler text, which the model must complete "The pass key is" with. Every example is exactly ``length``
tokens (bos and eos included), so that a training example fills one training window (nanoseek.train.extend) and
an evaluation example is scored by one forward (nanoseek.eval_long). Evaluation depths (EVAL_DEPTHS) are disjoint
from training depths (TRAIN_DEPTHS) and the evaluation keys come from their own seed (EVAL_SEED).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is {key}"
TRAIN_DEPTHS = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))  # 0.05, 0.15, ..., 0.95
EVAL_DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # held out: none is a training depth
EVAL_SEED = 1_000_003  # keys and filler phases of evaluation examples (training uses the run's seed)


class PasskeyTooShort(ValueError):
    """A length below the fewest tokens a passkey example takes with this tokenizer."""


@dataclass
class PasskeyExample:
    """One passkey document: ``ids`` (without bos / eos; len(ids) + 2 == length), whose last ``answer_len``
    tokens spell ``key``; ``depth`` is the fraction of the filler placed before the needle."""

    text: str
    ids: list[int]
    key: str
    answer_len: int
    length: int
    depth: float


class PasskeyMaker:
    """Builds passkey documents of an exact token length with a given tokenizer (a ``tokenizers.Tokenizer``).

    Layout, one part per line: filler before, the needle, filler after, the question followed by the key. The
    filler is PASSKEY_FILLER's words, cycled; its word count is searched so the document has exactly the
    requested tokens, and the last few tokens are filled with a word that is one token on its own.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.words = PASSKEY_FILLER.split()
        pads = [w for w in dict.fromkeys(w.strip(".") for w in self.words) if len(self._encode(" " + w)) == 1]
        if not pads:
            raise ValueError("the tokenizer has no single-token filler word: cannot build passkey examples of an "
                             "exact length (leave passkeys out with `extend --passkey-fraction 0` or "
                             "`eval-long --passkey-samples 0`)")
        self.pad = pads[0]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _text(self, key: str, depth: float, n_words: int, n_pad: int, phase: int) -> str:
        before = round(depth * n_words)
        words = [self.words[(phase + i) % len(self.words)] for i in range(n_words)]
        head, tail = words[:before], words[before:]
        (head if depth >= 0.5 else tail).extend([self.pad] * n_pad)  # pad on the longer side: depth barely moves
        parts = [" ".join(head), PASSKEY_NEEDLE.format(key=key), " ".join(tail), PASSKEY_QUESTION.format(key=key)]
        return "\n".join(p for p in parts if p)

    def make(self, length: int, depth: float, key: str, phase: int = 0) -> PasskeyExample:
        """A document of exactly ``length`` tokens counting bos and eos (ValueError when that cannot be met)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
        target = length - 2

        def count(words: int, pad: int = 0) -> int:  # tokens of the text with this much filler
            return len(self._encode(self._text(key, depth, words, pad, phase)))

        if count(0) > target:
            raise PasskeyTooShort(f"a passkey example needs at least {count(0) + 2} tokens with this tokenizer, "
                                  f"got length {length} (leave passkeys out with `extend --passkey-fraction 0` or "
                                  f"`eval-long --passkey-samples 0`)")
        hi = 1
        while count(hi) <= target:  # the filler grows by at least one token per word
            hi *= 2
        lo = hi // 2 if hi > 1 else 0  # count(lo) <= target < count(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count(mid) <= target else (lo, mid)
        # a pad word that starts its line (no space before it) can take 2 tokens, and 3 when it opens an empty part
        # (its line break too): the second pass, tried only when the first fails, allows for that
        for slack in ((0, 1), (2,)):
            for words in range(lo, max(-1, lo - 8), -1):  # pad the remainder with single tokens
                rest = target - count(words)
                for pad in (rest - s for s in slack):
                    if pad >= 0 and count(words, pad) == target:
                        text = self._text(key, depth, words, pad, phase)
                        return self._example(text, key, length, depth)
        if lo == 0:  # pad words alone miss the length and one filler word is too many: only a longer one will do
            raise PasskeyTooShort(f"a passkey example of exactly {length} tokens cannot be built with this tokenizer "
                                  f"(too short for one filler word: {count(1) + 2} tokens would do)")
        raise ValueError(f"could not build a passkey example of exactly {length} tokens")

    def _example(self, text: str, key: str, length: int, depth: float) -> PasskeyExample:
        ids = self._encode(text)
        for cut in (len(text) - len(key), len(text) - len(key) - 1):  # the key alone, or with its space
            prefix = self._encode(text[:cut])
            if ids[: len(prefix)] == prefix and self.tokenizer.decode(ids[len(prefix):]).strip() == key:
                return PasskeyExample(text, ids, key, len(ids) - len(prefix), length, depth)
        raise ValueError("the tokenizer merges the pass key with the text before it: cannot locate the answer")


def passkey_examples(tokenizer, lengths: list[int], depths: list[float], n: int, seed: int,
                     skip_short: bool = False) -> list[PasskeyExample]:
    """n examples per (length, depth), keys uniform in [10000, 99999] and filler phases from ``seed``. With
    ``skip_short``, a length too short for any of its examples (PasskeyTooShort) is left out altogether."""
    maker, rng = PasskeyMaker(tokenizer), random.Random(seed)
    out = []
    for length in lengths:
        try:
            out += [maker.make(length, depth, str(rng.randrange(10000, 100000)), phase=rng.randrange(len(maker.words)))
                    for depth in depths for _ in range(n)]
        except PasskeyTooShort:
            if not skip_short:
                raise
    return out
