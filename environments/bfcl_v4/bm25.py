"""BM25+ scores (Lv & Zhai 2011), the ranking BFCL's key-value memory uses for key search.

Parameters k1 = 1.5, b = 0.75, delta = 1 and idf = ln((N + 1) / df), evaluated in the same order of
floating-point operations as the ``rank_bm25`` package BFCL calls, so the scores the model sees are the
same numbers. Pure Python: memory corpora are at most 50 short keys; the offline web corpus (a few
hundred pages) builds its ``Bm25PlusIndex`` once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

K1 = 1.5
B = 0.75
DELTA = 1.0


class Bm25PlusIndex:
    """Term statistics and postings of a tokenized corpus, computed once."""

    __slots__ = ("_average", "_document_frequency", "_frequencies", "_lengths", "_postings", "size")

    def __init__(self, corpus: Sequence[Sequence[str]]) -> None:
        self.size = len(corpus)
        self._lengths = [len(document) for document in corpus]
        # ZeroDivisionError on an empty corpus, as in BFCL (the average length is undefined).
        self._average = sum(self._lengths) / self.size
        self._frequencies = [Counter(document) for document in corpus]
        self._document_frequency: Counter[str] = Counter()
        self._postings: dict[str, list[int]] = {}
        for index, counts in enumerate(self._frequencies):
            self._document_frequency.update(counts.keys())
            for term in counts:
                self._postings.setdefault(term, []).append(index)

    def _idfs(self, query: Sequence[str]) -> list[float]:
        frequency = self._document_frequency
        return [math.log((self.size + 1) / frequency[term]) if term in frequency else 0.0 for term in query]

    def _score(self, index: int, query: Sequence[str], idfs: Sequence[float]) -> float:
        # Accumulated term by term, as rank_bm25 adds one term's array at a time.
        counts = self._frequencies[index]
        length_norm = K1 * (1 - B + B * self._lengths[index] / self._average)
        score = 0.0
        for term, idf in zip(query, idfs, strict=True):
            tf = counts.get(term, 0)
            score += idf * (DELTA + (tf * (K1 + 1)) / (length_norm + tf))
        return score

    def scores(self, query: Sequence[str]) -> list[float]:
        """One score per document; a term repeated in the query counts again."""
        idfs = self._idfs(query)
        return [self._score(index, query, idfs) for index in range(self.size)]

    def top(self, query: Sequence[str], limit: int) -> list[int]:
        """Indices of the best ``limit`` documents that share a term with the query (ties: corpus order)."""
        idfs = self._idfs(query)
        candidates = sorted({index for term in set(query) for index in self._postings.get(term, ())})
        return sorted(candidates, key=lambda index: -self._score(index, query, idfs))[:limit]


def bm25_plus_scores(corpus: Sequence[Sequence[str]], query: Sequence[str]) -> list[float]:
    """Scores of a tokenized query against a tokenized corpus (``ZeroDivisionError`` if it is empty)."""
    return Bm25PlusIndex(corpus).scores(query)


def tokenize(text: str) -> list[str]:
    """BFCL's tokenizer for keys and queries: underscores as spaces, lower case, whitespace split."""
    return text.replace("_", " ").lower().split()
