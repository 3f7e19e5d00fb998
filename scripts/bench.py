"""Benchmark GRPO-LoRA training steps on a random model with Qwen3-0.6B's shapes.

What it measures: the real trainer path (`trainer.setup`, then `train_step`)
on B prompts of ~96 tokens, G completions of exactly T tokens each (EOS is
switched off so every step samples the same number of tokens). After one
warm-up step it prints, per measured step and as the median:

    rollout    batched sampling of the B x G completions (prefill + T decode steps)
    reference  pi_old / reference log-prob passes (zero unless beta != 0 or mu > 1)
    update     forward + backward over the rollout and one AdamW step
    other      the rest of train_step: rewards, decoding the texts, metrics
    step       wall time of the whole train_step
    tok/s      completion tokens / rollout time
    peak GB    mx.get_peak_memory() during the step

plus the trainable parameter count, the BLAS MLX uses and the machine. It
prints figures only and asserts nothing about them.

The model is built with `mlx_grpo.toy.build_tiny_qwen3` (random float32
weights, 2.4 GB on disk, about 30 s to build on 2 cores); `--cache-dir` keeps
it for later runs.

Run:
    python scripts/bench.py                 # Qwen3-0.6B shapes, G=4, T=64, beta 0
    python scripts/bench.py --beta 0.1      # include the reference pass
    python scripts/bench.py --cache-dir ~/.cache/mlx-grpo-bench --json bench.json
    python scripts/bench.py --quick         # tiny model, a few seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx_grpo  # first: loads OpenBLAS before mlx.core is imported (see mlx_grpo._backend)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_grpo.config import resolve
from mlx_grpo.lora import total_count, trainable_count
from mlx_grpo.toy import QWEN3_0_6B, TINY, build_tiny_qwen3
from mlx_grpo.trainer import Run, setup, train_step

# With the byte tokenizer's chat template (19 tokens around the user text),
# 77 ASCII characters make a 96-token prompt.
PROMPT_CHARS = 77
PROMPT_WORDS = "count the vowels in this sentence and reply with the number only please "

PHASES = ("time/rollout", "time/reference", "time/update")

# (label, metrics key, format) of the per-step table.
COLUMNS = (
    ("rollout s", "time/rollout", "{:.2f}"),
    ("ref s", "time/reference", "{:.2f}"),
    ("update s", "time/update", "{:.2f}"),
    ("other s", "time/other", "{:.2f}"),
    ("step s", "time/step", "{:.2f}"),
    ("tok/s", "tokens_per_second", "{:.1f}"),
    ("tokens", "completion_tokens", "{:.0f}"),
    ("peak GB", "peak_memory_gb", "{:.2f}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps, not measured")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight; != 0 adds the ref pass")
    p.add_argument("--generations", type=int, default=4, help="G: completions per prompt")
    p.add_argument("--prompts", type=int, default=1, help="B: prompts per step")
    p.add_argument(
        "--completion-length", type=int, default=None, help="T: tokens (default 64; quick 16)"
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--quick", action="store_true", help="tiny model and few tokens, for CI")
    p.add_argument("--cache-dir", type=Path, default=None, help="build / reuse the model here")
    p.add_argument("--json", type=Path, default=None, help="write the medians here")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.quick else 3
    if args.completion_length is None:
        args.completion_length = 16 if args.quick else 64
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def even_share(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Cheap reward: the share of even token ids.

    It reads ids, not text: most ids the random 152k-vocabulary model samples
    lie beyond the byte tokenizer and decode to nothing. The rewards vary
    within a group, so the advantages, and with them the update, are not zero.
    """
    return [sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]


def model_dir(root: Path, quick: bool) -> tuple[Path, str]:
    """Build the random model under `root`, or reuse one built there with the same shapes."""
    shapes = TINY if quick else QWEN3_0_6B
    path = root / ("tiny-qwen3" if quick else "qwen3-0.6b-shapes")
    config = path / "config.json"  # written after the weights: its presence means complete
    if config.is_file():
        saved = json.loads(config.read_text())
        # The model's vocabulary may be raised to fit the tokenizer's special tokens.
        if all(saved.get(k) == v for k, v in shapes.items() if k != "vocab_size"):
            return path, "reused"
    t0 = time.perf_counter()
    build_tiny_qwen3(path, **shapes)
    mx.clear_cache()  # the build's buffers would otherwise stay in MLX's cache
    return path, f"built in {time.perf_counter() - t0:.1f} s"


def write_prompts(path: Path, rows: int = 8) -> Path:
    with path.open("w") as f:
        for k in range(rows):
            text = f"{k}: " + PROMPT_WORDS * 2
            f.write(json.dumps({"prompt": text[:PROMPT_CHARS]}) + "\n")
    return path


