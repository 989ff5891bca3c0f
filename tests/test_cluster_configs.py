"""cluster/: the Ray cluster launcher files against the schema inside the installed ray package, the KubeRay manifests
against the project's own schema of the KubeRay fields they use (tests/schemas/kuberay.yaml) and, when they are at
hand, against the full KubeRay CRDs too (RAYDIFF_KUBERAY_CRDS, else ../shared/kuberay/ beside the repository), and
what no schema can see (GPUs, autoscaling, entrypoints)."""

import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from raydiff import config as C

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
KUBERAY_SCHEMA = REPO / "tests" / "schemas" / "kuberay.yaml"  # ours: always checked
KUBERAY_CRDS_ENV = "RAYDIFF_KUBERAY_CRDS"  # a directory holding ray.io_rayclusters.yaml and ray.io_rayjobs.yaml
SHARED_KUBERAY_CRDS = REPO.parent / "shared" / "kuberay"  # CI clones the repo with shared/ beside it
LAUNCHER_FILES = sorted(CLUSTER.glob("*.yaml"))
LAUNCHER_FILES = [p for p in LAUNCHER_FILES if p.name != "runtime_env.yaml"]
PROJECT_IMAGE = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- cluster launcher


def test_launcher_files_exist():
    assert {p.name for p in LAUNCHER_FILES} == {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_matches_ray_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(path)
    # What `ray up` does first: fill the provider's defaults, then check against ray/autoscaler/ray-schema.json.
    validate_config(prepare_config(cfg))
    cfg["available_node_types"][cfg["head_node_type"]]["min_worker"] = 0  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_autoscales_gpus_on_the_project_image(path):
    cfg = load(path)
    head, workers = cfg["head_node_type"], dict(cfg["available_node_types"])
    assert workers.pop(head)["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpus = sorted(t["resources"]["GPU"] for t in workers.values())
    assert gpus[0] == 1 and gpus[-1] == 8, "a small and an 8-GPU worker type"
    assert all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers.values())
    spot = [t for t in workers.values() if "spot" in yaml.safe_dump(t["node_config"]).lower()]
    assert len(spot) >= 2, "spot / preemptible GPU workers"
    assert cfg["docker"]["image"] == PROJECT_IMAGE
    assert any("pip install" in c and "/home/ray/raydiff" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["/home/ray/raydiff"] == "."
    bucket = {"aws": "s3://", "gcp": "gs://"}[cfg["provider"]["type"]]
    assert f"--env RAYDIFF_STORAGE_PATH={bucket}" in " ".join(cfg["docker"]["run_options"])


def test_storage_path_from_the_cluster_environment(monkeypatch):
    """The launcher and KubeRay files name the bucket once, in RAYDIFF_STORAGE_PATH; jobs refer to it."""
    monkeypatch.setenv("RAYDIFF_STORAGE_PATH", "s3://bucket/raydiff")
    cfg = C.load_config("tiny_cpu", ["run.storage_path=$RAYDIFF_STORAGE_PATH"])
    assert C.run_dir(cfg) == "s3://bucket/raydiff/raydiff-tiny"
    monkeypatch.delenv("RAYDIFF_STORAGE_PATH")
    with pytest.raises(C.ConfigError, match="run.storage_path"):
        C.load_config("tiny_cpu", ["run.storage_path=$RAYDIFF_STORAGE_PATH"])


def test_runtime_env_excludes_local_state():
    env = load(CLUSTER / "runtime_env.yaml")
    assert {".git", ".venv", "runs"} <= set(env["excludes"])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray accepts it as a runtime environment


# ---------------------------------------------------------------- KubeRay


KUBERAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def kuberay_crds_dir() -> Path | None:
    """Where the full KubeRay CRDs are, if anywhere: $RAYDIFF_KUBERAY_CRDS when it names a directory, else
    ../shared/kuberay/ when it exists. A bare clone has neither, and is checked against our schema alone."""
    named = os.environ.get(KUBERAY_CRDS_ENV)
    if named and Path(named).is_dir():
        return Path(named)
    return SHARED_KUBERAY_CRDS if SHARED_KUBERAY_CRDS.is_dir() else None


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, list[tuple[str, jsonschema.Draft7Validator]]]:
    """Per kind, the (label, validator) pairs every manifest must pass: our own schema always, the full CRD too when
    kuberay_crds_dir() finds one."""
    ours = load(KUBERAY_SCHEMA)
    jsonschema.Draft7Validator.check_schema(ours)
    validators = {
        kind: [("tests/schemas/kuberay.yaml", jsonschema.Draft7Validator({**ours, "$ref": f"#/definitions/{kind}"}))]
        for kind in KUBERAY_KINDS
    }
    crds = kuberay_crds_dir()
    if crds is not None:
        for kind, file in KUBERAY_KINDS.items():
            crd = load(crds / file)
            (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            validators[kind].append((str(crds / file), jsonschema.Draft7Validator(v1["schema"]["openAPIV3Schema"])))
    return validators


def schema_errors(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc))


def kuberay_docs() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted((CLUSTER / "kuberay").glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text())]


def kuberay(kind: str) -> list[dict]:
    return [doc for _, doc in kuberay_docs() if doc["kind"] == kind]


