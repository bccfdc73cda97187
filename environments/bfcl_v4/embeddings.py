"""Text embedders for the vector memory backend.

BFCL's vector backend embeds with sentence-transformers' ``all-MiniLM-L6-v2``, downloaded from the
Hugging Face hub when its module is imported. That download is impossible offline, so envtune makes
the embedder a choice:

- ``HashingEmbedder`` (the default, stdlib only): signed feature hashing of words and word bigrams
  into 384 dimensions, L2-normalised. Deterministic and offline, but **not** MiniLM: retrieval ranks
  differ from BFCL's, so vector-memory scores are comparable across envtune runs, not with BFCL
  leaderboard numbers.
- ``SentenceTransformerEmbedder``: the real model from a local folder the user already has
  (``sentence-transformers`` imported only when this is chosen), which gives BFCL's embeddings.

Both return L2-normalised vectors, so an inner product is the cosine similarity, as in BFCL's FAISS
``IndexFlatIP``.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

HASHING_DIMENSION = 384
"""MiniLM's dimension, so a snapshot's shape does not depend on the embedder."""
_WORD = re.compile(r"\w+")


class Embedder(Protocol):
    """Maps texts to L2-normalised vectors of a fixed dimension."""

    @property
    def name(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


def _normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


class HashingEmbedder:
    """Offline, deterministic bag of words and bigrams, hashed with CRC-32 into signed buckets.

    Vectors are cached per text (snapshots re-embed the same stored texts for every question).
    """

    CACHE_SIZE = 8192

    def __init__(self, dimension: int = HASHING_DIMENSION) -> None:
        if dimension < 8:
            raise ValueError(f"dimension must be >= 8, got {dimension}")
        self.dimension = dimension
        self._embed_one = functools.lru_cache(maxsize=self.CACHE_SIZE)(self._compute)

    @property
    def name(self) -> str:
        return f"hashing-{self.dimension}"

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]

    def _compute(self, text: str) -> tuple[float, ...]:
        vector = [0.0] * self.dimension
        for feature in self._features(text):
            code = zlib.crc32(feature.encode("utf-8"))
            vector[(code >> 1) % self.dimension] += 1.0 if code & 1 else -1.0
        return tuple(_normalised(vector))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [list(self._embed_one(text)) for text in texts]


class SentenceTransformerEmbedder:
    """``all-MiniLM-L6-v2`` (or another sentence-transformers model) from a local folder."""

    def __init__(self, model_path: Path) -> None:
        if not Path(model_path).is_dir():
            raise FileNotFoundError(f"no sentence-transformers model folder at {model_path}")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - optional dependency
            raise RuntimeError(
                "the vector backend's real embedder needs `pip install sentence-transformers`"
            ) from exc
        self._path = Path(model_path)
        self._model = SentenceTransformer(str(model_path), device="cpu", local_files_only=True)

    @property
    def name(self) -> str:
        return f"sentence-transformers:{self._path.name}"

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = self._model.encode(list(texts), normalize_embeddings=True)
        return [[float(x) for x in row] for row in vectors]
