"""Per-worker memory of ZeRO 0/2/3: measured on the tiny SDXL (2 CPU workers, gloo) and DeepSpeed's estimate for the
full SDXL UNet on 8 GPUs.

    PYTHONPATH=. python benchmarks/memory_zero.py --stages 0 2 3 --steps 6 --json memory.json
    PYTHONPATH=. python benchmarks/memory_zero.py --estimate-only

Measured: `raydiff.train.driver.run_training` with 2 workers; each worker runs the real `train_loop_per_worker`,
wrapped so that after each `Worker` phase (set-up = model load + DeepSpeed init, training, export) it records its
peak and current resident set size (VmHWM / VmRSS from /proc/self/status, the same peak as getrusage's ru_maxrss)
and the bytes of the model states it holds: module parameters (ZeRO-3: this rank's partition), the optimizer's own
fp32 parameter copies (ZeRO 1-3 partitions) and the AdamW moments.

Estimated: `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (DeepSpeed's
cold estimators: parameter counts in, bytes out; bf16 weights, fp32 master + AdamW) for the SDXL UNet's
2,567,463,684 parameters and its largest layer, on 1 node x 8 GPUs. Activations are not part of these estimates.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Ray workers must import this checkout's raydiff (an editable install elsewhere would otherwise win).
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
sys.path.insert(0, str(ROOT))

GIB = 2**30


# ------------------------------------------------------------------ measured on the tiny model


def _proc_status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value, _unit = line.split()
                out[key.rstrip(":")] = int(value) * 1024 / 2**20  # MiB
    return out


def _storage_bytes(tensors, exclude: set[int] = frozenset()) -> tuple[int, set[int]]:
    """Bytes of the distinct storages behind `tensors` (views into one flat ZeRO buffer count once)."""
    import torch

    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            s = t.untyped_storage()
            if s.data_ptr() not in exclude:
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()), set(seen)


def model_state_mib(engine) -> dict[str, float]:
    import torch

    params = list(engine.module.parameters())
    # ZeRO-3 replaces each parameter's data by an empty placeholder and keeps this rank's slice in ds_tensor.
    module_tensors = [getattr(p, "ds_tensor", p) for p in params]
    module_bytes, module_storages = _storage_bytes(module_tensors)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    opt_params = [p for g in base.param_groups for p in g["params"]]
    master_bytes, _ = _storage_bytes(opt_params, exclude=module_storages)
    moments = [t for s in base.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    moment_bytes, _ = _storage_bytes(moments)
    mib = 2**20
    return {"module_params_mib": round(module_bytes / mib, 2),
            "optimizer_fp32_copies_mib": round(master_bytes / mib, 2), "adam_moments_mib": round(moment_bytes / mib, 2)}


def measured_loop(loop_config: dict) -> None:
    """The real train_loop_per_worker, with memory marks after each Worker phase (runs in each Ray worker)."""
    import ray.train

    from raydiff.train import loop

    marks = {"start": _proc_status()}

    def after(name, fn):
        def wrapped(self, *args, **kwargs):
            out = fn(self, *args, **kwargs)
            marks[name] = {**_proc_status(), **model_state_mib(self.engine)}
            return out
        return wrapped

    for phase in ("train", "export"):
        setattr(loop.Worker, phase, after(phase, getattr(loop.Worker, phase)))
    loop.Worker.__init__ = after("setup", loop.Worker.__init__)  # the models and the engine are built there
    loop.train_loop_per_worker(loop_config)
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(loop_config["memory_dir"], f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "marks": marks}, f)


def run_stage(stage: int, args, storage: str) -> list[dict]:
    from raydiff.config import load_config
    from raydiff.train import driver

    never = 10**6
    cfg = load_config("tiny_cpu", [
        f"run.storage_path={storage}", f"run.name=zero{stage}", "scaling.num_workers=2",
        f"train.max_steps={args.steps}", f"deepspeed.zero_stage={stage}", f"validation.every_n_steps={never}",
        f"checkpoint.every_n_steps={never}", f"train.report_every_n_steps={never}",
        "validation.exposure_bias_denoising_steps=0", "validation.prompts=[]", "logging.sample_prompts=[]",
        "logging.tensorboard=false"])
    memory_dir = tempfile.mkdtemp(prefix=f"raydiff-mem-z{stage}-")
    # Logical CPUs beyond the driver's default (workers + 2): with two workers, each rank's validation dataset
    # holds a preprocessing actor, and at 3 CPUs the read tasks feeding them were starved (a hang seen here).
    driver.init_ray(cfg, num_cpus=6)
    original_build = driver.build_trainer

    def build_trainer(cfg, callbacks=None):  # the driver's own trainer, running the measuring loop
        trainer = original_build(cfg, callbacks)
        trainer.train_loop_per_worker = measured_loop
        trainer.train_loop_config["memory_dir"] = memory_dir
        return trainer

    driver.build_trainer = build_trainer
    try:
        driver.run_training(cfg)
    finally:
        driver.build_trainer = original_build
    return [json.loads((Path(memory_dir) / f"rank{r}.json").read_text()) for r in range(2)]


# ------------------------------------------------------------------ DeepSpeed's estimate for the full SDXL UNet


def _sdxl_counts() -> tuple[int, int, str]:
    """(total parameters, largest single layer's parameters, its name) of the SDXL UNet, built on the meta device."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_sdxl import build_unet

    unet = build_unet("meta")
    total = sum(p.numel() for p in unet.parameters())
    name, largest = max(((n, sum(p.numel() for p in m.parameters(recurse=False))) for n, m in unet.named_modules()),
                        key=lambda item: item[1])
    return total, largest, name


def estimates(gpus: int) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    total, largest, largest_name = _sdxl_counts()
    rows = []
    # No partitioning: every GPU holds everything (the ZeRO-2 formula with one GPU: 2 + 18 bytes per parameter).
    cpu, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=1, cpu_offload=False)
    rows.append({"setup": f"ZeRO-0 (no partitioning), {gpus} GPUs", "offload": "none", "per_gpu_gib": gpu / GIB,
                 "per_node_cpu_gib": None})
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=offload)
        rows.append({"setup": f"ZeRO-2, {gpus} GPUs", "offload": "optimizer -> CPU" if offload else "none",
                     "per_gpu_gib": gpu / GIB, "per_node_cpu_gib": cpu / GIB})
    for offload, offload_params in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus,
                                                            cpu_offload=offload, cpu_offload_params=offload_params,
                                                            zero_init=True)
        label = "none" if not offload else ("optimizer + params -> CPU" if offload_params else "optimizer -> CPU")
        rows.append({"setup": f"ZeRO-3, {gpus} GPUs", "offload": label, "per_gpu_gib": gpu / GIB,
                     "per_node_cpu_gib": cpu / GIB})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # DeepSpeed's own tables, kept verbatim in the JSON
        estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=gpus)
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=gpus)
    for row in rows:
        row["per_gpu_gib"] = round(row["per_gpu_gib"], 2)
        row["per_node_cpu_gib"] = None if row["per_node_cpu_gib"] is None else round(row["per_node_cpu_gib"], 1)
    return {"total_params": total, "largest_layer_params": largest, "largest_layer": largest_name, "gpus": gpus,
            "rows": rows, "deepspeed_output": printed.getvalue()}


# ------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="*", default=[0, 2, 3])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--gpus", type=int, default=8, help="GPUs (one node) for the SDXL estimate")
    p.add_argument("--estimate-only", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    result: dict = {"estimate": estimates(args.gpus)}
    print(result["estimate"]["deepspeed_output"])
    print(json.dumps(result["estimate"]["rows"], indent=1), flush=True)
    if not args.estimate_only:
        storage = tempfile.mkdtemp(prefix="raydiff-bench-mem-")
        result["measured"] = {}
        for stage in args.stages:
            t0 = time.perf_counter()
            ranks = run_stage(stage, args, storage)
            result["measured"][f"zero{stage}"] = ranks
            print(f"ZeRO-{stage} ({time.perf_counter() - t0:.0f} s):", flush=True)
            for r in ranks:
                m = r["marks"]
                print(f"  rank {r['rank']}: start RSS {m['start']['VmRSS']:.0f} MiB | after set-up peak "
                      f"{m['setup']['VmHWM']:.0f} | training peak {m['train']['VmHWM']:.0f} | run peak "
                      f"{m['export']['VmHWM']:.0f} MiB | states after training: "
                      + ", ".join(f"{k} {v}" for k, v in m["train"].items() if k.endswith("_mib")), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
