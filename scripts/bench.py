"""Side-by-side GRPO step benchmark: mlx-grpo, mlx-lm-lora, and the hardware bound.

One run builds a random-weight model with Qwen3-0.6B's exact shapes and, for
each configuration, times our GRPO step and (when `mlx-lm-lora` is installed)
its GRPO step on the same model, prompts and settings. Each side runs in its
own worker process, so its peak memory is its own; the two take turns, step
by step, so both see the machine in the same state.

    A  the peer's defaults: 1 prompt,  G = 4,  64 completion tokens, beta 0.1
    B  TRL-like:            2 prompts, G = 8,  64 completion tokens, beta 0.1
    C  a real user's shape: 4 prompts, G = 16, up to 256 tokens ending at varied
       lengths, beta 0.1 (ours and the bound; the peer with --peer-everywhere)

Both sides: float32, LoRA r = 8 (alpha 16) on the seven projections of every
layer, temperature 1 without filters, 96-token prompts, one AdamW step per
rollout. In A and B no token ends a completion (every one runs to 64 tokens);
in C every 128th token id does, and the random model's nearly flat
next-token distribution makes the lengths spread (about 128 on average, some
cut at 256). The peer keeps a second copy of the model as its reference, as
its CLI does.

Per configuration it prints per-step medians (rollout, reference, update,
step), rollout tokens/s, peak memory (MLX's peak, our memory plan's estimate
of it, and the worker's maximum RSS), a hardware bound for the same work,
and the ratios: the peer's time over ours (the speed-up), our memory over
the peer's, our time over the bound's and our memory estimate over the
measured peak, phase by phase. The bound comes from two probes run on the spot: a
float32 GEMM (the best of MLX's and NumPy's) and the memory bandwidth of a
matrix-vector product over a matrix 16x larger than the last-level cache.
The bound takes each phase at the slower of its arithmetic and its weight
reads; the backward pass of a frozen-base LoRA model costs one more forward
(input gradients only). It prints figures only and asserts nothing about
them.

Run:
    python scripts/bench.py                          # A, B (with the peer) and C
    python scripts/bench.py --config B --steps 2
    python scripts/bench.py --cache-dir ~/.cache/mlx-grpo-bench --json bench.json
    python scripts/bench.py --quick                  # tiny model, every config, for CI
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlx_grpo  # first: loads OpenBLAS before mlx.core is imported (see mlx_grpo.core.backend)

# isort: split
import mlx.core as mx
import numpy as np

from mlx_grpo.tasks.toy import QWEN3_0_6B, TINY, build_tiny_qwen3

# With the byte tokenizer's chat template (19 tokens around the user text),
# 77 ASCII characters make a 96-token prompt.
PROMPT_CHARS = 77
PROMPT_WORDS = "count the vowels in this sentence and reply with the number only please "
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEER = "mlx_lm_lora"
PEER_NAME = "mlx-lm-lora"


@dataclass(frozen=True)
class Spec:
    """One benchmark configuration, the same for both sides."""

    name: str
    prompts: int  # B
    generations: int  # G
    completion_length: int  # T
    beta: float
    rank: int = 8
    micro_batches: int = 1  # ours: the update in this many accumulated micro-batches
    # 0: no EOS, every completion runs to T. k: every k-th token id ends a completion; the
    # random model's next-token distribution is nearly flat, so lengths vary (mean about k).
    stop_every: int = 0
    peer: bool = True  # False: too slow for the peer to run here unless --peer-everywhere

    def eos_ids(self, vocab_size: int) -> list[int]:
        return list(range(0, vocab_size, self.stop_every)) if self.stop_every else []

    @property
    def sequences(self) -> int:
        return self.prompts * self.generations


CONFIGS = {
    "A": Spec("A", prompts=1, generations=4, completion_length=64, beta=0.1),
    # Two micro-batches: the same gradient, half the update's activation memory.
    "B": Spec("B", prompts=2, generations=8, completion_length=64, beta=0.1, micro_batches=2),
    # A real user's shape: completions that end at varied lengths.
    "C": Spec(
        "C",
        prompts=4,
        generations=16,
        completion_length=256,
        beta=0.1,
        micro_batches=4,
        stop_every=128,
        peer=False,
    ),
}

# (label, key, format) of the result table.
COLUMNS = (
    ("rollout s", "rollout", "{:.2f}"),
    ("ref s", "reference", "{:.2f}"),
    ("update s", "update", "{:.2f}"),
    ("step s", "step", "{:.2f}"),
    ("tok/s", "tokens_per_second", "{:.1f}"),
    ("peak GB", "peak_gb", "{:.2f}"),
    ("est GB", "estimated_gb", "{:.2f}"),
    ("rss GB", "rss_gb", "{:.2f}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 3; quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per side, not measured")
    p.add_argument("--quick", action="store_true", help="tiny model, 8 tokens: a smoke test")
    p.add_argument("--no-peer", action="store_true", help="measure mlx-grpo only")
    p.add_argument(
        "--peer-everywhere", action="store_true", help="run the peer on C too (hours on a CPU)"
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="build / reuse the model here")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=str, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


# --------------------------------------------------------------------------- model and data


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


def even_share(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Cheap reward that varies within a group: the share of even token ids.

    It reads ids, not text: most ids the random 152k-vocabulary model samples
    lie beyond the byte tokenizer and decode to nothing.
    """
    return [sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]


