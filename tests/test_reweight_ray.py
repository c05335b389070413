"""Reweighting on Ray: DDP equivalence, the reference/reweight stages, the DAG, resume, and the
direction of the weights on digits with a degraded class."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dedt_ray.artifacts import CLASSES, read_class_weights
from dedt_ray.config import ConfigError, ModelConfig, load_config
from dedt_ray.diffusion.export import load_export
from dedt_ray.diffusion.models import ModelSpec, build_noise_scheduler, build_unet
from dedt_ray.pipeline import STAGES, run_stage, stage_key
from dedt_ray.reweight.dro import DROLoss
from dedt_ray.reweight.stage import class_names
from dedt_ray.smoke import SMOKE_UNET
from dedt_ray.store import RunStore

from runs import ROWS, TRAINED, UPSTREAM, copy_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.degraded_class import MODEL, digits_run  # noqa: E402

SMALL = TRAINED  # the session's `trained` run: reference.steps=6, reweight.steps=8, ...


# -- 1 vs 2 DDP workers on the same global batches -----------------------------------------
K, GLOBAL, STEPS = 4, 12, 4
TINY = ModelConfig(**SMOKE_UNET)


def _dro_steps(rank: int, world: int, distributed: bool) -> dict:
    """STEPS proxy updates on fixed global batches, this rank taking its contiguous share."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    proxy = build_unet(TINY, ModelSpec(8, 1, K))
    torch.manual_seed(1)
    reference = build_unet(TINY, ModelSpec(8, 1, K))
    sched = build_noise_scheduler(TINY)
    model = DistributedDataParallel(proxy) if distributed else proxy
    opt = torch.optim.Adam(proxy.parameters(), lr=1e-2)
    dro = DROLoss(reference, K, eta=3.0, smoothing=1e-3, world=world, distributed=distributed)
    naive = DROLoss(reference, K, eta=3.0, smoothing=1e-3)  # no all-reduce: the control
    share = slice(rank * GLOBAL // world, (rank + 1) * GLOBAL // world)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x0 = torch.rand(GLOBAL, 1, 8, 8, generator=g) * 2 - 1
        labels = torch.randint(0, K, (GLOBAL,), generator=g)
        labels[: GLOBAL // 2] = step % K  # skewed: each rank sees different class mixes
        t = torch.randint(0, 1000, (GLOBAL,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        args = (x0[share], labels[share], t[share], noise[share])
        opt.zero_grad()
        dro.loss(model, sched, *args).backward()
        opt.step()
        dro.after_step(step + 1)
        with torch.no_grad():
            naive.loss(proxy, sched, *args)
        naive.after_step(step + 1)
    return {
        "weights": dro.dro.weights.tolist(),
        "average": dro.dro.average.tolist(),
        "excess": dro.dro.excess.tolist(),
        "naive": naive.dro.weights.tolist(),
        "param": float(sum(p.detach().double().sum() for p in proxy.parameters())),
    }


def _ddp_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = _dro_steps(rank, world, dist.is_initialized())
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(out, f)


def test_one_and_two_ddp_workers_give_the_same_weights(ray_cluster, tmp_path):
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    TorchTrainer(
        _ddp_worker,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(name="ddp-dro", storage_path=str(tmp_path / "ray")),
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = _dro_steps(0, 1, False)
    assert not np.allclose(single["weights"], np.full(K, 1 / K), atol=1e-3)
    for name in ("weights", "average", "excess"):
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name])  # identical on every rank
        np.testing.assert_allclose(ranks[0][name], single[name], rtol=2e-5, atol=1e-7)
    assert ranks[0]["param"] == pytest.approx(single["param"], rel=1e-5)  # same proxy too
    # without the all-reduce each rank would follow its own share of the batch
    assert not np.allclose(ranks[0]["naive"], ranks[1]["naive"], rtol=1e-3)


# -- the stages ----------------------------------------------------------------------------
STAGED = ("embed", "select", "reference", "reweight", "train")


@pytest.fixture(scope="module")
def staged(trained, tmp_path_factory):
    """The session's real embed -> select -> reference -> reweight -> train run (in-process,
    on the kept digits), copied: tests here rerun its stages."""
    store = copy_run(trained, tmp_path_factory.mktemp("rw") / "run", *STAGED)
    out = {name: store.manifest(name) for name in STAGED}
    return load_config(None, SMALL), store, out["select"]["kept"], out


def test_reference_stage_trains_and_exports(staged):
    _, store, kept, out = staged
    ref = out["reference"]
    assert ref["source"] == "trained" and ref["data"] == "subset" and ref["rows"] == kept
    assert ref["steps"] == 6 and ref["flops"] == 6 * ref["flops_per_step"] > 0
    assert ref["inputs"] == {"select": out["select"]["output_id"]}
    unet, _, _, info = load_export(store.path("reference", "model"))
    assert unet.config.num_class_embeds == 11 and info["steps"] == 6


def test_default_reference_is_small_and_learns_the_full_data(staged, tmp_path):
    """DoReMi's reference: the full data, uniform weights, the small shared architecture, as
    many steps as the budget buys (reference + proxy <= reweight.budget of the final FLOPs)."""
    _, done, _, _ = staged
    store = copy_run(done, tmp_path / "run", "embed", "select")
    cfg = load_config(None, [*UPSTREAM, *MODEL, "train.steps=40", "train.batch_size=10"])
    ref = run_stage("reference", cfg, store)
    assert ref["data"] == "full" and ref["rows"] == ROWS
    assert set(ref["inputs"]) == {"select"}  # only lends its groups (to unlabelled data)
    plan = ref["dro_plan"]
    assert ref["steps"] == plan["reference_steps"] == plan["proxy_steps"] > 1
    assert plan["planned_fraction"] <= cfg.reweight.budget
    unet, _, _, _ = load_export(store.path("reference", "model"))
    assert list(unet.config.block_out_channels) == [8, 16]  # half of model.* (16, 32)
    assert ref["model_config"]["block_out_channels"] == [8, 16]


def test_reweight_stage_artifacts(staged):
    cfg, store, kept, out = staged
    rw = out["reweight"]
    assert rw["rows"] == kept and rw["steps"] == 8 and rw["num_updates"] == 8
    assert rw["inputs"] == {
        "select": out["select"]["output_id"],
        "reference": out["reference"]["output_id"],
    }
    obj = store.read_json("reweight", "class_weights.json")
    weights = read_class_weights(obj, 10)  # the format the trainer reads
    np.testing.assert_allclose(weights, rw["class_weights"])
    assert obj["names"]["3"] == "3" and rw["class_names"][3] == "3"  # the dataset's names
    names = RunStore(str(store.root + "-names"))
    names.write_json({"classes": [f"digit {i}" for i in range(10)]}, *CLASSES)
    assert class_names(names, None, 10)[3] == "digit 3"  # else embed/classes.json
    assert class_names(names, None, 4) == ["0", "1", "2", "3"]  # else the labels
    assert not np.allclose(weights, 0.1, atol=1e-4)  # they moved
    trace = pq.read_table(store.path("reweight", "trace.parquet"))
    assert {"step", "class", "weight", "excess"} <= set(trace.column_names)
    assert trace.num_rows == 8 * 10
    rows = trace.to_pandas()
    per_step = rows.groupby("step")["weight"].sum()
    assert per_step.index.tolist() == list(range(1, 9))
    np.testing.assert_allclose(per_step.values, 1.0)
    last = rows[rows.step == 8].sort_values("class")
    np.testing.assert_allclose(last["average"] / last["average"].sum(), weights, rtol=1e-9)
    np.testing.assert_allclose(last["weight"], list(obj["final_weights"].values()), rtol=1e-9)
    for name in ("weights_over_steps.png", "class_weights.png"):
        assert store.read_bytes("reweight", name)[:8] == b"\x89PNG\r\n\x1a\n"
    # compute: reference training + proxy fwd/bwd + reference forward (~1/3 of fwd/bwd)
    flops = rw["flops"]
    assert flops["reference_training"] == out["reference"]["flops"]
    assert 0.25 < flops["reference_forward"] / flops["proxy_training"] < 0.45
    assert rw["search_flops"] == sum(flops.values())
    # the estimate is the final model's (not the small proxy's) FLOPs for train.steps
    assert rw["train_flops_estimate"] == pytest.approx(out["train"]["flops"])
    assert rw["flops_fraction"] == pytest.approx(rw["search_flops"] / out["train"]["flops"])
    assert flops["proxy_training"] / 8 < 0.5 * out["train"]["flops_per_step"]  # a small proxy
    assert rw["dro_plan"]["proxy_steps"] == 8  # reweight.steps wins over the budget
    # classes in each step's global batch of 10 (sampled with replacement): the trace's mean
    assert (
        rw["class_coverage"] == pytest.approx(rows["present"].mean())
        and 0.3 < rows["present"].mean() < 1
    )
    assert rw["initial_excess"] == pytest.approx(1.0)  # epsilon: the zero predictor's loss


def test_train_uses_the_weights_and_reruns_when_they_change(staged):
    cfg, store, _, out = staged
    train = out["train"]
    assert train["inputs"]["reweight"] == out["reweight"]["output_id"]
    np.testing.assert_allclose(train["class_weights"], out["reweight"]["class_weights"])
    assert train["flops"] == pytest.approx(out["reweight"]["train_flops_estimate"])
    assert train["reweight_flops_fraction"] == pytest.approx(out["reweight"]["flops_fraction"])
    assert run_stage("train", cfg, store).get("skipped_stage")  # nothing changed
    again = run_stage("reweight", cfg, store, force=True)
    assert again["output_id"] != out["reweight"]["output_id"]
    retrained = run_stage("train", cfg, store)
    assert not retrained.get("skipped_stage")
    assert retrained["inputs"]["reweight"] == again["output_id"]
    # reweighting disabled: the train stage neither reads nor keys on the weights
    off = load_config(None, [*SMALL, "reweight.enabled=false"])
    assert "reweight" not in stage_key(STAGES["train"], off, store)["inputs"]
    names = list(STAGES)
    assert names.index("select") < names.index("reference") < names.index("reweight")
    assert names.index("reweight") < names.index("train")


def test_reweight_resumes_with_the_same_weights(staged, tmp_path):
    _, done, _, out = staged
    flag = tmp_path / "fail.flag"
    flag.write_text("x")
    store = copy_run(done, tmp_path / "run", "embed", "select", "reference")  # same reference
    # in-process, as the session run: the crash ends the stage; the rerun resumes from the
    # checkpoint before it (Ray Train's worker-group restart: test_train_ray's DDP test)
    crashing = load_config(None, [*SMALL, "train.fail_at_step=5", f"train.fail_flag={flag}"])
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        run_stage("reweight", crashing, store)
    manifest = run_stage("reweight", crashing, store)
    assert not flag.exists() and manifest["resumed_at"] == [3]
    trace = pq.read_table(store.path("reweight", "trace.parquet")).to_pandas()
    assert sorted(set(trace.step)) == list(range(1, 9)) and len(trace) == 80
    # same reference and batches: the weights match the uninterrupted in-process run
    np.testing.assert_allclose(
        manifest["class_weights"], out["reweight"]["class_weights"], rtol=1e-4
    )


def test_pretrained_reference(staged, tmp_path):
    cfg, store, _, _ = staged
    other = RunStore(str(tmp_path / "run"))
    folder = store.path("reference", "model")
    ref = run_stage(
        "reference", load_config(None, [*SMALL, f"reference.pretrained={folder}"]), other
    )
    assert ref["source"] == "pretrained" and ref["flops"] == 0 and ref["num_class_embeds"] == 11
    unet, sched, _, info = load_export(other.path("reference", "model"))
    assert unet.config.sample_size == 8 and info["source"] == "pretrained"
    wrong = tmp_path / "wrong"
    torch.manual_seed(0)
    build_unet(
        ModelConfig(**{**cfg.model.model_dump(), "norm_num_groups": 8}), ModelSpec(16, 1, 10)
    ).save_pretrained(str(wrong))
    with pytest.raises(ConfigError, match="sample_size"):
        run_stage("reference", load_config(None, [*SMALL, f"reference.pretrained={wrong}"]), other)
    # an unconditional reference for a class-conditional proxy: refused before any training
    uncond = tmp_path / "uncond"
    build_unet(cfg.model, ModelSpec(8, 1, 0)).save_pretrained(str(uncond))
    with pytest.raises(ConfigError, match="None class embeddings.*10 classes"):
        run_stage("reference", load_config(None, [*SMALL, f"reference.pretrained={uncond}"]), other)


# -- which way do the weights move? ----------------------------------------------------------
DEGRADED = 0


def test_degraded_class_is_downweighted(ray_cluster, tmp_path):
    """Noise images raise the reference's loss as much as the proxy's: the class's excess
    loss (what is still learnable) shrinks, so DRO moves weight away from it. The rule: the
    degraded class loses weight against its clean control and ends the lowest, below uniform
    (benchmarks/degraded_class.py measures it over classes and seeds; docs/reweight.md)."""
    steps = ("reference.steps=60", "reweight.steps=60")
    clean_w, clean_excess, _ = digits_run(tmp_path / "clean", None, 0, steps)
    w, excess, _ = digits_run(tmp_path / "degraded", DEGRADED, 0, steps)
    assert w[DEGRADED] < clean_w[DEGRADED]
    assert w[DEGRADED] == w.min() < 0.25  # uniform: 0.25
    assert excess[DEGRADED] < clean_excess[DEGRADED]


def test_unlabelled_data_reweight_over_clusters(ray_cluster, tmp_path):
    """No labels: the select stage's clusters are the groups of Group DRO and of the final
    model's sampling; every model stays unconditional."""
    from sklearn.datasets import load_digits

    from dedt_ray.pipeline import run_pipeline

    digits = load_digits()
    images = np.round(digits.images[:160] * 255 / 16).astype(np.uint8)
    pq.write_table(
        pa.table(
            {"id": [f"u{i:04d}" for i in range(160)], "image": [im.tolist() for im in images]}
        ),
        str(tmp_path / "data.parquet"),
    )
    cfg = load_config(None, [
        *MODEL, "data.source=parquet", f"data.path={tmp_path / 'data.parquet'}",
        "data.label_column=null", "model.class_conditional=false", "select.groups=clusters",
        "select.clusters=4", "train.steps=4", "train.batch_size=16", "reference.steps=4",
        "reweight.steps=4", "train.log_every=2", "train.checkpoint_every=4",
    ])  # fmt: skip
    store = RunStore(str(tmp_path / "run"))
    done = run_pipeline(cfg, store, only=["embed", "select", "reference", "reweight", "train"])
    groups = pq.read_table(store.path("select", "scores.parquet")).column("group").to_numpy()
    k = len(np.unique(groups))
    assert k >= 2 and done["reweight"]["classes"] == k and "skipped" not in done["reweight"]
    assert len(done["train"]["class_weights"]) == k  # group weights as sampling probabilities
    assert (
        done["train"]["spec"]["num_classes"] == 0 and done["reference"]["spec"]["num_classes"] == 0
    )
