"""What an elastic run's resizes and a preemption notice cost: tests/elastic_run.py's scenario, timed.

    PYTHONPATH=. python benchmarks/elastic.py --repeat 2 --json elastic.json

Each repeat runs an elastic tiny run (`scaling.num_workers: [1, 2]`, 2 CPUs a worker) on a ray.cluster_utils.Cluster
of a head without CPUs and one worker node, in its own process: once a checkpoint exists a second node joins (grow),
after `--drain-after` steps at 2 workers that node is drained with a preemption reason and `--deadline` seconds
(`ray drain-node`, as the autoscaler does before a spot reclaim), and once raydiff's just-in-time checkpoint is
complete the node is removed (the reclaim). Reported per repeat, from the scenario's timestamps and metrics.jsonl:

- grow_s: the node joining -> the first optimizer step finished at 2 workers: the elastic policy's check (every
  `scaling.resize_interval_s`, 1 s here), the group's restart, the checkpoint's conversion to DeepSpeed's universal
  format and the resume. The scenario nudges Ray's autoscaling coordinator when the node joins; without that its
  view of the nodes lags by up to 20 s more (on a real cluster, next to minutes of node boot);
- grow_steps_redone: steps trained at 1 worker after the checkpoint the grown group resumed from (a grow gives no
  notice: up to `checkpoint.every_n_steps` - 1 steps are trained again);
- notice_to_durable_s: `ray drain-node` -> the just-in-time checkpoint complete on the storage (the watcher's poll,
  the rest of a step, the save and upload); jit_after_drain_steps: the steps between the two;
- steps_lost: steps trained after that checkpoint, lost at the restart (the goal: 0); periodic_would_lose: what the
  periodic checkpoint alone would have lost here (the notice's step modulo `checkpoint.every_n_steps`);
- shrink_s: the deadline -> the first step finished at 1 worker (the restart and the re-shard).

The last lines print the command and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=5, help="checkpoint.every_n_steps")
    p.add_argument("--grow-at", type=int, default=5, help="the node joins once a checkpoint at this step exists")
    p.add_argument("--drain-after", type=int, default=2, help="steps at 2 workers before the drain")
    p.add_argument("--deadline", type=int, default=12, help="the drain's deadline, seconds")
    p.add_argument("--poll", type=float, default=1.0, help="RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S")
    p.add_argument("--json", default=None, help="write the results to this file")
    return p.parse_args(argv)


def scenario(args: argparse.Namespace, storage: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": str(args.poll),
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "tests" / "elastic_run.py"), storage, str(args.grow_at), str(args.drain_after),
           str(args.deadline), "run.name=e", f"train.max_steps={args.steps}",
           f"checkpoint.every_n_steps={args.every}", "validation.every_n_steps=1000",
           "validation.exposure_bias_denoising_steps=0", "validation.prompts=[]", "logging.sample_prompts=[]",
           "data.demo_num_images=30", "data.val_max_samples=2", "scaling.resize_interval_s=1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"the scenario failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("[elastic] {"))
    return json.loads(line[len("[elastic] "):])


def measures(out: dict, args: argparse.Namespace) -> dict:
    with open(os.path.join(out["run_dir"], "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f)}
    jit = out["jit_step"]
    return {
        "grow_s": out["first_step_at_2_time"] - out["added_at"],
        "grow_steps_redone": out["steps_before_grow"] - (out["first_step_at_2"] - 1),
        "notice_to_durable_s": out["jit_durable_at"] - out["drained_at"],
        "jit_after_drain_steps": jit - out["drain_at_step"],
        "steps_lost": out["steps_at_removal"] - jit,
        "periodic_would_lose": jit % args.every,
        "shrink_s": rows[jit + 1]["time"] - (out["drained_at"] + args.deadline),
        "wall_s": out["wall_s"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="raydiff-elastic-") as storage:
            runs.append(measures(scenario(args, storage), args))
        print(f"repeat {i + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[-1].items()), flush=True)
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result = {"machine": f"{os.cpu_count()} CPUs", "args": vars(args), "runs": runs, "median": summary}
    given = argv if argv is not None else sys.argv[1:]
    print("command: PYTHONPATH=. python benchmarks/elastic.py " + shlex.join(given))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
