"""The DeepSpeed engine raydiff builds, checked with a real engine in a fresh process."""

import os
import socket
import subprocess
import sys
import textwrap

# One process, world size 1: lock the shm comm op's build directory as a killed build would leave it, then build and
# step an engine from raydiff's DeepSpeed config.
ENGINE_SCRIPT = textwrap.dedent("""
    import os
    import torch
    import torch.distributed as dist
    from torch.utils.cpp_extension import _get_build_directory

    from raydiff import config as C
    from raydiff.train.deepspeed_setup import SHM_COMM_OP, build_optimizer, deepspeed_config, initialize_engine

    lock = os.path.join(_get_build_directory(SHM_COMM_OP, verbose=False), "lock")
    open(lock, "w").close()
    dist.init_process_group("gloo")
    cfg = C.load_config("tiny_cpu", ["deepspeed.zero_stage=2", "train.batch_size=2"])
    model = torch.nn.Linear(4, 4)
    engine, *_ = initialize_engine(model=model, optimizer=build_optimizer(model.parameters(), cfg),
                                   config=deepspeed_config(cfg, 1), dist_init_required=False)
    loss = engine(torch.randn(2, 4)).square().mean()
    engine.backward(loss)
    engine.step()
    built = [f for f in os.listdir(os.path.dirname(lock)) if f != "lock"]
    print("stepped", engine.global_steps, "built", built, "lock", os.path.exists(lock))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engine_starts_past_a_stale_extension_build_lock(tmp_path):
    """A build of the shm comm op killed midway leaves a lock that made every later engine wait forever (a whole CI
    run hung on it). raydiff's engine never builds that op, so the lock is not waited on and nothing is compiled."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stepped 1 built [] lock True" in done.stdout, done.stdout[-2000:]


# One process, world size 1, ZeRO-0: raydiff's engine against plain torch (unfused AdamW, torch's clip) on one batch.
ALONE_SCRIPT = textwrap.dedent("""
    import copy
    import deepspeed.runtime.engine
    import torch
    import torch.distributed as dist

    from raydiff import config as C
    from raydiff.train.deepspeed_setup import build_optimizer, deepspeed_config, initialize_engine

    dist.init_process_group("gloo")
    cfg = C.load_config("tiny_cpu", ["deepspeed.zero_stage=0", "train.batch_size=2", "train.grad_clip=0.05"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    ref = copy.deepcopy(model)
    optimizer = build_optimizer(model.parameters(), cfg)
    engine, *_ = initialize_engine(model=model, optimizer=optimizer, config=deepspeed_config(cfg, 1),
                                   dist_init_required=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a lone engine all-reduced its gradients with itself, or clipped them tensor by tensor")

    engine.allreduce_gradients = refuse
    deepspeed.runtime.engine.clip_grad_norm_ = refuse  # DeepSpeed's per-tensor clip loop: torch's clip instead
    o = cfg.optim
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                weight_decay=o.weight_decay, foreach=False)
    x = torch.randn(2, 4)
    for _ in range(3):
        engine.backward(engine(x).square().mean())
        engine.step()
        ref(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.train.grad_clip)
        ref_opt.step()
        ref_opt.zero_grad()
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    print("fused", optimizer.defaults["fused"], "allreduce", engine.enable_backward_allreduce, "diff", diff)
""")


def test_lone_zero0_engine_skips_the_gradient_all_reduce_and_steps_like_plain_torch(tmp_path):
    """One worker, ZeRO-0: no gradient all-reduce with itself (DeepSpeed would flatten every gradient into buckets for
    it), torch's clip instead of DeepSpeed's per-tensor loop, a fused AdamW, and after three clipped steps the same
    weights as torch's own unfused AdamW and clip."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", ALONE_SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("fused"))
    fused, allreduce, diff = line.split()[1], line.split()[3], float(line.split()[5])
    assert (fused, allreduce) == ("True", "False"), line
    assert diff < 1e-6, line


class _Accelerator:
    def __init__(self, name: str):
        self.name = name

    def device_name(self) -> str:
        return self.name


def test_shm_comm_op_is_marked_on_the_cpu_accelerator_only(monkeypatch):
    """A CUDA accelerator's op table has no CPU shm comm op: marking it there failed every GPU engine build."""
    import deepspeed.accelerator
    import deepspeed.ops

    from raydiff.train.deepspeed_setup import SHM_COMM_OP, skip_cpu_shm_comm_op

    gpu_table = {"fused_adam": True}  # a CUDA accelerator's table: no deepspeed_shm_comm
    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", gpu_table)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _Accelerator("cuda"))
    skip_cpu_shm_comm_op()
    assert gpu_table == {"fused_adam": True}

    cpu_table = {SHM_COMM_OP: True}
    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", cpu_table)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _Accelerator("cpu"))
    skip_cpu_shm_comm_op()
    assert cpu_table == {SHM_COMM_OP: False}
