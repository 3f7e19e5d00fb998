"""`mlx-grpo plot`: metrics.jsonl -> training.png, and its errors."""

import json
import math
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from mlx_grpo.tools import plot  # noqa: E402
from mlx_grpo.tools.plot import figure_for, load_metrics, plot_run, rolling_mean  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rising_run(steps: int = 30, kl: bool = True) -> list[dict]:
    """Steps of a run whose reward climbs and whose every metric changes (warmup, several
    updates per rollout); a few values are null, as the reporter writes."""
    records = []
    for s in range(1, steps + 1):
        record = {
            "step": s,
            "reward": s / steps,
            "reward_std": 0.1,
            "rewards/correct/mean": 0.8 * s / steps,
            "rewards/format/mean": 0.2,
            "entropy": 2.0 - s / steps,
            "frac_reward_zero_std": (s % 4) / 4,
            "completions/mean_length": 100.0 + s,
            "completions/clipped_ratio": 0.1,
            "clip_ratio/low_mean": 0.0,
            "clip_ratio/high_mean": 0.01 * (s % 3),
            "clip_ratio/region_mean": 0.01 * (s % 3),
            "learning_rate": 1e-5 * min(1.0, s / 5),
            "grad_norm": 0.5 + 0.01 * s,
            "loss": 0.01 * (-1) ** s,
        }
        if kl:
            record["kl"] = 0.001 * s
        if s % 5 == 0:  # evaluated every 5 steps
            record |= {"eval_reward": s / (2 * steps), "eval_accuracy": s / (4 * steps)}
            record |= {"eval_pass@1": s / (4 * steps), "eval_pass@4": s / (3 * steps)}
        records.append(record)
    for r in records:
        if r["step"] == 10:
            r["reward"] = None  # no reward could be scored
        if r["step"] == 5:
            r["loss"] = None
    return records


def write_run(run_dir, records) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def flat_run(steps: int = 10) -> list[dict]:
    """A beta = 0 run with one update per rollout and no schedule: no kl, clip ratios
    all 0, a constant learning rate; reward, loss and grad norm change."""
    return [
        {
            "step": s,
            "reward": s / steps,
            "clip_ratio/low_mean": 0.0,
            "clip_ratio/high_mean": 0.0,
            "clip_ratio/region_mean": 0.0,
            "learning_rate": 1e-5,
            "loss": 0.01 * s,
            "grad_norm": 1.0 / s,
        }
        for s in range(1, steps + 1)
    ]


HELDOUT = {
    "before": {"all": {"accuracy": 0.25, "prompts": 8}, "add1": {"accuracy": 0.5}},
    "after": {"all": {"accuracy": 0.625, "prompts": 8}, "add1": {"accuracy": 1.0}},
}

ALL_PANELS = {
    "reward",
    "KL to reference policy",
    "completion length",
    "clipped surrogate: token share",
    "entropy (nats / token)",
    "groups with zero reward std (no signal)",
    "learning rate",
    "loss",
    "grad norm (before clipping)",
    "held-out evaluation (eval_data)",
}


def axes_by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def figure_text(fig) -> str:
    """Every line of text written on the figure itself (title, footnote)."""
    return "\n".join(t.get_text() for t in fig.texts)


