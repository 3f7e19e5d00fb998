import io
import json
import os
import sys

import pytest

from mlx_grpo.core import progress
from mlx_grpo.core.progress import progress_line, terminal_width
from mlx_grpo.core.reporting import METRICS_FILE, Reporter


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves by hand: `clock.now` seconds."""

    class Clock:
        now = 0.0

    monkeypatch.setattr(progress.time, "perf_counter", lambda: Clock.now)
    return Clock


def _log_steps(reporter: Reporter, steps: range) -> None:
    for step in steps:
        reporter.log({"step": step, "reward": 0.5, "time/step": 1.0})


def test_step_limited_line_shows_step_count_and_eta_from_the_mean_step_time():
    # 12 steps in 180 s: 15 s each, so 88 steps left take 1320 s. The last step's
    # 15.3 s is shown but not used for the ETA (88 x 15.3 s would be 22:26).
    line = progress_line(12, 100, 180.0, 15.3, 0.42)
    assert line == "step 12/100 | 3:00 elapsed, ETA 22:00 | reward 0.42 | 15.3 s/step"


def test_resumed_run_eta_counts_only_the_steps_run_since_the_resume():
    # 10 steps (51..60) in 100 s: 10 s each, 40 steps left.
    line = progress_line(60, 100, 100.0, 10.0, None, start_step=50)
    assert line.startswith("step 60/100 | 1:40 elapsed, ETA 6:40 |")
    assert "reward - |" in line


def test_time_limited_line_counts_minutes_and_its_eta_counts_down_to_the_limit():
    # 21 s a step: the 88 steps left would take 30 min, past the 10-minute limit.
    early = progress_line(12, 100, 252.0, 21.0, 0.4, max_minutes=10)
    assert early.startswith("4.2/10 min, step 12 | 4:12 elapsed, ETA 5:48 |")
    assert "/100" not in early  # the step limit is not what stops this run
    later = progress_line(20, 100, 420.0, 21.0, 0.4, max_minutes=10)
    assert "7.0/10 min" in later and "ETA 3:00" in later
    past = progress_line(29, 100, 609.0, 21.0, 0.4, max_minutes=10)
    assert "ETA 0:00" in past  # the step that passes the limit is the last


def test_time_limited_run_eta_never_goes_past_what_max_steps_would_take():
    # 10 s a step, 2 steps left: 20 s, well inside the 10-minute limit.
    line = progress_line(18, 20, 180.0, 10.0, 0.4, max_minutes=10)
    assert line.startswith("step 18/20 | 3:00 elapsed, ETA 0:20 |")


def test_line_before_the_first_step_shows_no_eta():
    line = progress_line(0, 100, 0.0, None, None, max_minutes=10)
    assert line == "0.0/10 min, step 0 | 0:00 elapsed, ETA - | reward - | - s/step"


def test_line_shows_hours_past_sixty_minutes():
    line = progress_line(1, 100, 3725.0, 3725.0, 1.0)
    assert "1:02:05 elapsed, ETA 102:26:15" in line


def test_lines_mode_prints_one_plain_line_per_every_steps_and_the_last(tmp_path, capsys):
    reporter = Reporter(tmp_path, max_steps=11, mode="lines", every=3)
    _log_steps(reporter, range(1, 12))
    reporter.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert [line.split(" |")[0] for line in lines] == [
        "step 1/11",
        "step 4/11",
        "step 7/11",
        "step 10/11",
        "step 11/11",
    ]
    assert err.endswith("\n")


def test_lines_mode_prints_the_last_step_of_a_run_stopped_early(tmp_path, capsys, clock):
    # 10 s a step against a 1-minute limit: the limit stops the run, here at step 5,
    # which `every` skips.
    reporter = Reporter(tmp_path, max_steps=100, max_minutes=1, mode="lines", every=3)
    for step in range(1, 6):
        clock.now += 10.0
        reporter.log({"step": step, "reward": 0.5})
    reporter.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" |")[0] for line in lines] == [
        "0.2/1 min, step 1",
        "0.7/1 min, step 4",
        "0.8/1 min, step 5",
    ]
    assert lines[-1].startswith("0.8/1 min, step 5 | 0:50 elapsed, ETA 0:10 |")


def test_step_time_comes_from_the_metrics_or_else_the_wall_clock(tmp_path, capsys, clock):
    reporter = Reporter(tmp_path, max_steps=10, mode="lines")
    clock.now = 4.0
    reporter.log({"step": 1, "reward": 0.25})  # no time/step: 4 s since the reporter started
    clock.now = 10.0
    reporter.log({"step": 2, "reward": None, "time/step": 5.5})
    reporter.close()
    first, second = capsys.readouterr().err.splitlines()
    assert first == "step 1/10 | 0:04 elapsed, ETA 0:36 | reward 0.25 | 4 s/step"
    assert second == "step 2/10 | 0:10 elapsed, ETA 0:40 | reward - | 5.5 s/step"


def test_off_mode_shows_nothing_but_still_writes_the_metrics(tmp_path, capsys):
    reporter = Reporter(tmp_path, max_steps=3, mode="off")
    _log_steps(reporter, range(1, 4))
    reporter.close()
    assert capsys.readouterr().err == ""
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


def test_disabled_reporter_writes_no_files_and_shows_nothing(tmp_path, capsys):
    reporter = Reporter(tmp_path, max_steps=3, mode="lines", enabled=False)
    _log_steps(reporter, range(1, 4))
    reporter.samples(1, [{"prompt": "p", "completion": "c", "rewards": {}, "advantage": 0.0}])
    reporter.write("text")
    reporter.close()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")


def test_auto_mode_prints_plain_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert not sys.stderr.isatty()  # capsys captures it
    reporter = Reporter(tmp_path, max_steps=2)
    _log_steps(reporter, range(1, 3))
    reporter.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(" |")[0] for line in err.splitlines()] == ["step 1/2", "step 2/2"]


def test_bar_mode_clears_its_line_before_printing_text_and_ends_on_a_newline(tmp_path, monkeypatch):
    screen = io.StringIO()  # stdout and stderr on one terminal, in the order written
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(sys, "stdout", screen)
    reporter = Reporter(tmp_path, max_steps=3, mode="bar")
    _log_steps(reporter, range(1, 3))
    reporter.write("sample text")
    reporter.close()
    out = screen.getvalue()
    assert "\r\x1b[2Ksample text\n" in out  # not after a half-drawn bar
    after_text = out.split("sample text\n")[1]
    assert after_text.startswith("\r\x1b[2Kstep 2/3 |")  # the bar is drawn again below it
    assert out.count("\n") == 2  # the text and the final newline: the bar never scrolls


def test_bar_mode_keeps_the_line_within_the_terminal_width(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "terminal_width", lambda stream: 30)
    reporter = Reporter(tmp_path, max_steps=3, mode="bar")
    _log_steps(reporter, range(1, 4))
    reporter.close()
    drawn = capsys.readouterr().err.split("\r\x1b[2K")[1:]
    assert len(drawn) == 4  # the start, then each step
    assert all(len(line.rstrip("\n")) <= 29 for line in drawn)
    assert drawn[-1].startswith("step 3/3 | ")


def test_terminal_that_reports_no_width_is_taken_as_80_columns(monkeypatch):
    # A pseudo-terminal whose size was never set reports 0 columns.
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    assert terminal_width(sys.__stderr__) == 80


def test_unknown_mode_is_refused_before_any_file_is_opened(tmp_path):
    with pytest.raises(ValueError, match="one of auto, bar, lines, off; got 'fancy'"):
        Reporter(tmp_path, max_steps=3, mode="fancy")
    assert list(tmp_path.iterdir()) == []
