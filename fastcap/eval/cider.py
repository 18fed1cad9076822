"""Fast CIDEr-D for self-critical sequence training rewards.

Follows ``CiderScorer`` of coco-caption / ``ciderD_scorer`` of self-critical.pytorch:
n-grams 1..n, tf-idf weights ``tf * (log(N) - log(max(1, df)))`` with document
frequencies from a fixed training corpus of N images, clipped numerator
``min(w_cand, w_ref) * w_ref``, cosine normalisation per n-gram order, Gaussian
length penalty, x10, averaged over orders and references.

Implementation: every n-gram gets an integer id (an order-k n-gram is the pair
(id of its (k-1)-gram prefix, last token)), so all matching is ``np.unique`` /
``np.searchsorted`` on int64 keys instead of per-n-gram Python dict work. The
reference side is computed once at init and stored as flat arrays (a few hundred MB
for all of COCO train, where per-image Python dicts would need several GB); a
``scores()`` call only processes the candidates.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, Sequence

import numpy as np

__all__ = ["CiderD"]


def _lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Position of each query in ``sorted_keys``, -1 where absent."""
    if sorted_keys.size == 0 or queries.size == 0:
        return np.full(queries.shape, -1, dtype=np.int64)
    idx = np.minimum(np.searchsorted(sorted_keys, queries), sorted_keys.size - 1)
    return np.where(sorted_keys[idx] == queries, idx, -1)


