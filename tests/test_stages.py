"""The stage table holds: every stage reads only the config sections it declares.

One tiny run of every stage (embed -> select -> reference -> reweight -> train -> tdc ->
evaluate on the routed model -> report) under a config that records which top-level sections
each stage reads; a section read but not declared in `dedt_ray.stages.STAGES` would let a
cached manifest survive a change of that section.
"""

from __future__ import annotations

import importlib
import math

import pytest

from dedt_ray.config import Config, load_config
from dedt_ray.pipeline import STAGES, run_pipeline
from dedt_ray.store import RunStore

READS: set[str] = set()


class RecordingConfig(Config):
    """A Config that notes every top-level section read from it (copies share the notes)."""

    def __getattribute__(self, name: str):
        if name in Config.model_fields:
            READS.add(name)
        return super().__getattribute__(name)


TINY_PIPELINE = [
    "data.image_size=8",
    "data.limit=96",
    "model.block_out_channels=[16,32]",
    "model.norm_num_groups=8",
    "model.attention_head_dim=8",
    "model.num_train_timesteps=100",
    "train.steps=40",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.hflip=true",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.threads_per_worker=1",
    "train.num_workers=0",
    "reference.steps=2",
    "reweight.steps=2",
    "tdc.enabled=true",
    "tdc.rounds=1",
    "tdc.score_steps=1",
    "tdc.score_images=16",
    "tdc.score_heldout=8",
    "tdc.taylor_images=4",  # a search small enough for stage 2 to fit train.steps' budget
    "tdc.taylor_timesteps=2",
    "evaluate.samples_per_class=2",
    "evaluate.num_inference_steps=2",
    "evaluate.feature_space=classifier",
    "evaluate.classifier_epochs=1",
    "evaluate.classifier_max_images=96",
    "evaluate.max_real=64",
    "evaluate.manifold_samples=16",
]


@pytest.mark.slow
def test_every_stage_reads_only_its_declared_sections(ray_cluster, tmp_path, monkeypatch):
    read: dict[str, set[str]] = {}
    for stage in STAGES.values():
        module_name, func = stage.target.split(":")
        module = importlib.import_module(module_name)
        original = getattr(module, func)

        def recording(cfg, store, ctx, _name=stage.name, _run=original):
            READS.clear()
            try:
                return _run(cfg, store, ctx)
            finally:
                read[_name] = set(READS)

        monkeypatch.setattr(module, func, recording)
    cfg = RecordingConfig.model_validate(load_config(None, TINY_PIPELINE).model_dump())
    done = run_pipeline(cfg, RunStore(str(tmp_path / "run")))
    assert set(done) == set(read) == set(STAGES) - {"latents"}  # every enabled stage ran
    assert done["tdc"]["rows"] == 2
    # evaluate sampled the routed model: its export, its steps, its (pruned) sampling FLOPs
    ev, tdc, store = done["evaluate"], done["tdc"], RunStore(str(tmp_path / "run"))
    assert ev["inputs"] == {"train": done["train"]["output_id"], "tdc": tdc["output_id"]}
    assert ev["rows"] == 2 * 10  # evaluate.samples_per_class x the digits' classes
    metrics = store.read_json("evaluate", "metrics.json")
    routed_info = store.read_json("tdc", "model", "dedt_model.json")
    assert metrics["model_path"] == "tdc/model" and routed_info["tdc"] is True
    assert metrics["model"]["steps"] == routed_info["steps"] > done["train"]["steps"]
    assert metrics["model"]["flops"] == tdc["training_flops"]["total_flops"]
    # evaluate counts the whole sampler (FlopCounterMode), tdc sums each group's batch-1
    # forward: within a few % of each other, and well below the single model's count
    sampling = tdc["sampling_flops"]
    assert ev["flops_per_image"] == pytest.approx(sampling["routed_flops_per_image"], rel=0.03)
    assert ev["flops_per_image"] < 0.9 * sampling["single_flops_per_image"]
    assert math.isfinite(ev["value"]) and ev["value"] > 0
    for name, sections in read.items():
        undeclared = sections - {*STAGES[name].sections, *STAGES[name].extra_sections(cfg)}
        assert not undeclared, f"stage {name!r} reads undeclared config sections {undeclared}"
    assert read["tdc"] >= {"evaluate", "tdc", "train"}  # the recorder sees real reads
    # TDC within the single model's budget: stage 1 = half of train.steps, stage 2 the rest
    assert done["train"]["steps"] == 20 and done["train"]["budget_steps"] == 40
    flops = done["tdc"]["training_flops"]
    assert done["tdc"]["stage2_steps_rule"] == "budget" and done["tdc"]["stage2_steps"] >= 1
    assert (
        flops["within_baseline"] and flops["baseline_flops"] == 40 * done["train"]["flops_per_step"]
    )
