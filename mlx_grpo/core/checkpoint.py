"""Checkpoints of a run: written atomically, verified when read, the last K kept.

    RUN_DIR/checkpoints/step-000012/
        adapters.safetensors, adapter_config.json   the adapter (mlx-lm format)
        optimizer.safetensors                       AdamW moments and step counter
        state.json                                  step, data order, RNG, metrics so far, config
        manifest.json                               size and SHA-256 of each file above

A checkpoint is built in a hidden sibling folder; every file is fsynced, then
the folder is renamed into place and its parent fsynced. A crash therefore
leaves either the previous set of checkpoints or the new one, never half of
one; the leftover hidden folder is removed on resume. A checkpoint is used
only when its manifest lists every file it needs, names only plain files of
its own folder (no `../`, no symlinks, nothing unlisted beside them) and every
file matches; otherwise (a disk that lied about fsync, a folder tampered with)
it is skipped in favour of the one before it. Only `step-NNNNNN` folders count:
anything else in checkpoints/ is ignored.

On resume the newest checkpoint is checked against the run's model (a hash of
its files' bytes) and data (row count and a hash of the rows) before anything
is written. The newest `save_total_limit` checkpoints are kept, checked again
on resume (a kill between a save and its pruning), and the newest usable one
is never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_grpo.core.adapters import MLX_CONFIG, MLX_WEIGHTS, Adapter
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.files import fsync, sha256
from mlx_grpo.core.reporting import COMPLETIONS_FILE, CONFIG_FILE, METRICS_FILE, REWARD_ERRORS_FILE
from mlx_grpo.core.runfolder import SymlinkRefused, disk_full, is_disk_full
from mlx_grpo.core.settings import resolve

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"
_PREFIX = "step-"
_STEP_RE = re.compile(r"step-(\d+)")
_PARTIAL = ".partial-"
_REMOVING = ".removing-"  # an old checkpoint being pruned: never mistaken for a usable one
# Every file a checkpoint needs; a manifest that omits one makes it unusable.
NEEDED = (MLX_WEIGHTS, MLX_CONFIG, OPTIMIZER_FILE, STATE_FILE)
# Settings a resumed run may change; any other change would make it another run.
RESUMABLE = (
    "max_steps",
    "max_minutes",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "on_reward_error",
    "max_nonfinite_updates",
    "distributed_timeout",
    "overwrite",
    "max_memory",  # changes how the work is cut, not what is computed
)


# What a run writes into its output directory (besides the final adapter).
BEST = "best"  # keep_best: the adapter with the best eval metric so far
RUN_FILES = (CONFIG_FILE, METRICS_FILE, COMPLETIONS_FILE, REWARD_ERRORS_FILE, CHECKPOINTS, BEST)


class CheckpointError(ValueError):
    """A run directory holds no usable checkpoint."""


@dataclass
class Snapshot:
    """A run's state between two steps; arrays are references, so taking one is free."""

    step: int  # steps completed
    adapter: Adapter
    optimizer: dict[str, mx.array]  # flattened optimizer state
    state: dict[str, Any]  # JSON-ready: data order, RNG key, metrics, config, ...


def path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{step:06d}"


