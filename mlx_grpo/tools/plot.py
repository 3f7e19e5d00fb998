"""Training curves of a run: `metrics.jsonl` -> one PNG of panels over steps.

Panels: reward across the top (raw, a +-reward_std band, a trailing rolling mean
and each reward function's mean unless it is the reward itself), then, two to a
row, held-out accuracy before -> after training when given, KL to the reference,
completion length with the clipped share, the surrogate's clip ratios, entropy,
the share of groups with zero reward spread (no learning signal), learning rate,
loss and grad norm.

Only metrics that change get a panel. One that is constant over the run (clip
ratios all 0 with one update per rollout, a learning rate without a schedule),
all null, or never logged (no KL when beta = 0) is named, with its value, in a
line at the foot of the figure instead, so nothing is hidden silently. The reward
panel is always drawn.

Null values (what the reporter writes for NaN or unscorable steps) become gaps in
the lines; a point with gaps on both sides is drawn as a dot so it stays visible.
A resumed run may log a step twice; the later record wins.

matplotlib is an optional dependency (`pip install "mlx-grpo[plot]"`), imported
only here, and drawn through the Agg canvas: no display and no pyplot state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Panel:
    """One panel over steps: the metrics it draws and how its axes are labelled."""

    name: str  # mosaic key, and its name in the note of what was left out
    title: str
    ylabel: str
    keys: list[tuple[str, str]]  # (metric key, legend label)
    why_absent: str = ""  # said in the note when none of `keys` was logged


_CLIPPED = "completions/clipped_ratio"
_LENGTHS = [
    ("completions/mean_length", "mean length"),
    ("completions/mean_terminated_length", "mean length, terminated"),
]
# Drawn in this order after the reward (and held-out) panels, two to a row.
_PANELS = [
    _Panel("kl", "KL to reference policy", "nats / token", [("kl", "kl")], "beta = 0"),
    _Panel(
        "completions",
        "completion length",
        "tokens",
        [*_LENGTHS, (_CLIPPED, "clipped ratio (right)")],
    ),
    _Panel(
        "clip ratios",
        "clipped surrogate: token share",
        "share of tokens",
        [
            ("clip_ratio/low_mean", "low: r < 1-eps, A < 0"),
            ("clip_ratio/high_mean", "high: r > 1+eps, A > 0"),
            ("clip_ratio/region_mean", "region: either"),
            ("cispo_clip_ratio", "cispo: r > eps_high, A > 0"),
        ],
    ),
    _Panel("entropy", "entropy (nats / token)", "nats / token", [("entropy", "entropy")]),
    _Panel(
        "frac_reward_zero_std",
        "groups with zero reward std (no signal)",
        "share of groups",
        [
            ("frac_reward_zero_std", "trained on"),
            ("dynamic_sampling/frac_reward_zero_std_before", "drawn (dynamic sampling)"),
        ],
    ),
    _Panel(
        "eval",
        "held-out evaluation (eval_data)",
        "share / reward",
        [("eval_reward", "reward"), ("eval_accuracy", "accuracy")],
        "no eval_data",
    ),
    _Panel("learning_rate", "learning rate", "learning rate", [("learning_rate", "lr")]),
    _Panel("loss", "loss", "loss", [("loss", "loss")]),
    _Panel("grad_norm", "grad norm (before clipping)", "L2 norm", [("grad_norm", "grad norm")]),
]
# Values this close count as one: a float that only round-trips through JSON is constant.
_RTOL, _ATOL = 1e-6, 1e-12


def plot_run(
    run_dir: str | Path, output: str | Path | None = None, *, heldout: dict | None = None
) -> Path:
    """Draw the training curves of the run in `run_dir` to a PNG; return its path.

    `heldout`, if given, adds a panel of held-out accuracy before -> after training:
    `{"before": summary, "after": summary}`, each the `summary` of an `evaluate(...)`
    result (group -> figures, with "accuracy" in each group).

    Example:
        >>> plot_run("runs/grpo")  # writes runs/grpo/training.png
        >>> plot_run("runs/grpo", heldout={"before": before.summary, "after": after.summary})
    """
    run_dir = Path(run_dir)
    out = Path(output) if output is not None else run_dir / PLOT_FILE
    _check_output(out)
    records = load_metrics(run_dir)
    _, FigureCanvasAgg = _matplotlib()
    fig = figure_for(records, _title(run_dir), heldout=heldout)
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
    records = [r for r in records if "event" not in r]  # restarts (--auto-resume) are no step
    if not records:
        raise ValueError(f"{path} is empty: the run has not logged a step yet")
    return records


def figure_for(records: list[dict[str, Any]], title: str, *, heldout: dict | None = None) -> Figure:
    """The figure of all panels for these step records (the test seam of `plot_run`)."""
    if heldout is not None:
        _check_heldout(heldout)
    figure_cls, _ = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    steps, series = _series(records)
    panels, left_out = _panels_with_data(series)
    names = (["heldout"] if heldout is not None else []) + [p.name for p in panels]
    layout = [["reward", "reward"]]
    for i in range(0, len(names), 2):
        pair = names[i : i + 2]
        layout.append(pair + ["."] * (2 - len(pair)))  # "." leaves the slot empty
    height_ratios = [1.3] + [1] * (len(layout) - 1)
    fig = figure_cls(figsize=(13, 0.8 + 2.6 * sum(height_ratios)), dpi=100, layout="constrained")
    fig.get_layout_engine().set(hspace=0.05)  # room between a panel's ticks and the next title
    fig.suptitle(title, fontsize=13)
    if left_out:
        # A figure-wide x label is a footnote that constrained layout makes room for.
        fig.supxlabel(left_out, fontsize=9, color="0.35")
    axes = fig.subplot_mosaic(layout, height_ratios=height_ratios)

    reward = axes["reward"]
    _reward_panel(reward, steps, series)
    reward.set_ylabel("reward")
    for panel in panels:
        ax = axes[panel.name]
        ax.sharex(reward)  # not the held-out panel: its x axis is the groups
        ax.set_title(panel.title)
        ax.set_ylabel(panel.ylabel)
        draw = {"completions": _length_panel, "eval": _eval_panel}.get(panel.name, _lines_panel)
        draw(ax, steps, series, panel)
    if "learning_rate" in axes:
        axes["learning_rate"].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if heldout is not None:
        _heldout_panel(axes["heldout"], heldout)

    reward.xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by all step panels
    if steps[-1] - steps[0] < 2:  # one or two steps: widen, or the ticks are fractions
        reward.set_xlim(steps[0] - 1, steps[-1] + 1)
    for name, ax in axes.items():
        ax.grid(alpha=0.3)
        if name != "heldout":
            ax.set_xlabel("step")
    return fig


def _panels_with_data(series: dict[str, np.ndarray]) -> tuple[list[_Panel], str]:
    """The panels with a metric that changes over the run, and a line naming the rest."""
    drawn, constant, null, absent = [], [], [], []
    for panel in _PANELS:
        logged = [k for k, _ in panel.keys if k in series]
        values = {k: series[k][np.isfinite(series[k])] for k in logged}
        values = {k: v for k, v in values.items() if v.size}
        if any(not np.allclose(v, v[0], rtol=_RTOL, atol=_ATOL) for v in values.values()):
            drawn.append(panel)
            continue
        if values:
            constant.append(_constant_text(panel.name, {k: v[0] for k, v in values.items()}))
        null += [k for k in logged if k not in values]
        if not logged:
            absent.append(f"{panel.name} ({panel.why_absent})" if panel.why_absent else panel.name)
    parts = [("constant", constant), ("all null", null), ("not logged", absent)]
    return drawn, "  |  ".join(f"{what}: {', '.join(names)}" for what, names in parts if names)


def _constant_text(name: str, values: dict[str, float]) -> str:
    """'learning_rate 1e-05'; a group of metrics sharing one value goes by the panel's name."""
    first = next(iter(values.values()))
    if len(values) > 1 and all(
        math.isclose(v, first, rel_tol=_RTOL, abs_tol=_ATOL) for v in values.values()
    ):
        return f"{name} {first:.3g}"
    return ", ".join(f"{k} {v:.3g}" for k, v in values.items())


