"""Group DRO over classes as in DoReMi (Xie et al., NeurIPS 2023): pure math, no Ray.

One step: `alpha' = softmax(log alpha + eta * excess)`, then `(1 - c) * alpha' + c / K`.
The excess of class i is the mean over its batch samples of `max(l_proxy - l_ref, 0)`; a class
absent from the batch keeps its previous excess, which starts at `initial_excess` (DoReMi: the
loss of a uniform predictor, so a class not yet seen is not pushed down). The output weights
are the running mean of all weights, starting from the uniform initial ones.
"""

from __future__ import annotations

from numbers import Integral
from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _check_hparams(eta: float, smoothing: float) -> None:
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")


def doremi_update(alpha: ArrayT, excess: ArrayT, eta: float, smoothing: float) -> ArrayT:
    """One exponentiated-gradient step on the class weights `alpha` [K].

    Returns the same kind as `alpha` (numpy array or torch tensor, same dtype and device);
    `excess` [K] is converted to match.
    """
    _check_hparams(eta, smoothing)
    if alpha.ndim != 1 or tuple(alpha.shape) != tuple(excess.shape):
        raise ValueError(
            f"alpha and excess must be 1-D of the same length, got shapes "
            f"{tuple(alpha.shape)} and {tuple(excess.shape)}"
        )
    k = alpha.shape[0]
    if k < 1:
        raise ValueError("alpha must have at least one class")
    if isinstance(alpha, torch.Tensor):
        dtype = alpha.dtype if alpha.is_floating_point() else torch.get_default_dtype()
        a = alpha.to(dtype)
        e = torch.as_tensor(excess, dtype=dtype, device=alpha.device)
        new = torch.softmax(torch.log(a) + eta * e, dim=0)
    else:
        a = np.asarray(alpha)
        dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float64)
        a = a.astype(dtype, copy=False)
        e = np.asarray(excess, dtype=dtype)
        with np.errstate(divide="ignore"):  # a zero weight is log 0 = -inf, softmax gives 0
            z = np.log(a) + dtype.type(eta) * e
        z = np.exp(z - z.max())
        new = z / z.sum()
    return (1 - smoothing) * new + smoothing / k


class GroupDRO:
    """Online DoReMi class weights for a proxy model trained against a reference model.

    State (CPU float64 tensors): `weights` (current), `average` (running mean, the output),
    `excess` (last per-class excess loss) and the int `num_updates`.

    Distributed use: every rank calls `class_sums`, the trainer all-reduces (sums) the two
    tensors across ranks, then every rank calls `update_from_sums` and `weighted_loss`.
    `step` does all three for a single process.
    """

    def __init__(
        self,
        num_classes: int,
        eta: float = 1.0,
        smoothing: float = 1e-3,
        initial_excess: float = 0.0,
    ) -> None:
        is_int = isinstance(num_classes, Integral) and not isinstance(num_classes, bool)
        if not is_int or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        _check_hparams(eta, smoothing)
        self.num_classes = int(num_classes)
        self.eta = float(eta)
        self.smoothing = float(smoothing)
        self.weights = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        self.average = self.weights.clone()
        if not initial_excess >= 0:
            raise ValueError(f"initial_excess must be >= 0, got {initial_excess}")
        self.excess = torch.full((num_classes,), float(initial_excess), dtype=torch.float64)
        self.num_updates = 0

    def class_sums(
        self, loss_proxy: torch.Tensor, loss_ref: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class sums of `max(l_proxy - l_ref, 0)` and sample counts, both float64 [K].

        They stay on the losses' device, ready for an all-reduce (sum).
        """
        if loss_proxy.ndim != 1 or loss_proxy.shape != loss_ref.shape:
            raise ValueError(
                f"loss_proxy and loss_ref must be 1-D per-sample losses of the same shape, got "
                f"{tuple(loss_proxy.shape)} and {tuple(loss_ref.shape)}"
            )
        self._check_labels(labels, loss_proxy)
        with torch.no_grad():
            gap = (loss_proxy.detach() - loss_ref.detach()).clamp_min(0).to(torch.float64)
            sums = torch.zeros(self.num_classes, dtype=torch.float64, device=gap.device)
            index = labels.to(gap.device, torch.int64)
            sums.index_add_(0, index, gap)
            counts = torch.bincount(index, minlength=self.num_classes)
        return sums, counts.to(torch.float64)

    def update_from_sums(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Update excess, weights and running average from (all-reduced) class sums and counts.

        Returns the new current weights.
        """
        k = self.num_classes
        if tuple(sums.shape) != (k,) or tuple(counts.shape) != (k,):
            raise ValueError(
                f"sums and counts must have shape ({k},), got {tuple(sums.shape)} and "
                f"{tuple(counts.shape)}"
            )
        sums = sums.detach().to("cpu", torch.float64)
        counts = counts.detach().to("cpu", torch.float64)
        present = counts > 0
        excess = self.excess.clone()
        excess[present] = sums[present] / counts[present]
        self.excess = excess
        self.weights = doremi_update(self.weights, excess, self.eta, self.smoothing)
        n = self.num_updates + 1
        self.average = (self.average * n + self.weights) / (n + 1)
        self.num_updates = n
        return self.weights

    def weighted_loss(self, loss_proxy: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`sum_j w[y_j] l_j / sum_j w[y_j]` with the current weights (constants for autograd)."""
        if loss_proxy.ndim != 1:
            raise ValueError(f"loss_proxy must be 1-D, got shape {tuple(loss_proxy.shape)}")
        self._check_labels(labels, loss_proxy)
        if loss_proxy.numel() == 0:
            raise ValueError("cannot weight an empty batch")
        w = self.weights.to(loss_proxy.device, loss_proxy.dtype)[
            labels.to(loss_proxy.device, torch.int64)
        ]
        return (w * loss_proxy).sum() / w.sum()

    def step(
        self, loss_proxy: torch.Tensor, loss_ref: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Update the weights from one batch and return the proxy's weighted loss (scalar)."""
        sums, counts = self.class_sums(loss_proxy, loss_ref, labels)
        self.update_from_sums(sums, counts)
        return self.weighted_loss(loss_proxy, labels)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only (safetensors-friendly); `num_updates` is a 0-d int64 tensor."""
        return {
            "weights": self.weights.clone(),
            "average": self.average.clone(),
            "excess": self.excess.clone(),
            "num_updates": torch.tensor(self.num_updates, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        """Restore from `state_dict()` output (`num_updates` may be an int or a tensor)."""
        missing = {"weights", "average", "excess", "num_updates"} - set(state)
        if missing:
            raise KeyError(f"GroupDRO state is missing {sorted(missing)}")
        tensors = {}
        for key in ("weights", "average", "excess"):
            value = torch.as_tensor(state[key]).detach().to("cpu", torch.float64)
            if tuple(value.shape) != (self.num_classes,):
                raise ValueError(
                    f"state[{key!r}] has shape {tuple(value.shape)}, expected ({self.num_classes},)"
                )
            tensors[key] = value.clone()
        self.weights, self.average, self.excess = (
            tensors["weights"],
            tensors["average"],
            tensors["excess"],
        )
        self.num_updates = int(state["num_updates"])

    def _check_labels(self, labels: torch.Tensor, loss: torch.Tensor) -> None:
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if tuple(labels.shape) != tuple(loss.shape):
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match losses {tuple(loss.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