def text_length_reward(prompts, completions, answer, types=None, **kwargs) -> list[float]:
    """The peer's reward signature (text only): a cheap score that varies within a group."""
    return [float(len(c) % 5) for c in completions]


# --------------------------------------------------------------------------- workers


def _rss_gb() -> float:
    """The worker's maximum resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class Ours:
    """mlx-grpo's trainer: `trainer.setup`, then one `train_step` per step."""

    def __init__(self, spec: Spec, model: Path, data: Path, output: Path):
        from mlx_grpo.core import trainer
        from mlx_grpo.core.settings import resolve
        from mlx_grpo.core.trainer import setup

        cfg = resolve(
            None,
            model=str(model),
            data=str(data),
            output_dir=str(output),
            overwrite=True,
            num_generations=spec.generations,
            prompts_per_step=spec.prompts,
            max_completion_length=spec.completion_length,
            lora_rank=spec.rank,
            lora_alpha=2.0 * spec.rank,
            gradient_accumulation_steps=spec.micro_batches,
            lora_targets=list(TARGETS),
            beta=spec.beta,
            temperature=1.0,
            max_steps=10_000,
            save_steps=0,
            rewards=[],
        )
        self.run = setup(cfg, [even_share])
        self.run.lm.eos_ids = spec.eos_ids(self.run.lm.model.args.vocab_size)
        self.step_index = 0
        self.lengths: list[int] = []
        rollout = trainer._rollout

        def measured_rollout(*args):  # keeps the completions' lengths for the bound
            batch = rollout(*args)
            self.lengths = batch.lengths
            return batch

        trainer._rollout = measured_rollout

    def info(self) -> dict[str, Any]:
        from mlx_grpo.core.lora import total_count, trainable_count

        model = self.run.lm.model
        return {
            "prompt_ids": [r.prompt_ids for r in self.run.rows],
            "total_parameters": total_count(model),
            "trainable_parameters": trainable_count(model),
        }

    def step(self) -> dict[str, float]:
        from mlx_grpo.core.trainer import train_step

        t0 = time.perf_counter()
        metrics, _ = train_step(self.run, self.step_index)
        elapsed = time.perf_counter() - t0
        self.step_index += 1
        tokens = metrics["completions/mean_length"] * self.run.cfg.prompts_per_step
        tokens *= self.run.cfg.num_generations
        return {
            "rollout": metrics["time/rollout"],
            "reference": metrics["time/reference"],
            "update": metrics["time/update"],
            "step": elapsed,
            "tokens": tokens,
            "tokens_per_second": tokens / metrics["time/rollout"],
            "peak_gb": metrics["peak_memory_gb"],  # train_step takes the peak phase by phase
            "estimated_gb": self.run.plan.peak / 1e9,  # the memory plan's estimate
            **{f"estimated_{k}_gb": getattr(self.run.plan, k) / 1e9 for k in MEMORY_PHASES},
            "rss_gb": _rss_gb(),
            **{f"{k}_gb": metrics[f"memory/{k}_gb"] for k in MEMORY_PHASES},
            "lengths": self.lengths,
        }


