"""Checkpoints, resume, signals and non-finite updates: a run loses nothing."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import cli_flags

from mlx_grpo.cli import main
from mlx_grpo.core import checkpoint, supervise
from mlx_grpo.core import trainer as trainer_mod
from mlx_grpo.core.adapters import Adapter
from mlx_grpo.core.trainer import TrainingStopped, train

VOLATILE = ("time/", "memory/", "peak_memory_gb", "tokens_per_second")


@pytest.fixture
def settings(quick_settings):
    # Dropout draws from the RNG in training too, so resuming must restore it exactly.
    return {**quick_settings, "lora_dropout": 0.1, "save_steps": 2, "show_progress": False}


def cli_args(settings, **changes):
    return cli_flags({**settings, **changes})


def adapter(run_dir):
    return {k: np.array(v) for k, v in mx.load(str(Path(run_dir) / "adapters.safetensors")).items()}


def steady_metrics(run_dir):
    """metrics.jsonl's steps without the timing and memory figures, which differ run to run
    (and without the records of --auto-resume restarts)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "event" not in r]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]


def assert_same_run(a, b):
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)  # bit for bit
    assert steady_metrics(a) == steady_metrics(b)


@pytest.fixture
def reference_run(settings, tmp_path):
    """The uninterrupted run every resumed one must equal: 8 steps."""
    out = tmp_path / "uninterrupted"
    train(**{**settings, "output_dir": str(out), "max_steps": 8})
    return out


def spawn(args, tmp_path, prelude=""):
    """`mlx-grpo train ARGS` in a new Python process (optionally after `prelude`)."""
    code = f"{prelude}\nimport sys\nfrom mlx_grpo.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )


def wait_for_steps(run_dir, steps, proc, timeout=120):
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{steps} steps not reached in {timeout} s")


def resume(run_dir, **changes):
    result = CliRunner().invoke(main, ["train", "--resume", str(run_dir), *cli_args(changes)])
    assert result.exit_code == 0, result.output
    return result


# --------------------------------------------------------------------------- resume


def test_run_stopped_and_resumed_equals_uninterrupted_run(settings, reference_run, tmp_path):
    out = tmp_path / "resumed"
    train(**{**settings, "output_dir": str(out), "max_steps": 3})
    assert checkpoint.latest(out).step == 3
    train(resume=out, max_steps=8, show_progress=False)
    assert_same_run(reference_run, out)


def test_adaptive_entropy_control_resumes_where_it_stopped(settings, tmp_path):
    """The coefficient and the last update's entropy travel in the checkpoint: a resumed
    run applies and moves the coefficient as the uninterrupted one does."""
    adaptive = {
        **settings,
        "use_adaptive_entropy": True,
        "entropy_coef": 0.01,
        "entropy_coef_delta": 0.02,
        "entropy_target": 100.0,  # above the tiny model's entropy: the coefficient rises
        "top_entropy_quantile": 0.5,
    }
    whole = tmp_path / "whole"
    train(**{**adaptive, "output_dir": str(whole), "max_steps": 5})
    resumed = tmp_path / "resumed"
    train(**{**adaptive, "output_dir": str(resumed), "max_steps": 3})
    train(resume=resumed, max_steps=5, show_progress=False)
    assert_same_run(whole, resumed)
    steps = steady_metrics(whole)
    assert [m["entropy_coef"] for m in steps] == pytest.approx([0.03, 0.05, 0.07, 0.09, 0.11])
    # applied from the second update on (none before it to measure the entropy)
    assert steps[0]["policy_loss"] == pytest.approx(steps[0]["loss"], abs=1e-9)
    assert all(abs(m["policy_loss"] - m["loss"]) > 1e-6 for m in steps[1:])


def test_a_run_with_several_updates_per_rollout_resumes_exactly(settings, tmp_path):
    """The rollout's shuffle and each update's learning rate depend only on the step."""
    several = {
        **settings,
        "gradient_accumulation_steps": 2,
        "steps_per_generation": 4,
        "warmup_steps": 3,  # the rate changes at every update, across the stop
    }
    whole = tmp_path / "whole"
    train(**{**several, "output_dir": str(whole), "max_steps": 4})
    resumed = tmp_path / "resumed"
    train(**{**several, "output_dir": str(resumed), "max_steps": 2})
    train(resume=resumed, max_steps=4, show_progress=False)
    assert_same_run(whole, resumed)