@pytest.mark.parametrize("name,doc", kuberay_docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_kuberay_manifest_matches_crd(crd_validators, name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    errors = [f"{label}: {e}" for label, v in crd_validators[doc["kind"]] for e in schema_errors(v, doc)]
    assert not errors, "\n".join(errors)


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_raycluster_autoscales_gpu_workers():
    (cluster,) = kuberay("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_counts = []
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        (worker,) = containers(group)
        res = worker["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
        gpu_counts.append(int(res["limits"]["nvidia.com/gpu"]))
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"]["tolerations"]
        assert {"name": "RAYDIFF_STORAGE_PATH", "value": "s3://YOUR-BUCKET/raydiff"} in worker["env"]
    assert sorted(gpu_counts) == [1, 8]


def test_kuberay_image_is_built_from_the_project_image():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(PROJECT_IMAGE)}$", dockerfile, re.M)
    assert 'pip install --no-cache-dir -e "/home/ray/raydiff[mlflow]"' in dockerfile
    (cluster,) = kuberay("RayCluster")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    assert {c["image"] for g in groups for c in containers(g)} == {"YOUR-REGISTRY/raydiff:0.1.0"}


def entrypoint(job: dict) -> tuple[str, list[str]]:
    """`python -m MODULE ARGS...` as the job's shell would split it."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], argv
    return argv[2], argv[3:]


def jobs_by_module() -> dict[str, dict]:
    return {entrypoint(job)[0]: job for job in kuberay("RayJob")}


def test_rayjobs_target_the_raycluster_and_name_shipped_configs(monkeypatch):
    (cluster,) = kuberay("RayCluster")
    jobs = jobs_by_module()
    assert set(jobs) == {"raydiff.train", "raydiff.tune"}
    monkeypatch.setenv("RAYDIFF_STORAGE_PATH", "s3://bucket/raydiff")  # as the pods set it
    for module, job in jobs.items():
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert "run.storage_path=$RAYDIFF_STORAGE_PATH" in entrypoint(job)[1]
        yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    from raydiff.train.driver import parse_args

    args = parse_args(entrypoint(jobs["raydiff.train"])[1], "train", "")
    cfg = C.load_config(args.config, args.overrides)  # the config exists and validates with the job's overrides
    assert cfg.scaling.use_gpu and C.run_dir(cfg).startswith("s3://bucket/raydiff/")


def test_train_rayjob_module_exists():
    assert importlib.util.find_spec(entrypoint(jobs_by_module()["raydiff.train"])[0]) is not None


def test_tune_rayjob_module_and_config_exist():
    module, args = entrypoint(jobs_by_module()["raydiff.tune"])
    assert importlib.util.find_spec(module) is not None
    assert C.resolve_config_path(args[args.index("--config") + 1]).is_file()


def test_crd_validation_catches_a_broken_manifest(crd_validators):
    import copy

    (cluster,) = kuberay("RayCluster")
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    del broken["spec"]["workerGroupSpecs"][1]["groupName"]
    for label, validator in crd_validators["RayCluster"]:
        errors = schema_errors(validator, broken)
        assert len(errors) == 2, (label, errors)
        assert errors[0].startswith("spec.workerGroupSpecs.0.maxReplicas: 'two'"), (label, errors)
        assert errors[1] == "spec.workerGroupSpecs.1: 'groupName' is a required property", (label, errors)


def test_own_kuberay_schema_catches_what_the_crds_let_through(crd_validators):
    """The CRDs let a misspelt key through (the API server drops it) and have no enum for submissionMode; ours refuses
    misspelt keys, wrong types and enum values, and a RayJob with neither a cluster to create nor one to select."""
    import copy

    (label, ours), *_ = crd_validators["RayCluster"]
    assert label == "tests/schemas/kuberay.yaml"
    (cluster,) = kuberay("RayCluster")
    broken = copy.deepcopy(cluster)
    group = broken["spec"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")
    broken["spec"]["autoscalerOptions"]["upscalingMode"] = "Eager"
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert schema_errors(ours, broken) == [
        "spec.autoscalerOptions.upscalingMode: 'Eager' is not one of ['Default', 'Aggressive', 'Conservative']",
        "spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'",
        "spec.workerGroupSpecs.0: 'maxReplicas' is a required property",
        "spec.workerGroupSpecs.0: Additional properties are not allowed ('maxReplica' was unexpected)",
    ]

    (label, ours), *_ = crd_validators["RayJob"]
    job = copy.deepcopy(jobs_by_module()["raydiff.train"])
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    job["spec"]["submissionMode"] = "K8sJob"
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    assert schema_errors(ours, job) == [
        "spec.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'",
        "spec.submissionMode: 'K8sJob' is not one of ['K8sJobMode', 'HTTPMode', 'InteractiveMode', 'SidecarMode']",
        "spec: Additional properties are not allowed ('entryPoint' was unexpected)",
    ]
    del job["spec"]["clusterSelector"]
    assert any("is not valid under any of the given schemas" in e for e in schema_errors(ours, job))


def test_a_recorded_local_cluster_is_joined_only_while_it_answers(monkeypatch):
    """`python -m raydiff.train` on a node of a `ray start` cluster joins it; a record left by a dead cluster (a
    crashed `ray start` or test cluster) must not send ray.init to a dead address."""
    import socket

    from raydiff.train import driver

    listener = socket.create_server(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % listener.getsockname()[1]
    monkeypatch.setattr(driver, "find_bootstrap_address", lambda temp_dir: address)
    assert driver._local_cluster_answers()
    listener.close()
    assert not driver._local_cluster_answers()
    monkeypatch.setattr(driver, "find_bootstrap_address", lambda temp_dir: None)
    assert not driver._local_cluster_answers()