def make_run(args: argparse.Namespace, model: Path, data: Path, output: Path) -> Run:
    cfg = resolve(
        None,
        model=str(model),
        data=str(data),
        output_dir=str(output),
        overwrite=True,
        num_generations=args.generations,
        prompts_per_step=args.prompts,
        max_completion_length=args.completion_length,
        lora_rank=args.rank,
        lora_alpha=2.0 * args.rank,
        beta=args.beta,
        temperature=1.0,
        max_steps=args.warmup + args.steps,
        save_steps=0,
        rewards=[],
    )
    run = setup(cfg, [even_share])
    # No EOS: every completion runs to max_completion_length, so every step
    # samples B x G x T tokens. rollout() handles an empty EOS list.
    run.lm.eos_ids = []
    return run


def measure(run: Run, warmup: int, steps: int) -> list[dict[str, float]]:
    """Run warm-up then measured train_steps; return the measured steps' figures."""
    n = run.cfg.prompts_per_step * run.cfg.num_generations
    rows = []
    for step in range(warmup + steps):
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        metrics, _ = train_step(run, step)
        elapsed = time.perf_counter() - t0
        row = {key: float(metrics[key]) for _, key, _ in COLUMNS if key in metrics}
        row["time/step"] = elapsed
        row["time/other"] = elapsed - sum(row[k] for k in PHASES)
        row["completion_tokens"] = metrics["completions/mean_length"] * n
        row["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        label = "warm-up" if step < warmup else f"step {step - warmup + 1}"
        print(table_row(label, row), flush=True)
        if step >= warmup:
            rows.append(row)
    return rows


def table_row(label: str, row: dict[str, float]) -> str:
    cells = [fmt.format(row[key]).rjust(max(len(name), 7)) for name, key, fmt in COLUMNS]
    return f"{label:<8} | " + " | ".join(cells)


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": mlx_grpo._backend.openblas_path or "reference BLAS",
    }


def describe(run: Run, args: argparse.Namespace, how: str, t_setup: float) -> dict[str, Any]:
    """Print what is measured, where; return it as a dict for the JSON report."""
    cfg, model = run.cfg, run.lm.model
    host = machine()
    info = {
        "model": "tiny (TINY shapes)" if args.quick else "Qwen3-0.6B shapes, random weights",
        "dtype": str(tree_flatten(model.parameters())[0][1].dtype).removeprefix("mlx.core."),
        "total_parameters": total_count(model),
        "trainable_parameters": trainable_count(model),
        "prompt_tokens": len(run.rows[0].prompt_ids),
        "prompts_per_step": cfg.prompts_per_step,
        "num_generations": cfg.num_generations,
        "max_completion_length": cfg.max_completion_length,
        "lora_rank": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_modules": len(run.lora_paths),
        "beta": cfg.beta,
        "warmup_steps": args.warmup,
        "measured_steps": args.steps,
        "machine": host,
    }
    print(f"machine    {host['platform']} | {host['cpu_count']} CPUs | {host['device']}")
    print(f"BLAS       {host['blas']} | mlx {host['mlx']} | python {host['python']}")
    print(
        f"model      {info['model']}, {info['total_parameters']:,} parameters, "
        f"{info['dtype']} | {how} | setup {t_setup:.1f} s"
    )
    print(
        f"LoRA       r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on {info['lora_modules']} "
        f"modules | trainable parameters {info['trainable_parameters']:,}"
    )
    print(
        f"rollout    B={cfg.prompts_per_step} prompts x G={cfg.num_generations} | prompt "
        f"{info['prompt_tokens']} tokens | completion {cfg.max_completion_length} tokens "
        f"(no EOS) | temperature {cfg.temperature:g} | beta {cfg.beta:g}"
    )
    return info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlx-grpo-bench-") as tmp:
        tmp = Path(tmp)
        root = args.cache_dir.expanduser() if args.cache_dir else tmp
        model, how = model_dir(root, args.quick)
        t0 = time.perf_counter()
        run = make_run(args, model, write_prompts(tmp / "prompts.jsonl"), tmp / "run")
        info = describe(run, args, how, time.perf_counter() - t0)

        header = f"{'':<8} | " + " | ".join(name.rjust(7) for name, _, _ in COLUMNS)
        print(f"\n{header}\n{'-' * len(header)}")
        rows = measure(run, args.warmup, args.steps)
        print("-" * len(header))

    med = medians(rows)
    peak = max(r["peak_memory_gb"] for r in rows)
    print(table_row("median", med))
    print(
        f"\nmedian over {len(rows)} steps: step {med['time/step']:.2f} s | "
        f"rollout {med['time/rollout']:.2f} s, reference {med['time/reference']:.2f} s, "
        f"update {med['time/update']:.2f} s, other {med['time/other']:.2f} s | "
        f"rollout {med['tokens_per_second']:.1f} tok/s | peak memory {peak:.2f} GB"
    )
    if args.json:
        result = {"median": med, "peak_memory_gb": peak, "steps": rows, **info}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