def _sizes_fingerprint(model: str) -> str | None:
    """The fingerprint of checkpoints written before the bytes were hashed (config + sizes)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    if (folder / "config.json").is_file():
        digest.update((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- resuming


def resume_settings(
    run_dir: str | Path,
    config: Any = None,
    overrides: dict[str, Any] | None = None,
    given_as: str = "argument",
) -> TrainConfig:
    """The settings of the run in `run_dir`, with the changes a resume allows.

    Refuses a folder that is not a run, a config file (the run has its own),
    and changes to settings outside RESUMABLE. `overrides` are checked on
    top of the run's own settings; `given_as` says what they were (see
    settings.resolve).
    """
    run_dir = Path(run_dir).expanduser()
    saved_file = run_dir / CONFIG_FILE
    if not run_dir.is_dir() or not saved_file.is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {CONFIG_FILE}"
        raise ValueError(
            f"cannot resume {run_dir}: it {what}, so it is not an mlx-grpo run. Give --resume "
            "the output directory of an earlier `mlx-grpo train` (it holds config.yaml, "
            "metrics.jsonl and checkpoints/)."
        )
    if config is not None:
        raise ValueError(
            f"--resume takes its settings from {saved_file}; drop --config (flags may change "
            f"only {', '.join(RESUMABLE[:-1])})."
        )
    saved = resolve(saved_file)
    given = resolve(saved_file, given_as=given_as, **(overrides or {}))
    changed = []
    for key in overrides or {}:
        old = getattr(saved, key)
        new = getattr(given, key)
        if key == "output_dir":
            same = Path(new).expanduser().resolve() == run_dir.resolve()
        else:
            same = new == old
        if not same and key not in RESUMABLE:
            changed.append(f"{key} {old!r} -> {new!r}")
    if changed:
        raise ValueError(
            f"cannot resume {run_dir} with other settings: {'; '.join(changed)}. A resumed run "
            f"keeps the settings it started with; only {', '.join(RESUMABLE[:-1])} may change. "
            "Start a new run (another --output-dir) to train with these."
        )
    values = saved.to_dict()
    values.update({k: getattr(given, k) for k in (overrides or {}) if k in RESUMABLE})
    values["output_dir"] = str(run_dir)
    return resolve(None, **values)


def check_compatible(
    saved: Loaded, cfg: TrainConfig, model_sha256: str | None, data: dict[str, Any]
) -> None:
    """Refuse a checkpoint written for another model, LoRA shape or dataset.

    `model_sha256` is `models.fingerprint(cfg.model)` and `data` is
    `data.fingerprint` of the rows, both taken at setup. Checkpoints older
    than a field skip its check.
    """
    state, problems = saved.state, []
    before = state.get("config", {})
    for key in ("model", "lora_rank", "lora_alpha", "lora_targets", "lora_layers", "use_rslora"):
        if key in before and before[key] != getattr(cfg, key):
            problems.append(f"{key} was {before[key]!r}, now {getattr(cfg, key)!r}")
    if "model_sha256" in state:
        model_changed = state["model_sha256"] != model_sha256
    else:  # written before the bytes were hashed: config.json and weight sizes
        model_changed = state.get("model_fingerprint") not in (None, _sizes_fingerprint(cfg.model))
    if model_changed:
        problems.append(
            f"the model files in {cfg.model} changed (config.json, weights or tokenizer)"
        )
    old = state.get("data")
    if old and old["rows"] != data["rows"]:
        problems.append(f"the data {cfg.data} had {old['rows']} rows, now {data['rows']}")
    elif old and old["sha256"] != data["sha256"]:
        problems.append(
            f"the data {cfg.data} has the same number of rows ({data['rows']}) but its content "
            "changed (prompts or other columns)"
        )
    if problems:
        raise ValueError(
            f"checkpoint {saved.path} cannot continue with this setup: {'; '.join(problems)}. "
            "Resume with the run's own model and data, or start a new run (another "
            "--output-dir) to train on these."
        )


def check_rewards(saved: Loaded, rewards: list[str]) -> None:
    """Refuse a checkpoint written with other reward functions (names, in order)."""
    if saved.state.get("rewards") != rewards:
        raise ValueError(
            f"checkpoint {saved.path} cannot continue with these rewards: they were "
            f"{saved.state.get('rewards')}, now {rewards}. Resume with the run's own reward "
            "functions (pass the same reward_funcs), or start a new run."
        )


# --------------------------------------------------------------------------- writing


def write(run_dir: Path, snap: Snapshot, keep: int) -> Path:
    """Write `snap` as RUN_DIR/checkpoints/step-NNNNNN atomically; keep the newest `keep`.

    A full disk raises `runfolder.DiskFull` with the half-written folder removed
    and the checkpoints before it untouched.
    """
    _check_finite(snap)
    root = Path(run_dir) / CHECKPOINTS
    if root.is_symlink():
        raise SymlinkRefused(
            f"{root} is a symlink; mlx-grpo does not write checkpoints through symlinks. "
            "Replace it with a regular folder (move the checkpoints into it), then resume."
        )
    final = root / f"{_PREFIX}{snap.step:06d}"
    partial = root / f"{_PARTIAL}{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove(partial)
        partial.mkdir()
        _write_files(partial, snap)
        if final.exists() or final.is_symlink():  # the same step saved again (e.g. on interrupt)
            _remove(final)
        os.replace(partial, final)
        fsync(root)
    except BaseException as exc:
        _remove(partial)
        if is_disk_full(exc):
            what = f"the checkpoint of step {snap.step}"
            kept = f"It was not kept; the checkpoints before it in {root} are intact."
            then = f"continue with `mlx-grpo train --resume {run_dir}`"
            raise disk_full(what, root, kept, then) from None
        raise
    prune(root, keep, final)
    return final


def _write_files(partial: Path, snap: Snapshot) -> None:
    """The checkpoint's files, then their manifest, each fsynced."""
    snap.adapter.save(partial)
    mx.save_safetensors(str(partial / OPTIMIZER_FILE), snap.optimizer)
    (partial / STATE_FILE).write_text(json.dumps(snap.state, indent=1))
    files = sorted(p.name for p in partial.iterdir())
    for name in files:
        fsync(partial / name)
    manifest = {name: _digest(partial / name) for name in files}
    (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    fsync(partial / MANIFEST_FILE)
    fsync(partial)


def prune(root: Path, keep: int, newest_good: Path | None = None) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all).

    `newest_good` (the newest checkpoint known to be usable) is never deleted,
    even when newer damaged ones fill the `keep` places.
    """
    if keep <= 0:
        return
    for old in _complete(root)[:-keep]:
        if newest_good is not None and old == newest_good:
            continue
        # Renamed first, so a kill mid-delete leaves no half checkpoint that looks usable.
        doomed = root / f"{_REMOVING}{old.name}-{os.getpid()}"
        try:
            os.replace(old, doomed)
        except OSError:
            continue  # left for the next prune, as a complete checkpoint
        _remove(doomed)


def _remove(path: Path) -> None:
    """Delete a file, a symlink (not its target) or a folder, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _check_finite(snap: Snapshot) -> None:
    for name, factors in (("lora_a", snap.adapter.lora_a), ("lora_b", snap.adapter.lora_b)):
        for path, value in factors.items():
            assert bool(mx.all(mx.isfinite(value)).item()), f"non-finite {path}.{name}"


def _digest(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


# --------------------------------------------------------------------------- reading


@dataclass
class Loaded:
    path: Path
    step: int
    adapter: Adapter
    optimizer: dict[str, mx.array]
    state: dict[str, Any]
    skipped: list[str]  # checkpoints not used (half written, damaged) and why


def latest(run_dir: Path) -> Loaded:
    """The newest checkpoint of a run that passes its manifest check (reads only).

    Raises CheckpointError when there is none. `tidy` removes the leftovers of
    interrupted writes once the run may write.
    """
    root = Path(run_dir) / CHECKPOINTS
    if root.is_symlink():
        raise SymlinkRefused(
            f"{root} is a symlink; mlx-grpo neither reads checkpoints through nor writes them "
            "into a symlinked folder. Replace it with a regular folder, then resume."
        )
    skipped = [
        f"{leftover.name}: half written when the run stopped; removed once the resume starts"
        for leftover in sorted(root.glob(f"{_PARTIAL}*"))
    ]
    for path in reversed(_complete(root)):
        problem = verify(path)
        if problem:
            skipped.append(f"{path.name}: {problem}")
            continue
        optimizer = mx.load(str(path / OPTIMIZER_FILE))
        state = json.loads((path / STATE_FILE).read_text())
        return Loaded(path, state["step"], Adapter.load(path), optimizer, state, skipped)
    found = "; ".join(skipped) if skipped else "none written yet"
    raise CheckpointError(
        f"{run_dir} holds no usable checkpoint in {root} ({found}). "
        "Start the run again with --overwrite, or resume a run that saved one "
        "(checkpoints are written every save_steps steps, on Ctrl-C and on errors)."
    )


def tidy(run_dir: Path, keep: int, newest_good: Path | None) -> None:
    """Remove leftovers of interrupted writes and prunes; keep the newest `keep` checkpoints.

    Run on resume once every check has passed: a kill between a save and its
    pruning may have left one checkpoint too many.
    """
    root = Path(run_dir) / CHECKPOINTS
    for leftover in [*root.glob(f"{_PARTIAL}*"), *root.glob(f"{_REMOVING}*")]:
        _remove(leftover)
    prune(root, keep, newest_good)


def verify(path: Path) -> str | None:
    """None when the checkpoint is usable; otherwise what is wrong with it.

    Usable: the manifest lists every file in NEEDED, names only regular files
    of this folder (no paths, no symlinks), every one matches its size and
    SHA-256, and the folder holds no other file (hidden ones aside).
    """
    if (path / MANIFEST_FILE).is_symlink():
        return f"{MANIFEST_FILE} is a symlink"
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return "manifest missing or unreadable"
    if not isinstance(manifest, dict):
        return "manifest is not a JSON object of file -> checksum"
    for name in manifest:
        if name in ("", ".", "..", MANIFEST_FILE) or Path(name).name != name or "\\" in name:
            return f"manifest entry {name!r} is not a file of the checkpoint folder"
    missing = [name for name in NEEDED if name not in manifest]
    if missing:
        return f"manifest does not list {', '.join(missing)}"
    # Hidden files (.DS_Store) are harmless; another adapter file would be loaded instead.
    unlisted = sorted(
        p.name
        for p in path.iterdir()
        if p.name not in (*manifest, MANIFEST_FILE) and not p.name.startswith(".")
    )
    if unlisted:
        return f"holds {', '.join(unlisted)}, which its manifest does not list"
    for name, expected in manifest.items():
        file = path / name
        if file.is_symlink():
            return f"{name} is a symlink"
        if not file.is_file():
            return f"{name} is missing"
        if _digest(file) != expected:
            return f"{name} does not match its checksum"
    return None


def _complete(root: Path) -> list[Path]:
    """Finished checkpoint folders (step-NNNNNN, no symlinks), oldest first; the rest is ignored."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if _STEP_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))