def test_a_run_with_dynamic_sampling_resumes_exactly(settings, tmp_path):
    """Its extra rollout rounds draw prompts and noise from the checkpointed state."""
    dynamic = {**settings, "rewards": ["test_dynamic_sampling:mixed"], "dynamic_sampling": True}
    whole = tmp_path / "whole"
    steps = train(**{**dynamic, "output_dir": str(whole), "max_steps": 4}).metrics
    assert max(m["dynamic_sampling/rounds"] for m in steps) > 1
    resumed = tmp_path / "resumed"
    train(**{**dynamic, "output_dir": str(resumed), "max_steps": 2})
    train(resume=resumed, max_steps=4, show_progress=False)
    assert_same_run(whole, resumed)


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(settings, reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = spawn(cli_args(settings, output_dir=out, max_steps=8), tmp_path)
    wait_for_steps(out, 5, proc)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert 4 <= checkpoint.latest(out).step < 8
    resume(out)
    assert_same_run(reference_run, out)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(
    settings, reference_run, tmp_path
):
    out = tmp_path / "killed-in-save"
    # Kill the process after the step-4 checkpoint's adapter is written, before the rest.
    prelude = (
        "import os, signal\n"
        "from mlx_grpo.core import checkpoint\n"
        "real = checkpoint.fsync\n"
        "def fsync(path):\n"
        "    if 'step-000004' in str(path) and path.name == 'optimizer.safetensors':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(path)\n"
        "checkpoint.fsync = fsync\n"
    )
    proc = spawn(cli_args(settings, output_dir=out, max_steps=8), tmp_path, prelude)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    root = out / checkpoint.CHECKPOINTS
    partial = [p.name for p in root.iterdir() if p.name.startswith(".partial-step-000004")]
    assert partial and (root / partial[0] / "adapters.safetensors").exists()
    resumed = resume(out)
    assert "resumed at step 2" in resumed.output  # the half-written step 4 is not taken
    assert f"not used: {partial[0]}: half written" in resumed.output
    assert not any(p.name.startswith(".partial") for p in root.iterdir())  # and is cleaned up
    assert_same_run(reference_run, out)


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(settings, reference_run, tmp_path):
    out = tmp_path / "interrupted"
    proc = spawn(cli_args(settings, output_dir=out, max_steps=8, save_steps=0), tmp_path)
    wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert f"Resume with: mlx-grpo train --resume {out}" in err
    saved = checkpoint.latest(out)
    assert 3 <= saved.step < 8  # save_steps=0: only the interrupt wrote it
    assert f"checkpoint of step {saved.step}" in err
    assert "Traceback" not in err
    resume(out)
    assert_same_run(reference_run, out)


def test_sigterm_saves_a_checkpoint_too(settings, tmp_path):
    out = tmp_path / "terminated"
    proc = spawn(cli_args(settings, output_dir=out, max_steps=50, save_steps=0), tmp_path)
    wait_for_steps(out, 2, proc)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err and "--resume" in err
    assert checkpoint.latest(out).step >= 2


# --------------------------------------------------------------------------- --auto-resume


def child_of(proc, timeout=60):
    """The pid of `proc`'s child process (the supervised training run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        if found.stdout.split():
            return int(found.stdout.split()[0])
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the supervisor started no training process")


def test_auto_resume_survives_kills_at_random_moments_and_ends_as_if_never_killed(
    settings, reference_run, tmp_path
):
    out = tmp_path / "supervised"
    args = cli_args(settings, output_dir=out, max_steps=8)
    proc = spawn([*args, "--auto-resume", "3"], tmp_path)
    rng = random.Random(7)
    killed = []
    for least in (3, 5):  # after a checkpoint exists (save_steps=2), at a random moment
        child = child_of(proc)
        wait_for_steps(out, least, proc)
        time.sleep(rng.uniform(0.0, 0.1))  # steps of the tiny model take ~0.1 s
        os.kill(child, signal.SIGKILL)
        killed.append(child)
        while child_of(proc) == child:  # the supervisor reaps it and starts the next
            time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_same_run(reference_run, out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    restarts = [r for r in map(json.loads, lines) if r.get("event") == "restart"]
    assert [(r["restart"], r["cause"], r["error"]) for r in restarts] == [
        (1, "crash", "killed by SIGKILL"),
        (2, "crash", "killed by SIGKILL"),
    ]
    assert all(2 <= r["step"] < 8 and r["step"] % 2 == 0 for r in restarts)
    assert "auto-resume 1/3: the run died (killed by SIGKILL)" in err
    assert "auto-resume 2/3" in err and "auto-resume 3/3" not in err


def test_auto_resume_gives_up_on_a_crash_before_any_checkpoint_and_passes_bad_input_on(
    settings, tmp_path
):
    out = tmp_path / "early"
    proc = spawn([*cli_args(settings, output_dir=out, max_steps=8), "--auto-resume", "2"], tmp_path)
    os.kill(child_of(proc), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "before its first checkpoint: not restarted" in err, err
    bad = CliRunner().invoke(
        main,
        ["train", *cli_args(settings, output_dir=out, num_generations=1), "--auto-resume", "2"],
    )
    assert bad.exit_code == 2 and "auto-resume" not in bad.output


def outcome_of(code, error=None, message=""):
    return supervise.Outcome(code, error, message)


@pytest.mark.parametrize(
    "outcome, expected",
    [
        (outcome_of(0), None),
        (outcome_of(2, "ValueError", "bad --data"), None),
        (outcome_of(130, "TrainingInterrupted"), None),
        (outcome_of(143, "TrainingInterrupted"), None),
        (outcome_of(1, "TrainingStopped", "3 non-finite updates"), None),
        (outcome_of(1, "RuntimeError", "[metal::malloc] Unable to allocate 4 GB"), "memory"),
        (
            outcome_of(-6, None, "[METAL] Command buffer execution failed: Insufficient Memory"),
            "memory",
        ),
        (outcome_of(-6, None, "kIOGPUCommandBufferCallbackErrorImpactingInteractivity"), "gpu"),
        (outcome_of(-9), "crash"),
        (outcome_of(1, "KeyError", "'x'"), "crash"),
    ],
)
def test_which_deaths_are_restarted(outcome, expected):
    assert supervise.cause(outcome) == expected


def test_a_memory_error_before_the_first_checkpoint_starts_over_and_later_ones_resume(
    tmp_path, monkeypatch
):
    out = tmp_path / "run"
    out.mkdir()
    saved = out / checkpoint.CHECKPOINTS / "step-000004"

    def latest(run_dir):
        if not saved.exists():
            raise checkpoint.CheckpointError("none written yet")
        return SimpleNamespace(step=4)

    monkeypatch.setattr(checkpoint, "latest", latest)
    tries, said = [], []
    memory = outcome_of(1, "RuntimeError", "[metal::malloc] Unable to allocate")

    def launch(how, max_memory):
        tries.append(how)
        (out / "config.yaml").write_text("the run's settings")
        if len(tries) == 2:  # the second try gets as far as a checkpoint at step 4
            saved.mkdir(parents=True)
        return memory if len(tries) < 4 else outcome_of(0)

    assert supervise.supervise(launch, out, 3, said.append) == 0
    assert tries == ["start", "again", "resume", "resume"]
    assert said[0].startswith("auto-resume 1/3: the run died (RuntimeError")
    assert "from the start" in said[0] and "checkpoint at step 4" in said[1]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["restart"], r["step"], r["cause"]) for r in records] == [
        (1, 0, "memory"),
        (2, 4, "memory"),
        (3, 4, "memory"),
    ]
    tries.clear()
    assert (
        supervise.supervise(lambda how, budget: tries.append(how) or memory, out, 1, said.append)
        == 1
    )
    assert tries == ["start", "resume"] and "no restart left of --auto-resume 1" in said[-1]


def test_checkpoints_keep_the_newest_and_hold_the_whole_state(settings, tmp_path):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "max_steps": 7, "save_total_limit": 2})
    names = sorted(p.name for p in (out / checkpoint.CHECKPOINTS).iterdir())
    assert names == ["step-000006", "step-000007"]  # every 2 steps and at the end, last 2 kept
    saved = checkpoint.latest(out)
    assert saved.state["step"] == 7 and len(saved.state["metrics"]) == 7
    assert saved.state["config"]["lora_rank"] == settings["lora_rank"]
    assert {"order", "queue", "rng", "epoch", "num_tokens"} <= saved.state.keys()
    assert int(saved.optimizer["step"].item()) == 7  # AdamW's own step counter
    np.testing.assert_array_equal(
        np.array(saved.adapter.lora_b[saved.adapter.modules[0]]),
        adapter(out)[f"{saved.adapter.modules[0]}.lora_b"],
    )


def test_a_checkpoint_that_fails_its_checksum_is_skipped_for_the_one_before(settings, tmp_path):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "max_steps": 4})
    newest = checkpoint.path(out, 4) / checkpoint.OPTIMIZER_FILE
    newest.write_bytes(newest.read_bytes()[:-8])  # truncated behind the writer's back
    saved = checkpoint.latest(out)
    assert saved.step == 2
    assert "optimizer.safetensors does not match its checksum" in saved.skipped[0]


@pytest.mark.parametrize(
    "change, named",
    [
        (["--lora-rank", "8"], "lora_rank 4 -> 8"),
        (["--lora-targets", "q_proj"], "lora_targets"),
        (["--learning-rate", "0.5"], "learning_rate"),
    ],
)
def test_resume_with_settings_that_cannot_continue_the_run_is_refused(
    settings, tmp_path, change, named
):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "max_steps": 2})
    before = (out / "metrics.jsonl").read_bytes()
    result = CliRunner().invoke(main, ["train", "--resume", str(out), *change])
    assert result.exit_code == 2
    assert named in result.output and "Start a new run" in result.output
    assert (out / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_a_model_whose_files_changed(settings, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "run"
    train(**{**settings, "model": str(model), "output_dir": str(out), "max_steps": 2})
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    result = CliRunner().invoke(main, ["train", "--resume", str(out)])
    assert result.exit_code == 2
    assert "model files" in result.output and "changed" in result.output


def test_resume_of_a_run_with_no_checkpoint_yet_says_so(settings, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    train(**{**settings, "output_dir": str(out), "max_steps": 1})
    for p in (out / checkpoint.CHECKPOINTS).iterdir():
        shutil.rmtree(p)
    result = CliRunner().invoke(main, ["train", "--resume", str(out)])
    assert result.exit_code == 2 and "holds no usable checkpoint" in result.output


# --------------------------------------------------------------------------- NaN


def poison(monkeypatch, bad_steps):
    """Make the loss NaN on the given steps (1-based), through its inputs: NaN advantages."""
    real, calls = trainer_mod.micro_batches, []

    def micro_batches(*args, **kwargs):
        calls.append(1)
        micro = real(*args, **kwargs)
        if len(calls) in bad_steps:
            for mb in micro:
                mb.advantages = mb.advantages * float("nan")
        return micro

    monkeypatch.setattr(trainer_mod, "micro_batches", micro_batches)


def test_a_nan_loss_skips_the_update_and_is_counted(settings, tmp_path, monkeypatch):
    poison(monkeypatch, {2})
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "max_steps": 3, "save_steps": 1})
    metrics = steady_metrics(out)
    assert [m["skipped_updates"] for m in metrics] == [0.0, 1.0, 0.0]
    assert metrics[1]["loss"] is None
    after_1 = Adapter.load(checkpoint.path(out, 1))
    after_2 = Adapter.load(checkpoint.path(out, 2))
    for p in after_1.modules:  # step 2 changed nothing
        np.testing.assert_array_equal(np.array(after_1.lora_b[p]), np.array(after_2.lora_b[p]))
    final = adapter(out)
    assert all(np.isfinite(v).all() for v in final.values())
    assert any(not np.array_equal(final[f"{p}.lora_b"], after_2.lora_b[p]) for p in after_2.modules)


def test_consecutive_nan_updates_stop_the_run_with_the_last_good_weights(
    settings, tmp_path, monkeypatch
):
    poison(monkeypatch, set(range(2, 100)))
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="3 updates in a row had a NaN or Inf"):
        train(
            **{
                **settings,
                "output_dir": str(out),
                "max_steps": 10,
                "save_steps": 1,
                "save_total_limit": 0,
            },
            max_nonfinite_updates=3,
        )
    assert len(steady_metrics(out)) == 4  # step 1 good, steps 2-4 skipped, then stop
    saved = checkpoint.latest(out)
    assert saved.step == 4
    good = Adapter.load(checkpoint.path(out, 1))
    for p in good.modules:
        np.testing.assert_array_equal(np.array(saved.adapter.lora_a[p]), np.array(good.lora_a[p]))
        assert np.isfinite(np.array(saved.adapter.lora_b[p])).all()


def test_nan_stop_in_the_cli_exits_1_with_the_reason(settings, tmp_path, monkeypatch):
    poison(monkeypatch, set(range(1, 100)))
    out = tmp_path / "run"
    args = cli_args(settings, output_dir=out, max_steps=5, max_nonfinite_updates=2)
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 1
    assert "2 updates in a row had a NaN or Inf" in result.output and "--resume" in result.output
    assert not (out / "adapters.safetensors").exists()  # no final adapter from a failed run
    assert os.path.isdir(checkpoint.path(out, 2))


def test_a_second_sigint_exits_at_once_without_waiting_for_the_save(settings, tmp_path):
    out = tmp_path / "impatient"
    # Saving takes "forever" here, so only the second Ctrl-C can end the process.
    prelude = (
        "import time\n"
        "from mlx_grpo.core import checkpoint\n"
        "checkpoint.write = lambda *a, **k: time.sleep(600)\n"
    )
    args = cli_args(settings, output_dir=out, max_steps=50, save_steps=0)
    proc = spawn(args, tmp_path, prelude)
    wait_for_steps(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # still "saving"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 128 + signal.SIGINT
    assert "SIGINT again: exiting without saving" in err


def test_an_error_mid_run_saves_the_last_completed_step(settings, tmp_path):
    calls = []

    def breaks_at_step_3(prompts, completions, completion_ids, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("reward server went away")
        return [0.5] * len(completions)

    out = tmp_path / "run"
    run = {**settings, "rewards": [], "output_dir": str(out), "max_steps": 6, "save_steps": 0}
    with pytest.raises(ValueError, match="reward server went away"):
        train(**run, reward_funcs=[breaks_at_step_3])
    assert checkpoint.latest(out).step == 2
    assert len(steady_metrics(out)) == 2


OLD_RUN = Path(__file__).parent / "data" / "run-0.1"


def test_a_run_folder_written_by_mlx_grpo_0_1_resumes_as_if_never_stopped(
    quick_settings, tmp_path, monkeypatch
):
    # tests/data/run-0.1: two steps of the tiny model (quick_settings, seed 7), written by
    # mlx-grpo 0.1 with the flat package layout (its reward spec names mlx_grpo.toy), with
    # relative paths so that it resumes anywhere.
    from mlx_grpo.tasks.toy import build_tiny_qwen3, write_toy_task

    monkeypatch.chdir(tmp_path)
    build_tiny_qwen3("model", init_std=0.3)
    write_toy_task("data.jsonl", rows=16)
    shutil.copytree(OLD_RUN, "run")
    assert "mlx_grpo.toy:allowed_share" in Path("run/config.yaml").read_text()
    train(resume="run", max_steps=3, show_progress=False)
    here = dict(model="model", data="data.jsonl", output_dir="fresh", seed=7, max_steps=3)
    train(**{**quick_settings, **here}, show_progress=False)
    assert len(steady_metrics("run")) == 3
    assert steady_metrics("run")[:2] == steady_metrics(OLD_RUN)
    # The folder's two steps were computed on another machine, whose BLAS may round
    # differently (1e-7): equal up to that, where a wrongly restored optimizer, random
    # stream or prompt order would differ in the first digits.
    fresh, resumed = adapter("fresh"), adapter("run")
    assert fresh.keys() == resumed.keys()
    for k in fresh:
        np.testing.assert_allclose(resumed[k], fresh[k], rtol=1e-4, atol=1e-5, err_msg=k)
    last, again = steady_metrics("fresh")[2], steady_metrics("run")[2]
    assert last.keys() == again.keys()
    for k, v in last.items():
        if isinstance(v, float):
            assert again[k] == pytest.approx(v, rel=1e-3, abs=1e-5), k
        else:
            assert again[k] == v, k


def test_after_a_memory_error_the_next_try_gets_a_budget_below_the_dead_plan(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(checkpoint, "latest", lambda run_dir: SimpleNamespace(step=3))
    oom = supervise.Outcome(1, "RuntimeError", "[metal::malloc] Unable to allocate", 5 * 10**9)
    crash = supervise.Outcome(-9)
    outcomes, tries, said = [oom, crash, oom, outcome_of(0)], [], []

    def launch(how, max_memory):
        tries.append((how, max_memory))
        return outcomes[len(tries) - 1]

    assert supervise.supervise(launch, out, 3, said.append) == 0
    # 80% of the 5 GB plan; a crash keeps that budget; the next memory error shrinks again
    assert tries == [("start", None), ("resume", 4 * 10**9), ("resume", 4 * 10**9)] + [
        ("resume", 4 * 10**9)
    ]
    assert "with a smaller memory plan (max_memory 4.00 GB)" in said[0]
    assert "smaller memory plan" not in said[1]


def test_the_cli_passes_the_smaller_budget_to_the_resumed_try(tmp_path, monkeypatch):
    from mlx_grpo import cli

    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(checkpoint, "latest", lambda run_dir: SimpleNamespace(step=2))
    jobs = []

    def child(args):
        jobs.append(json.loads(args[1]))
        if len(jobs) == 1:
            return supervise.Outcome(1, "RuntimeError", "Insufficient Memory", 10**9)
        return outcome_of(0)

    monkeypatch.setattr(supervise, "run_child", child)
    job = {"given": {"max_steps": 5, "lora_rank": 4}, "config_file": None, "resume": None}
    job |= {"progress": False, "debug": False}
    assert cli._supervised(job, out, 2) == 0
    assert jobs[0]["given"] == job["given"]
    assert jobs[1]["resume"] == str(out)
    assert jobs[1]["given"] == {"max_steps": 5, "max_memory": f"{8 * 10**8}B"}
