"""cluster/: the Ray cluster launcher files against the schema inside the installed ray package, the KubeRay manifests
against the project's own schema of the KubeRay fields they use (tests/schemas/kuberay.yaml) and, when they are at
hand, against the full KubeRay CRDs too (RAYDIFF_KUBERAY_CRDS, else ../shared/kuberay/ beside the repository), and
what no schema can see: the GPU type pinned to 8 x 80 GB nodes, the recipe configs' workers filling those nodes with
CPUs to spare for Ray Data, disks sized for the model cache, checkpoints and export, the model cache volume, S3
credentials on KubeRay, token authentication, entrypoints."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

# The only GPU machines the cluster files may launch: 8 GPUs of 80 GB (the recipe's ZeRO-2 bf16 AdamW state, ~10 GB
# per GPU, plus 1024 px activations), with the accelerator type Ray detects on them.
GPU_MACHINES = {"p5.48xlarge": "H100", "p4de.24xlarge": "A100", "a3-highgpu-8g": "H100", "a2-ultragpu-8g": "A100"}
# Disk per 8-GPU node in GB (docs/cluster.md, section 4): the hub cache of SDXL base + fp16-fix VAE; a ZeRO-2
# checkpoint of the UNet, three of them at once (one uploading, one being written, one downloaded on resume); the
# export (fp16 variant 7 + fp32 14); Ray's logs and object spilling; the container image with torch and CUDA.
MODEL_CACHE_GB, CHECKPOINT_GB, CHECKPOINTS_ON_DISK, EXPORT_GB, RAY_SCRATCH_GB, IMAGE_GB = 20, 36, 3, 21, 100, 30
SCRATCH_GB = CHECKPOINTS_ON_DISK * CHECKPOINT_GB + EXPORT_GB + RAY_SCRATCH_GB
NODE_DISK_GB = IMAGE_GB + MODEL_CACHE_GB + SCRATCH_GB
# CPUs a node must keep beyond the training workers' for Ray Data (decode, crop, tokenize: ~0.1 CPU-s per 1024 px
# image, ~7 images/s per H100), per GPU.
SPARE_CPUS_PER_GPU = 2
CPU_ADAM_BUILD = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
TOKEN_FILE = "~/.ray/auth_token"  # where Ray's clients and `ray start` look for the token (docs/cluster.md)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def recipe_scaling() -> dict[str, dict]:
    """`scaling` of every GPU config in configs/ (the recipe, its ZeRO-3 variant, the Tune sweep's trials)."""
    found = {p.stem: load(p).get("scaling", {}) for p in sorted(C.CONFIG_DIR.glob("*.yaml"))}
    gpu = {name: s for name, s in found.items() if s.get("use_gpu")}
    assert {"sdxl_pokemon_blip_ip", "sdxl_pokemon_blip_ip_zero3", "tune_gamma_lr"} <= set(gpu), sorted(gpu)
    return gpu


def check_fits_recipe(where: str, node_cpus: float, node_gpus: int, max_nodes: int) -> None:
    """Each GPU config's workers fill whole nodes of this type, fit in max_nodes of them, and leave every node
    SPARE_CPUS_PER_GPU CPUs per GPU for Ray Data."""
    for name, s in recipe_scaling().items():
        gpus = s["num_workers"] * s["gpus_per_worker"]
        assert gpus % node_gpus == 0, f"{where}: configs/{name}.yaml's {gpus} GPUs are not whole {node_gpus}-GPU nodes"
        assert gpus // node_gpus <= max_nodes, f"{where}: configs/{name}.yaml needs {gpus // node_gpus} nodes"
        training_cpus = node_gpus / s["gpus_per_worker"] * s["cpus_per_worker"]
        spare = node_cpus - training_cpus
        assert spare >= SPARE_CPUS_PER_GPU * node_gpus, (
            f"{where}: {node_cpus} CPUs - {training_cpus} for configs/{name}.yaml's workers: {spare} for Ray Data")


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


def gpu_node_types(cfg: dict) -> dict[str, dict]:
    return {name: t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


def machine_type(node_type: dict) -> str:
    node_config = node_type["node_config"]
    return node_config.get("InstanceType") or node_config["machineType"]


def docker_env(cfg: dict) -> dict[str, str]:
    opts = [o.split(None, 1) for o in cfg["docker"]["run_options"]]
    return dict(value.split("=", 1) for flag, value in opts if flag == "--env")


def docker_volumes(cfg: dict) -> dict[str, str]:
    """{container path: host path} of the -v options."""
    opts = [o.split(None, 1) for o in cfg["docker"]["run_options"]]
    return {value.split(":")[1]: value.split(":")[0] for flag, value in opts if flag == "-v"}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_autoscales_gpus_on_the_project_image(path):
    cfg = load(path)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}, "the head takes no training, preprocessing or GPU work"
    assert all(t["min_workers"] == 0 for t in gpu_node_types(cfg).values())
    assert cfg["docker"]["image"] == PROJECT_IMAGE
    assert any("pip install" in c and "/home/ray/raydiff" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["/home/ray/raydiff"] == "."
    bucket = {"aws": "s3://", "gcp": "gs://"}[cfg["provider"]["type"]]
    assert docker_env(cfg)["RAYDIFF_STORAGE_PATH"].startswith(bucket)


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_pins_one_80gb_gpu_type(path):
    """Only 8 x 80 GB machine types, each declaring the accelerator type Ray detects on it, and one of them at a
    time launchable: a run's workers never land on two GPU types."""
    cfg = load(path)
    types = gpu_node_types(cfg)
    for name, t in types.items():
        machine = machine_type(t)
        assert machine in GPU_MACHINES, f"{path.name}: {name} is {machine}, not one of {sorted(GPU_MACHINES)}"
        accel = GPU_MACHINES[machine]
        assert t["resources"]["GPU"] == 8 and t["resources"][f"accelerator_type:{accel}"] == 1, (path.name, name)
        assert t["labels"] == {"ray.io/accelerator-type": accel}, (path.name, name)
    enabled = [name for name, t in types.items() if t["max_workers"] > 0]
    assert len(enabled) == 1, f"{path.name}: GPU types launchable at once: {enabled}"
    assert cfg["max_workers"] == types[enabled[0]]["max_workers"], f"{path.name}: max_workers"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_gpu_nodes_fit_the_recipe(path):
    cfg = load(path)
    for name, t in gpu_node_types(cfg).items():  # the off type too: it is one max_workers edit away
        res = t["resources"]
        check_fits_recipe(f"{path.name}: {name}", res["CPU"], res["GPU"], max(t["max_workers"], cfg["max_workers"]))


def boot_disk(cfg: dict, node_type: dict) -> tuple[int, str]:
    """(size in GB, type) of the node's boot disk."""
    node_config = node_type["node_config"]
    if cfg["provider"]["type"] == "aws":
        (ebs,) = [m["Ebs"] for m in node_config["BlockDeviceMappings"]]
        return ebs["VolumeSize"], ebs["VolumeType"]
    (disk,) = [d["initializeParams"] for d in node_config["disks"] if d["boot"]]
    return disk["diskSizeGb"], disk.get("diskType", "pd-standard")


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_gpu_disks_hold_cache_checkpoints_and_export(path):
    cfg = load(path)
    for name, t in gpu_node_types(cfg).items():
        size, kind = boot_disk(cfg, t)
        assert size >= NODE_DISK_GB, f"{path.name}: {name} disk {size} GB < {NODE_DISK_GB} GB"
        if cfg["provider"]["type"] == "aws":  # gp3's default 125 MB/s: minutes per 36 GB checkpoint
            ebs = t["node_config"]["BlockDeviceMappings"][0]["Ebs"]
            assert kind == "gp3" and ebs["Throughput"] >= 500, f"{path.name}: {name} disk throughput"
        else:
            assert kind == f"zones/{cfg['provider']['availability_zone']}/diskTypes/pd-ssd", f"{path.name}: {name}"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_model_cache_on_the_host_disk(path):
    """HF_HOME and the DeepSpeed op build live in a host directory mounted into the container: they outlive
    worker and container restarts, and the worker setup builds DeepSpeedCPUAdam there before any worker starts."""
    cfg = load(path)
    env, volumes = docker_env(cfg), docker_volumes(cfg)
    for var in ("HF_HOME", "TORCH_EXTENSIONS_DIR"):
        mount = [c for c in volumes if env[var].startswith(c + "/")]
        assert mount, f"{path.name}: {var}={env[var]} is not on a -v volume"
        assert any(f"mkdir -p {volumes[mount[0]]}" in c for c in cfg["initialization_commands"]), path.name
    assert ["python", "-c", CPU_ADAM_BUILD] in [shlex.split(c) for c in cfg["worker_setup_commands"]], path.name


def test_cpu_adam_build_step_names_deepspeeds_builder():
    """The build step imports what DeepSpeedCPUAdam itself loads (deepspeed.ops.adam.cpu_adam)."""
    import inspect

    from deepspeed.ops.adam import cpu_adam

    imports = CPU_ADAM_BUILD.split(";")[0]
    assert imports in inspect.getsource(cpu_adam) and "CPUAdamBuilder().load()" in inspect.getsource(cpu_adam)
    exec(imports, {})


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_runs_token_auth_with_the_laptops_token(path):
    cfg = load(path)
    assert docker_env(cfg)["RAY_AUTH_MODE"] == "token", path.name
    assert cfg["file_mounts"][TOKEN_FILE] == TOKEN_FILE, path.name


class _JobServer(BaseHTTPRequestHandler):
    """The job server's side of token authentication (ray.dashboard's token middleware), for TOKEN."""

    TOKEN = "raydiff-test-token"
    seen: list = []

    def do_GET(self):  # noqa: N802
        header = self.headers.get("Authorization")
        self.seen.append(header)
        status, body = {None: (401, b"Unauthorized: Missing authentication token"),
                        f"Bearer {self.TOKEN}": (200, b"[]")}.get(header, (403, b"Forbidden"))
        if status == 200 and self.path == "/api/version":
            body = b'{"version": "4", "ray_version": "%s", "ray_commit": "x"}' % ray.__version__.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("how", ["token file", "RAY_AUTH_TOKEN", "no RAY_AUTH_MODE"])
def test_ray_job_cli_sends_the_token_as_docs_cluster_md_says(tmp_path, how):
    """The laptop side of docs/cluster.md: `ray job` sends the token of ~/.ray/auth_token (what the launcher files
    copy to every node) or of RAY_AUTH_TOKEN (KubeRay's Secret) only with RAY_AUTH_MODE=token; without it the head
    answers "Missing authentication token"."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JobServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _JobServer.seen = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["HOME"] = str(tmp_path)
    if how == "RAY_AUTH_TOKEN":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_JobServer.TOKEN)
    else:
        token = tmp_path / TOKEN_FILE.removeprefix("~/")
        token.parent.mkdir()
        token.write_text(_JobServer.TOKEN)
        if how == "token file":
            env["RAY_AUTH_MODE"] = "token"
    address = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", address],
                             env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    if how == "no RAY_AUTH_MODE":
        assert out.returncode != 0 and "Missing authentication token" in out.stdout + out.stderr
        assert _JobServer.seen == [None]
    else:
        assert out.returncode == 0, out.stdout + out.stderr
        assert set(_JobServer.seen) == {f"Bearer {_JobServer.TOKEN}"}


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


def kubernetes_docs() -> list[tuple[str, dict]]:
    files = sorted((CLUSTER / "kuberay").glob("*.yaml"))
    return [(p.name, doc) for p in files for doc in yaml.safe_load_all(p.read_text())]


def kuberay_docs() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in kubernetes_docs() if doc["kind"] in KUBERAY_KINDS]


def kuberay(kind: str) -> list[dict]:
    return [doc for _, doc in kubernetes_docs() if doc["kind"] == kind]


def test_kuberay_files_hold_only_known_kinds():
    assert {doc["kind"] for _, doc in kubernetes_docs()} == {"ServiceAccount", *KUBERAY_KINDS}


@pytest.mark.parametrize("name,doc", kuberay_docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_kuberay_manifest_matches_crd(crd_validators, name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    errors = [f"{label}: {e}" for label, v in crd_validators[doc["kind"]] for e in schema_errors(v, doc)]
    assert not errors, "\n".join(errors)


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def the_gpu_group() -> dict:
    (cluster,) = kuberay("RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]  # one GPU group: a run cannot mix GPU types
    return group


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def gib(quantity: str) -> float:
    """A Kubernetes memory / storage quantity ("550Gi", "100G", "1Ti", bytes) in GiB."""
    number, unit = re.fullmatch(r"([0-9.]+)([KMGT]i?)?", str(quantity)).groups()
    power = {"K": 1, "M": 2, "G": 3, "T": 4}
    scale = 1.0 if unit is None else (1024 if unit.endswith("i") else 1000) ** power[unit[0]]
    return float(number) * scale / 1024**3


def test_raycluster_autoscales_gpu_workers():
    (cluster,) = kuberay("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    (head_container,) = containers(head)
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"], "the head is a CPU pod"
    group = the_gpu_group()
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    (worker,) = containers(group)
    res = worker["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert gpu_taint in group["template"]["spec"]["tolerations"]
    assert env_of(worker)["RAYDIFF_STORAGE_PATH"] == "s3://YOUR-BUCKET/raydiff"


def test_raycluster_pins_the_gpu_type():
    group = the_gpu_group()
    machine = group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
    assert machine in GPU_MACHINES, machine
    accel = GPU_MACHINES[machine]
    assert group["resources"] == {f"accelerator_type:{accel}": "1"}
    assert group["labels"] == {"ray.io/accelerator-type": accel}


def test_raycluster_gpu_pod_fits_the_recipe():
    group = the_gpu_group()
    (worker,) = containers(group)
    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    assert "num-cpus" not in group["rayStartParams"], "Ray's CPUs are the pod's CPU limit"
    assert all(requests[k] == limits[k] for k in ("cpu", "memory", "nvidia.com/gpu")), "scheduled for what Ray uses"
    check_fits_recipe("raycluster.yaml: gpu group", float(limits["cpu"]), int(limits["nvidia.com/gpu"]),
                      group["maxReplicas"])


def mounted_volume(pod: dict, container: dict, path: str) -> dict:
    """The pod volume that holds `path` inside the container."""
    (mount,) = [m for m in container["volumeMounts"] if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


def test_raycluster_gpu_pod_has_model_cache_scratch_and_ephemeral_storage():
    group = the_gpu_group()
    pod = group["template"]["spec"]
    (worker,) = containers(group)
    env = env_of(worker)
    cache = mounted_volume(pod, worker, env["HF_HOME"])
    scratch = mounted_volume(pod, worker, env["TMPDIR"])  # Ray's session dir and raydiff's staging
    assert cache is not scratch
    assert gib(cache["emptyDir"]["sizeLimit"]) >= MODEL_CACHE_GB
    assert gib(scratch["emptyDir"]["sizeLimit"]) >= SCRATCH_GB
    disk_volumes = [v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v and "medium" not in v["emptyDir"]]
    on_disk = sum(gib(v["sizeLimit"]) for v in disk_volumes)
    assert gib(worker["resources"]["requests"]["ephemeral-storage"]) >= on_disk, "the scheduler must see the volumes"
    shm = mounted_volume(pod, worker, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    object_store = int(group["rayStartParams"]["object-store-memory"]) / 1024**3
    assert object_store < 0.9 * gib(shm["emptyDir"]["sizeLimit"]), "room in /dev/shm for NCCL and DataLoaders"


def test_raycluster_builds_cpu_adam_into_the_workers_extension_dir():
    group = the_gpu_group()
    pod = group["template"]["spec"]
    (worker,) = containers(group)
    (build,) = [c for c in pod["initContainers"] if c["command"] == ["python", "-c", CPU_ADAM_BUILD]]
    assert build["image"] == worker["image"]
    ext_dir = env_of(worker)["TORCH_EXTENSIONS_DIR"]
    assert env_of(build)["TORCH_EXTENSIONS_DIR"] == ext_dir
    assert mounted_volume(pod, build, ext_dir) is mounted_volume(pod, worker, ext_dir)
    assert "emptyDir" in mounted_volume(pod, worker, ext_dir), "a pod-lifetime volume: survives worker restarts"


def test_kuberay_pods_get_s3_credentials_from_a_service_account():
    (account,) = kuberay("ServiceAccount")
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\S+:role/\S+", role), role
    (cluster,) = kuberay("RayCluster")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    assert {g["template"]["spec"]["serviceAccountName"] for g in groups} == {account["metadata"]["name"]}


def test_raycluster_runs_token_auth_and_docs_name_its_secret():
    """KubeRay keeps the token in a Secret named after the RayCluster (key auth_token); docs/cluster.md reads it."""
    (cluster,) = kuberay("RayCluster")
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert f"kubectl get secret {cluster['metadata']['name']} " in docs and "auth_token" in docs
    assert re.search(r"^export .*\bRAY_AUTH_MODE=token\b", docs, re.M) and TOKEN_FILE in docs


def test_kuberay_image_is_built_from_the_project_image():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(PROJECT_IMAGE)}$", dockerfile, re.M)
    assert 'pip install --no-cache-dir -e "/home/ray/raydiff[mlflow]"' in dockerfile
    (cluster,) = kuberay("RayCluster")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    pods = [g["template"]["spec"] for g in groups]
    assert {c["image"] for p in pods for c in p["containers"] + p.get("initContainers", [])} == {
        "YOUR-REGISTRY/raydiff:0.1.0"}


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
    from raydiff.train.driver import parse_args

    for module, job in jobs.items():
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert "run.storage_path=$RAYDIFF_STORAGE_PATH" in entrypoint(job)[1]
        yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        args = parse_args(entrypoint(job)[1], module.split(".")[1], "")
        # As shipped, the data source is the placeholder the user replaces: refused before Ray starts.
        with pytest.raises(C.ConfigError, match="data.source"):
            C.load_config(args.config, args.overrides)
        mine = [o.replace("YOUR-BUCKET", "my-bucket") for o in args.overrides]
        cfg = C.load_config(args.config, mine)  # the config exists and validates with the job's overrides
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
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    for label, validator in crd_validators["RayCluster"]:
        errors = schema_errors(validator, broken)
        assert len(errors) == 2, (label, errors)
        assert errors[0].startswith("spec.workerGroupSpecs.0.maxReplicas: 'two'"), (label, errors)
        assert errors[1] == "spec.workerGroupSpecs.0: 'groupName' is a required property", (label, errors)


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
    broken["spec"]["authOptions"]["mode"] = "Token"
    assert schema_errors(ours, broken) == [
        "spec.authOptions.mode: 'Token' is not one of ['disabled', 'token']",
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
