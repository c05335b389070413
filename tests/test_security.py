"""Security defaults: the local cluster the tool starts listens on loopback only, and no
checkpoint or artifact load unpickles data."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os, psutil, ray
from dedt_ray.runtime import init_ray
init_ray(num_cpus=1, progress=False)
ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
listening = sorted({c.laddr.ip for c in psutil.net_connections("tcp")
                    if c.status == "LISTEN" and c.pid in ours})
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                  "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                  "listening": listening}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_cluster_binds_to_loopback():
    tmp = tempfile.mkdtemp(prefix="dr", dir="/tmp")  # short: Ray's unix socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tmp  # no cluster `ray start`ed by someone else is found
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["gcs"].startswith("127.0.0.1:") and seen["nodes"] == ["127.0.0.1"]
    assert seen["listening"], "no listening socket found"
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in seen["listening"])


def _loads(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else None
            yield name, node.func.attr, {k.arg: k.value for k in node.keywords}


def test_no_load_unpickles():
    """torch.load only with weights_only=True; no pickle/joblib/dill loads; no
    np.load(allow_pickle=True). (The CIFAR reader's restricted unpickler is the one
    exception: it refuses every global but numpy arrays.)"""
    problems = []
    for path in sorted((ROOT / "dedt_ray").rglob("*.py")):
        for owner, attr, kw in _loads(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}: {owner}.{attr}"
            if owner == "torch" and attr == "load":
                safe = kw.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    problems.append(where + " without weights_only=True")
            if owner in ("pickle", "cloudpickle", "joblib", "dill") and attr in ("load", "loads"):
                problems.append(where)
            if owner in ("np", "numpy") and attr == "load" and "allow_pickle" in kw:
                problems.append(where + " with allow_pickle")
    assert not problems, problems