def _flatten(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated tokens, owning sequence, position in it, and sequence lengths."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    total = int(lengths.sum())
    tok = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=total)
    owner = np.repeat(np.arange(len(seqs), dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    return tok, owner, pos, lengths


def _length_for_penalty(lengths: np.ndarray, n: int) -> np.ndarray:
    # The reference implementations take the length from order index 1 (bigrams:
    # `if n == 1: length += term_freq`), i.e. len(words) - 1. Kept for identical
    # rewards; it only differs from len(words) for captions shorter than two tokens.
    return np.maximum(lengths - 1, 0) if n >= 2 else lengths


class CiderD:
    """CIDEr-D against a fixed reference corpus (document frequencies from that corpus).

    ``references[i]`` holds the reference captions of image ``i``, each either a list of
    non-negative token ids or an already tokenized, space-separated string. Candidates
    passed to ``scores()`` must use the same representation (ids from the same
    vocabulary, or strings tokenized the same way), including any end-of-sequence
    convention.
    """

    def __init__(
        self,
        references: Sequence[Sequence[Sequence[int]]] | Sequence[Sequence[str]],
        n: int = 4,
        sigma: float = 6.0,
    ) -> None:
        if len(references) == 0:
            raise ValueError("CiderD needs a non-empty reference corpus.")
        if n < 1:
            raise ValueError("CiderD needs n >= 1.")
        self.n = n
        self.sigma = float(sigma)
        self._vocab: dict[str, int] | None = None  # set for string corpora

        n_refs = np.fromiter((len(refs) for refs in references), dtype=np.int64, count=len(references))
        if (n_refs == 0).any():
            raise ValueError(f"Image {int(np.argmin(n_refs))} of the CiderD corpus has no reference captions.")
        first = references[0][0]
        if isinstance(first, str):
            self._vocab = {}
        seqs = [self._encode(r, self._vocab, grow=True) for refs in references for r in refs]

        tok, owner, pos, lengths = _flatten(seqs)
        self._base = int(tok.max()) + 1 if tok.size else 1
        n_images, n_total_refs, max_refs = len(references), len(seqs), int(n_refs.max())
        ref_image = np.repeat(np.arange(n_images, dtype=np.int64), n_refs)
        ref_slot = np.arange(n_total_refs, dtype=np.int64) - np.repeat(np.cumsum(n_refs) - n_refs, n_refs)
        self.ref_len = math.log(float(n_images))

        self._keys: list[np.ndarray] = []  # per order: sorted n-gram keys (index = n-gram id)
        self._idf: list[np.ndarray] = []  # per order: idf by n-gram id
        self._rows: list[np.ndarray] = []  # per order: sorted image * G + id keys
        self._row_tf: list[np.ndarray] = []  # per order: (rows, max_refs) term frequencies
        ref_norms = np.zeros((n_total_refs, n), dtype=np.float64)
        prev_ids = np.empty(0, dtype=np.int64)
        for k in range(1, n + 1):
            p = np.flatnonzero(pos + k <= lengths[owner])
            keys = tok[p] if k == 1 else prev_ids[p] * self._base + tok[p + k - 1]
            uniq, gid = np.unique(keys, return_inverse=True)
            gid = gid.reshape(-1)
            n_grams = max(int(uniq.size), 1)
            prev_ids = np.full(tok.size, -1, dtype=np.int64)
            prev_ids[p] = gid

            pair, tf = np.unique(owner[p] * n_grams + gid, return_counts=True)
            pair_ref, pair_gram = pair // n_grams, pair % n_grams
            rows, row_of_pair = np.unique(ref_image[pair_ref] * n_grams + pair_gram, return_inverse=True)
            df = np.bincount(rows % n_grams, minlength=uniq.size)
            idf = self.ref_len - np.log(np.maximum(1.0, df.astype(np.float64)))
            w = tf * idf[pair_gram]
            ref_norms[:, k - 1] = np.sqrt(np.bincount(pair_ref, weights=w * w, minlength=n_total_refs))
            tf_dtype = np.uint8 if tf.size == 0 or tf.max() < 256 else np.int32
            row_tf = np.zeros((rows.size, max_refs), dtype=tf_dtype)
            row_tf[row_of_pair.reshape(-1), ref_slot[pair_ref]] = tf
            self._keys.append(uniq)
            self._idf.append(idf)
            self._rows.append(rows)
            self._row_tf.append(row_tf)

        # Per image, padded to max_refs: norms (image, ref, order), lengths, ref count.
        self._ref_norms = np.zeros((n_images, max_refs, n), dtype=np.float64)
        self._ref_norms[ref_image, ref_slot] = ref_norms
        self._ref_lengths = np.zeros((n_images, max_refs), dtype=np.float64)
        self._ref_lengths[ref_image, ref_slot] = _length_for_penalty(lengths, n)
        self._ref_mask = np.zeros((n_images, max_refs), dtype=np.float64)
        self._ref_mask[ref_image, ref_slot] = 1.0
        self._n_refs = n_refs.astype(np.float64)

    def __len__(self) -> int:
        return len(self._n_refs)

    def _encode(self, caption: Any, vocab: dict[str, int] | None, grow: bool) -> list[int]:
        if vocab is not None:
            if not isinstance(caption, str):
                raise TypeError("This CiderD corpus holds strings; give captions as tokenized strings.")
            if grow:
                return [vocab.setdefault(w, len(vocab)) for w in caption.split()]
            return [vocab[w] for w in caption.split()]
        if isinstance(caption, str):
            raise TypeError("This CiderD corpus holds token ids; give captions as lists of token ids.")
        ids = caption.tolist() if hasattr(caption, "tolist") else list(caption)
        if ids and min(ids) < 0:
            raise ValueError("Token ids must be non-negative.")
        return ids

    def scores(self, candidates: list[list[int]] | list[str], refs_index: list[int]) -> np.ndarray:
        """CIDEr-D of ``candidates[k]`` against the references of image ``refs_index[k]``."""
        n_cand = len(candidates)
        image = np.asarray(refs_index, dtype=np.int64).reshape(-1)
        if image.size != n_cand:
            raise ValueError(f"{n_cand} candidates but {image.size} reference indices; they must match.")
        if n_cand == 0:
            return np.zeros(0, dtype=np.float64)
        if image.min() < 0 or image.max() >= len(self):
            raise IndexError(f"refs_index out of range for a corpus of {len(self)} images.")

        if self._vocab is not None:
            # Words unseen in the corpus get fresh ids (>= base) so they still count
            # towards the candidate's own term frequencies and norm.
            local = dict(self._vocab)
            seqs = [self._encode(c, local, grow=True) for c in candidates]
        else:
            seqs = [self._encode(c, None, grow=False) for c in candidates]
        tok, owner, pos, lengths = _flatten(seqs)
        base = max(self._base, int(tok.max()) + 1 if tok.size else 1)

        n = self.n
        max_refs = self._ref_mask.shape[1]
        cand_norms = np.zeros((n_cand, n), dtype=np.float64)
        dots = np.zeros((n, n_cand, max_refs), dtype=np.float64)
        prev_local = np.empty(0, dtype=np.int64)
        prev_corpus = np.empty(0, dtype=np.int64)  # corpus id of each local (k-1)-gram
        for k in range(1, n + 1):
            p = np.flatnonzero(pos + k <= lengths[owner])
            if p.size == 0:
                break
            keys = tok[p] if k == 1 else prev_local[p] * base + tok[p + k - 1]
            uniq, lid = np.unique(keys, return_inverse=True)
            lid = lid.reshape(-1)
            prev_local = np.full(tok.size, -1, dtype=np.int64)
            prev_local[p] = lid

            # Map this call's n-grams to corpus ids through (corpus prefix id, last token).
            if k == 1:
                known, corpus_key = uniq < self._base, uniq
            else:
                prefix = prev_corpus[uniq // base]
                last = uniq % base
                known = (prefix >= 0) & (last < self._base)
                corpus_key = prefix * self._base + last
            corpus_id = np.where(known, _lookup(self._keys[k - 1], np.where(known, corpus_key, 0)), -1)
            prev_corpus = corpus_id

            n_local = int(uniq.size)
            pair, tf = np.unique(owner[p] * n_local + lid, return_counts=True)
            pair_cand, pair_gram = pair // n_local, corpus_id[pair % n_local]
            idf = self._idf[k - 1]
            seen = pair_gram >= 0
            w = tf * np.where(seen, idf[np.maximum(pair_gram, 0)], self.ref_len)
            cand_norms[:, k - 1] = np.sqrt(np.bincount(pair_cand, weights=w * w, minlength=n_cand))

            hc, hg, hw = pair_cand[seen], pair_gram[seen], w[seen]
            n_grams = max(int(self._keys[k - 1].size), 1)
            row = _lookup(self._rows[k - 1], image[hc] * n_grams + hg)
            hit = row >= 0
            hc, hg, hw, row = hc[hit], hg[hit], hw[hit], row[hit]
            w_ref = self._row_tf[k - 1][row] * idf[hg][:, None]
            np.add.at(dots[k - 1], hc, np.minimum(hw[:, None], w_ref) * w_ref)

        denom = cand_norms.T[:, :, None] * self._ref_norms[image].transpose(2, 0, 1)
        sims = np.divide(dots, denom, out=np.zeros_like(dots), where=denom != 0)
        delta = _length_for_penalty(lengths, n)[:, None] - self._ref_lengths[image]
        penalty = np.exp(-(delta * delta) / (2.0 * self.sigma * self.sigma)) * self._ref_mask[image]
        per_ref = sims.sum(axis=0) * penalty
        return per_ref.sum(axis=1) / self._n_refs[image] / n * 10.0
