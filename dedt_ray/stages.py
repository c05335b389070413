"""The stage table: every stage, the config sections it reads and the stages it reads from.

Declared once, here; the pipeline (`dedt_ray.pipeline`) keys, skips and runs stages from it, the
report orders its sections by it, and a test runs every stage under a config that records the
sections it reads, failing when one is read but not declared.

The stage contract: `run(cfg, store, ctx) -> dict` in its own module. It reads the artifacts of
the upstream stages in `ctx.inputs` (through `dedt_ray.artifacts`), writes its own under
`<run>/<name>/`, and returns what goes into its `_manifest.json`. No stage imports another.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dedt_ray.config import Config
from dedt_ray.store import RunStore


@dataclass(frozen=True)
class StageContext:
    """What a stage gets besides the config and the run directory."""

    inputs: dict[str, str] = field(default_factory=dict)  # upstream stage -> its output_id
    train_callbacks: tuple[Any, ...] = ()  # ray.train UserCallbacks of the `train` stage's fit
    # starts the actor that scores a training run's curve (train.eval_every); the pipeline
    # passes `dedt_ray.evaluate.scorer.make_scorer`
    curve_scorer: Callable[..., Any] | None = None


StageFn = Callable[[Config, RunStore, StageContext], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function" implementing run(cfg, store, ctx) -> dict
    sections: tuple[str, ...]  # config sections the stage reads (its output depends on them)
    inputs: tuple[str, ...] = ()  # upstream stages whose artifacts it needs
    enabled: Callable[[Config], bool] = lambda cfg: True
    # upstream stages it reads when the config enables them and they ran (their output then
    # joins the key and `ctx.inputs`, so a changed upstream output reruns this stage)
    optional: Callable[[Config], tuple[str, ...]] = lambda cfg: ()
    # config sections it reads only in some configs (then they join its key)
    extra_sections: Callable[[Config], tuple[str, ...]] = lambda cfg: ()
    always: bool = False  # rerun every time (the report reads every stage)
    uses_ray: bool = True  # False: runs without connecting to a cluster (the report)

    def load(self) -> StageFn:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


TRAINING = ("seed", "data", "model", "train")  # what every training stage depends on


def curve_sections(cfg: Config) -> tuple[str, ...]:
    """A curve along training (train.eval_every) is measured as the evaluate stage measures."""
    return ("evaluate",) if cfg.train.eval_every else ()


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("embed", "dedt_ray.embed:run", ("seed", "data", "embed")),
        Stage(
            "select",
            "dedt_ray.selection.stage:run",
            ("data", "select"),
            inputs=("embed",),
            enabled=lambda cfg: cfg.select.enabled,
        ),
        Stage(
            "latents",
            "dedt_ray.diffusion.latents:run",
            ("data", "model"),
            enabled=lambda cfg: cfg.model.latent,
        ),
        Stage(
            "reference",
            "dedt_ray.reweight.reference:run",
            (*TRAINING, "reference", "reweight"),  # reweight: the shared model and budget
            enabled=lambda cfg: cfg.reweight.enabled,
            # select: the subset (reference.data=subset) or, for unlabelled data, its groups
            optional=lambda cfg: (
                ("latents",) if cfg.reference.pretrained else ("select", "latents")
            ),
        ),
        Stage(
            "reweight",
            "dedt_ray.reweight.stage:run",
            (*TRAINING, "reference", "reweight"),  # reference: the planned steps, batch
            inputs=("reference",),
            enabled=lambda cfg: cfg.reweight.enabled,
            optional=lambda cfg: ("select", "latents"),
        ),
        Stage(
            "train",
            "dedt_ray.diffusion.train:run",
            (*TRAINING, "tdc"),  # tdc: with TDC on, stage 1 trains tdc.stage1_fraction of it
            optional=lambda cfg: ("select", "reweight", "latents"),
            extra_sections=curve_sections,
        ),
        Stage(
            "tdc",
            "dedt_ray.tdc.stage:run",
            (*TRAINING, "tdc", "evaluate"),  # evaluate: the sampler whose FLOPs it reports
            inputs=("train",),
            enabled=lambda cfg: cfg.tdc.enabled,
            optional=lambda cfg: ("select", "reweight", "latents"),
        ),
        Stage(
            "evaluate",
            "dedt_ray.evaluate.stage:run",
            # tdc: the routed model is evaluated when enabled; embed + select: the warning
            # when the selection encoder is the metric's network
            ("data", "evaluate", "tdc", "embed", "select"),
            inputs=("train",),
            optional=lambda cfg: ("tdc",) if cfg.tdc.enabled else (),
        ),
        Stage("report", "dedt_ray.report:run", ("report",), always=True, uses_ray=False),
    ]
}
