"""Running the stage DAG (`dedt_ray.stages.STAGES`): keys, skip/force by manifest, order.

A stage is a function `run(cfg, store, ctx) -> dict` in its own module; what it returns goes
into its `_manifest.json` together with the cache key. A stage is skipped when its manifest
holds the same key: the same config sections and the same upstream outputs.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from dedt_ray.config import Config, dump_config, hash_json
from dedt_ray.stages import STAGES, Stage, StageContext
from dedt_ray.store import RunStore

__all__ = [
    "STAGES", "Stage", "StageContext", "pending_stages", "run_pipeline", "run_stage", "stage_key",
]  # fmt: skip

log = logging.getLogger("dedt_ray")


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
        for s in (*stage.sections, *stage.extra_sections(cfg))
    }
    config_hash = hash_json(sections)
    return {"config_hash": config_hash, "inputs": inputs, "key": hash_json([config_hash, inputs])}


def selected_stages(cfg: Config, only: Sequence[str] | None = None) -> list[str]:
    """The enabled stages in DAG order (restricted to `only`)."""
    return [
        name
        for name, stage in STAGES.items()
        if (only is None or name in only) and stage.enabled(cfg)
    ]


def pending_stages(
    cfg: Config, store: RunStore, force: bool = False, only: Sequence[str] | None = None
) -> list[str]:
    """The stages of `run_pipeline(cfg, store, force, only)` that would run (not be skipped).

    A stage runs when forced, always, out of date, or when an upstream stage it reads runs
    (its output id changes). Reads manifests only: no Ray, no torch."""
    pending: list[str] = []
    for name in selected_stages(cfg, only):
        stage = STAGES[name]
        upstream = set(stage.inputs) | set(stage.optional(cfg))
        if force or stage.always or upstream & set(pending):
            pending.append(name)
            continue
        try:
            key = stage_key(stage, cfg, store)
        except RuntimeError:  # a missing input: run_stage says so
            pending.append(name)
            continue
        previous = store.manifest(name)
        if previous is None or previous.get("key") != key["key"]:
            pending.append(name)
    return pending


def run_stage(
    name: str,
    cfg: Config,
    store: RunStore,
    force: bool = False,
    train_callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Run one stage unless its manifest says the same inputs were already done.

    `force` also deletes the stage's in-progress training state (`<run>/_ray/<name>-*`), so
    it starts clean. A stage that raises leaves no half-written folder behind.
    `train_callbacks`: ray.train UserCallbacks for the `train` stage's trainer (a sweep trial
    forwards its reports to Tune with one)."""
    stage = STAGES[name]
    key = stage_key(stage, cfg, store)
    previous = store.manifest(name)
    if previous is not None and previous.get("key") == key["key"] and not (force or stage.always):
        log.info("%s: up to date (%s rows), skipped; --force reruns it", name, previous.get("rows"))
        return {**previous, "skipped_stage": True}

    if stage.uses_ray:
        from dedt_ray.runtime import init_ray

        init_ray()
    if force:
        for cleared in store.clear_run_state(name):
            log.info("%s: --force: deleted the in-progress run %s", name, cleared)
    store.clear(name)
    started = time.time()
    log.info("%s: running", name)
    from dedt_ray.evaluate.scorer import make_scorer

    ctx = StageContext(dict(key["inputs"]), tuple(train_callbacks), curve_scorer=make_scorer)
    try:
        result = stage.load()(cfg, store, ctx)
    except BaseException as exc:
        store.delete(name)  # nothing half-written that a reader could take for output
        if not hasattr(exc, "dedt_stage"):
            with contextlib.suppress(AttributeError):  # the CLI names the stage that failed
                exc.dedt_stage = name  # type: ignore[attr-defined]
        raise
    seconds = time.time() - started
    manifest = {
        "stage": name,
        **key,
        "output_id": uuid.uuid4().hex,
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "seconds": round(seconds, 3),
        **export_checksums(store, name),
        **result,
    }
    store.write_manifest(name, manifest)
    log.debug("%s: done in %.1f s", name, seconds)
    return manifest


def export_checksums(store: RunStore, name: str) -> dict[str, Any]:
    """`export_sha256` of the stage's export (`<run>/<name>/model`), when it wrote one."""
    from dedt_ray.artifacts import EXPORT_INFO, model_dir

    if not store.exists(*model_dir(name), EXPORT_INFO):
        return {}
    sha = store.read_json(*model_dir(name), EXPORT_INFO).get("sha256")
    return {"export_sha256": sha} if sha else {}


def run_pipeline(
    cfg: Config,
    store: RunStore,
    force: bool = False,
    only: list[str] | None = None,
    train_callbacks: Sequence[Any] = (),
) -> dict[str, dict[str, Any]]:
    """Run the enabled stages in DAG order (or just `only`), writing config.yaml first."""
    store.write_text(dump_config(cfg), "config.yaml")
    done = {}
    for name, stage in STAGES.items():
        if only is not None and name not in only:
            continue
        if not stage.enabled(cfg):
            log.debug("%s: disabled by config", name)
            continue
        done[name] = run_stage(name, cfg, store, force, train_callbacks)
    return done
