"""raydiff.hub: model files downloaded once per node into the Hugging Face cache, then found with no hub call.

There is no hub here. ``FakeHub`` stands in for it on loopback (model info, tree listing, file downloads: what
``huggingface_hub`` asks for), serving the tiny SDXL as a hub repo, so the real download path runs and every hub
request is counted. The offline path is tested on a hand-made HF cache (``models--org--name/snapshots/<sha>``,
``refs/main``) with ``HF_HUB_OFFLINE=1`` and every connection refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from raydiff import hub
from raydiff import models as m
from raydiff.config import DataSection
from raydiff.data import pipeline
from raydiff.data.demo import write_demo_dataset

REPO = "org/tiny-sdxl"
SHA = "0123456789abcdef0123456789abcdef01234567"
NEVER = b"not for this run"  # files a run must not download: their bytes are not loadable weights
FOREIGN = {  # what SDXL base ships beside the files a run loads (abridged)
    "sd_xl_base_1.0.safetensors": NEVER,
    "README.md": b"# tiny",
    "unet/diffusion_pytorch_model.bin": NEVER,
    "unet/openvino_model.bin": NEVER,
    "text_encoder/model.fp16.safetensors": NEVER,
    "text_encoder_2/flax_model.msgpack": NEVER,
}


class FakeHub:
    """One model repo served over HTTP on 127.0.0.1 the way the hub serves it; ``requests`` counts (method, path)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.requests = files, Counter()
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub_.answer(self, body=False)

            def do_GET(self) -> None:
                hub_.answer(self, body=True)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(req.path).path)
        self.requests[req.command, path] += 1
        api, resolve = f"/api/models/{REPO}", f"/{REPO}/resolve/"
        if path in (api, f"{api}/revision/main", f"{api}/revision/{SHA}"):
            data = json.dumps({"id": REPO, "sha": SHA, "siblings": [{"rfilename": f} for f in self.files]}).encode()
            headers = {"Content-Type": "application/json"}
        elif path.startswith(f"{api}/tree/"):
            data = json.dumps([{"type": "file", "path": f, "size": len(b), "oid": _sha1(b)}
                               for f, b in self.files.items()]).encode()
            headers = {"Content-Type": "application/json"}
        elif path.startswith(resolve) and path[len(resolve):].partition("/")[2] in self.files:
            data = self.files[path[len(resolve):].partition("/")[2]]
            headers = {"X-Repo-Commit": SHA, "ETag": f'"{_sha1(data)}"'}
        else:
            data, headers = b"{}", {"X-Error-Code": "EntryNotFound"}
            req.send_response(404)
        if not headers.get("X-Error-Code"):
            req.send_response(200)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            req.send_header(k, v)
        req.end_headers()
        if body:
            req.wfile.write(data)

    def downloaded(self) -> Counter:
        """Per repo file: how many times it was asked for (HEAD: one per download)."""
        prefix = f"/{REPO}/resolve/"
        return Counter(p[len(prefix):].partition("/")[2] for (method, p), n in self.requests.items()
                       if method == "HEAD" and p.startswith(prefix) for _ in range(n))

    def info_calls(self) -> int:
        api = f"/api/models/{REPO}"
        return sum(n for (_, p), n in self.requests.items() if p == api or p.startswith(f"{api}/revision/"))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _tree(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")] = f.read()
    return out


@pytest.fixture(scope="module")
def repo_files(tiny_sdxl: str, tmp_path_factory) -> dict[str, bytes]:
    """The tiny SDXL as a hub repo: its files, a real fp16 UNet variant, and files no run may download."""
    from diffusers import UNet2DConditionModel

    half = str(tmp_path_factory.mktemp("fp16"))
    UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").half().save_pretrained(half, variant="fp16")
    fp16 = "diffusion_pytorch_model.fp16.safetensors"
    with open(os.path.join(half, fp16), "rb") as f:
        return {**_tree(tiny_sdxl), f"unet/{fp16}": f.read(), **FOREIGN}


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return str(tmp_path / "hf")


@pytest.fixture
def fake_hub(repo_files, hf_home, monkeypatch):
    server = FakeHub(repo_files)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


def refuse_connections(monkeypatch) -> list:
    """From now on every connection this process attempts fails, and is recorded: no hub call can hide (transformers
    falls back silently when the hub is unreachable, so a failing call is not enough to notice one)."""
    attempts: list = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"no network in this test (connect to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def _tiny_weight(tiny_sdxl: str, sub: str = "unet") -> dict[str, torch.Tensor]:
    name = "diffusion_pytorch_model.safetensors" if sub in ("unet", "vae") else "model.safetensors"
    return load_file(os.path.join(tiny_sdxl, sub, name))


def _assert_unet_is(unet: torch.nn.Module, expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    state = unet.state_dict()
    assert {t.dtype for t in state.values()} == {dtype}
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k].to(dtype)) for k in expected)