def _check_heldout(heldout: Any) -> None:
    """Refuse a `heldout` that is not {"before": summary, "after": summary} with accuracies."""
    hint = 'give {"before": evaluate(...).summary, "after": evaluate(...).summary}'
    if not isinstance(heldout, dict) or not {"before", "after"} <= heldout.keys():
        got = sorted(heldout) if isinstance(heldout, dict) else type(heldout).__name__
        raise ValueError(f'heldout needs "before" and "after" summaries ({hint}); got {got}')
    for side in ("before", "after"):
        summary = heldout[side]
        if not isinstance(summary, dict) or not summary:
            raise ValueError(
                f'heldout["{side}"] should map group -> figures, e.g. '
                f'{{"all": {{"accuracy": 0.4}}}}; got {summary!r:.80}'
            )
        for group, figures in summary.items():
            accuracy = figures.get("accuracy") if isinstance(figures, dict) else None
            if not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool):
                what = sorted(figures) if isinstance(figures, dict) else repr(figures)
                raise ValueError(
                    f'heldout["{side}"]["{group}"] has no "accuracy" number; got {what}'
                )


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


def _length_panel(
    ax: Axes, steps: np.ndarray, series: dict[str, np.ndarray], panel: _Panel
) -> None:
    clipped = series.get(_CLIPPED)
    for i, (key, label) in enumerate(_LENGTHS):
        if key in series:
            y = series[key]
            if key.endswith("terminated_length") and clipped is not None:
                # The reporter logs 0 when every completion was clipped: no such length.
                y = np.where(clipped >= 1.0, np.nan, y)
            _line(ax, steps, y, color=f"C{i}", label=label)
    if clipped is None:
        ax.legend(fontsize=8, loc="best")
        return
    twin = ax.twinx()
    _line(twin, steps, clipped, color="C3", linestyle=":", label=dict(panel.keys)[_CLIPPED])
    twin.set_ylim(-0.03, 1.03)
    twin.set_ylabel("share hitting max length")
    handles, labels = ax.get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    ax.legend(handles + twin_handles, labels + twin_labels, fontsize=8, loc="best")


