"""Data-parallel runs: two processes on this machine over MLX's ring backend.

Each test starts real processes, through `mlx.launch` as users do or directly
with the environment a launcher sets (MLX_RANK, MLX_HOSTFILE), so one of them
can be killed or frozen on purpose.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import cli_flags

from mlx_grpo.core import checkpoint
from mlx_grpo.core.trainer import train

BIN = Path(sys.executable).parent
LAUNCH, CLI = BIN / "mlx.launch", BIN / "mlx-grpo"
VOLATILE = ("time/", "memory/", "peak_memory_gb", "tokens_per_second")
EXACT = ("step", "epoch", "reward", "rewards/", "frac_reward_zero_std", "completions/")


def free_ports(n: int) -> int:
    """A port p with p .. p + n - 1 free on localhost (the ring listens on one per rank)."""
    rng = np.random.default_rng()
    for _ in range(100):
        base = int(rng.integers(20000, 60000))
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


@contextmanager
def launched(rest: list[str], cwd: Path, log: Path, n: int = 2) -> Iterator[subprocess.Popen]:
    """`mlx.launch --backend ring -n N REST` on free ports, output to `log`; killed on exit."""
    command = [str(LAUNCH), "--backend", "ring", "-n", str(n), "--starting-port"]
    with open(log, "w") as out:
        # stdin stays an open pipe: the launcher forwards stdin and spins on a closed one
        proc = subprocess.Popen(
            [*command, str(free_ports(n)), *rest],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=out,
            cwd=cwd,
        )
        try:
            yield proc
        finally:
            proc.kill()
            proc.stdin.close()


def launch(args: list[str], cwd: Path, timeout: float = 300) -> str:
    """`mlx.launch ... -- mlx-grpo train ARGS` on 2 processes; its stdout and stderr together."""
    log = cwd / f"launch-{time.monotonic_ns()}.log"
    with launched(["--", str(CLI), "train", *args], cwd, log) as proc:
        proc.wait(timeout=timeout)
    return log.read_text(errors="replace")


def start_processes(args: list[str], cwd: Path, n: int = 2) -> list[subprocess.Popen]:
    """`mlx-grpo train ARGS` as ranks 0 .. n-1 of a ring, started as mlx.launch starts them."""
    port = free_ports(n)
    hosts = cwd / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
    procs = []
    for rank in range(n):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)}
        out = open(cwd / f"rank{rank}.log", "w")
        command = [str(CLI), "train", *args]
        procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=out, cwd=cwd))
    return procs


def wait_for_steps(run_dir: Path, steps: int, procs: list, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert all(p.poll() is None for p in procs), "a process ended early"
        time.sleep(0.1)
    raise AssertionError(f"fewer than {steps} steps in {timeout} s")


def adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run_dir / "adapters.safetensors")).items()}


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def assert_same_training(one: Path, two: Path) -> None:
    """Same adapter (float32 reordering tolerance), completions and metrics."""
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    # Adam turns float32 rounding in near-zero gradients into small weight differences:
    # splitting one process's batch into micro-batches moves the weights by ~5e-5 too.
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=5e-4, err_msg=k)
    moved = max(np.abs(v).max() for k, v in a.items() if k.endswith("lora_b"))
    assert moved > 0.02  # the tolerance is far below what training changed
    samples_a, samples_b = records(one / "completions.jsonl"), records(two / "completions.jsonl")
    assert [(s["prompt"], s["completion"], s["rewards"]) for s in samples_a] == [
        (s["prompt"], s["completion"], s["rewards"]) for s in samples_b
    ]
    metrics_a, metrics_b = records(one / "metrics.jsonl"), records(two / "metrics.jsonl")
    assert len(metrics_a) == len(metrics_b)  # process 1 wrote no lines of its own
    for ma, mb in zip(metrics_a, metrics_b):
        assert ma.keys() == mb.keys()
        for key, value in ma.items():
            if key.startswith(VOLATILE) or value is None:
                continue
            if key.startswith(EXACT) or key == "num_tokens":
                assert mb[key] == value, key
            else:
                assert mb[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key


def test_two_processes_train_like_one_with_twice_the_prompts(quick_settings, tmp_path):
    settings = {
        **quick_settings,
        "max_steps": 3,
        "beta": 0.04,  # reference pass, KL metric
        "num_iterations": 2,  # pi_old, clipping
        "scale_rewards": "batch",  # std over both processes' rows
    }
    one, two = tmp_path / "one", tmp_path / "two"
    train(**{**settings, "prompts_per_step": 4, "output_dir": str(one)}, show_progress=False)
    output = launch(
        cli_flags({**settings, "prompts_per_step": 2, "output_dir": str(two)}), tmp_path
    )
    assert "2 processes x 2 prompts x 4 completions per step = 4 prompts" in output
    assert output.count("adapter saved in") == 1, output  # printed by process 0 only
    assert "Error" not in output, output
    assert_same_training(one, two)


def test_a_distributed_run_resumes_and_matches_one_process(quick_settings, tmp_path):
    # bnpo normalises per micro-batch: one process with 2 micro-batches has exactly
    # the two processes' batches as its micro-batches.
    settings = {**quick_settings, "loss_type": "bnpo", "save_steps": 2, "max_steps": 4}
    one, two = tmp_path / "one", tmp_path / "two"
    single = {**settings, "prompts_per_step": 4, "gradient_accumulation_steps": 2}
    train(**{**single, "output_dir": str(one)}, show_progress=False)
    flags = cli_flags({**settings, "prompts_per_step": 2, "output_dir": str(two)})
    launch([*flags, "--max-steps", "2"], tmp_path)
    assert len(records(two / "metrics.jsonl")) == 2
    assert checkpoint.path(two, 2).is_dir()
    output = launch(["--resume", str(two), "--max-steps", "4"], tmp_path)
    assert f"resumed at step 2 from {checkpoint.path(two, 2)}" in output, output
    assert_same_training(one, two)


def test_resuming_with_another_process_count_says_so(quick_settings, tmp_path, capsys):
    run_dir = tmp_path / "run"
    launch(cli_flags({**quick_settings, "output_dir": str(run_dir), "max_steps": 1}), tmp_path)
    train(resume=str(run_dir), max_steps=2, show_progress=False)  # one process now
    assert "the run used 2 process(es), now 1: each step now takes 1 x 2" in capsys.readouterr().out
    assert len(records(run_dir / "metrics.jsonl")) == 2


@pytest.fixture
def long_run(quick_settings, tmp_path):
    settings = {**quick_settings, "max_steps": 10_000, "save_steps": 0}
    return cli_flags({**settings, "distributed_timeout": 5}), tmp_path / "run"


def stopped_step(log: str) -> int:
    found = re.search(r"checkpoint of step (\d+) in", log)
    assert found, log
    return int(found.group(1))


def test_a_killed_process_ends_the_others_with_a_checkpoint(long_run, tmp_path):
    args, run_dir = long_run
    procs = start_processes(args, tmp_path)
    try:
        wait_for_steps(run_dir, 2, procs)
        procs[1].kill()
        code = procs[0].wait(timeout=60)  # bounded: no hang
    finally:
        for p in procs:
            p.kill()
    log = (tmp_path / "rank0.log").read_text()
    assert code == 1, log
    assert "Error (process 0 of 2): another process of this distributed run stopped" in log
    assert f"mlx-grpo train --resume {run_dir}" in log
    step = stopped_step(log)
    assert step >= 2 and checkpoint.verify(checkpoint.path(run_dir, step)) is None


def test_a_frozen_process_ends_the_others_after_the_timeout(long_run, tmp_path):
    args, run_dir = long_run
    procs = start_processes(args, tmp_path)
    try:
        wait_for_steps(run_dir, 2, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)  # alive, sockets open, never answering
        started = time.monotonic()
        code = procs[0].wait(timeout=60)
        waited = time.monotonic() - started
    finally:
        for p in procs:
            p.kill()
    log = (tmp_path / "rank0.log").read_text()
    assert code == 1, log
    assert waited >= 4, log  # it gave the others distributed_timeout (5 s)
    assert "process 0 of 2: waited 5 s for the other processes" in log
    step = stopped_step(log)  # the watchdog let process 0 save first
    assert step >= 2 and checkpoint.verify(checkpoint.path(run_dir, step)) is None


def _child_with_rank(parent: int, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"MLX_RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the launched process in /proc")
def test_killing_a_process_under_mlx_launch_ends_the_run(long_run, tmp_path):
    args, run_dir = long_run
    log = tmp_path / "launch.log"
    with launched(["--", str(CLI), "train", *args], tmp_path, log) as launcher:
        wait_for_steps(run_dir, 2, [launcher])
        victim = _child_with_rank(launcher.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        launcher.wait(timeout=60)  # bounded: the launcher and process 0 both end
    text = log.read_text(errors="replace")
    step = stopped_step(text)  # process 0 saved its last completed step on the way out
    assert checkpoint.verify(checkpoint.path(run_dir, step)) is None


COLLECTIVES = """
import json, sys
import mlx_grpo
import mlx.core as mx, numpy as np
from mlx_grpo.core.distributed import connect