def line(ax, label: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


def test_plot_run_writes_a_png_into_the_run_dir(tmp_path):
    write_run(tmp_path / "run", rising_run())

    out = plot_run(tmp_path / "run")

    assert out == tmp_path / "run" / "training.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = imread(out).shape
    assert height > 600 and width > 600


def test_plot_pixels_follow_the_data(tmp_path):
    run = tmp_path / "run"
    write_run(run, rising_run())
    rising = plot_run(run, tmp_path / "plots" / "rising.png")
    falling = rising_run()
    for r in falling:
        r["reward"] = None if r["reward"] is None else 1.0 - r["reward"]
    write_run(run, falling)
    other = plot_run(run, tmp_path / "plots" / "falling.png")

    assert not (run / "training.png").exists()  # `output` replaces the default path
    first, second = imread(rising), imread(other)
    assert first.shape == second.shape
    assert not np.array_equal(first, second)


def test_figure_has_a_panel_per_metric_group_when_every_metric_changes():
    fig = figure_for(rising_run(), "my-run")

    assert set(axes_by_title(fig)) == ALL_PANELS
    assert fig.get_suptitle() == "my-run"
    assert figure_text(fig) == "my-run"  # nothing left out, so no footnote


def test_panels_are_laid_out_two_to_a_row_under_the_full_width_reward():
    axes = axes_by_title(figure_for(rising_run(), "run"))

    reward = axes.pop("reward").get_subplotspec()
    assert reward.colspan == range(0, 2) and reward.rowspan == range(0, 1)
    spans = [ax.get_subplotspec() for ax in axes.values()]
    assert all(len(spec.colspan) == 1 for spec in spans)
    assert max(spec.rowspan.stop for spec in spans) == 1 + math.ceil(len(spans) / 2)


def test_reward_panel_draws_raw_values_band_rolling_mean_and_each_reward_function():
    records = rising_run(steps=60)
    fig = figure_for(records, "run")
    ax = axes_by_title(fig)["reward"]

    expected = [math.nan if r["reward"] is None else r["reward"] for r in records]
    np.testing.assert_array_equal(line(ax, "reward").get_ydata(), expected)
    np.testing.assert_array_equal(line(ax, "reward").get_xdata(), np.arange(1, 61))
    # window = 60 / 20 = 3 steps
    smooth = line(ax, "rolling mean (3 steps)").get_ydata()
    assert smooth[5] == pytest.approx(np.mean([4 / 60, 5 / 60, 6 / 60]))
    assert smooth[10] == pytest.approx(np.mean([9 / 60, 11 / 60]))  # step 10's null is skipped
    np.testing.assert_allclose(
        line(ax, "correct").get_ydata(), [r["rewards/correct/mean"] for r in records]
    )
    assert line(ax, "format").get_ydata()[0] == 0.2
    assert len(ax.collections) == 1  # the +- reward_std band


def test_a_lone_reward_function_equal_to_the_reward_is_not_drawn_twice():
    records = [{"step": s, "reward": s / 10, "rewards/only/mean": s / 10} for s in range(1, 11)]

    ax = axes_by_title(figure_for(records, "run"))["reward"]

    assert [ln.get_label() for ln in ax.get_lines()] == ["reward"]


def test_eval_panel_joins_the_evaluated_steps_and_draws_pass_at_k():
    records = rising_run()

    ax = axes_by_title(figure_for(records, "run"))["held-out evaluation (eval_data)"]

    evaluated = [r for r in records if "eval_reward" in r]
    for label, key in [("reward", "eval_reward"), ("accuracy", "eval_accuracy"),
                       ("pass@1", "eval_pass@1"), ("pass@4", "eval_pass@4")]:  # fmt: skip
        np.testing.assert_array_equal(line(ax, label).get_xdata(), [5, 10, 15, 20, 25, 30])
        np.testing.assert_allclose(line(ax, label).get_ydata(), [r[key] for r in evaluated])


def test_kl_panel_plots_kl_when_logged():
    records = rising_run()

    ax = axes_by_title(figure_for(records, "run"))["KL to reference policy"]

    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [r["kl"] for r in records])


def test_absent_and_constant_metrics_get_no_panel_and_are_named_with_their_value():
    fig = figure_for(flat_run(), "run")

    assert set(axes_by_title(fig)) == {"reward", "loss", "grad norm (before clipping)"}
    note = figure_text(fig)
    assert "constant: clip ratios 0, learning_rate 1e-05" in note
    assert "not logged: kl (beta = 0)" in note


def test_a_varying_learning_rate_gets_its_panel():
    records = flat_run()
    for r in records:
        r["learning_rate"] = 1e-5 * r["step"] / len(records)  # warmup

    fig = figure_for(records, "run")

    ax = axes_by_title(fig)["learning rate"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [r["learning_rate"] for r in records])
    assert "learning_rate" not in figure_text(fig)


def test_values_equal_within_float_tolerance_count_as_constant():
    records = flat_run()
    for r in records:
        r["learning_rate"] = 1e-5 * (1 + 1e-9 * r["step"])

    fig = figure_for(records, "run")

    assert "learning rate" not in axes_by_title(fig)
    assert "learning_rate 1e-05" in figure_text(fig)


def test_clip_ratios_of_different_constant_values_are_named_one_by_one():
    records = flat_run()
    for r in records:
        r["clip_ratio/high_mean"] = r["clip_ratio/region_mean"] = 0.02

    note = figure_text(figure_for(records, "run"))

    assert "clip_ratio/low_mean 0, clip_ratio/high_mean 0.02, clip_ratio/region_mean 0.02" in note


def test_unlogged_or_all_null_metrics_get_no_panel_and_are_named():
    records = [{"step": s, "reward": s / 3, "grad_norm": None} for s in (1, 2, 3)]

    fig = figure_for(records, "run")

    assert set(axes_by_title(fig)) == {"reward"}
    note = figure_text(fig)
    assert "all null: grad_norm" in note
    assert "not logged: kl (beta = 0), completions, clip ratios, entropy" in note


def test_every_axes_has_a_label_on_each_visible_axis():
    fig = figure_for(rising_run(), "run", heldout=HELDOUT)

    assert len(fig.axes) == len(ALL_PANELS) + 2  # + held-out, + the clipped ratio's twin
    for ax in fig.axes:
        assert ax.get_ylabel(), ax.get_title()
        if ax.xaxis.get_visible():  # a twin's x axis is its host's, drawn once
            assert ax.get_xlabel(), ax.get_title()
    step_panels = [ax for ax in fig.axes if ax.get_title() in ALL_PANELS]
    assert {ax.get_xlabel() for ax in step_panels} == {"step"}
    assert axes_by_title(fig)["reward"].get_ylabel() == "reward"
    assert axes_by_title(fig)["completion length"].get_ylabel() == "tokens"


