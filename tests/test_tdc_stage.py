"""Stage `tdc` end to end on tiny settings: routed export, rounds, FLOPs accounting, loaders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dedt_ray.config import ConfigError, load_config
from dedt_ray.diffusion.export import load_export
from dedt_ray.diffusion.models import sampling_scheduler
from dedt_ray.diffusion.sampling import generate
from dedt_ray.evaluate.stage import ROUTED, model_classes, model_parts
from dedt_ray.pipeline import STAGES, StageContext, run_stage, stage_key
from dedt_ray.store import RunStore
from dedt_ray.tdc.routing import RoutedUNet

TINY = [
    "data.image_size=8",
    "data.limit=96",
    "model.block_out_channels=[16,32]",
    "model.norm_num_groups=8",
    "model.attention_head_dim=8",
    "model.num_train_timesteps=100",
    "train.steps=4",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.threads_per_worker=1",
    "train.num_workers=0",
    "tdc.enabled=true",
    "tdc.rounds=2",
    "tdc.score_steps=2",
    "tdc.score_images=32",
    "tdc.score_heldout=16",
    "tdc.taylor_images=16",
    "tdc.taylor_timesteps=4",
    "tdc.finetune_steps=3",
    "evaluate.num_inference_steps=4",
]


@pytest.fixture(scope="module")
def tdc_run(ray_cluster, tmp_path_factory):
    torch.set_num_threads(1)
    store = RunStore(str(tmp_path_factory.mktemp("tdc") / "run"))
    cfg = load_config(None, TINY)
    run_stage("train", cfg, store)
    return cfg, store, run_stage("tdc", cfg, store)


def test_config_and_dag() -> None:
    assert not load_config(None, []).tdc.enabled
    assert list(STAGES).index("tdc") == list(STAGES).index("train") + 1
    assert STAGES["tdc"].inputs == ("train",)
    with pytest.raises(ConfigError, match="boundaries"):
        load_config(None, ["tdc.rule=explicit"])
    with pytest.raises(ConfigError, match="llm_base_url"):
        load_config(None, ["tdc.proxy=llm"])


def test_routed_export_loads_and_samples(tdc_run) -> None:
    cfg, store, manifest = tdc_run
    model_dir = store.path(*ROUTED)
    routing = json.loads(open(os.path.join(model_dir, "unet", "routing.json")).read())
    assert len(routing["models"]) == 2
    for folder in routing["models"]:
        assert os.path.isfile(os.path.join(model_dir, "unet", folder, "pruned.json"))
    unet, scheduler, vae, info = load_export(model_dir)
    assert isinstance(unet, RoutedUNet) and vae is None and info["tdc"]
    images = generate(unet, sampling_scheduler(scheduler, "ddim"), [0, 1, 2], 4)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    # the evaluate stage picks the routed model when tdc is enabled
    assert model_parts(stage_key(STAGES["evaluate"], cfg, store)["inputs"]) == ROUTED
    classes, _, _ = model_classes(store, ROUTED)
    assert classes == list(range(10))


def test_flops_accounting_and_rounds(tdc_run) -> None:
    _, store, manifest = tdc_run
    train = store.manifest("train")
    flops = manifest["training_flops"]
    assert flops["stage1_flops"] == train["flops"]
    assert flops["baseline_flops"] == 4 * train["flops_per_step"]
    assert flops["search_flops"] > 0 and flops["stage2_flops"] > 0
    assert flops["total_flops"] == (
        flops["stage1_flops"] + flops["search_flops"] + flops["stage2_flops"]
    )
    groups = manifest["groups"]
    assert [g["stage2_steps"] for g in groups] == [3, 3]
    # default smallest=noisiest, k=0.5: the noisy group gets ~75% of the base FLOPs
    assert groups[1]["flops_fraction"] == pytest.approx(0.75, abs=0.03)
    assert groups[0]["flops_fraction"] == pytest.approx(1.0, abs=0.03)
    sampling = manifest["sampling_flops"]
    assert 0 < sampling["routed_flops_per_image"] < sampling["single_flops_per_image"]
    rounds = store.read_json("tdc", "rounds.json")
    # the full-budget group 0 keeps the base model: no search
    assert groups[0]["rounds"] == 0 and groups[0]["search_flops"] == 0
    assert len(rounds) == 2 and {r["group"] for r in rounds} == {1}
    assert all({"round", "proposer", "ratios", "flops", "score"} <= set(r) for r in rounds)
    (bank,) = store.list("_tdc_proxy")  # only the searched group has a memory bank
    assert bank.startswith("g1-") and bank.endswith(".db")
    searched = groups[1]
    assert searched["taylor_pairs"] == 16 * 4 and searched["rounds_reused"] == 0
    assert searched["search_images"] == {"taylor": 16, "finetune": 32, "heldout": 16}


def test_rerun_continues_the_memory_bank(tdc_run, tmp_path) -> None:
    """A rerun reuses the bank's rounds (more rounds continue it); resume_search=false and a
    new base model start afresh. The search FLOPs count every round the decision used."""
    import shutil

    from dedt_ray.tdc.budget import search_flops

    cfg, store, manifest = tdc_run
    first = store.read_json("tdc", "rounds.json")
    shutil.copytree(store.root, tmp_path / "run", ignore=shutil.ignore_patterns("tdc", "_ray"))
    copy = RunStore(str(tmp_path / "run"))
    banks = copy.list("_tdc_proxy")
    more = run_stage("tdc", load_config(None, [*TINY, "tdc.rounds=3"]), copy)["groups"][1]
    rounds = copy.read_json("tdc", "rounds.json")
    assert (more["rounds"], more["rounds_reused"]) == (3, 2)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [(r["ratios"], r["score"]) for r in rounds[:2]] == [
        (r["ratios"], r["score"]) for r in first
    ]
    assert copy.list("_tdc_proxy") == banks
    images = more["search_images"]
    assert more["search_flops"] == search_flops(
        manifest["base_flops_per_image"], more["taylor_pairs"], [r["flops"] for r in rounds],
        cfg.tdc.score_steps, min(16, images["finetune"]), images["heldout"],
    )  # fmt: skip
    fresh = run_stage("tdc", load_config(None, [*TINY, "tdc.resume_search=false"]), copy)
    assert fresh["groups"][1]["rounds_reused"] == 0
    assert [r["round"] for r in copy.read_json("tdc", "rounds.json")] == [0, 1]
    run_stage("train", cfg, copy, force=True)  # a new base model: a new bank
    assert run_stage("tdc", cfg, copy)["groups"][1]["rounds_reused"] == 0
    assert len(copy.list("_tdc_proxy")) == 2


def test_sample_cli_accepts_routed(tdc_run, tmp_path) -> None:
    from dedt_ray.cli import main

    _, store, _ = tdc_run
    out = tmp_path / "samples"
    code = main(
        ["sample", "--model", store.path(*ROUTED), "--num", "2", "--steps", "2",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0 and (out / "samples.npz").is_file()


def test_stage2_parallelism_follows_config_and_resources(ray_cluster) -> None:
    from dedt_ray.tdc.stage import stage2_parallelism

    assert stage2_parallelism(load_config(None, TINY), 2) == 1  # in-process trainer
    workers = TINY + ["train.num_workers=1", "train.cpus_per_worker=0.5"]
    # 2 CPUs, one kept for Ray Data: two half-CPU runs fit, never more than the groups
    assert stage2_parallelism(load_config(None, workers), 3) == 2
    assert stage2_parallelism(load_config(None, workers), 1) == 1
    assert stage2_parallelism(load_config(None, [*workers, "tdc.parallel_groups=1"]), 2) == 1


@pytest.mark.slow
def test_stage2_groups_train_concurrently(tdc_run, tmp_path) -> None:
    import shutil

    from dedt_ray.tdc import stage

    _, store, _ = tdc_run
    shutil.copytree(store.root, tmp_path / "run", ignore=shutil.ignore_patterns("tdc", "_ray"))
    copy = RunStore(str(tmp_path / "run"))
    overrides = ["train.num_workers=1", "train.cpus_per_worker=0.5", "tdc.rounds=1"]
    cfg = load_config(None, TINY + overrides)
    manifest = stage.run(cfg, copy, StageContext(stage_key(STAGES["tdc"], cfg, copy)["inputs"]))
    assert manifest["stage2_parallel"] == 2
    groups = manifest["groups"]
    assert [g["stage2_steps"] for g in groups] == [3, 3]
    starts = [g["stage2_started"] for g in groups]
    ends = [g["stage2_started"] + g["stage2_seconds"] for g in groups]
    assert max(starts) < min(ends)  # the two Ray Train runs overlapped in time
    unet, _, _, _ = load_export(copy.path(*ROUTED))
    assert isinstance(unet, RoutedUNet) and len(unet.models) == 2
