"""InfoBatch (Qin et al., ICLR 2024): loss-aware soft pruning of every epoch (pure numpy).

The rule, per epoch: of the samples whose last recorded loss is below the mean of the recorded
losses, drop a random `ratio` of them; the kept low-loss samples' loss is scaled by
`1 / (1 - ratio)` so the expected gradient is unchanged; samples never scored yet are kept.
For the last `1 - anneal` of the epochs nothing is pruned. In a step-based loop the saving is
real because an epoch is a pass over what is kept: a pruned epoch has fewer optimizer steps.

`EpochPlan` is one epoch's decision over the whole data set (every rank computes the same one
from the same score table and seed); `InfoBatchStream` is one rank's view: its share of the
kept rows, drawn in a seeded order (class-weighted when class weights are given, as
`IndexStream` draws), the loss weights of each draw, and the score table the trainer keeps in
step on every rank (`record`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dedt_ray.diffusion.stream import IndexStream


@dataclass(frozen=True)
class EpochPlan:
    """Which rows an epoch keeps and each row's loss weight (global indices)."""

    keep: np.ndarray  # bool [N]
    weights: np.ndarray  # float32 [N]: 1, or 1 / (1 - ratio) for kept low-loss rows

    @property
    def kept(self) -> int:
        return int(self.keep.sum())


def plan_epoch(scores: np.ndarray, ratio: float, prune: bool, seed: int, epoch: int) -> EpochPlan:
    """The InfoBatch decision for `epoch` from the last recorded losses (NaN: not yet scored)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"the prune ratio must be in [0, 1), got {ratio}")
    n = len(scores)
    keep, weights = np.ones(n, bool), np.ones(n, np.float32)
    recorded = np.isfinite(scores)
    if not prune or ratio == 0.0 or not recorded.any():
        return EpochPlan(keep, weights)
    low = np.flatnonzero(recorded & (scores < scores[recorded].mean()))
    rng = np.random.default_rng([seed, epoch, 7])
    kept_low = rng.choice(low, int((1.0 - ratio) * len(low)), replace=False)
    keep[low] = False
    keep[kept_low] = True
    weights[kept_low] = 1.0 / (1.0 - ratio)
    return EpochPlan(keep, weights)


class InfoBatchStream:
    """One rank's rows epoch by epoch under InfoBatch (see the module docstring).

    `labels`: this rank's rows, which are rows `offset .. offset + len(labels)` of the global
    table of `total` rows; every rank draws `per_rank` rows per step, `steps_per_epoch` times:
    `ceil(kept rows of all ranks / global batch)`.
    """

    def __init__(
        self, labels: np.ndarray, offset: int, total: int, per_rank: int, world: int,
        ratio: float, anneal: float, epochs: float, seed: int, rank: int = 0,
        class_weights: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        self.labels = np.asarray(labels, np.int64)
        self.offset, self.total = int(offset), int(total)
        self.per_rank, self.world, self.rank = int(per_rank), int(world), int(rank)
        self.ratio, self.anneal, self.epochs = float(ratio), float(anneal), float(epochs)
        self.seed, self.class_weights = int(seed), class_weights
        self.scores = np.full(self.total, np.nan)
        self.epoch, self.step_in_epoch, self.pruned_total = 0, 0, 0
        self._start(self.epoch)
        self._planned = True  # False between an epoch's end and the next draw

    # -- the epoch ---------------------------------------------------------------------
    def _start(self, epoch: int, plan: EpochPlan | None = None) -> None:
        """Plan `epoch` (or take the saved `plan`) and draw this rank's order for it."""
        prune = epoch < self.anneal * self.epochs
        self.plan = plan or plan_epoch(self.scores, self.ratio, prune, self.seed, epoch)
        full = math.ceil(self.plan.kept / (self.per_rank * self.world))
        left = self.epochs - epoch  # a fractional last epoch is cut short
        self.steps_per_epoch = max(1, math.ceil(full * min(1.0, left)))
        mine = self.plan.keep[self.offset : self.offset + len(self.labels)]
        self.rows = np.flatnonzero(mine)
        if not len(self.rows):  # this rank's rows were all pruned: keep its own at weight 1
            self.rows = np.arange(len(self.labels))
        stream = IndexStream(
            self.labels[self.rows], self.seed + 1_000_003 * (epoch + 1), self.rank,
            self.class_weights if self.class_weights is not None else None,
        )  # fmt: skip
        self.order = self.rows[stream.next(self.per_rank * self.steps_per_epoch)]

    @property
    def done(self) -> bool:
        """All the epochs are trained."""
        return self.epoch >= math.ceil(self.epochs)

    @property
    def progress(self) -> float:
        """Epochs done, fractional, over the budget (0 .. 1)."""
        frac = self.step_in_epoch / self.steps_per_epoch if self._planned else 0.0
        return min(1.0, (self.epoch + frac * min(1.0, self.epochs - self.epoch)) / self.epochs)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """This step's rows (local indices) and their loss weights; advances the epoch. A new
        epoch is planned at its first draw, so the last step's losses are in the table."""
        if not self._planned:
            self._start(self.epoch)
            self._planned = True
        lo = self.step_in_epoch * self.per_rank
        idx = self.order[lo : lo + self.per_rank]
        weights = self.plan.weights[self.offset + idx]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.pruned_total += self.total - self.plan.kept
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self._planned = False
        return idx, weights

    def record(self, global_rows: np.ndarray, losses: np.ndarray) -> None:
        """The last loss of these rows (every rank's rows of the step, gathered)."""
        self.scores[np.asarray(global_rows, np.int64)] = np.asarray(losses, np.float64)

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The score table, the current epoch's plan and where the stream is in it (the
        epoch's draw order is rebuilt from the plan: it is seeded by the epoch)."""
        return {
            "scores": self.scores.copy(),
            "plan_keep": self.plan.keep.copy(),
            "plan_weights": self.plan.weights.copy(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "pruned_total": self.pruned_total,
            "planned": self._planned,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scores = np.asarray(state["scores"], np.float64).copy()
        self.epoch, self.pruned_total = int(state["epoch"]), int(state["pruned_total"])
        saved = EpochPlan(np.asarray(state["plan_keep"], bool),
                          np.asarray(state["plan_weights"], np.float32))  # fmt: skip
        self._planned = bool(state.get("planned", True))
        if self._planned:
            self._start(self.epoch, saved)
        self.step_in_epoch = int(state["step_in_epoch"])
