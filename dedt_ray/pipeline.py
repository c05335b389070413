"""The stage DAG: which stages exist, what each depends on, and skip/force by manifest.

A stage is a function `run(cfg, store) -> dict` in its own module; what it returns goes
into its `_manifest.json` together with the cache key. A stage is skipped when its manifest
holds the same key: the same config sections and the same upstream outputs.
"""

from __future__ import annotations

import importlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from dedt_ray.config import Config, dump_config, hash_json
from dedt_ray.store import RunStore

log = logging.getLogger("dedt_ray")


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function" implementing run(cfg, store) -> dict
    sections: tuple[str, ...]  # config sections the stage's output depends on
    inputs: tuple[str, ...] = ()  # upstream stages whose artifacts it reads
    enabled: Callable[[Config], bool] = lambda cfg: True
    # upstream stages it reads when the config enables them and they ran (their output then
    # joins the key, so a changed upstream output reruns this stage)
    optional: Callable[[Config], tuple[str, ...]] = lambda cfg: ()
    always: bool = False  # rerun every time (the report reads every stage)

    def load(self) -> Callable[[Config, RunStore], dict[str, Any]]:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("embed", "dedt_ray.embed:run", ("seed", "data", "embed")),
        Stage(
            "select",
            "dedt_ray.selection.stage:run",
            ("select",),
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
            ("seed", "data", "model", "train", "reference"),
            enabled=lambda cfg: cfg.reweight.enabled,
            optional=lambda cfg: (
                ("select",)
                if cfg.reference.data == "subset" and not cfg.reference.pretrained
                else ()
            ),
        ),
        Stage(
            "reweight",
            "dedt_ray.reweight.stage:run",
            ("seed", "data", "model", "train", "reweight"),
            inputs=("reference",),
            enabled=lambda cfg: cfg.reweight.enabled,
            optional=lambda cfg: ("select",),
        ),
        Stage(
            "train",
            "dedt_ray.diffusion.train:run",
            ("seed", "data", "model", "train"),
            optional=lambda cfg: ("select", "reweight", "latents"),
        ),
        Stage(
            "tdc",
            "dedt_ray.tdc.stage:run",
            ("seed", "data", "model", "train", "tdc"),
            inputs=("train",),
            enabled=lambda cfg: cfg.tdc.enabled,
        ),
        Stage(
            "evaluate",
            "dedt_ray.evaluate.stage:run",
            ("data", "evaluate", "tdc"),  # tdc: the routed model is evaluated when enabled
            inputs=("train",),
            optional=lambda cfg: ("tdc",) if cfg.tdc.enabled else (),
        ),
        Stage("report", "dedt_ray.report:run", ("report",), always=True),
    ]
}


def stage_key(stage: Stage, cfg: Config, store: RunStore) -> dict[str, Any]:
    """What the stage's output depends on; raises when an input stage has not run."""
    inputs = {}
    for name in stage.inputs:
        upstream = store.manifest(name)
        if upstream is None:
            raise RuntimeError(
                f"stage {stage.name!r} needs {name!r} first: run `dedt-ray {name}` "
                f"or `dedt-ray run` with the same --run-dir"
            )
        inputs[name] = upstream["output_id"]
    for name in stage.optional(cfg):
        if not STAGES[name].enabled(cfg):
            continue
        upstream = store.manifest(name)
        if upstream is None:
            log.warning(
                "%s: %s is enabled but has not run in this run directory; running without "
                "its output (`dedt-ray run` runs every stage in order)", stage.name, name,
            )  # fmt: skip
            continue
        inputs[name] = upstream["output_id"]
    sections = {
        s: (
            getattr(cfg, s).model_dump(mode="json")
            if hasattr(getattr(cfg, s), "model_dump")
            else getattr(cfg, s)
        )
        for s in stage.sections
    }
    config_hash = hash_json(sections)
    return {"config_hash": config_hash, "inputs": inputs, "key": hash_json([config_hash, inputs])}


def run_stage(name: str, cfg: Config, store: RunStore, force: bool = False) -> dict[str, Any]:
    """Run one stage unless its manifest says the same inputs were already done."""
    stage = STAGES[name]
    key = stage_key(stage, cfg, store)
    previous = store.manifest(name)
    if previous is not None and previous.get("key") == key["key"] and not (force or stage.always):
        log.info("%s: up to date (%s rows), skipped; --force reruns it", name, previous.get("rows"))
        return {**previous, "skipped_stage": True}

    from dedt_ray.runtime import init_ray

    init_ray()
    store.clear(name)
    started = time.time()
    log.info("%s: running", name)
    result = stage.load()(cfg, store)
    seconds = time.time() - started
    manifest = {
        "stage": name,
        **key,
        "output_id": uuid.uuid4().hex,
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "seconds": round(seconds, 3),
        **result,
    }
    store.write_manifest(name, manifest)
    log.info("%s: done in %.1f s", name, seconds)
    return manifest


def run_pipeline(
    cfg: Config, store: RunStore, force: bool = False, only: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Run the enabled stages in DAG order (or just `only`), writing config.yaml first."""
    store.write_text(dump_config(cfg), "config.yaml")
    done = {}
    for name, stage in STAGES.items():
        if only is not None and name not in only:
            continue
        if not stage.enabled(cfg):
            log.info("%s: disabled by config", name)
            continue
        done[name] = run_stage(name, cfg, store, force=force)
    return done