def _lines_panel(ax: Axes, steps: np.ndarray, series: dict[str, np.ndarray], panel: _Panel) -> None:
    # An all-null metric would only add an empty legend entry.
    drawn = [(k, label) for k, label in panel.keys if k in series and np.isfinite(series[k]).any()]
    for key, label in drawn:
        _line(ax, steps, series[key], label=label)
    if len(panel.keys) > 1:
        ax.legend(fontsize=8, loc="best")


def _eval_panel(ax: Axes, steps: np.ndarray, series: dict[str, np.ndarray], panel: _Panel) -> None:
    """The evaluations' figures, each point joined to the next (they come every eval_steps)."""
    passes = sorted(k for k in series if k.startswith("eval_pass@"))
    keys = [*panel.keys, *((k, k.removeprefix("eval_")) for k in passes)]
    for key, label in keys:
        if key in series:
            y = series[key]
            ok = np.isfinite(y)
            ax.plot(steps[ok], y[ok], marker="o", markersize=3, label=label)
    ax.legend(fontsize=8, loc="best")


def _heldout_panel(ax: Axes, heldout: dict) -> None:
    """Accuracy per group, before and after training side by side, each bar labelled."""
    from matplotlib.ticker import PercentFormatter

    before, after = heldout["before"], heldout["after"]
    groups = list(dict.fromkeys([*before, *after]))  # a group only one side has gets one bar
    width = 0.38
    for offset, side, label, color in [
        (-width / 2, before, "before training", "0.65"),
        (width / 2, after, "after training", "C0"),
    ]:
        xs = [i + offset for i, g in enumerate(groups) if g in side]
        accuracies = [float(side[g]["accuracy"]) for g in groups if g in side]
        bars = ax.bar(xs, accuracies, width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{a:.1%}" for a in accuracies], fontsize=7, padding=1)
    ax.set_title("held-out accuracy")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel("group")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.25)  # room above a 100% bar for its label and the legend
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(fontsize=8, loc="upper center", ncols=2)
