"""The DoReMi proxy loss: a drop-in for `core.training_loss` that runs Group DRO every call.

`DROSpec` is the trainer's loss hook (`dedt_ray.diffusion.job.LossSpec`): the reweight stage
puts one in the job, and each worker builds its `DROLoss` from it.

Per micro-batch: draw (t, noise) once, compute the per-sample denoising losses of the proxy
(with gradients) and of the frozen reference (without) on the same (x_t, t, noise), sum the
excess per class (`GroupDRO.class_sums`), all-reduce sums and counts over the DDP ranks,
update the weights (`update_from_sums`: identical on every rank) and return the proxy loss
weighted by the *updated* weights.

The weighted loss is normalised by the weight sum of the whole global batch, not of the
rank's share, so the DDP-averaged gradient equals the single-process gradient on the same
global batch: 1 and N workers train the same proxy and find the same weights.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dedt_ray.diffusion.core import LossConfig, denoising_loss, draw_noise, timestep_weights
from dedt_ray.diffusion.job import WorkerInfo
from dedt_ray.reweight.doremi import GroupDRO


def load_reference_unet(path: str, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen reference UNet of an exported model folder (local path or URI)."""
    from diffusers import UNet2DModel

    if "://" in path:  # a worker on another node: fetch the unet/ folder first
        import pyarrow.fs as pafs

        local = tempfile.mkdtemp(prefix="dedt-ref-")
        fs, remote = pafs.FileSystem.from_uri(path)
        pafs.copy_files(f"{remote}/unet", local, source_filesystem=fs)
        unet = UNet2DModel.from_pretrained(local)
    else:
        unet = UNet2DModel.from_pretrained(os.path.join(path, "unet"))
    return unet.to(device).eval().requires_grad_(False)


class DROLoss:
    """`loss_fn` for `core.train_step` that trains a proxy by Group DRO against `reference`.

    `record(step)` after each optimizer step keeps the trace (weights, average, excess);
    `state_dict` / `load_state_dict` carry GroupDRO and the trace through checkpoints.
    """

    def __init__(
        self,
        reference: nn.Module,
        num_classes: int,
        eta: float,
        smoothing: float,
        world: int = 1,
        distributed: bool = False,
    ) -> None:
        self.reference = reference.eval().requires_grad_(False)
        self.dro = GroupDRO(num_classes, eta, smoothing)
        self.world, self.distributed = int(world), bool(distributed)
        embeds = getattr(getattr(reference, "config", None), "num_class_embeds", None)
        if embeds not in (None, num_classes, num_classes + 1):
            raise ValueError(
                f"the reference model has {embeds} class embeddings; expected {num_classes} "
                f"or {num_classes + 1} (with a null class) for {num_classes} classes, or none"
            )
        self.ref_embeds = embeds
        self._steps: list[int] = []
        self._trace: dict[str, list[torch.Tensor]] = {"weight": [], "average": [], "excess": []}

    def __call__(
        self,
        model: nn.Module,
        scheduler: Any,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        sample_weights: torch.Tensor | None,
        generator: torch.Generator | None,
        cfg: LossConfig,
    ) -> torch.Tensor:
        """Same signature as `core.training_loss`; `labels` are the true classes (required)."""
        if labels is None:
            raise ValueError("DRO reweighting needs class labels")
        draw = draw_noise(x0, labels, scheduler.config.num_train_timesteps, generator, cfg)
        return self.loss(
            model, scheduler, x0, labels, draw.cond, draw.t, draw.noise, sample_weights, cfg
        )

    def _reference_labels(
        self, labels: torch.Tensor, cond: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The reference sees what the proxy sees (dropped labels -> its null class)."""
        k = self.dro.num_classes
        if self.ref_embeds is None:
            return None
        if self.ref_embeds == k:  # no null class: it can only be given the true labels
            return labels
        return cond if cond is not None else torch.full_like(labels, k)

    def loss(
        self,
        model: nn.Module,
        scheduler: Any,
        x0: torch.Tensor,
        labels: torch.Tensor,
        cond: torch.Tensor | None,
        t: torch.Tensor,
        noise: torch.Tensor,
        sample_weights: torch.Tensor | None = None,
        cfg: LossConfig | None = None,
    ) -> torch.Tensor:
        """DRO update from this (x0, t, noise) and the proxy's weighted loss (scalar)."""
        import torch.distributed as dist

        l_proxy = denoising_loss(model, scheduler, x0, cond, t, noise)
        with torch.no_grad():
            ref_labels = self._reference_labels(labels, cond)
            l_ref = denoising_loss(self.reference, scheduler, x0, ref_labels, t, noise)
        w_t = timestep_weights(scheduler, t, cfg.min_snr_gamma) if cfg is not None else None
        if w_t is not None:
            l_proxy, l_ref = l_proxy * w_t, l_ref * w_t
        sums, counts = self.dro.class_sums(l_proxy, l_ref, labels)
        if self.distributed:
            both = torch.stack([sums, counts])
            dist.all_reduce(both)
            sums, counts = both[0], both[1]
        self.dro.update_from_sums(sums, counts)
        per_sample = l_proxy * sample_weights if sample_weights is not None else l_proxy
        local = self.dro.weights[labels.cpu()].sum()
        total = (self.dro.weights * counts.cpu()).sum()  # weight sum of the global batch
        scale = float(local * self.world / total)
        return self.dro.weighted_loss(per_sample, labels) * scale

    # -- trace and state -------------------------------------------------------------
    def after_step(self, step: int) -> None:
        """The trainer's hook after each optimizer step: keep the trace."""
        self.record(step)

    def record(self, step: int) -> None:
        """Keep the weights after optimizer step `step`."""
        self._steps.append(int(step))
        self._trace["weight"].append(self.dro.weights.clone())
        self._trace["average"].append(self.dro.average.clone())
        self._trace["excess"].append(self.dro.excess.clone())

    def trace(self) -> dict[str, torch.Tensor]:
        """step [n] and weight / average / excess [n, K] (float64)."""
        k = self.dro.num_classes
        out = {"step": torch.tensor(self._steps, dtype=torch.int64)}
        for name, rows in self._trace.items():
            out[name] = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.float64)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"group_dro": self.dro.state_dict(), "trace": self.trace()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dro.load_state_dict(state["group_dro"])
        trace = state["trace"]
        self._steps = [int(s) for s in trace["step"].tolist()]
        for name in self._trace:
            self._trace[name] = list(trace[name].to(torch.float64).unbind(0))


@dataclass(frozen=True)
class DROSpec:
    """The trainer's loss hook for a DoReMi proxy run: Group DRO against a frozen reference.

    `reference`: the reference stage's export folder (local path or URI)."""

    reference: str
    num_classes: int
    eta: float
    smoothing: float
    needs_labels: bool = True  # the excess is per class, also for unconditional models

    def build(self, worker: WorkerInfo) -> DROLoss:
        return DROLoss(
            load_reference_unet(self.reference, worker.device),
            self.num_classes,
            self.eta,
            self.smoothing,
            worker.world,
            worker.distributed,
        )
