"""The DoReMi proxy loss: a drop-in for `core.training_loss` that runs Group DRO, as DoReMi does.

`DROSpec` is the trainer's loss hook (`dedt_ray.diffusion.job.LossSpec`): the reweight stage
puts one in the job, and each worker builds its `DROLoss` from it.

Per micro-batch: draw (t, noise) once, compute the per-sample denoising losses of the proxy
(with gradients) and of the frozen reference (without) on identical inputs (the same x_t, t,
noise and true labels: no label dropout in the proxy run), add the excess per class to this
optimizer step's sums (`GroupDRO.class_sums`), and return the proxy loss weighted by the
current weights. After the optimizer step (`after_step`) the sums of every micro-batch are
all-reduced over the DDP ranks and the weights update once (`update_from_sums`), as DoReMi
updates once per optimizer step over all micro-batches and ranks.

The weighted loss is normalised by the weight sum of the whole global micro-batch, not of the
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

    `after_step(step)` after each optimizer step updates the weights from the step's excess
    and keeps the trace (weights, average, excess, classes present); `state_dict` /
    `load_state_dict` carry GroupDRO and the trace through checkpoints.
    """

    def __init__(
        self,
        reference: nn.Module,
        num_classes: int,
        eta: float,
        smoothing: float,
        world: int = 1,
        distributed: bool = False,
        initial_excess: float = 0.0,
    ) -> None:
        self.reference = reference.eval().requires_grad_(False)
        self.dro = GroupDRO(num_classes, eta, smoothing, initial_excess)
        self.world, self.distributed = int(world), bool(distributed)
        embeds = getattr(getattr(reference, "config", None), "num_class_embeds", None)
        if embeds not in (None, num_classes, num_classes + 1):
            raise ValueError(
                f"the reference model has {embeds} class embeddings; expected {num_classes} "
                f"or {num_classes + 1} (with a null class) for {num_classes} classes, or none"
            )
        self.ref_embeds = embeds
        self._sums = torch.zeros(num_classes, dtype=torch.float64)
        self._counts = torch.zeros(num_classes, dtype=torch.float64)
        self._steps: list[int] = []
        self._trace: dict[str, list[torch.Tensor]] = {
            "weight": [], "average": [], "excess": [], "present": []
        }  # fmt: skip

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
        draw = draw_noise(x0, None, scheduler.config.num_train_timesteps, generator, cfg)
        return self.loss(model, scheduler, x0, labels, draw.t, draw.noise, sample_weights, cfg)

    def _reference_labels(
        self, labels: torch.Tensor, proxy_conditional: bool
    ) -> torch.Tensor | None:
        """What the proxy sees: the true labels, or "no label" (None, or the reference's null
        class when it has one) for an unconditional proxy."""
        if self.ref_embeds is None:
            return None
        if proxy_conditional:
            return labels
        if self.ref_embeds == self.dro.num_classes:
            raise ValueError(
                "an unconditional proxy needs a reference without a label or with a null class"
            )
        return torch.full_like(labels, self.dro.num_classes)

    def loss(
        self,
        model: nn.Module,
        scheduler: Any,
        x0: torch.Tensor,
        labels: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        sample_weights: torch.Tensor | None = None,
        cfg: LossConfig | None = None,
    ) -> torch.Tensor:
        """Add this micro-batch's excess to the step's sums; the proxy's weighted loss."""
        import torch.distributed as dist

        conditional = _class_embeds(model) is not None
        l_proxy = denoising_loss(model, scheduler, x0, labels if conditional else None, t, noise)
        with torch.no_grad():
            ref_labels = self._reference_labels(labels, conditional)
            l_ref = denoising_loss(self.reference, scheduler, x0, ref_labels, t, noise)
        w_t = timestep_weights(scheduler, t, cfg.min_snr_gamma) if cfg is not None else None
        if w_t is not None:
            l_proxy, l_ref = l_proxy * w_t, l_ref * w_t
        sums, counts = self.dro.class_sums(l_proxy, l_ref, labels)
        self._sums += sums.cpu()
        self._counts += counts.cpu()
        per_sample = l_proxy * sample_weights if sample_weights is not None else l_proxy
        w = self.dro.weights.to(per_sample.device, per_sample.dtype)[labels.to(per_sample.device)]
        total = w.sum().detach()
        if self.distributed:  # the weight sum of the global micro-batch
            total = total.clone()
            dist.all_reduce(total)
        return (w * per_sample).sum() * self.world / total

    # -- trace and state -------------------------------------------------------------
    def after_step(self, step: int) -> None:
        """One weight update from optimizer step `step`'s excess (all micro-batches and ranks),
        then keep the trace."""
        import torch.distributed as dist

        both = torch.stack([self._sums, self._counts])
        if self.distributed:
            both = both.to(_device(self.reference))
            dist.all_reduce(both)
        sums, counts = both[0].cpu(), both[1].cpu()
        self.dro.update_from_sums(sums, counts)
        self._sums.zero_()
        self._counts.zero_()
        self._steps.append(int(step))
        self._trace["weight"].append(self.dro.weights.clone())
        self._trace["average"].append(self.dro.average.clone())
        self._trace["excess"].append(self.dro.excess.clone())
        self._trace["present"].append((counts > 0).to(torch.float64))

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


def _class_embeds(model: nn.Module) -> int | None:
    """`num_class_embeds` of a (possibly DDP-wrapped) UNet."""
    inner = getattr(model, "module", model)
    return getattr(getattr(inner, "config", None), "num_class_embeds", None)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class DROSpec:
    """The trainer's loss hook for a DoReMi proxy run: Group DRO against a frozen reference.

    `reference`: the reference stage's export folder (local path or URI)."""

    reference: str
    num_classes: int
    eta: float
    smoothing: float
    initial_excess: float = 0.0
    needs_labels: bool = True  # the excess is per class, also for unconditional models

    def build(self, worker: WorkerInfo) -> DROLoss:
        return DROLoss(
            load_reference_unet(self.reference, worker.device),
            self.num_classes,
            self.eta,
            self.smoothing,
            worker.world,
            worker.distributed,
            self.initial_excess,
        )