class Peer:
    """mlx-lm-lora's GRPO: `train_grpo` for one iteration per step, phases timed by wrapping."""

    def __init__(self, spec: Spec, model: Path, prompt_ids: list[list[int]], output: Path):
        import mlx.optimizers as optim
        from mlx_lm import load
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from mlx_lm_lora.trainer import grpo_trainer

        self.spec, self.g = spec, grpo_trainer
        self.model, self.tokenizer = load(str(model))
        self.tokenizer.eos_token_ids = set(spec.eos_ids(self.model.args.vocab_size))
        self.model.freeze()
        keys = [f"self_attn.{t}" for t in TARGETS[:4]] + [f"mlp.{t}" for t in TARGETS[4:]]
        lora = {"rank": spec.rank, "scale": 2.0, "dropout": 0.0, "keys": keys}
        linear_to_lora_layers(self.model, len(self.model.layers), lora)
        # The peer's CLI loads a second copy of the model as the reference.
        self.ref = load(str(model))[0].freeze() if spec.beta else None
        self.optimizer = optim.AdamW(learning_rate=1e-5)
        self.dataset = [(ids, [0], f"prompt {i}", "0") for i, ids in enumerate(prompt_ids)]
        self.args = grpo_trainer.GRPOTrainingArgs(
            batch_size=spec.prompts,
            iters=1,
            group_size=spec.generations,
            beta=spec.beta,
            epsilon=0.2,
            max_completion_length=spec.completion_length,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            steps_per_report=1,
            steps_per_save=10**9,
            adapter_file=str(output / "peer_adapters.safetensors"),
        )
        self.times: dict[str, float] = {}
        self.tokens = 0
        self._wrap()

    def _wrap(self) -> None:
        g, times = self.g, self.times
        generate, token_logps = g.generate_grpo, g._get_token_logps

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            completions, texts, indices = generate(*a, **kw)
            times["rollout"] += time.perf_counter() - t0
            self.tokens += sum(len(c) for c in completions)
            return completions, texts, indices

        def timed_logps(model, *a, **kw):
            if model is not self.ref:
                return token_logps(model, *a, **kw)
            t0 = time.perf_counter()
            out = token_logps(model, *a, **kw)
            mx.eval(out)  # the reference pass, forced here so it can be timed alone
            times["reference"] += time.perf_counter() - t0
            return out

        g.generate_grpo, g._get_token_logps = timed_generate, timed_logps

    def info(self) -> dict[str, Any]:
        return {"version": importlib.metadata.version("mlx-lm-lora")}

    def step(self) -> dict[str, float]:
        self.times.update(rollout=0.0, reference=0.0)
        self.tokens = 0
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        self.g.train_grpo(
            model=self.model,
            ref_model=self.ref,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            train_dataset=self.dataset,
            reward_funcs=[text_length_reward],
            args=self.args,
            end_answer_token="",
        )
        elapsed = time.perf_counter() - t0
        return {
            **self.times,
            "update": elapsed - self.times["rollout"] - self.times["reference"],
            "step": elapsed,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens / self.times["rollout"],
            "peak_gb": mx.get_peak_memory() / 1e9,
            "rss_gb": _rss_gb(),
        }


def worker_main(args: argparse.Namespace) -> None:
    """Serve steps: one JSON line per request on the real stdout, all chatter on stderr."""
    out = sys.stdout
    spec = Spec(**json.loads(args.spec))
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory() as tmp:
        if args.worker == "ours":
            side = Ours(spec, args.model, args.prompt_ids, Path(tmp) / "run")
        else:
            ids = json.loads(args.prompt_ids.read_text())
            side = Peer(spec, args.model, ids, Path(tmp))
        print(json.dumps({"info": side.info()}), file=out, flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            print(json.dumps(side.step()), file=out, flush=True)


class Worker:
    """A benchmark side running in its own process."""

    def __init__(self, side: str, spec: Spec, model: Path, extra: Path, log: Path):
        cmd = [sys.executable, __file__, "--worker", side, "--spec", json.dumps(asdict(spec))]
        cmd += ["--model", str(model), "--prompt-ids", str(extra)]
        self.side, self.log = side, log
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True
        )
        self.info = self._read()["info"]

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-3000:]
            raise SystemExit(f"the {self.side} worker stopped; its log ends with:\n{tail}")
        return json.loads(line)

    def step(self) -> dict[str, float]:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait(timeout=120)


# --------------------------------------------------------------------------- hardware bound


