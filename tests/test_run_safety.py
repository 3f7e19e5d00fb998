"""Run folders are safe to resume: one process at a time, no writes through symlinks,
checkpoints and data checked before anything runs, logs and disks that fail midway."""

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlx_grpo.cli import main
from mlx_grpo.core import checkpoint, runfolder
from mlx_grpo.core.trainer import train


@pytest.fixture
def settings(quick_settings):
    return {**quick_settings, "save_steps": 2, "show_progress": False}


def resume(run_dir, *flags):
    return CliRunner().invoke(
        main, ["train", "--resume", str(run_dir), *flags], catch_exceptions=False
    )


def one_line(output):
    return " ".join(output.split())  # the terminal may wrap a long message


def own_data(toy_data, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(toy_data, data)
    return data


# --------------------------------------------------------------------------- lock


HOLD_LOCK = """
import sys, time
from mlx_grpo.core import runfolder
held = runfolder.lock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_folder_locked_by_another_process_is_refused_until_that_process_dies(
    settings, tmp_path
):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out)})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = resume(out, "--max-steps", "3")
        assert result.exit_code == 2
        message = one_line(result.output)
        assert f"is in use by process {holder.pid} on " in message and "(this machine)" in message
        fresh = CliRunner().invoke(
            main,
            ["train", "--output-dir", str(out), "--overwrite", "--model", settings["model"]],
            catch_exceptions=False,
        )
        assert fresh.exit_code == 2 and f"process {holder.pid}" in one_line(fresh.output)
    finally:
        holder.kill()  # as SIGKILL ends a run: its lock goes with it
        holder.wait()
    assert checkpoint.latest(out).step == 2  # the refused resumes changed nothing
    assert resume(out, "--max-steps", "3").exit_code == 0
    assert checkpoint.latest(out).step == 3


def lock_is_free(run_dir):
    """Whether another open file description could take the lock now (as another process)."""
    fd = os.open(run_dir / runfolder.LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_lock_is_held_for_the_whole_run_and_released_at_its_end(settings, tmp_path):
    out = tmp_path / "run"
    seen = []

    def looks_at_the_lock(prompts, completions, completion_ids, **kwargs):
        holder = (out / runfolder.LOCK_FILE).read_text().split()
        seen.append((lock_is_free(out), holder[0]))
        return [0.0] * len(completions)

    run = {**settings, "rewards": [], "output_dir": str(out)}
    train(**run, reward_funcs=[looks_at_the_lock])
    assert seen == [(False, str(os.getpid()))] * 2
    assert lock_is_free(out)  # released once train() returned
    train(**{**run, "max_steps": 3}, reward_funcs=[looks_at_the_lock], resume=out)
    assert seen[-1] == (False, str(os.getpid())) and lock_is_free(out)


def test_a_failed_run_releases_its_lock(settings, tmp_path):
    def broken(prompts, completions, completion_ids, **kwargs):
        raise RuntimeError("reward server went away")

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="reward server went away"):
        train(**{**settings, "rewards": [], "output_dir": str(out)}, reward_funcs=[broken])
    assert lock_is_free(out)


# --------------------------------------------------------------------------- symlinks


def test_a_symlinked_metrics_file_is_refused_not_written_through(settings, tmp_path):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out)})
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"not a log\n")
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(outside)
    result = resume(out, "--max-steps", "4")
    assert result.exit_code == 2
    assert "metrics.jsonl is a symlink" in one_line(result.output)
    assert outside.read_bytes() == b"not a log\n"
    assert checkpoint.latest(out).step == 2


def test_run_files_are_opened_without_following_symlinks(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"keep\n")
    link = tmp_path / "reward_errors.jsonl"
    link.symlink_to(outside)
    for opener in (runfolder.open_append, runfolder.open_new):
        with pytest.raises(runfolder.SymlinkRefused, match="reward_errors.jsonl is a symlink"):
            opener(link)
    assert outside.read_bytes() == b"keep\n"


def test_a_symlinked_checkpoints_folder_is_refused(settings, tmp_path):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out)})
    elsewhere = tmp_path / "elsewhere"
    (out / "checkpoints").rename(elsewhere)
    (out / "checkpoints").symlink_to(elsewhere)
    result = resume(out, "--max-steps", "4")
    assert result.exit_code == 2 and "checkpoints is a symlink" in one_line(result.output)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["step-000002"]


# --------------------------------------------------------------------------- manifests


def edit_manifest(step_dir, change):
    manifest = json.loads((step_dir / "manifest.json").read_text())
    change(manifest)
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (
            lambda d: edit_manifest(d, lambda m: m.update({"../x": m["state.json"]})),
            "manifest entry '../x' is not a file of the checkpoint folder",
        ),
        (
            lambda d: edit_manifest(d, lambda m: m.update({"/etc/passwd": m["state.json"]})),
            "manifest entry '/etc/passwd' is not a file of the checkpoint folder",
        ),
        (
            lambda d: edit_manifest(d, lambda m: m.pop("state.json")),
            "manifest does not list state.json",
        ),
        (lambda d: (d / "notes.txt").write_text("hi"), "holds notes.txt, which its manifest"),
    ],
)
def test_a_checkpoint_whose_manifest_escapes_or_omits_files_is_not_used(
    settings, tmp_path, tamper, reason
):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "max_steps": 4})
    tamper(checkpoint.path(out, 4))
    saved = checkpoint.latest(out)
    assert saved.step == 2
    assert saved.skipped[0].startswith(f"step-000004: {reason}")


def test_a_checkpoint_file_replaced_by_a_symlink_is_not_used(settings, tmp_path):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "max_steps": 4})
    state = checkpoint.path(out, 4) / "state.json"
    copy = tmp_path / "state-copy.json"
    shutil.copy(state, copy)  # same bytes: only the symlink is wrong
    state.unlink()
    state.symlink_to(copy)
    saved = checkpoint.latest(out)
    assert saved.step == 2 and "state.json is a symlink" in saved.skipped[0]


# --------------------------------------------------------------------------- model and data


def test_resume_refuses_model_weights_changed_in_place_at_the_same_size(
    settings, tiny_model_dir, tmp_path
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "run"
    train(**{**settings, "model": str(model), "output_dir": str(out)})
    weights = next(model.glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-2:] = bytes(b ^ 0x01 for b in raw[-2:])  # one bf16/f32 value, nudged
    weights.write_bytes(bytes(raw))
    result = resume(out, "--max-steps", "4")
    assert result.exit_code == 2
    assert f"the model files in {model} changed" in one_line(result.output)


def test_resume_refuses_a_shrunk_dataset_with_both_row_counts(settings, toy_data, tmp_path):
    data = own_data(toy_data, tmp_path)
    out = tmp_path / "run"
    train(**{**settings, "data": str(data), "output_dir": str(out)})
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:10]) + "\n")
    result = resume(out, "--max-steps", "4")
    assert result.exit_code == 2
    assert f"the data {data} had 16 rows, now 10" in one_line(result.output)
    assert checkpoint.latest(out).step == 2


def test_resume_refuses_a_dataset_whose_rows_changed(settings, toy_data, tmp_path):
    data = own_data(toy_data, tmp_path)
    out = tmp_path / "run"
    train(**{**settings, "data": str(data), "output_dir": str(out)})
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    rows[5]["allowed"] = "xyz"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = resume(out, "--max-steps", "4")
    assert result.exit_code == 2
    assert "has the same number of rows (16) but its content changed" in one_line(result.output)


def test_a_checkpoint_without_a_data_record_resumes_as_before(settings, toy_data, tmp_path):
    data = own_data(toy_data, tmp_path)
    out = tmp_path / "run"
    train(**{**settings, "data": str(data), "output_dir": str(out)})
    step_dir = checkpoint.path(out, 2)
    state = json.loads((step_dir / "state.json").read_text())
    del state["data"]  # as written before the data was fingerprinted
    (step_dir / "state.json").write_text(json.dumps(state))
    digest = checkpoint._digest(step_dir / "state.json")
    edit_manifest(step_dir, lambda m: m.update({"state.json": digest}))
    assert resume(out, "--max-steps", "3").exit_code == 0


REWARD_FILE = """
import pathlib
(pathlib.Path(__file__).parent / "imported.marker").write_text("imported")

def score(prompts, completions, completion_ids, **kwargs):
    return [0.5] * len(completions)
"""


def test_a_resume_that_fails_a_check_never_imports_the_reward_code(settings, toy_data, tmp_path):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(REWARD_FILE)
    marker = tmp_path / "imported.marker"
    data = own_data(toy_data, tmp_path)
    out = tmp_path / "run"
    train(
        **{**settings, "rewards": [f"{rewards}:score"], "data": str(data), "output_dir": str(out)}
    )
    assert marker.exists()  # the file does write its marker when imported
    marker.unlink()
    data.write_text("\n".join(data.read_text().splitlines()[:8]) + "\n")
    result = resume(out, "--max-steps", "4")
    assert result.exit_code == 2 and "had 16 rows, now 8" in one_line(result.output)
    assert not marker.exists()
    (out / "checkpoints" / "step-000002" / "manifest.json").unlink()
    result = resume(out, "--max-steps", "4")
    assert result.exit_code == 2 and "holds no usable checkpoint" in one_line(result.output)
    assert not marker.exists()


# --------------------------------------------------------------------------- logs


@pytest.mark.parametrize("name", ["completions.jsonl", "metrics.jsonl"])
def test_a_log_line_cut_short_by_a_kill_is_dropped_with_a_warning(settings, tmp_path, name):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "logging_steps": 1})
    with open(out / name, "a") as f:
        f.write('{"step": 3, "prompt": "What is')  # the kill came mid-write
    result = resume(out, "--max-steps", "4")
    assert result.exit_code == 0, result.output
    assert f"warning: dropped the last line of {out / name} (line " in one_line(result.output)
    metrics = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(x)["step"] for x in (out / "completions.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4] and samples == sorted(samples) and set(samples) == set(metrics)


def test_a_damaged_log_line_before_the_last_is_refused_with_its_line(settings, tmp_path):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "logging_steps": 1})
    path = out / "completions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    result = resume(out, "--max-steps", "4")
    assert result.exit_code == 2
    assert f"{path}, line 2: not valid JSON" in one_line(result.output)


# --------------------------------------------------------------------------- checkpoints/


def test_foreign_entries_in_the_checkpoints_folder_are_ignored(settings, tmp_path):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "save_total_limit": 1})
    root = out / "checkpoints"
    (root / "notes.txt").write_text("my notes")
    (root / "step-abc").mkdir()
    (root / "step-000010.bak").mkdir()
    (root / "step-000099").symlink_to(root / "step-000002")
    assert checkpoint.latest(out).step == 2
    assert resume(out, "--max-steps", "4").exit_code == 0
    names = sorted(p.name for p in root.iterdir())
    assert names == ["notes.txt", "step-000004", "step-000010.bak", "step-000099", "step-abc"]


def test_save_total_limit_is_restored_on_resume(settings, tmp_path):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "max_steps": 6, "save_total_limit": 0})
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert resume(out, "--max-steps", "6", "--save-total-limit", "2").exit_code == 0
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000006"]


def test_pruning_never_deletes_the_newest_usable_checkpoint(settings, tmp_path):
    out = tmp_path / "run"
    train(**{**settings, "output_dir": str(out), "max_steps": 6, "save_total_limit": 0})
    newest = checkpoint.path(out, 6) / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:-4])
    saved = checkpoint.latest(out)
    assert saved.step == 4
    checkpoint.tidy(out, 1, saved.path)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000006"]


# --------------------------------------------------------------------------- full disk


def test_a_full_disk_while_checkpointing_keeps_the_previous_one(settings, tmp_path, monkeypatch):
    real = checkpoint.fsync

    def fsync(path):
        if "step-000004" in str(path) and path.name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    monkeypatch.setattr(checkpoint, "fsync", fsync)
    out = tmp_path / "run"
    flags = ["--model", settings["model"], "--data", settings["data"], "--rewards"]
    flags += [settings["rewards"][0], "--output-dir", str(out), "--save-steps", "2"]
    flags += ["--max-steps", "6", "--num-generations", "4", "--prompts-per-step", "2"]
    flags += ["--max-completion-length", "8", "--lora-rank", "4"]
    result = CliRunner().invoke(main, ["train", *flags], catch_exceptions=False)
    assert result.exit_code == 2
    message = one_line(result.output)
    assert "Error: the disk is full (or the quota is used up) while writing the checkpoint of " in (
        message
    )
    assert f"step 4 to {out / 'checkpoints'}" in message and " MB free there." in message
    assert f"mlx-grpo train --resume {out}" in message and "Traceback" not in message
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # no half-written folder
    assert checkpoint.verify(root / "step-000002") is None
    monkeypatch.undo()
    assert resume(out).exit_code == 0
    assert checkpoint.latest(out).step == 6


def test_a_symlinked_lock_file_is_refused_not_written_through(settings, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (out / ".lock").symlink_to(notes)
    flags = ["--model", settings["model"], "--data", settings["data"], "--rewards"]
    flags += [settings["rewards"][0], "--output-dir", str(out), "--max-steps", "1"]
    result = CliRunner().invoke(main, ["train", *flags], catch_exceptions=False)
    assert result.exit_code == 2 and "is a symlink" in result.output, result.output
    assert notes.read_text() == "my notes"
