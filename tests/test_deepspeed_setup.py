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
