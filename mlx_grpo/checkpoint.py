"""Checkpoints of a run: written atomically, verified when read, the last K kept.

    RUN_DIR/checkpoints/step-000012/
        adapters.safetensors, adapter_config.json   the adapter (mlx-lm format)
        optimizer.safetensors                       AdamW moments and step counter
        state.json                                  step, data order, RNG, metrics so far, config
        manifest.json                               size and SHA-256 of each file above

A checkpoint is built in a hidden sibling folder; every file is fsynced, then
the folder is renamed into place and its parent fsynced. A crash therefore
leaves either the previous set of checkpoints or the new one, never half of
one; the leftover hidden folder is removed on resume. A checkpoint whose files
do not match its manifest (a disk that lied about fsync) is skipped in favour
of the one before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_grpo.adapters import Adapter
from mlx_grpo.config import TrainConfig, resolve
from mlx_grpo.reporting import COMPLETIONS_FILE, CONFIG_FILE, METRICS_FILE, REWARD_ERRORS_FILE

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"
_PREFIX = "step-"
_PARTIAL = ".partial-"


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
)


# What a run writes into its output directory (besides the final adapter).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, COMPLETIONS_FILE, REWARD_ERRORS_FILE, CHECKPOINTS)


class CheckpointError(ValueError):
    """A run directory holds no usable checkpoint."""


@dataclass
class Snapshot:
    """A run's state between two steps; arrays are references, so taking one is free."""

    step: int  # steps completed
    adapter: Adapter
    optimizer: dict[str, mx.array]  # flattened optimizer state
    state: dict[str, Any]  # JSON-ready: data order, RNG key, metrics, config, ...


def take_rng() -> list[int]:
    """The global MLX random key, as two integers."""
    return [int(v) for v in mx.random.state[0].tolist()]


def restore_rng(key: list[int]) -> None:
    """Set the global MLX random key back to one `take_rng` returned."""
    mx.random.seed((int(key[0]) << 32) | int(key[1]))


def path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{step:06d}"


def fingerprint(model: str) -> str | None:
    """A hash of a local model directory's config and weight file sizes (None for Hub ids)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    if (folder / "config.json").is_file():
        digest.update((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- output directory


def check_output(cfg: TrainConfig, resume: bool) -> Path:
    """Refuse an output directory that cannot be written or holds a run (writes nothing)."""
    out = Path(cfg.output_dir).expanduser()
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir():
        raise ValueError(
            f"output directory {out} cannot be created: {existing} is a file, not a folder. "
            "Choose another --output-dir."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"output directory {out} is not writable ({existing} does not allow writing for "
            "this user). Choose a folder you can write to with --output-dir, or fix its "
            "permissions."
        )
    held = [n for n in RUN_FILES if (out / n).exists()]
    if held and not (cfg.overwrite or resume):
        raise ValueError(
            f"output directory {out} already holds a run ({', '.join(held)}). Continue it with "
            f"`mlx-grpo train --resume {out}`, choose another --output-dir, or pass --overwrite "
            "to replace it."
        )
    return out


def prepare_output(cfg: TrainConfig) -> None:
    """Create the output directory; with overwrite, remove the previous run's files."""
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- resuming


def resume_settings(
    run_dir: str | Path, config: Any = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The settings of the run in `run_dir`, with the changes a resume allows.

    Refuses a folder that is not a run, a config file (the run has its own),
    and changes to settings outside RESUMABLE.
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
    given = resolve(None, **(overrides or {})) if overrides else None
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


def check_compatible(saved: Loaded, cfg: TrainConfig, rewards: list[str]) -> None:
    """Refuse a checkpoint written for another model, LoRA shape or reward set."""
    state, problems = saved.state, []
    before = state.get("config", {})
    for key in ("model", "lora_rank", "lora_alpha", "lora_targets", "lora_layers", "use_rslora"):
        if key in before and before[key] != getattr(cfg, key):
            problems.append(f"{key} was {before[key]!r}, now {getattr(cfg, key)!r}")
    now = fingerprint(cfg.model)
    if state.get("model_fingerprint") not in (None, now):
        problems.append(f"the model files in {cfg.model} changed (config.json or weights)")
    if state.get("rewards") != rewards:
        problems.append(f"rewards were {state.get('rewards')}, now {rewards}")
    if problems:
        raise ValueError(
            f"checkpoint {saved.path} cannot continue with this setup: {'; '.join(problems)}. "
            "Resume with the run's own model and rewards, or start a new run."
        )


# --------------------------------------------------------------------------- writing


def write(run_dir: Path, snap: Snapshot, keep: int) -> Path:
    """Write `snap` as RUN_DIR/checkpoints/step-NNNNNN atomically; keep the newest `keep`."""
    _check_finite(snap)
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{snap.step:06d}"
    partial = root / f"{_PARTIAL}{final.name}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        snap.adapter.save(partial)
        mx.save_safetensors(str(partial / OPTIMIZER_FILE), snap.optimizer)
        (partial / STATE_FILE).write_text(json.dumps(snap.state, indent=1))
        files = sorted(p.name for p in partial.iterdir())
        for name in files:
            _fsync(partial / name)
        manifest = {name: _digest(partial / name) for name in files}
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        _fsync(partial / MANIFEST_FILE)
        _fsync(partial)
        if final.exists():  # the same step saved again (e.g. on interrupt)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _check_finite(snap: Snapshot) -> None:
    for name, factors in (("lora_a", snap.adapter.lora_a), ("lora_b", snap.adapter.lora_b)):
        for path, value in factors.items():
            assert bool(mx.all(mx.isfinite(value)).item()), f"non-finite {path}.{name}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


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
    """The newest checkpoint of a run that passes its manifest check.

    Leftovers of an interrupted write are removed. Raises CheckpointError when
    there is none.
    """
    root = Path(run_dir) / CHECKPOINTS
    skipped = []
    for leftover in sorted(root.glob(f"{_PARTIAL}*")):
        skipped.append(f"{leftover.name}: half written when the run stopped; removed")
        shutil.rmtree(leftover, ignore_errors=True)
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


def verify(path: Path) -> str | None:
    """None when every file matches the manifest; otherwise what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return "manifest missing or unreadable"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _digest(file) != expected:
            return f"{name} does not match its checksum"
    return None


def _complete(root: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def order_state(rng: np.random.Generator) -> dict[str, Any]:
    """A NumPy generator's state, JSON-ready."""
    return rng.bit_generator.state


def order_from_state(state: dict[str, Any]) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng
