"""Output folders: what this program may write into, and how it writes them whole.

Every folder mlx-grpo creates carries a marker file, `.mlx-grpo.json`, with
the kind of output (see KINDS) and the version that wrote it. A target is
refused before anything is written when it is, lies inside or contains a
protected folder (the base model, the source adapter), is a file, holds an
output of another kind, or is a non-empty folder without the marker: a model,
an adapter, a run or anything else the user keeps there. Paths are compared
after expanding `~` and resolving symlinks.

Writing again into an output of the same kind (a re-export, a re-fuse) is
allowed and replaces it: the marker lists each file with its size and mtime,
and a folder where a file was added or changed since is refused instead, so
nothing put there by hand is lost. `build` writes the new output in a hidden
sibling (`.NAME.partial-PID`), fsyncs it and renames it into place; the
previous output is moved aside (`.NAME.old-PID`) and deleted only then. A crash
leaves the previous output, or the new one, never half of one; the next write
to the same target tidies what a crash left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from mlx_grpo.core.files import fsync

MARKER = ".mlx-grpo.json"
KINDS = {
    "run": "a training run",
    "peft": "a PEFT adapter export",
    "mlx-adapter": "an mlx-lm adapter",
    "fused": "a fused model",
    "converted": "a converted model",
    "quickstart": "a quickstart folder",
    "demo": "a demo folder",
}
_PARTIAL, _OLD = ".partial-", ".old-"
SYSTEM_FILES = (".DS_Store",)  # what macOS Finder leaves in a folder it opened

Protected = Mapping[str, "str | Path | None"]


def kind_of(folder: str | Path) -> str | None:
    """The kind of output `folder` holds by its marker; None when it has none."""
    path = Path(folder).expanduser() / MARKER
    try:
        return None if path.is_symlink() else json.loads(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def mark(folder: str | Path, kind: str, record_files: bool = False) -> None:
    """Write the marker; `record_files` lists the files now there (they may be replaced)."""
    from mlx_grpo.core import __version__

    assert kind in KINDS, kind
    folder = Path(folder)
    content: dict = {"kind": kind, "made_by": "mlx-grpo", "version": __version__}
    if record_files:
        content["files"] = _files(folder)
    tmp = folder / f"{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, folder / MARKER)  # never through a symlink planted there


def check_protected(target: str | Path, protected: Protected, option: str = "--output") -> None:
    """Refuse a target that is, lies inside or contains one of the `protected` paths."""
    real = _real(target)
    for label, path in protected.items():
        if not path or not Path(path).expanduser().exists():
            continue  # a Hub id, or nothing there to destroy
        other = _real(path)
        relation = (
            "is"
            if real == other
            else "is inside"
            if other in real.parents
            else "contains"
            if real in other.parents
            else None
        )
        if relation:
            raise ValueError(
                f"{option} {target} {relation} {label} ({path}); writing there could destroy "
                f"it. Choose a new folder for {option}, outside {path}."
            )


def check_target(
    target: str | Path, kind: str, protected: Protected | None = None, option: str = "--output"
) -> Path:
    """Refuse an output target that writing `kind` there would damage; writes nothing.

    Allowed: a path that does not exist, an empty folder, or a folder this
    program marked as the same kind whose recorded files are unchanged.
    """
    target = Path(target).expanduser()
    check_protected(target, protected or {}, option)
    check_creatable(target, option, option)
    if not target.is_dir() or not entries(target):
        return target
    found = kind_of(target)
    if found is None:
        raise ValueError(
            f"{option} {target} already holds {_describe(target)} and was not written by "
            f"mlx-grpo (it has no {MARKER}), so it is never overwritten. Choose a new or empty "
            f"folder for {option}."
        )
    if found != kind:
        raise ValueError(
            f"{option} {target} holds {KINDS.get(found, found)} made by mlx-grpo, not "
            f"{KINDS[kind]}; writing there would destroy it. Choose a new or empty folder for "
            f"{option}."
        )
    changed = _changed(target)
    if changed:
        one = len(changed) == 1
        raise ValueError(
            f"{option} {target} holds {KINDS[kind]} made by mlx-grpo, but {_names(changed)} "
            f"{'was' if one else 'were'} added or changed since, and replacing the folder would "
            f"delete {'it' if one else 'them'}. Move {'it' if one else 'them'} out, or choose a "
            f"new folder for {option}."
        )
    return target


def check_creatable(target: Path, name: str, option: str) -> None:
    """Refuse a folder that cannot be made or written to: a file in the way, or no permission."""
    existing = next(p for p in [target, *target.parents] if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == target else f"cannot be created: {existing} is a file"
        raise ValueError(f"{name} {target} {where}, not a folder. Choose another {option}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name} {target} is not writable ({existing} does not allow writing for this "
            f"user). Choose a folder you can write to with {option}, or fix its permissions."
        )


def own_folder(target: str | Path, kind: str, option: str = "--output-dir") -> Path:
    """Create (or reuse) a folder this program writes into piece by piece, and mark it."""
    target = check_target(target, kind, option=option)
    target.mkdir(parents=True, exist_ok=True)
    if kind_of(target) != kind:
        mark(target, kind)
    return target


@contextlib.contextmanager
def build(
    target: str | Path, kind: str, protected: Protected | None = None, option: str = "--output"
) -> Iterator[Path]:
    """Yield a hidden sibling folder to write the output into; rename it into place after.

    Example:
        >>> with build("export/qwen3-gsm8k", "peft", {"the adapter": "runs/a"}) as folder:
        ...     adapter.save_peft(folder)
    """
    check_target(target, kind, protected, option)
    final = _real(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    _tidy(final)
    partial = final.with_name(f".{final.name}{_PARTIAL}{os.getpid()}")
    old = final.with_name(f".{final.name}{_OLD}{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        mark(partial, kind)  # first, so that a leftover is known to be ours
        yield partial
        mark(partial, kind, record_files=True)
        _fsync_tree(partial)
        check_target(target, kind, protected, option)  # it may have changed meanwhile
        if entries(final):
            os.rename(final, old)
            os.rename(partial, final)
        else:
            shutil.rmtree(final, ignore_errors=True)  # nothing, or only system files
            os.replace(partial, final)
        fsync(final.parent)
    except BaseException:
        if old.exists() and not final.exists():
            os.rename(old, final)  # stopped between the two renames: the previous one is back
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _real(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def entries(folder: Path) -> list[str]:
    """The names in `folder` that are someone's: not the desktop's own files (.DS_Store)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in SYSTEM_FILES)


