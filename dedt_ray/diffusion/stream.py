"""Which rows a rank trains on, step by step: a resumable, seeded index stream (pure numpy).

The stream is a sequence of chunks ("epochs" of this rank's shard, `len(labels)` rows each).
Chunk k is drawn from `np.random.default_rng([seed, rank, k])`:
- without class weights: a permutation of the shard (every row once per chunk);
- with class weights w: each draw picks class c with probability w_c (renormalised over
  the classes this shard holds), then a row of that class, cycling through a random
  permutation of the class so rows are reused evenly.
The whole state is one integer, the position; every rank consumes the same number of rows
per step, so rank 0's position restores every rank.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("dedt_ray")


class IndexStream:
    """Row indices of one rank's shard for step after step."""

    def __init__(
        self,
        labels: np.ndarray,
        seed: int,
        rank: int = 0,
        class_weights: np.ndarray | None = None,
        position: int = 0,
    ):
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) == 0:
            raise ValueError(f"rank {rank} has no training rows")
        self.seed, self.rank, self.position = int(seed), int(rank), int(position)
        self.probs: np.ndarray | None = None
        if class_weights is not None:
            self.probs = self._class_probs(np.asarray(class_weights, dtype=np.float64))
        self._chunk_id = -1
        self._chunk = np.empty(0, dtype=np.int64)

    def _class_probs(self, weights: np.ndarray) -> np.ndarray:
        if np.any(weights < 0) or not np.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError(f"class weights must be finite, >= 0 and not all 0: {weights}")
        if self.labels.min() < 0 or self.labels.max() >= len(weights):
            raise ValueError(
                f"labels span [{self.labels.min()}, {self.labels.max()}] but there are "
                f"{len(weights)} class weights"
            )
        present = np.bincount(self.labels, minlength=len(weights)) > 0
        missing = np.flatnonzero((weights > 0) & ~present)
        if len(missing):
            log.warning(
                "rank %d holds no rows of classes %s; their weight is spread over the others",
                self.rank,
                missing.tolist(),
            )
        probs = np.where(present, weights, 0.0)
        if probs.sum() <= 0:
            raise ValueError(f"rank {self.rank}: no class with positive weight has rows")
        return probs / probs.sum()

    @property
    def chunk_size(self) -> int:
        return len(self.labels)

    def chunk(self, k: int) -> np.ndarray:
        """The indices of chunk k (cached: the stream reads chunks in order)."""
        if k != self._chunk_id:
            rng = np.random.default_rng([self.seed, self.rank, k])
            n = len(self.labels)
            if self.probs is None:
                self._chunk = rng.permutation(n)
            else:
                classes = rng.choice(len(self.probs), size=n, p=self.probs)
                out = np.empty(n, dtype=np.int64)
                for c in np.flatnonzero(self.probs):
                    slots = np.flatnonzero(classes == c)
                    rows = rng.permutation(np.flatnonzero(self.labels == c))
                    out[slots] = np.resize(rows, len(slots))  # cycle the permutation
                self._chunk = out
            self._chunk_id = k
        return self._chunk

    def next(self, count: int) -> np.ndarray:
        """The next `count` indices; advances the position."""
        parts, need = [], count
        while need:
            k, offset = divmod(self.position, self.chunk_size)
            take = min(need, self.chunk_size - offset)
            parts.append(self.chunk(k)[offset : offset + take])
            self.position += take
            need -= take
        return np.concatenate(parts)

    @property
    def epoch(self) -> float:
        """Passes over this shard so far."""
        return self.position / self.chunk_size

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])