peers = connect()
r = peers.rank
mine = {"b": mx.full((3,), float(r + 1)), "a": mx.array([7 + r], dtype=mx.uint64)}
if r:  # another dict order on the other process
    mine = dict(reversed(list(mine.items())))
shared = peers.broadcast(mine, "test")
sums = peers.sum({"x": mx.array([1.0, 2.0]) * (r + 1), "n": mx.array([r + 1], mx.int32)}, "t")
rows = peers.gather(np.array([[1 / 3 + r, np.nan]]), "test")
try:
    peers.check_same({"data": "same everywhere", "model": f"model of {r}"})
    refused = None
except ValueError as e:
    refused = str(e)
result = {
    "size": peers.size,
    "b": np.array(shared["b"]).tolist(), "a": np.array(shared["a"]).tolist(),
    "x": np.array(sums["x"]).tolist(), "n": np.array(sums["n"]).tolist(),
    "rows": rows.tobytes().hex(),
    "json": peers.gather_json({"rank": r, "text": "x" * (5 * r)}, "test"),
    "any": [peers.any(r == 1, "test"), peers.any(False, "test")],
    "settings": peers.broadcast_json({"from": r}, "test"),
    "refused": refused,
}
open(f"{sys.argv[1]}/rank{r}.json", "w").write(json.dumps(result))
"""


def test_collectives_give_every_process_the_same_exact_values(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    rest = ["--python", sys.executable, str(script), str(tmp_path)]
    with launched(rest, tmp_path, tmp_path / "launch.log") as proc:
        proc.wait(timeout=120)
    expected_rows = np.array([[1 / 3, np.nan], [1 / 3 + 1, np.nan]]).tobytes().hex()
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["size"] == 2
        assert got["b"] == [1.0, 1.0, 1.0] and got["a"] == [7]  # process 0's, by name
        assert got["x"] == [3.0, 6.0] and got["n"] == [3]
        assert got["rows"] == expected_rows  # float64 bytes, not rounded to float32
        assert got["json"] == [{"rank": 0, "text": ""}, {"rank": 1, "text": "xxxxx"}]
        assert got["any"] == [True, False]
        assert got["settings"] == {"from": 0}
        assert "differ in model (processes [1] vs process 0)" in got["refused"]