def _files(folder: Path) -> dict[str, list[int]]:
    """Relative path -> [size, mtime_ns] of every file and link under `folder`.

    Folders are listed too, as [-1, -1]: only that they are there counts.
    """
    out = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            out[str((Path(root) / name).relative_to(folder))] = [-1, -1]
        for name in names:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if rel != MARKER and name not in SYSTEM_FILES:
                info = path.lstat()
                out[rel] = [info.st_size, info.st_mtime_ns]
    return out


def _changed(folder: Path) -> list[str]:
    """Files added or changed since the marker recorded them.

    A marker without a file list belongs to a folder written piece by piece
    and reused in place (a run, the quickstart, the demo): nothing to compare.
    """
    try:
        recorded = json.loads((folder / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded is None:
        return []
    return sorted(name for name, stat in _files(folder).items() if recorded.get(name) != stat)


def _describe(folder: Path) -> str:
    names = set(entries(folder))
    if names & {"config.yaml", "checkpoints"}:
        what = "a training run"
    elif names & {"adapters.safetensors", "adapter_model.safetensors"}:
        what = "an adapter"
    elif "config.json" in names and any(n.endswith((".safetensors", ".gguf")) for n in names):
        what = "a model"
    else:
        what = "files"
    return f"{what} ({_names(sorted(names))})"


def _names(names: list[str], most: int = 3) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _tidy(final: Path) -> None:
    """Remove what a crashed write to `final` left; put back a previous output moved aside."""
    prefix = f".{final.name}"
    for leftover in final.parent.iterdir():
        rest = leftover.name[len(prefix) :] if leftover.name.startswith(prefix) else ""
        stage = _PARTIAL if rest.startswith(_PARTIAL) else _OLD if rest.startswith(_OLD) else None
        pid = rest[len(stage) :] if stage else ""
        if not pid.isdigit() or kind_of(leftover) is None or _alive(int(pid)):
            continue
        if stage == _OLD and not final.exists():
            os.rename(leftover, final)  # the crash came between the two renames
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()  # our own leftovers are from an earlier, failed write


def _fsync_tree(folder: Path) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            fsync(Path(root) / name)
        fsync(Path(root))