# ------------------------------------------------------------------------------------------------ selection


SDXL_BASE = [  # stabilityai/stable-diffusion-xl-base-1.0 (abridged: one of each kind of file per folder)
    "model_index.json", "sd_xl_base_1.0.safetensors", "README.md", "scheduler/scheduler_config.json",
    *(f"{t}/{n}" for t in hub.TOKENIZERS
      for n in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")),
    *(f"{t}/{n}" for t in ("text_encoder", "text_encoder_2")
      for n in ("config.json", "model.safetensors", "model.fp16.safetensors", "model.onnx", "flax_model.msgpack",
                "openvino_model.bin")),
    *(f"{c}/{n}" for c in ("unet", "vae")
      for n in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_flax_model.msgpack", "openvino_model.bin")),
    "unet/model.onnx", "unet/model.onnx_data", "vae_1_0/config.json", "vae_1_0/diffusion_pytorch_model.safetensors",
]


def test_selection_takes_the_runs_files_and_the_chosen_variant_only() -> None:
    small = sorted(["model_index.json", "scheduler/scheduler_config.json",
                    *(f for f in SDXL_BASE if f.startswith("tokenizer")),
                    *(f"{c}/config.json" for c in ("unet", "vae", "text_encoder", "text_encoder_2"))])
    fp32 = ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert hub.select_files(SDXL_BASE, hub.PIPELINE) == sorted(small + fp32)
    # fp16 training prefers the fp16 UNet; the frozen parts stay as asked
    with_half = [f.replace("unet/diffusion_pytorch_model", "unet/diffusion_pytorch_model.fp16") for f in fp32]
    assert hub.select_files(SDXL_BASE, hub.PIPELINE, prefer={"unet": "fp16"}) == sorted(small + with_half)
    # no bf16 files: the default ones (an fp16 file is not the bf16 cast of the fp32 weights)
    assert hub.select_files(SDXL_BASE, hub.PIPELINE, prefer={"unet": "bf16"}) == sorted(small + fp32)
    every_half = [f.replace(".safetensors", ".fp16.safetensors") for f in fp32]
    assert hub.select_files(SDXL_BASE, hub.PIPELINE, variant="fp16") == sorted(small + every_half)
    assert hub.select_files(SDXL_BASE, hub.TOKENIZERS) == [f for f in small if f.startswith(("model", "tok"))]


def test_selection_of_shards_bin_fallback_a_bare_vae_and_missing_parts() -> None:
    shards = ["text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.fp16.json",
              "text_encoder_2/model.fp16-00001-of-00002.safetensors",
              "text_encoder_2/model.fp16-00002-of-00002.safetensors", "text_encoder_2/model.safetensors"]
    assert hub.select_files(shards, ["text_encoder_2"], variant="fp16") == sorted(set(shards) - {shards[-1]})
    old = ["unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin"]
    assert hub.select_files(old, ["unet"]) == old[:2]
    bare_vae = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "README.md"]
    assert hub.select_files(bare_vae, [hub.STANDALONE_VAE]) == bare_vae[:2]
    assert hub.select_files(SDXL_BASE, [hub.STANDALONE_VAE]) == ["model_index.json", "vae/config.json",
                                                                 "vae/diffusion_pytorch_model.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"no bf16 weights in unet/ .*default.*fp16"):
        hub.select_files(SDXL_BASE, hub.PIPELINE, variant="bf16")
    with pytest.raises(FileNotFoundError, match="no tokenizer_2/ folder"):
        hub.select_files([f for f in SDXL_BASE if not f.startswith("tokenizer_2")], hub.PIPELINE)
    with pytest.raises(FileNotFoundError, match="tokenizer/ has no vocab.json"):  # else: an empty tokenizer, silently
        hub.select_files([f for f in SDXL_BASE if f != "tokenizer/merges.txt"], hub.TOKENIZERS)


def test_model_ref_carries_the_revision_and_absolute_local_paths(tmp_path, monkeypatch) -> None:
    assert hub.model_ref(REPO, "v1.0") == f"{REPO}@v1.0" and hub.parse_ref(f"{REPO}@v1.0") == (REPO, "v1.0")
    assert hub.model_ref(REPO) == REPO and hub.parse_ref(REPO) == (REPO, None)
    assert hub.model_ref(hub.TINY, "v1.0") == hub.TINY
    local = tmp_path / "a@b"
    local.mkdir()
    monkeypatch.chdir(tmp_path)
    assert hub.model_ref("a@b", "v1.0") == str(local) and hub.parse_ref(str(local)) == (str(local), None)


# ------------------------------------------------------------------------------------------------ the hub path


def test_a_node_downloads_the_runs_files_once_then_makes_no_hub_call(fake_hub, tiny_sdxl, monkeypatch) -> None:
    """bf16 training: the fp32 UNet loaded as bf16 (the repo has no bf16 files), nothing else downloaded; a restarted
    worker, the precompute actors and the preprocessing tasks then find everything with no hub request."""
    c = m.load_components(REPO, unet_dtype=torch.bfloat16)
    _assert_unet_is(c.unet, _tiny_weight(tiny_sdxl), torch.bfloat16)
    assert fake_hub.info_calls() == 1
    assert set(fake_hub.downloaded()) == set(_tree(tiny_sdxl)) and max(fake_hub.downloaded().values()) == 1
    expected = pipeline.Preprocessor(tiny_sdxl)._tokenize(["a photo of a cat"])
    attempts = refuse_connections(monkeypatch)  # the hub (any network) is gone from here on
    restarted = m.load_components(REPO, unet_dtype=torch.bfloat16)  # a restarted worker
    _assert_unet_is(restarted.unet, _tiny_weight(tiny_sdxl), torch.bfloat16)
    m.load_encoders(REPO)  # a precompute actor
    pipeline._tokenizers.cache_clear()
    ids = pipeline.Preprocessor(hub.model_ref(REPO))._tokenize(["a photo of a cat"])  # a preprocessing task
    assert [a.tolist() for a in ids] == [a.tolist() for a in expected]
    assert attempts == []


def test_fp16_training_downloads_and_loads_the_fp16_unet_only(fake_hub, repo_files, tiny_sdxl) -> None:
    unet = m.load_components(REPO, unet_dtype=torch.float16).unet
    _assert_unet_is(unet, _tiny_weight(tiny_sdxl), torch.float16)  # the fp16 file is the fp32 weights' fp16 cast
    got = set(fake_hub.downloaded())
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in got
    assert "unet/diffusion_pytorch_model.safetensors" not in got and not got & set(FOREIGN)
    # A later fp32 run on the node needs the fp32 UNet: one more listing, that one file
    before = fake_hub.downloaded()
    _assert_unet_is(m.load_components(REPO).unet, _tiny_weight(tiny_sdxl), torch.float32)
    assert fake_hub.downloaded() - before == Counter({"unet/diffusion_pytorch_model.safetensors": 1})
    assert fake_hub.info_calls() == 2


RESOLVE = "from raydiff import hub; print('resolved', hub.local_pretrained({repo!r}), flush=True)"


def test_concurrent_processes_on_a_node_download_once(fake_hub, hf_home) -> None:
    """Three processes (a node's workers) start together; the lock holder downloads, the others wait and find it."""
    from filelock import FileLock

    lock = FileLock(os.path.join(hf_home, "hub", ".locks", "models--org--tiny-sdxl", "raydiff.lock"))
    os.makedirs(os.path.dirname(lock.lock_file), exist_ok=True)
    with lock:  # every process must reach the lock before anyone downloads
        procs = [subprocess.Popen([sys.executable, "-c", RESOLVE.format(repo=REPO)], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for _ in range(3)]
        for p in procs:
            assert "is downloading it; waiting" in p.stdout.readline()
    outs = [p.communicate(timeout=120)[0].splitlines() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    snapshot = os.path.join(hf_home, "hub", "models--org--tiny-sdxl", "snapshots", SHA)
    assert {out[-1] for out in outs} == {f"resolved {snapshot}"}
    assert sum(line.startswith("[raydiff] downloading") for out in outs for line in out) == 1
    assert fake_hub.info_calls() == 1 and max(fake_hub.downloaded().values()) == 1


def test_the_driver_can_pin_a_branch_to_its_commit(fake_hub, tiny_sdxl) -> None:
    assert hub.pinned_revision(REPO) == SHA and hub.pinned_revision(REPO, "main") == SHA
    assert fake_hub.info_calls() == 2
    assert hub.pinned_revision(REPO, SHA) == SHA and hub.pinned_revision(tiny_sdxl, "v1") == "v1"
    assert hub.pinned_revision(hub.TINY) is None and fake_hub.info_calls() == 2
    fake_hub.stop()
    assert hub.pinned_revision(REPO, "main") == "main"  # the hub down at launch: not pinned, the run goes on


def test_a_missing_repo_or_variant_is_named(fake_hub) -> None:
    with pytest.raises(FileNotFoundError, match=r"tiny-sdxl \(revision main\): the model has no bf16 weights in unet/"):
        hub.local_pretrained(REPO, variant="bf16")
    fake_hub.stop()
    with pytest.raises(FileNotFoundError, match=r"org/tiny-sdxl \(revision main\) is not in the Hugging Face cache"):
        hub.local_pretrained(REPO)


# ------------------------------------------------------------------------------------------------ offline


@pytest.fixture
def seeded_cache(tiny_sdxl: str, hf_home: str) -> str:
    """The tiny SDXL in huggingface_hub's cache layout, as `huggingface-cli download` leaves it: blobs, a snapshot
    of symlinks, refs/main."""
    repo = os.path.join(hf_home, "hub", "models--org--tiny-sdxl")
    snapshot = os.path.join(repo, "snapshots", SHA)
    for rel, data in _tree(tiny_sdxl).items():
        blob = os.path.join(repo, "blobs", _sha1(data))
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(snapshot, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(SHA)
    return snapshot


def test_offline_a_seeded_cache_serves_training_and_preprocessing(seeded_cache, tiny_sdxl, tmp_path,
                                                                   monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_demo_dataset(str(tmp_path / "data"), num_images=4)
    batch = pq.read_table(sorted(glob.glob(os.path.join(data, "*.parquet")))[0])
    ref = pipeline.Preprocessor(tiny_sdxl, DataSection(resolution=64))(batch)
    attempts = refuse_connections(monkeypatch)
    assert hub.local_pretrained(REPO) == seeded_cache
    _assert_unet_is(m.load_components(REPO, unet_dtype=torch.bfloat16).unet, _tiny_weight(tiny_sdxl), torch.bfloat16)
    # What a Ray Data preprocessing task runs, on a batch of the demo dataset, with the hub id the driver hands out
    pipeline._tokenizers.cache_clear()
    out = pipeline._preprocess(batch, tokenizer_path=hub.model_ref(REPO, "main"),
                               settings={"data": DataSection(resolution=64)})
    assert out["input_ids"].tolist() == ref["input_ids"].tolist() and len(out["input_ids"]) == batch.num_rows
    assert attempts == []
    shutil.rmtree(os.path.join(seeded_cache, "unet"))
    with pytest.raises(FileNotFoundError, match="cached snapshot .* is incomplete .*HF_HUB_OFFLINE.*unet/config.json"):
        hub.local_pretrained(REPO)


# ------------------------------------------------------------------------------------------------ the UNet's dtype

MASTERS = textwrap.dedent("""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from raydiff import config as C, models
    from raydiff.train.deepspeed_setup import build_optimizer, deepspeed_config, initialize_engine

    dist.init_process_group("gloo")

    def masters(stage, unet_dtype):
        cfg = C.load_config("tiny_cpu", [f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16"])
        unet = models.load_components(models.TINY, unet_dtype=unet_dtype).unet
        engine, *_ = initialize_engine(model=unet, optimizer=build_optimizer(unet.parameters(), cfg),
                                       config=deepspeed_config(cfg, 1), dist_init_required=False)
        return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}

    fp32 = models.load_components(models.TINY).unet.state_dict()
    for stage in (2, 3):  # ZeRO-1 runs ZeRO-2's optimizer (stage_1_and_2.py)
        a, b = masters(stage, torch.float32), masters(stage, torch.bfloat16)
        same = a.keys() == b.keys() == fp32.keys() and all(torch.equal(a[k], b[k]) for k in a)
        rounded = all(torch.equal(a[k], fp32[k].bfloat16().float()) for k in a)
        print(f"zero {stage}: masters equal {same}, are the bf16 cast {rounded}", flush=True)
""")


def test_deepspeed_masters_are_the_same_from_a_bf16_load(raydiff_cache, tiny_sdxl) -> None:
    """DeepSpeed bf16 builds its fp32 masters from the module cast to bf16 (every ZeRO stage): loading the UNet in
    bf16 gives the same masters as loading fp32, at half the host RAM. (An fp16 file cast to bf16 does not.)"""
    env = {**os.environ, "RAYDIFF_CACHE": raydiff_cache, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", MASTERS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in (2, 3):
        assert f"zero {stage}: masters equal True, are the bf16 cast True" in done.stdout, done.stdout[-2000:]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
