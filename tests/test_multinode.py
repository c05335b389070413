"""Ray nodes on one machine (`ray.cluster_utils.Cluster`, a head without CPUs): embedding runs
on two nodes and a 2-worker training run puts one worker on each node; then, on the same
cluster, a node lost during embedding (benchmarks/faults.py's node scenario) costs no row.

The cluster runs in a subprocess (this file as a script), away from the session fixture's
single-node cluster; the subprocess prints one JSON line of what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    "data.image_size=8",
    "data.limit=64",
    "model.block_out_channels=[8,16]",
    "model.norm_num_groups=4",
    "model.attention_head_dim=4",
    "model.mid_attention=false",
    "model.attention_levels=[false,false]",
    "train.steps=2",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.threads_per_worker=1",
    "train.num_workers=2",
    "train.cpus_per_worker=1",  # a whole node each: the two workers cannot share a node
]


def actor_nodes(class_part: str) -> list[str]:
    """Node ids of every actor (alive or dead) whose class name contains `class_part`."""
    from ray._private import state

    return [
        a["Address"]["NodeID"] for a in state.actors().values() if class_part in a["ActorClassName"]
    ]


def spread(run_dir: str, nodes: list[str]) -> dict:
    """Embed digits (an encoder actor pool of up to 2) and train 2 workers on the two 1-CPU
    `nodes`; returns the embedded ids' counts and where the actors ran."""
    from dedt_ray.config import load_config
    from dedt_ray.data import open_source
    from dedt_ray.embed import embed_dataset
    from dedt_ray.pipeline import run_stage
    from dedt_ray.store import RunStore

    cfg = load_config(
        None,
        [
            "data.image_size=8",
            "data.limit=512",
            "embed.encoder=random_projection",
            "embed.dim=16",
            "embed.batch_size=16",
            "embed.actors=2",
        ],
    )
    source = open_source(cfg.data)
    blocks = source.dataset.repartition(16)  # enough queued blocks to grow the pool to 2
    ds = embed_dataset(blocks, cfg.embed, 1, 8).materialize()
    ids = [r["id"] for r in ds.select_columns(["id"]).iter_rows()]
    embed = {"rows": len(ids), "unique": len(set(ids))}

    manifest = run_stage("train", load_config(None, TRAIN), RunStore(run_dir))
    return {
        "nodes": sorted(nodes),
        "embed": embed,
        "encoder_actor_nodes": actor_nodes("_Encode"),
        "train": {"steps": manifest["steps"], "shard_rows": manifest["shard_rows"]},
        "train_worker_nodes": actor_nodes("RayTrainWorker"),
    }


def scenario(workdir: str) -> dict:
    """`spread` on two 1-CPU nodes; those nodes removed, then `faults.node_loss` on the same
    cluster (it adds the node it loses)."""
    import ray

    sys.path.insert(0, str(ROOT))
    from benchmarks.faults import FAST_NODE_DEATH, local_cluster, node_loss

    cluster = local_cluster(head_cpus=0, **FAST_NODE_DEATH)
    try:
        added = [cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20) for _ in "ab"]
        cluster.wait_for_nodes()
        seen = spread(os.path.join(workdir, "spread"), [n.node_id for n in added])
        for node in added:
            cluster.remove_node(node)
        return {**seen, "node_loss": node_loss(os.path.join(workdir, "node"), cluster)}
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_two_nodes_share_the_work_and_a_lost_node_costs_no_row(tmp_path):
    out = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(seen["nodes"]) == 2
    embed = seen["embed"]
    assert embed["rows"] == embed["unique"] == 512
    assert sorted(set(seen["encoder_actor_nodes"])) == seen["nodes"]  # an encoder on each
    assert seen["train"]["steps"] == 2 and len(seen["train"]["shard_rows"]) == 2
    assert sorted(seen["train_worker_nodes"]) == seen["nodes"]  # one worker per node

    lost = seen["node_loss"]  # the embed stage's node removed mid-stage, then replaced
    assert lost["survived"], lost
    assert lost["removed_during_embedding"] and lost["encoders_on_removed_node"] >= 1, lost
    assert lost["rows_written"] == lost["rows_expected"] == 600
    assert lost["rows_lost"] == 0 and lost["rows_duplicated"] == 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    print(json.dumps(scenario(sys.argv[1])))