def probe_hardware() -> dict[str, float]:
    """Best float32 GEMM rate (FLOP/s) and matrix-vector read bandwidth (bytes/s) seen here."""

    def best(fn, repeats: int = 5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    n = 2048
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    gemm_mlx = 2 * n**3 / best(lambda: mx.eval(a @ b))
    an, bn = np.array(a), np.array(b)
    gemm_numpy = 2 * n**3 / best(lambda: an @ bn)
    # 512 MB, far beyond the last-level cache: every product streams it from memory.
    w = np.random.default_rng(0).standard_normal((131072, 1024), dtype=np.float32)
    x = np.ones(1024, dtype=np.float32)
    bandwidth = w.nbytes / best(lambda: w @ x)
    return {
        "gemm_flops": max(gemm_mlx, gemm_numpy),
        "gemm_mlx_flops": gemm_mlx,
        "gemm_numpy_flops": gemm_numpy,
        "bandwidth": bandwidth,
    }


def hardware_bound(
    shapes: dict, spec: Spec, prompt_len: int, hw: dict, lengths: list[int] | None = None
) -> dict[str, float]:
    """Seconds the step's work needs at the probed GEMM rate and bandwidth, phase by phase.

    `lengths` are the completions' lengths (default: every one runs to T); a completion
    costs nothing after its last token.
    """
    d, layers, v = shapes["hidden_size"], shapes["num_hidden_layers"], shapes["vocab_size"]
    q = shapes["num_attention_heads"] * shapes["head_dim"]
    kv = shapes["num_key_value_heads"] * shapes["head_dim"]
    body = layers * (d * q + 2 * d * kv + q * d + 3 * d * shapes["intermediate_size"])
    head = v * d
    weight_bytes = 4 * (body + head)
    gemm, bw = hw["gemm_flops"], hw["bandwidth"]
    b, n, p, t = spec.prompts, spec.sequences, prompt_len, spec.completion_length

    def attention(queries: int, context: float) -> float:  # QK^T and PV
        return 4 * layers * q * queries * context

    prefill = b * (2 * body * p + attention(p, p / 2)) + b * 2 * head
    lengths = lengths or [t] * n
    decode = 0.0
    for i in range(1, max(lengths)):  # token 0 comes from the prefill's logits
        rows = sum(length > i for length in lengths)
        flops = rows * (2 * body + 2 * head) + attention(rows, p + i)
        decode += max(weight_bytes / bw, flops / gemm)
    # Scoring: each prompt once per group, then the completions, head on completion tokens.
    tokens = sum(lengths)
    forward = 2 * body * (b * p + tokens) + 2 * head * tokens
    forward += sum(attention(length, p + length / 2) for length in lengths)
    out = {
        "rollout": max(weight_bytes / bw, prefill / gemm) + decode,
        "reference": forward / gemm if spec.beta else 0.0,
        "update": 2 * forward / gemm,  # forward + input-gradient backward
    }
    out["step"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- the run


def medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "lengths"}
    for key in [k for k in rows[0] if k.endswith("_gb")]:  # memory: the most any step took
        med[key] = max(r[key] for r in rows)
    return med


def table_row(label: str, row: dict[str, float]) -> str:
    cells = []
    for name, key, fmt in COLUMNS:
        cell = fmt.format(row[key]) if key in row else "-"
        cells.append(cell.rjust(max(len(name), 7)))
    return f"{label:<12} | " + " | ".join(cells)


PHASES = ("rollout", "reference", "update", "step")
MEMORY_PHASES = ("rollout", "reference", "update")
MEMORY = ("peak_gb", "rss_gb")


def ratio_rows(ours: dict[str, float], peer: dict[str, float] | None, bound: dict[str, float]):
    """(label, row) pairs: the peer's times over ours and our tokens/s over theirs (the
    speed-up, higher is better), our memory over theirs (lower is better), and our times
    over the bound's per phase (1.0 would be at the bound)."""
    rows = []
    if peer:
        speed = {k: peer[k] / ours[k] for k in PHASES if ours.get(k)}
        speed["tokens_per_second"] = ours["tokens_per_second"] / peer["tokens_per_second"]
        rows.append(("peer / ours", speed))
        rows.append(("mem ours/peer", {k: ours[k] / peer[k] for k in MEMORY if peer.get(k)}))
    rows.append(("ours / bound", {k: ours[k] / bound[k] for k in PHASES if bound.get(k)}))
    return rows


def memory_line(ours: dict[str, float]) -> str:
    """Our memory plan's estimate against the measured peak, phase by phase."""
    cells = [
        f"{k} {ours[f'estimated_{k}_gb']:.2f}/{ours[f'{k}_gb']:.2f} GB "
        f"({ours[f'estimated_{k}_gb'] / ours[f'{k}_gb']:.2f}x)"
        for k in MEMORY_PHASES
        if ours.get(f"{k}_gb")
    ]
    return "estimate / measured peak: " + ", ".join(cells)


def ratio_row(label: str, ratios: dict[str, float]) -> str:
    cells = []
    for name, key, _ in COLUMNS:
        cell = f"{ratios[key]:.2f}x" if key in ratios else "-"
        cells.append(cell.rjust(max(len(name), 7)))
    return f"{label:<12} | " + " | ".join(cells)


def run_config(spec: Spec, args, model: Path, data: Path, tmp: Path, with_peer: bool) -> dict:
    ours = Worker("ours", spec, model, data, tmp / f"ours-{spec.name}.log")
    ids_file = tmp / "prompt_ids.json"
    ids_file.write_text(json.dumps(ours.info["prompt_ids"]))
    peer = None
    if with_peer:
        peer = Worker("peer", spec, model, ids_file, tmp / f"peer-{spec.name}.log")
    sides = [("mlx-grpo", ours)] + ([(PEER_NAME, peer)] if peer else [])
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
    header = f"{'':<12} | " + " | ".join(name.rjust(7) for name, _, _ in COLUMNS)
    print(f"\n{header}\n{'-' * len(header)}", flush=True)
    try:
        for i in range(args.warmup + args.steps):
            for name, worker in sides:  # taking turns, step by step
                row = worker.step()
                label = f"{name[:8]} {'w' if i < args.warmup else i - args.warmup + 1}"
                print(table_row(label, row), flush=True)
                if i >= args.warmup:
                    rows[name].append(row)
    finally:
        for _, worker in sides:
            worker.close()
    med = {name: medians(r) for name, r in rows.items()}
    print("-" * len(header))
    for name in med:
        print(table_row(name, med[name]))
    return {
        "spec": asdict(spec),
        "medians": med,
        "steps": rows,
        "prompt_tokens": len(ours.info["prompt_ids"][0]),
        "trainable_parameters": ours.info["trainable_parameters"],
        "total_parameters": ours.info["total_parameters"],
        "peer": peer.info if peer else None,
    }


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": mlx_grpo.core.backend.openblas_path or "MLX's own BLAS",
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    specs = list(CONFIGS.values()) if args.config == "all" else [CONFIGS[args.config]]
    if args.quick:  # same phases, a few seconds each
        specs = [
            replace(s, completion_length=8, rank=4, stop_every=s.stop_every and 4) for s in specs
        ]
    with_peer = not args.no_peer and importlib.util.find_spec(PEER) is not None
    host = machine()
    print(f"machine    {host['platform']} | {host['cpu_count']} CPUs | {host['device']}")
    print(f"BLAS       {host['blas']} | mlx {host['mlx']} | python {host['python']}")
    hw = probe_hardware()
    gf = {k: v / 1e9 for k, v in hw.items()}
    print(
        f"probes     GEMM {gf['gemm_flops']:.0f} GFLOP/s (MLX {gf['gemm_mlx_flops']:.0f}, "
        f"NumPy {gf['gemm_numpy_flops']:.0f}) | bandwidth {gf['bandwidth']:.1f} GB/s"
    )
    if not with_peer:
        print("peer       not measured" + ("" if args.no_peer else f" ({PEER} is not installed)"))
    run = {"steps": args.steps, "warmup": args.warmup, "quick": args.quick}
    report: dict[str, Any] = {"machine": host, "probes": hw, "run": run, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="mlx-grpo-bench-") as tmp:
        tmp = Path(tmp)
        root = args.cache_dir.expanduser() if args.cache_dir else tmp
        model, how = model_dir(root, args.quick)
        shapes = json.loads((model / "config.json").read_text())
        data = write_prompts(tmp / "prompts.jsonl")
        kind = "tiny" if args.quick else "Qwen3-0.6B"
        print(f"model      {kind} shapes, random weights, float32 | {how}")
        for spec in specs:
            print(
                f"\nconfig {spec.name}   {spec.prompts} prompt(s) x G={spec.generations} | "
                f"{spec.completion_length} tokens | beta {spec.beta:g} | LoRA r={spec.rank} on "
                f"{len(TARGETS)} targets | ours: update in {spec.micro_batches} micro-batch(es) | "
                f"{args.warmup} warm-up + {args.steps} measured steps"
            )
            peer = with_peer and (spec.peer or args.peer_everywhere)
            result = run_config(spec, args, model, data, tmp, peer)
            bounds = [  # for each measured step's completion lengths
                hardware_bound(shapes, spec, result["prompt_tokens"], hw, row["lengths"])
                for row in result["steps"]["mlx-grpo"]
            ]
            bound = {k: statistics.median(b[k] for b in bounds) for k in bounds[0]}
            result["bound"] = bound
            print(table_row("bound", bound))
            med = result["medians"]
            for label, ratios in ratio_rows(med["mlx-grpo"], med.get(PEER_NAME), bound):
                print(ratio_row(label, ratios))
            print(memory_line(med["mlx-grpo"]))
            report["configs"][spec.name] = result
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
