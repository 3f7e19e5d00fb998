"""Data-parallel speed: N processes with B prompts each vs one process with N x B.

Both sides run `mlx-grpo train` on the same model (random weights with
Qwen3-0.6B's shapes, built as scripts/bench.py builds them, or --quick's
tiny model), the same prompts and settings, for warm-up + measured steps;
the N processes join over MLX's ring backend on this machine. Per-step
figures come from each run's metrics.jsonl (process 0's timings;
`time/step` includes waiting for the other processes). Prints figures;
asserts nothing.

On one machine the N processes share its cores and memory bandwidth, so
this measures the cost of the data-parallel machinery more than the gain
of a second Mac, which adds its own cores and bandwidth.

The ranks are started directly, with the environment `mlx.launch` gives them
(MLX_RANK, MLX_HOSTFILE): mlx.launch's output-forwarding threads poll their
processes' stdin pipes without blocking and keep one core busy, half of
this 2-core machine. `--launcher` measures with mlx.launch anyway.

Run:
    python scripts/bench_distributed.py --cache-dir ~/.cache/mlx-grpo-bench
    python scripts/bench_distributed.py --threads 1     # one BLAS thread per process
    python scripts/bench_distributed.py --quick         # tiny model, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (loads mlx_grpo first, so OpenBLAS before mlx.core)

BIN = Path(sys.executable).parent
PHASES = ("time/rollout", "time/reference", "time/update", "time/step")
LENGTH = "completions/mean_length"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step in all")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="completion tokens")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="OPENBLAS_NUM_THREADS of each process")
    p.add_argument("--quick", action="store_true", help="tiny model, 8 tokens")
    p.add_argument("--cache-dir", type=Path, help="build / reuse the model here")
    p.add_argument("--launcher", action="store_true", help="start the N processes with mlx.launch")
    args = p.parse_args(argv)
    if args.prompts % args.processes:
        p.error("--prompts must be a multiple of --processes")
    if args.quick:
        args.tokens = 8
    return args


def flags(args: argparse.Namespace, model: Path, data: Path, out: Path, prompts: int) -> list:
    settings = {
        "model": model,
        "data": data,
        "rewards": f"{HERE / 'bench.py'}:even_share",
        "output-dir": out,
        "num-generations": args.generations,
        "prompts-per-step": prompts,
        "max-completion-length": args.tokens,
        "lora-rank": 8,
        "lora-alpha": 16,
        "beta": 0.1,
        "max-steps": args.warmup + args.steps,
        "save-steps": 0,
        "logging-steps": 10_000,
    }
    return [x for k, v in settings.items() for x in (f"--{k}", str(v))]


def timed(commands: list[list[str]], out: Path, envs: list[dict]) -> tuple[list[dict], float]:
    """Run `commands` side by side; return the run's metrics and wall time."""
    t0 = time.perf_counter()
    # stdin stays an open pipe: mlx.launch forwards stdin and spins on a closed one
    procs = [
        subprocess.Popen(c, stdin=subprocess.PIPE, env=e, text=True) for c, e in zip(commands, envs)
    ]
    for proc in procs:
        proc.wait()
        proc.stdin.close()
    wall = time.perf_counter() - t0
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        sys.exit(f"{commands[0][0]} wrote no metrics; see its output above")
    return [json.loads(x) for x in metrics.read_text().splitlines()], wall


def summary(metrics: list[dict], warmup: int) -> dict[str, float]:
    measured = metrics[warmup:]
    row = {k: statistics.median(m[k] for m in measured) for k in (*PHASES, LENGTH)}
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = args.cache_dir or Path(tempfile.mkdtemp(prefix="mlx-grpo-dp-"))
    root.mkdir(parents=True, exist_ok=True)
    model, how = bench.model_dir(root, args.quick)
    work = Path(tempfile.mkdtemp(prefix="mlx-grpo-dp-runs-"))
    data = bench.write_prompts(work / "prompts.jsonl", rows=4 * args.prompts)
    env = dict(os.environ)
    if args.threads:
        env["OPENBLAS_NUM_THREADS"] = str(args.threads)
    n = args.processes
    host = bench.machine()
    print(f"machine    {host['platform']} | {host['cpu_count']} CPUs | {host['device']}")
    print(f"BLAS       {host['blas']} | mlx {host['mlx']} | python {host['python']}")
    print(f"model      {'tiny' if args.quick else 'Qwen3-0.6B shapes'}, float32 | {how}")
    print(
        f"settings   {args.prompts} prompts x G={args.generations} per step | {args.tokens} "
        f"tokens | beta 0.1 | LoRA r=8 on 7 targets | {args.warmup} warm-up + {args.steps} "
        f"measured steps | BLAS threads per process: {args.threads or 'default'}\n"
    )
    rows = []
    one = work / "one"
    command = [str(BIN / "mlx-grpo"), "train", *flags(args, model, data, one, args.prompts)]
    rows.append(("1 process", *timed([command], one, [env])))
    many = work / "many"
    command = [str(BIN / "mlx-grpo"), "train", *flags(args, model, data, many, args.prompts // n)]
    if args.launcher:
        launch = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", str(n)]
        if args.threads:
            launch += ["--env", f"OPENBLAS_NUM_THREADS={args.threads}"]
        rows.append((f"{n} processes", *timed([[*launch, "--", *command]], many, [env])))
    else:
        hosts = work / "hosts.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{33300 + r}"] for r in range(n)]))
        envs = [{**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)} for r in range(n)]
        rows.append((f"{n} processes", *timed([command] * n, many, envs)))

    print(f"\n{'':14}| rollout s | ref s | update s | step s | tok/s | run wall s")
    print("-" * 72)
    steps = []
    for label, metrics, wall in rows:
        s = summary(metrics, args.warmup)
        tokens = s[LENGTH] * args.prompts * args.generations
        steps.append(s["time/step"])
        print(
            f"{label:14}| {s['time/rollout']:9.2f} | {s['time/reference']:5.2f} | "
            f"{s['time/update']:8.2f} | {s['time/step']:6.2f} | {tokens / s['time/step']:5.1f} | "
            f"{wall:10.1f}"
        )
    print(f"\n{n} processes / 1 process, step time: {steps[1] / steps[0]:.2f}x")


if __name__ == "__main__":
    main()
