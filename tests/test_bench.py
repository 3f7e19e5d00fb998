"""The side-by-side benchmark still runs end to end (its --quick mode, as in CI)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
HAS_PEER = importlib.util.find_spec("mlx_lm_lora") is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_quick_benchmark_measures_both_configurations_with_every_phase(report):
    stdout, result = report
    assert set(result["configs"]) == {"A", "B", "C"}
    for name, config in result["configs"].items():
        spec, ours = config["spec"], config["medians"]["mlx-grpo"]
        for phase in ("rollout", "reference", "update", "step"):
            assert ours[phase] > 0, (name, phase)  # beta 0.1: the reference pass runs
        assert ours["step"] >= ours["rollout"] + ours["reference"] + ours["update"]
        lengths = config["steps"]["mlx-grpo"][0]["lengths"]
        assert len(lengths) == spec["prompts"] * spec["generations"]
        assert ours["tokens"] == sum(lengths)
        if spec["stop_every"]:  # C: completions end at varied lengths
            assert len(set(lengths)) > 2 and max(lengths) <= spec["completion_length"]
        else:  # EOS is off, so every completion has exactly T tokens
            assert set(lengths) == {spec["completion_length"]}
        assert config["bound"]["step"] > 0
        assert config["trainable_parameters"] > 0
    assert "ours / bound" in stdout and "estimate / measured peak: rollout" in stdout


def test_quick_benchmark_probes_the_hardware(report):
    _, result = report
    probes = result["probes"]
    assert probes["gemm_flops"] >= max(probes["gemm_mlx_flops"], probes["gemm_numpy_flops"])
    assert probes["bandwidth"] > 1e8


@pytest.mark.skipif(not HAS_PEER, reason="mlx-lm-lora is not installed")
def test_quick_benchmark_runs_the_peer_on_the_same_work(report):
    stdout, result = report
    assert "mlx-lm-lora" not in result["configs"]["C"]["medians"]  # only with --peer-everywhere
    for config in (result["configs"][name] for name in "AB"):
        ours, peer = config["medians"]["mlx-grpo"], config["medians"]["mlx-lm-lora"]
        assert peer["tokens"] == ours["tokens"]
        assert peer["reference"] > 0 and peer["update"] > 0
    assert "peer / ours" in stdout and "mem ours/peer" in stdout


def test_the_readme_table_renders_a_report_with_its_ratios(report):
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_readme

    _, result = report
    table = bench_readme.section(result)
    assert table.startswith(bench_readme.START) and table.endswith(bench_readme.END)
    assert f"{result['probes']['gemm_flops'] / 1e9:.0f} GFLOP/s" in table
    for name, config in result["configs"].items():
        ours, bound = config["medians"]["mlx-grpo"], config["bound"]
        row = next(line for line in table.splitlines() if line.startswith(f"| {name}: "))
        assert f"| mlx-grpo | {ours['rollout']:.1f} s |" in row
        assert f"{ours['step'] / bound['step']:.1f}x |" in table  # ours / bound
        estimate = f"{ours['estimated_gb']:.2f} GB ({ours['estimated_gb'] / ours['peak_gb']:.2f}x)"
        assert estimate in table
        for phase in ("rollout", "reference", "update"):  # the plan's estimate, phase by phase
            assert ours[f"estimated_{phase}_gb"] >= ours[f"{phase}_gb"] > 0
        peer = config["medians"].get("mlx-lm-lora")
        if peer:  # memory is ours over the peer's, time the peer's over ours
            assert f"**{ours['peak_gb'] / peer['peak_gb']:.2f}x**" in table
            assert f"**{peer['step'] / ours['step']:.1f}x**" in table


def test_hardware_bound_adds_up_the_phases():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench

    shapes = {
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "vocab_size": 10,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "intermediate_size": 8,
    }
    spec = bench.Spec("X", prompts=1, generations=2, completion_length=3, beta=0.0)
    hw = {"gemm_flops": 1e3, "bandwidth": 1e12}  # compute-bound everywhere
    bound = bench.hardware_bound(shapes, spec, prompt_len=4, hw=hw)
    assert bound["reference"] == 0.0  # beta 0: no reference pass
    assert bound["update"] > bound["rollout"] > 0
    assert bound["step"] == pytest.approx(bound["rollout"] + bound["update"])
    # body: q, k, v, o (4 x 64) + gate, up, down (3 x 64) = 448 weights; head 80
    body, head = 448, 80
    forward = 2 * body * (4 + 2 * 3) + 4 * 8 * 2 * 3 * (4 + 1.5) + 2 * head * 2 * 3
    assert bound["update"] == pytest.approx(2 * forward / 1e3)
    # Completions that end early cost nothing after their end: the same as shorter ones.
    shorter = bench.hardware_bound(shapes, spec, prompt_len=4, hw=hw, lengths=[3, 1])
    assert shorter["update"] < bound["update"] and shorter["rollout"] < bound["rollout"]
    one = bench.Spec("Y", prompts=1, generations=1, completion_length=3, beta=0.0)
    alone = bench.hardware_bound(shapes, one, prompt_len=4, hw=hw)
    # Decoding [3, 1] is decoding one completion of 3: the second row left after its prefill.
    assert shorter["rollout"] == pytest.approx(alone["rollout"])


def test_the_agent_benchmark_times_episodes_with_one_tool_round(tmp_path):
    out = tmp_path / "agent.json"
    script = SCRIPT.with_name("bench_agent.py")
    command = [sys.executable, str(script), "--quick", "--steps", "1", "--generations", "4"]
    proc = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    for schedule in ("pause", "rejoin"):
        assert figures[schedule]["tools/call_frequency"] == 1.0  # one round per episode
    # first turns of unequal lengths: rows that rejoin at once finish in fewer decode steps
    assert figures["rejoin"]["decode_steps"] < figures["pause"]["decode_steps"]
    for side in ("plain", "pause", "rejoin"):
        assert all(figures[side][f"time/{p}"] > 0 for p in ("rollout", "update", "step"))
    assert "rejoin" in proc.stdout and "decode steps" in proc.stdout
