"""Training curves of a run: `metrics.jsonl` -> one PNG of panels over steps.

Panels: reward across the top (raw, a +-reward_std band, a trailing rolling mean
and each reward function's mean unless it is the reward itself), then KL to the
reference, completion length with the clipped share, the surrogate's clip ratios,
entropy, the share of groups with zero reward spread (no learning signal), learning
rate, loss and grad norm. A metric a run never logged gets a note in its panel
instead of an empty plot.

Null values (what the reporter writes for NaN or unscorable steps) become gaps in
the lines; a point with gaps on both sides is drawn as a dot so it stays visible.
A resumed run may log a step twice; the later record wins.

matplotlib is an optional dependency (`pip install "mlx-grpo[plot]"`), imported
only here, and drawn through the Agg canvas: no display and no pyplot state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from mlx_grpo.core.reporting import METRICS_FILE, read_log

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOT_FILE = "training.png"
INSTALL_HINT = 'plotting needs matplotlib: pip install "mlx-grpo[plot]"'

# (metric key, legend label) of the simple panels, drawn in this order after the
# reward, KL and length panels.
_CLIP_RATIOS = [
    ("clip_ratio/low_mean", "low: r < 1-eps, A < 0"),
    ("clip_ratio/high_mean", "high: r > 1+eps, A > 0"),
    ("clip_ratio/region_mean", "region: either"),
]
_SINGLE = [
    ("entropy", "entropy (nats / token)"),
    ("frac_reward_zero_std", "groups with zero reward std (no signal)"),
    ("learning_rate", "learning rate"),
    ("loss", "loss"),
    ("grad_norm", "grad norm (before clipping)"),
]
_LAYOUT = [
    ["reward", "reward"],
    ["kl", "completions"],
    ["clip_ratio", "entropy"],
    ["frac_reward_zero_std", "learning_rate"],
    ["loss", "grad_norm"],
]


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw the training curves of the run in `run_dir` to a PNG; return its path.

    Example:
        >>> plot_run("runs/grpo")  # writes runs/grpo/training.png
    """
    run_dir = Path(run_dir)
    out = Path(output) if output is not None else run_dir / PLOT_FILE
    _check_output(out)
    records = load_metrics(run_dir)
    _, FigureCanvasAgg = _matplotlib()
    fig = figure_for(records, _title(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    FigureCanvasAgg(fig).print_png(str(partial))
    partial.replace(out)  # an earlier plot is replaced whole, or kept
    return out


def _check_output(out: Path) -> None:
    """Refuse a plot path that is not a .png, or an existing file that is not a PNG image."""
    if out.suffix.lower() != ".png":
        raise ValueError(f"--output {out}: give the plot a .png name, e.g. {out.stem}.png.")
    if out.is_dir():
        raise ValueError(f"--output {out} is a folder; give the path of a .png file.")
    if out.exists() and not (out.is_file() and _starts_with(out, b"\x89PNG\r\n\x1a\n")):
        raise ValueError(
            f"--output {out} exists and is not a PNG image, so it is not overwritten; choose "
            "another path."
        )


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The step records of `<run_dir>/metrics.jsonl`; ValueError names what is wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise ValueError(f"run directory {run_dir} {what}")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: is {run_dir} the output_dir of a training run?")
    records, _ = read_log(path)  # a last line cut short by a kill is left out
    if not records:
        raise ValueError(f"{path} is empty: the run has not logged a step yet")
    return records


def figure_for(records: list[dict[str, Any]], title: str) -> Figure:
    """The figure of all panels for these step records (the test seam of `plot_run`)."""
    figure_cls, _ = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    steps, series = _series(records)
    fig = figure_cls(figsize=(13, 15), dpi=100, layout="constrained")
    fig.get_layout_engine().set(hspace=0.05)  # room between a panel's ticks and the next title
    fig.suptitle(title, fontsize=13)
    axes = fig.subplot_mosaic(_LAYOUT, sharex=True, height_ratios=[1.3, 1, 1, 1, 1])

    _reward_panel(axes["reward"], steps, series)
    if "kl" in series:
        _lines_panel(axes["kl"], steps, series, [("kl", "kl")], "KL to reference policy")
    else:
        axes["kl"].set_title("KL to reference policy")
        _note(axes["kl"], "beta = 0: no KL")
    _length_panel(axes["completions"], steps, series)
    _lines_panel(axes["clip_ratio"], steps, series, _CLIP_RATIOS, "clipped surrogate: token share")
    for key, label in _SINGLE:
        _lines_panel(axes[key], steps, series, [(key, label)], label)
    axes["learning_rate"].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    axes["reward"].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by all panels
    if steps[-1] - steps[0] < 2:  # one or two steps: widen, or the ticks are fractions
        axes["reward"].set_xlim(steps[0] - 1, steps[-1] + 1)
    for ax in axes.values():
        ax.grid(alpha=0.3)
        ax.tick_params(labelbottom=True)  # sharex hides them; keep step numbers on every panel
    for key in _LAYOUT[-1]:
        axes[key].set_xlabel("step")
    return fig


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the finite values among the last `window` steps; NaN where none."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    n = counts[idx] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[idx] - sums[start]) / np.maximum(n, 1), np.nan)


def _matplotlib() -> tuple[type, type]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError(f"{INSTALL_HINT} ({e})") from None
    return Figure, FigureCanvasAgg


def _title(run_dir: Path) -> str:
    # Parent too: run folders are often named alike ("run", "grpo").
    resolved = run_dir.resolve()
    title = f"{resolved.parent.name}/{resolved.name}" if resolved.parent.name else resolved.name
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            model = (yaml.safe_load(config.read_text()) or {}).get("model")
        except (yaml.YAMLError, AttributeError, ValueError):
            model = None  # a broken config should not stop the plot
        if model:
            model = str(model)
            title += f"  |  model: {model if len(model) <= 70 else '...' + model[-67:]}"
    return title


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def _series(records: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Steps (sorted, one record per step) and each metric as a float array, NaN = null."""
    by_step: dict[float, dict[str, Any]] = {}
    for i, record in enumerate(records):
        step = _number(record.get("step"))
        by_step[i + 1 if math.isnan(step) else step] = record  # later record of a step wins
    steps = sorted(by_step)
    rows = [by_step[s] for s in steps]
    keys = dict.fromkeys(k for row in rows for k in row if k != "step")
    series = {k: np.array([_number(row.get(k)) for row in rows]) for k in keys}
    return np.array(steps, dtype=np.float64), series


def _line(ax: Axes, x: np.ndarray, y: np.ndarray, **kw: Any) -> None:
    """A line with gaps at NaN; points isolated between gaps get a marker."""
    ok = np.isfinite(y)
    prev_ok = np.concatenate([[False], ok[:-1]])
    next_ok = np.concatenate([ok[1:], [False]])
    isolated = np.flatnonzero(ok & ~prev_ok & ~next_ok).tolist()
    if isolated:
        kw |= {"marker": "o", "markersize": 4, "markevery": isolated}
    ax.plot(x, y, **kw)


def _note(ax: Axes, text: str) -> None:
    """Say why a panel is empty; its y scale would mean nothing, so drop it."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_yticks([])


def _reward_panel(ax: Axes, steps: np.ndarray, series: dict[str, np.ndarray]) -> None:
    ax.set_title("reward")
    reward = series.get("reward")
    if reward is None or not np.isfinite(reward).any():
        _note(ax, "not in metrics.jsonl" if reward is None else "every value is null")
        return
    std = series.get("reward_std")
    if std is not None and np.isfinite(std).any():
        ax.fill_between(
            steps, reward - std, reward + std, alpha=0.15, color="C0", label="+- reward_std"
        )
    window = max(1, round(len(steps) / 20))
    # Raw values fade behind the rolling mean when there is one; else they are the curve.
    faint = {"alpha": 0.45, "linewidth": 1} if window > 1 else {"linewidth": 1.8}
    _line(ax, steps, reward, color="C0", label="reward", **faint)
    if window > 1:
        smooth = rolling_mean(reward, window)
        _line(ax, steps, smooth, color="C0", linewidth=2.2, label=f"rolling mean ({window} steps)")
    # A reward function whose mean is the reward itself (the only one, weight 1) would
    # hide the raw line under a copy of it.
    names = [
        k
        for k in series
        if k.startswith("rewards/")
        and k.endswith("/mean")
        and not np.array_equal(series[k], reward, equal_nan=True)
    ]
    for i, key in enumerate(names):
        name = key.removeprefix("rewards/").removesuffix("/mean")
        _line(ax, steps, series[key], color=f"C{i + 1}", linewidth=0.9, linestyle="--", label=name)
    # Outside, right: the full-width panel has room there and no curve is hidden.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))


def _length_panel(ax: Axes, steps: np.ndarray, series: dict[str, np.ndarray]) -> None:
    ax.set_title("completion length")
    clipped = series.get("completions/clipped_ratio")
    drawn = False
    for key, label, color in [
        ("completions/mean_length", "mean length", "C0"),
        ("completions/mean_terminated_length", "mean length, terminated", "C1"),
    ]:
        if key in series:
            y = series[key]
            if key.endswith("terminated_length") and clipped is not None:
                # The reporter logs 0 when every completion was clipped: no such length.
                y = np.where(clipped >= 1.0, np.nan, y)
            _line(ax, steps, y, color=color, label=label)
            drawn = True
    if drawn:
        ax.set_ylabel("tokens")
    if clipped is not None:
        twin = ax.twinx()
        _line(
            twin,
            steps,
            clipped,
            color="C3",
            linestyle=":",
            label="clipped ratio (right)",
        )
        twin.set_ylim(-0.03, 1.03)
        twin.set_ylabel("share hitting max length")
        handles, labels = ax.get_legend_handles_labels()
        twin_handles, twin_labels = twin.get_legend_handles_labels()
        ax.legend(handles + twin_handles, labels + twin_labels, fontsize=8, loc="best")
    elif drawn:
        ax.legend(fontsize=8, loc="best")
    else:
        _note(ax, "not in metrics.jsonl")


def _lines_panel(
    ax: Axes,
    steps: np.ndarray,
    series: dict[str, np.ndarray],
    keys: list[tuple[str, str]],
    title: str,
) -> None:
    ax.set_title(title)
    present = [(k, label) for k, label in keys if k in series]
    if not present:
        _note(ax, "not in metrics.jsonl")
        return
    if not any(np.isfinite(series[k]).any() for k, _ in present):
        _note(ax, "every value is null")
        return
    for key, label in present:
        _line(ax, steps, series[key], label=label)
    if len(keys) > 1:
        ax.legend(fontsize=8, loc="best")