def test_heldout_adds_a_panel_of_before_and_after_bars_labelled_in_percent():
    fig = figure_for(rising_run(), "run", heldout=HELDOUT)

    ax = axes_by_title(fig)["held-out accuracy"]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == [0.25, 0.5, 0.625, 1.0]  # before: all, add1; then after: all, add1
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all", "add1"]
    assert [t.get_text() for t in ax.texts] == ["25.0%", "50.0%", "62.5%", "100.0%"]
    assert "held-out accuracy" not in axes_by_title(figure_for(rising_run(), "run"))


def test_plot_run_draws_heldout_accuracy(tmp_path, monkeypatch):
    write_run(tmp_path, rising_run(steps=3))
    seen = []
    real = plot.figure_for

    def spy(records, title, heldout=None):
        seen.append(heldout)
        return real(records, title, heldout=heldout)

    monkeypatch.setattr(plot, "figure_for", spy)

    out = plot_run(tmp_path, heldout=HELDOUT)

    assert seen == [HELDOUT]
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("heldout", "message"),
    [
        ({"before": HELDOUT["before"]}, 'needs "before" and "after"'),
        ([HELDOUT["before"], HELDOUT["after"]], 'needs "before" and "after"'),
        ({"before": {}, "after": HELDOUT["after"]}, r'heldout\["before"\] should map group'),
        (
            {"before": HELDOUT["before"], "after": {"all": {"prompts": 8}}},
            r'heldout\["after"\]\["all"\] has no "accuracy" number',
        ),
        (
            {"before": {"all": {"accuracy": "25%"}}, "after": HELDOUT["after"]},
            r'heldout\["before"\]\["all"\] has no "accuracy" number',
        ),
    ],
)
def test_malformed_heldout_is_refused(heldout, message):
    with pytest.raises(ValueError, match=message):
        figure_for(rising_run(steps=3), "run", heldout=heldout)


def test_single_step_run_with_null_and_nan_values_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # NaN is not JSON, but Python's json writes and reads it; take it like null.
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "reward": 0.25, "reward_std": null, "loss": NaN, "kl": 0.0}\n'
    )

    out = plot_run(run)

    assert out.read_bytes()[:8] == PNG_MAGIC
    fig = figure_for(load_metrics(run), "run")
    ax = axes_by_title(fig)["reward"]
    reward = line(ax, "reward")
    assert reward.get_marker() == "o"  # a lone point gets a dot, or it would be invisible
    assert ax.get_xlim() == (0.0, 2.0)
    assert "constant: kl 0" in figure_text(fig)  # one value is constant over the run
    assert "all null: loss" in figure_text(fig)


def test_a_relogged_step_keeps_the_later_record():
    records = [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.9}, {"step": 2, "reward": 0.5}]

    ax = axes_by_title(figure_for(records, "run"))["reward"]

    np.testing.assert_array_equal(line(ax, "reward").get_ydata(), [0.1, 0.5])


def test_title_names_the_run_dir_and_the_model(tmp_path, monkeypatch):
    run = tmp_path / "exp" / "grpo-7"
    write_run(run, rising_run(steps=2))
    (run / "config.yaml").write_text("model: Qwen/Qwen3-0.6B\nbeta: 0.0\n")
    titles = []

    def spy(records, title, heldout=None):  # skip the drawing: only the title matters here
        titles.append(title)
        return Figure(figsize=(1, 1))

    monkeypatch.setattr(plot, "figure_for", spy)

    plot_run(run)

    assert titles == ["exp/grpo-7  |  model: Qwen/Qwen3-0.6B"]


def test_rolling_mean_is_trailing_and_skips_nan():
    values = np.array([1.0, 3.0, np.nan, 5.0, np.nan, np.nan])

    np.testing.assert_allclose(
        rolling_mean(values, 2), [1.0, 2.0, 3.0, 5.0, 5.0, np.nan], equal_nan=True
    )
    np.testing.assert_array_equal(rolling_mean(values, 1), values)


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="run directory .*nope does not exist"):
        plot_run(tmp_path / "nope")


def test_run_dir_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"metrics\.jsonl not found"):
        plot_run(tmp_path)


def test_empty_metrics_file_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n\n")

    with pytest.raises(ValueError, match="is empty"):
        plot_run(tmp_path)


def test_bad_json_line_is_named_by_file_and_line(tmp_path):
    lines = [json.dumps({"step": 1, "reward": 0.1}), '{"step": 2, "rew', json.dumps({"step": 3})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        plot_run(tmp_path)


def test_a_last_line_cut_short_by_a_kill_is_left_out(tmp_path):
    lines = [json.dumps({"step": 1, "reward": 0.1}), json.dumps({"step": 2}), '{"step": 3, "rew']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    assert [r["step"] for r in load_metrics(tmp_path)] == [1, 2]


def test_a_line_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("[1, 2]\n")

    with pytest.raises(ValueError, match="line 1: expected a JSON object of metrics .*, got list"):
        plot_run(tmp_path)


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    write_run(tmp_path, rising_run(steps=2))
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail

    with pytest.raises(ValueError, match=r'pip install "mlx-grpo\[plot\]"'):
        plot_run(tmp_path)
