"""Every command the README shows runs, in order, against tiny local stand-ins.

The shell blocks of README.md (and of any docs/*.md page) are run one command
at a time in an empty folder, in the order they are written, so later commands
find what earlier ones made (`train` writes the run that `--resume`, `eval`,
`export` and `fuse` read). Its Python blocks run too (PEFT and transformers offline,
from the same local stand-ins).
A command fails the test when it exits non-zero or prints a traceback.

What a user has and this machine does not is replaced through MAPPING, the one
place that says how README text becomes a local command:
- the Hub ids (`Qwen/Qwen3-0.6B`, `openai/gsm8k:main`) become a tiny random
  Qwen3 and small JSONL files written here with the same columns;
- step counts N become 1 + N // 300, completion lengths 8 tokens (a new run
  that leaves either at its default gets 1 step, 8 tokens);
- two Macs in `hosts.json` become two local processes;
- `--push-to-hub` talks to a recording stand-in for the Hub API.
SKIPPED lists the commands that are not run here, and why.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_distributed import free_ports

from mlx_grpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
HUB_MODEL = "Qwen/Qwen3-0.6B"

# README text -> what runs here. {model}, {gguf} and {port} are filled in at run time.
MAPPING: list[tuple[str, str]] = [
    (r"(?<![\w/])(?<!--base-model )Qwen/Qwen3-0\.6B", "{model}"),
    (r"openai/gsm8k:main", "gsm8k_train.jsonl"),
    (r"--model M\b", "--model {model}"),
    (r"\bruns/x\b", "runs/qwen3-gsm8k"),
    (r"\bmodel\.gguf\b", "{gguf}"),
    (r"peft-adapter/", "export/qwen3-gsm8k"),
    (r"--hostfile hosts\.json", "--backend ring -n 2 --starting-port {port}"),
    (r"~/mlx-grpo/\.venv/bin/mlx-grpo", "mlx-grpo"),
    (r"~/runs/", "runs/"),
    (r"--config gsm8k\.yaml", "--config grpo.yaml"),
    (r"(--max-steps[ =]|max_steps: |max_steps=)(\d+)", "steps"),
    (r"(--max-completion-length |max_completion_length: |--max-tokens )(\d+)", r"\g<1>8"),
]

SKIPPED = {
    "./scripts/main.sh": "the 12-minute main job; tests/test_quickstart.py runs it for 2 steps",
    "./scripts/test.sh": "this test suite itself (CI runs it through .ci/run)",
    "pip": "installs packages; the suite runs offline from the test environment",
}

# Local stand-ins for the README's data files, with the columns the commands name.
DATA = {
    "gsm8k_train.jsonl": ("question", "answer"),
    "gsm8k_test.jsonl": ("question", "answer"),
    "train.jsonl": ("prompt", "answer"),
    "test.jsonl": ("prompt", "answer", "kind"),
    "mult.jsonl": ("prompt", "answer"),
}


def fenced_blocks(page: Path) -> list[tuple[str, str, int]]:
    """(language, text, line) of every fenced code block of a Markdown page."""
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"\s*```(\w*)\s*$", lines[i])
        if m:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((m.group(1), "\n".join(lines[i + 1 : end]), i + 1))
            i = end
        i += 1
    return blocks


def substitute(text: str, values: dict[str, str]) -> str:
    for pattern, replacement in MAPPING:
        if replacement == "steps":
            text = re.sub(pattern, lambda m: f"{m.group(1)}{1 + int(m.group(2)) // 300}", text)
        else:
            text = re.sub(pattern, replacement, text)
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def shorten(argv: list[str]) -> list[str]:
    """A new training run that leaves its length at the defaults gets 1 step of 8 tokens."""
    if argv[:2] != ["mlx-grpo", "train"] or {"--config", "--resume"} & set(argv):
        return argv
    for flag, value in (("--max-steps", "1"), ("--max-completion-length", "8")):
        if flag not in argv:
            argv = [*argv, flag, value]
    return argv


def commands(block: str) -> list[list[str]]:
    """A shell block's commands: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def write_data(folder: Path) -> None:
    for name, columns in DATA.items():
        rows = []
        for i in range(8):
            row = {c: f"What is {i} + {i}?" for c in columns[:1]}
            row |= {"answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
            if "kind" in columns:
                row["kind"] = "even" if i % 2 == 0 else "odd"
            rows.append(json.dumps(row))
        (folder / name).write_text("\n".join(rows) + "\n")


@pytest.fixture
def workdir(tmp_path, tool_model_dir, monkeypatch, hub_calls):
    from test_gguf import _random_model, _write_gguf

    # The tiny model in a folder that says which Hub model it stands for, as a
    # downloaded copy of Qwen/Qwen3-0.6B does: exports then name that id.
    model = tmp_path / "models" / "Qwen3-0.6B"
    shutil.copytree(tool_model_dir, model)  # its chat template shows tools too
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "_name_or_path": HUB_MODEL}))
    write_data(tmp_path)
    _write_gguf(tmp_path / "tiny.gguf", "qwen3", _random_model("qwen3"))
    (tmp_path / "examples").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def run(argv: list[str], where: str, cwd: Path) -> None:
    name = argv[0]
    if name == "mlx-grpo":  # in this process: faster, and the Hub stand-in applies
        result = CliRunner().invoke(main, argv[1:], catch_exceptions=False)
        output, code = result.output, result.exit_code
    elif name == "mlx.launch":
        done = subprocess.run(
            [str(BIN / name), *argv[1:]],
            cwd=cwd,
            input="",
            capture_output=True,
            text=True,
            timeout=600,
            env={"PATH": f"{BIN}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )
        output, code = done.stdout + done.stderr, done.returncode
    else:
        raise AssertionError(
            f"{where}: `{shlex.join(argv)}` is neither an mlx-grpo nor an mlx.launch command, "
            "nor in SKIPPED: teach tests/test_readme.py how to run it"
        )
    assert code == 0, f"{where}: `{shlex.join(argv)}` exited with {code}:\n{output}"
    assert "Traceback" not in output, f"{where}: `{shlex.join(argv)}` printed:\n{output}"


def stand_ins(workdir: Path) -> dict[str, str]:
    return {"model": str(workdir / "models" / "Qwen3-0.6B"), "gguf": str(workdir / "tiny.gguf")}


def test_every_readme_command_runs(workdir, hub_calls):
    values = stand_ins(workdir)
    example = ROOT / "examples" / "qwen3-0.6b-gsm8k.yaml"
    (workdir / "examples" / example.name).write_text(substitute(example.read_text(), values))
    ran = 0
    for page in PAGES:
        for language, block, line in fenced_blocks(page):
            where = f"{page.name}:{line}"
            if language == "yaml":  # the settings file the next commands read
                text = substitute(block, values)
                if "max_completion_length" not in text:
                    text += "\nmax_completion_length: 8\n"
                (workdir / "grpo.yaml").write_text(text)
            if language not in ("bash", "sh", "shell"):
                continue
            for argv in commands(block):
                if argv[0] in SKIPPED:
                    continue
                values["port"] = str(free_ports(2))
                run(shorten(shlex.split(substitute(shlex.join(argv), values))), where, workdir)
                ran += 1
    assert ran >= 15  # the blocks were found and run, not skipped
    uploads = [kwargs for method, kwargs in hub_calls if method == "upload_folder"]
    assert [u["repo_id"] for u in uploads] == ["me/qwen3-gsm8k-grpo"]
    assert "adapter_model.safetensors" in uploads[0]["files"]


def test_every_readme_python_example_runs(workdir, monkeypatch):
    values = stand_ins(workdir)
    # The adapter examples load a run and a PEFT export: make both first.
    settings = ["--model", values["model"], "--data", "gsm8k_train.jsonl"]
    settings += ["--prompt-column", "question", "--rewards", "math_answer", "--max-steps", "1"]
    settings += ["--max-completion-length", "8", "--num-generations", "2"]
    run(["mlx-grpo", "train", *settings, "--output-dir", "runs/qwen3-gsm8k"], "setup", workdir)
    run(["mlx-grpo", "export", "runs/qwen3-gsm8k", "-o", "export/qwen3-gsm8k"], "setup", workdir)
    ran = 0
    for page in PAGES:
        for language, block, line in fenced_blocks(page):
            if language != "python":
                continue
            text = substitute(block, values)
            if "max_completion_length" not in text:
                text = re.sub(r"max_steps=\d+", r"\g<0>, max_completion_length=8", text)
            code = compile(text, f"{page.name}:{line}", "exec")
            exec(code, {"__name__": f"readme_{line}"})
            ran += 1
    assert ran >= 4


def test_the_main_job_figures_are_the_recorded_runs():
    from mlx_grpo.tasks.quickstart import readme_section

    record = ROOT / "docs" / "main-job"
    summary = json.loads((record / "summary.json").read_text())
    image = "docs/main-job/training.png"
    assert readme_section(summary, image) in (ROOT / "README.md").read_text()
    assert (ROOT / image).read_bytes().startswith(b"\x89PNG")
    assert summary["after"]["all"]["accuracy"] > summary["before"]["all"]["accuracy"]


def test_the_agent_example_figures_are_the_recorded_run():
    sys.path.insert(0, str(ROOT / "scripts"))
    import agent_example

    summary = json.loads((ROOT / "docs" / "agent-example" / "summary.json").read_text())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert agent_example.readme_figures(summary) in readme
    assert summary["all"]["episodes"] == summary["steps"] * 16  # 2 prompts x 8 episodes


def test_the_recipes_tried_are_the_recorded_sweeps():
    sys.path.insert(0, str(ROOT / "scripts"))
    import main_job_readme

    passes = json.loads((ROOT / "docs" / "main-job" / "recipes.json").read_text())
    section = main_job_readme.recipes_section(passes)
    assert section in (ROOT / "README.md").read_text()
    recipes = [name for p in passes for name in p["results"]["recipes"]]
    assert all(f"| {name} |" in section for name in recipes) and len(recipes) >= 6


def test_the_performance_table_is_the_recorded_bench_run():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_readme

    readme = (ROOT / "README.md").read_text()
    if not bench_readme.RECORD.is_file():  # no full run recorded: no rendered table either
        assert bench_readme.START not in readme
        return
    report = json.loads(bench_readme.RECORD.read_text())
    assert not report["run"]["quick"] and set(report["configs"]) == {"A", "B", "C"}
    assert bench_readme.section(report) in readme


def test_the_trl_field_table_names_every_grpo_config_field_and_real_flags():
    trl = pytest.importorskip("trl")
    import click

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### TRL's GRPOConfig, field by field", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+) \|$", section, re.M)
    # the fields GRPOConfig itself declares (TrainingArguments' are in the text after)
    declared = set(trl.GRPOConfig.__annotations__)
    assert [name for name, _ in rows if name not in declared] == []
    assert declared - {name for name, _ in rows} == set()
    commands = {name: main.get_command(None, name) for name in ("train", "eval")}
    flags = {
        opt
        for command in commands.values()
        for param in command.params
        if isinstance(param, click.Option)
        for opt in param.opts + param.secondary_opts
    }
    named = set(re.findall(r"`(--[a-z0-9-]+)", section))
    assert named - flags == set() and len(named) > 30
