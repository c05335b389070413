"""The cluster files in clusters/ and docs/cluster.md: offline checks, no cloud, no Ray cluster.

Launcher YAMLs are validated against the installed Ray's own cluster-config schema and through
`prepare_config` + `validate_config` (what `ray up` does before it talks to a cloud); KubeRay
manifests are checked for the fields KubeRay needs; every repository file and config key the
files name must exist.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from dedt_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml"]
RAY_VERSION = ray.__version__
RAY_MINOR = ".".join(RAY_VERSION.split(".")[:2])


def ray_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


# -- Ray cluster launcher ------------------------------------------------------------------
@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_validates_against_ray_schema(name):
    cfg = load(name)
    jsonschema.validate(cfg, ray_schema())
    prepared = prepare_config(copy.deepcopy(cfg))  # merges the provider's defaults.yaml
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", LAUNCHER)
@pytest.mark.parametrize(
    "breakage",
    ["unknown top-level key", "string resource count", "unknown node-type key", "no provider"],
)
def test_schema_rejects_a_broken_copy(name, breakage):
    cfg = load(name)
    worker = next(t for t in cfg["available_node_types"] if t != cfg["head_node_type"])
    if breakage == "unknown top-level key":
        cfg["max_wrokers"] = 4
    elif breakage == "string resource count":
        cfg["available_node_types"][worker]["resources"]["GPU"] = "1"
    elif breakage == "unknown node-type key":
        cfg["available_node_types"][worker]["min_replicas"] = 0
    else:
        del cfg["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_rejects_head_type_that_does_not_exist(name):
    cfg = prepare_config(load(name))
    cfg["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(cfg)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_has_cpu_head_and_autoscaling_gpu_workers(name):
    cfg = load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head should be a CPU node"
    gpu_types = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert len(gpu_types) == 1
    (gpu,) = gpu_types
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= cfg["max_workers"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_installs_the_package_and_pinned_ray_on_every_node(name):
    cfg = load(name)
    assert cfg["file_mounts"]["~/dedt-ray"] == ".", "the repository is synced from `ray up`'s cwd"
    setup = "\n".join(cfg["setup_commands"])
    assert "-e ~/dedt-ray" in setup
    pins = re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", setup)
    assert pins == [RAY_VERSION], f"setup_commands must pin ray=={RAY_VERSION}, found {pins}"
    assert re.search(r"torch==\d", setup)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_starts_every_node_with_token_auth(name):
    cfg = load(name)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert any("--head" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_workers_can_reach_the_bucket(name):
    cfg = load(name)
    worker = next(t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"])
    node = worker["node_config"]
    if cfg["provider"]["type"] == "aws":
        assert "IamInstanceProfile" in node
    else:
        (account,) = node["serviceAccounts"]
        assert "cloud-platform" in account["scopes"][0]


# -- KubeRay -------------------------------------------------------------------------------
def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("name,kind", [(KUBERAY[0], "RayJob"), (KUBERAY[1], "RayCluster")])
def test_kuberay_manifest_fields(name, kind):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token"
    version = str(spec["rayVersion"])
    assert version.startswith(RAY_MINOR + "."), f"rayVersion {version} vs installed {RAY_VERSION}"

    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    images = [head["image"]]
    assert head["image"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        (container,) = group["template"]["spec"]["containers"]
        images.append(container["image"])
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert (
            container["resources"]["requests"]["nvidia.com/gpu"]
            == container["resources"]["limits"]["nvidia.com/gpu"]
        )
    for image in images:
        assert f":{version}-" in image or image.endswith(f":{version}"), image


def test_rayjob_runs_the_pipeline_and_cleans_up():
    spec = load("kuberay-rayjob.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/full_pipeline.py"]
    run_dir = argv[argv.index("--run-dir") + 1]
    assert run_dir.startswith(("s3://", "gs://")), "a multi-node run directory must be shared"
    # The config and every override in the entrypoint are valid for the package as it is now.
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    cfg = load_config(ROOT / config, overrides)
    assert cfg.train.use_gpu is True and cfg.embed.gpus_per_actor
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] and env["pip"]["packages"]


def test_raycluster_autoscales():
    spec = load("kuberay-raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"])


def test_dockerfile_base_image_matches_ray():
    text = (CLUSTERS / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}-"), base


# -- references from the cluster files and docs into the repository --------------------------
CLUSTER_TEXTS = sorted(CLUSTERS.glob("*.yaml")) + [
    CLUSTERS / "Dockerfile",
    ROOT / "docs/cluster.md",
]


def referenced_paths(text: str) -> set[str]:
    return set(
        re.findall(r"(?<![\w/.-])((?:jobs|configs|clusters|docs)/[\w.-]+\.(?:py|yaml|md))", text)
    )


def test_referenced_repository_files_exist():
    seen = set()
    for path in CLUSTER_TEXTS:
        refs = referenced_paths(path.read_text())
        missing = sorted(r for r in refs if not (ROOT / r).is_file())
        assert not missing, f"{path.name} names files that do not exist: {missing}"
        seen |= refs
    assert {"jobs/full_pipeline.py", "configs/cifar10.yaml"} <= seen


def test_reference_check_catches_a_missing_file():
    assert referenced_paths("python jobs/no_such_job.py --config configs/x.yaml") == {
        "jobs/no_such_job.py",
        "configs/x.yaml",
    }
    assert not (ROOT / "jobs/no_such_job.py").exists()


def config_key_exists(dotted: str) -> bool:
    model: type = Config
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        model = fields[part].annotation
    return True


def test_config_key_lookup_can_fail():
    assert config_key_exists("embed.gpus_per_actor")
    assert not config_key_exists("embed.gpus_per_actors")
    assert not config_key_exists("embed.gpus_per_actor.x")


def test_every_config_key_named_in_the_cluster_files_exists():
    table_keys = re.findall(
        r"^\| `([a-z_]+\.[a-z_]+)` \|", (ROOT / "docs/cluster.md").read_text(), re.M
    )
    assert "embed.gpus_per_actor" in table_keys and "train.num_workers" in table_keys
    override_keys = set()
    for path in CLUSTER_TEXTS:
        override_keys |= set(re.findall(r"(?<![\w./-])([a-z_]+\.[a-z_]+)=", path.read_text()))
    unknown = sorted(k for k in set(table_keys) | override_keys if not config_key_exists(k))
    assert not unknown, f"config keys that dedt_ray.config.Config does not have: {unknown}"
