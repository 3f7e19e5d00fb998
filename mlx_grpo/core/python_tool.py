"""The built-in `python` tool: a snippet run in a subprocess, time- and memory-limited.

`--tools python` gives an agent `python(code)`, which runs the code in a
fresh interpreter (isolated mode, an empty working folder, no environment
variables but PATH) and returns what it printed. The process is killed past
PYTHON_TIMEOUT seconds, its address space is capped at PYTHON_MEMORY_MB
where the OS enforces it (Linux), and its sockets are refused: inside
Python always, and by the OS sandbox where macOS has `sandbox-exec`. This is
a convenience for agents that compute, not a security boundary: run only
models and code you would run yourself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

PYTHON_TIMEOUT = 10.0  # seconds
PYTHON_MEMORY_MB = 1024
OUTPUT_LIMIT = 4000  # characters of output handed back to the model

# Runs in the child before the snippet: limits, then no sockets, then the code from stdin.
_BOOT = """
import resource, socket, sys
limit = {memory} * 1024 * 1024
try:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
except (ValueError, OSError):
    pass  # macOS does not enforce RLIMIT_AS
def _refused(*args, **kwargs):
    raise OSError("network access is disabled in the python tool")
socket.socket = socket.create_connection = socket.getaddrinfo = _refused
code = sys.stdin.read()
exec(compile(code, "<tool>", "exec"), {{"__name__": "__main__"}})
"""

_SANDBOX = "(version 1)(allow default)(deny network*)"


def python(code: str) -> str:
    """Run a Python program and return what it prints.

    Args:
        code: A complete Python program; print every value you need to see.
    """
    return run_python(code)


def run_python(
    code: str, timeout: float = PYTHON_TIMEOUT, memory_mb: int = PYTHON_MEMORY_MB
) -> str:
    """The program's printed output; an error (raised, so the model reads it as the tool's
    failure) when it raises, runs out of time or is killed."""
    command = [sys.executable, "-I", "-c", _BOOT.format(memory=int(memory_mb))]
    sandbox = shutil.which("sandbox-exec") if sys.platform == "darwin" else None
    if sandbox:
        command = [sandbox, "-p", _SANDBOX, *command]
    with tempfile.TemporaryDirectory(prefix="mlx-grpo-python-") as folder:
        try:
            done = subprocess.run(
                command,
                input=code,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=folder,
                env={"PATH": os.environ.get("PATH", "")},
            )
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the program ran past {timeout:g} s and was stopped") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"the program exited with {done.returncode}")
    out = done.stdout
    return out if len(out) <= OUTPUT_LIMIT else out[:OUTPUT_LIMIT] + "\n[output cut]"
