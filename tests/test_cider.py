"""Tests for fastcap.eval.cider.CiderD (SCST reward)."""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict

import numpy as np
import pytest

from fastcap.eval.cider import CiderD


def reference_cider_d(corpus: list[list[list]], cand: list, image: int, n: int = 4, sigma: float = 6.0) -> float:
    """Straightforward CIDEr-D, transcribed from self-critical.pytorch's ciderD_scorer."""

    def counts(words: list) -> dict:
        c: dict = defaultdict(int)
        for k in range(1, n + 1):
            for i in range(len(words) - k + 1):
                c[tuple(words[i : i + k])] += 1
        return c

    df: dict = defaultdict(int)
    for refs in corpus:
        for g in {g for r in refs for g in counts(r)}:
            df[g] += 1
    ref_len = math.log(len(corpus))

    def vec(c: dict) -> tuple:
        v = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in c.items():
            o = len(g) - 1
            v[o][g] = tf * (ref_len - math.log(max(1.0, df[g])))
            norm[o] += v[o][g] ** 2
            if o == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    vh, nh, lh = vec(counts(cand))
    score = 0.0
    for ref in corpus[image]:
        vr, nr, lr = vec(counts(ref))
        for o in range(n):
            val = sum(min(w, vr[o][g]) * vr[o][g] for g, w in vh[o].items())
            if nh[o] != 0 and nr[o] != 0:
                val /= nh[o] * nr[o]
            score += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
    return score / n / len(corpus[image]) * 10.0


TINY = [
    ["a man riding a horse", "a person on a brown horse"],
    ["two cats on a couch", "a cat sleeping on a red couch"],
]


def test_tiny_example_matches_direct_implementation() -> None:
    corpus = [[r.split() for r in refs] for refs in TINY]
    cider = CiderD(TINY)
    cands = ["a man riding a horse", "a cat on a horse", "two cats on a red couch", "couch", ""]
    for image in (0, 1):
        got = cider.scores(cands, [image] * len(cands))
        want = [reference_cider_d(corpus, c.split(), image) for c in cands]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_hand_computed_unigram_value() -> None:
    # n=1, N=2 images, every word in one image -> idf = log 2 for all words.
    # "a b" vs ref "a b": cosine 1; vs ref "a c": 0.5; no length difference.
    # CIDEr-D = (1 + 0.5) / 2 refs * 10 = 7.5.
    cider = CiderD([["a b", "a c"], ["d e", "d f"]], n=1)
    assert cider.scores(["a b"], [0])[0] == pytest.approx(7.5, abs=1e-9)
    assert cider.scores(["a b"], [1])[0] == 0.0


def test_random_corpus_matches_direct_implementation() -> None:
    rng = random.Random(0)
    corpus = [
        [[rng.randrange(1, 25) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
        for _ in range(30)
    ]
    cider = CiderD(corpus)
    cands, index = [], []
    for _ in range(300):
        image = rng.randrange(len(corpus))
        kind = rng.random()
        if kind < 0.3:
            cand = list(rng.choice(corpus[image]))
        else:  # includes ids never seen in the corpus (30..39) and empty captions
            cand = [rng.randrange(1, 40) for _ in range(rng.randint(0, 15))]
        cands.append(cand)
        index.append(image)
    got = cider.scores(cands, index)
    want = [reference_cider_d(corpus, c, i) for c, i in zip(cands, index)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_token_ids_and_strings_agree() -> None:
    vocab: dict[str, int] = {}
    enc = lambda s: [vocab.setdefault(w, len(vocab) + 1) for w in s.split()]  # noqa: E731
    as_ids = CiderD([[enc(r) for r in refs] for refs in TINY])
    as_str = CiderD(TINY)
    cands = ["a man riding a horse", "two cats on a red couch", "a dog"]
    ids = [enc(c) for c in cands]
    np.testing.assert_allclose(
        as_ids.scores(ids, [0, 1, 0]), as_str.scores(cands, [0, 1, 0]), rtol=0, atol=1e-12
    )
    # numpy arrays are accepted as candidates too
    np.testing.assert_allclose(as_ids.scores([np.array(i) for i in ids], [0, 1, 0]), as_ids.scores(ids, [0, 1, 0]))


def test_matches_pycocoevalcap_cider_with_same_corpus_df() -> None:
    # coco-caption's "CIDEr" is CIDEr-D with df from the evaluated references, so with
    # the corpus equal to those references the two must coincide.
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider

    refs = TINY + [["a plate of food", "food on a white plate"]]
    cands = ["a man on a horse", "a cat on a couch", "a white plate of food"]
    mean, per_image = Cider().compute_score(
        {i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)}
    )
    got = CiderD(refs).scores(cands, [0, 1, 2])
    np.testing.assert_allclose(got, per_image, rtol=0, atol=1e-9)


BIG = [
    ["a man riding a horse on a beach", "a person rides a brown horse near the ocean",
     "a rider on a horse at the seaside"],
    ["two cats sleeping on a red couch", "a pair of cats asleep on a sofa", "cats lying on a couch"],
    ["a plate of food with broccoli and rice", "rice and broccoli on a white plate",
     "a dinner plate with vegetables"],
    ["a red double decker bus on a street", "a bus driving down a city road", "a tall red bus in traffic"],
]


def test_quality_orderings() -> None:
    cider = CiderD(BIG)
    exact = cider.scores([BIG[0][0]], [0])[0]
    random_caption = cider.scores(["a bus driving down a city road"], [0])[0]
    constant = cider.scores(["a a a a a a a"], [0])[0]
    assert exact > 1.0 > random_caption
    assert constant < 0.2 * exact
    # Repeating words cannot earn more credit than the reference holds (clipping).
    clean = cider.scores(["a man riding a horse"], [0])[0]
    repeated = cider.scores(["a man man man riding a horse horse horse"], [0])[0]
    assert repeated < clean
    # Length penalty: the same n-gram matches, far longer candidate -> lower score.
    long = cider.scores(["a man riding a horse on a beach " + "near " * 12], [0])[0]
    no_penalty = CiderD(BIG, sigma=1e9).scores(["a man riding a horse on a beach " + "near " * 12], [0])[0]
    assert long < 0.5 * no_penalty


def test_errors() -> None:
    cider = CiderD(TINY)
    with pytest.raises(ValueError, match="must match"):
        cider.scores(["a"], [0, 1])
    with pytest.raises(IndexError):
        cider.scores(["a"], [2])
    with pytest.raises(TypeError):
        cider.scores([[1, 2]], [0])
    with pytest.raises(ValueError):
        CiderD([])
    with pytest.raises(ValueError, match="no reference"):
        CiderD([["a b"], []])
    assert cider.scores([], []).shape == (0,)


def test_speed_5000_candidates() -> None:
    rng = random.Random(1)
    corpus = [[[rng.randrange(1, 2000) for _ in range(rng.randint(8, 14))] for _ in range(5)] for _ in range(500)]
    cider = CiderD(corpus)
    cands, index = [], []
    for image in range(500):
        for _ in range(10):
            ref = rng.choice(corpus[image])
            cands.append([t if rng.random() < 0.7 else rng.randrange(1, 2000) for t in ref])
            index.append(image)
    start = time.perf_counter()
    out = cider.scores(cands, index)
    elapsed = time.perf_counter() - start
    assert out.shape == (5000,) and np.isfinite(out).all()
    assert elapsed < 2.0, f"5000 CIDEr-D scorings took {elapsed:.2f}s (typically ~0.05s)"
