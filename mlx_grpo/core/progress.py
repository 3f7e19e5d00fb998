"""The run's progress on stderr: a one-line bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO

PROGRESS_MODES = ("auto", "bar", "lines", "off")
_CLEAR_LINE = "\r\x1b[2K"  # back to the line's start, then erase it


class Progress:
    """The run's progress on stderr: one redrawn line on a terminal ("bar"), a plain line
    every `every` steps and at the last ("lines", for logs and CI), or nothing ("off").
    "auto" is "bar" when stderr is a terminal, else "lines".
    """

    def __init__(
        self,
        mode: str,
        max_steps: int,
        max_minutes: float | None,
        start_step: int,
        every: int,
    ):
        if mode not in PROGRESS_MODES:
            raise ValueError(
                f"progress mode must be one of {', '.join(PROGRESS_MODES)}; got {mode!r}"
            )
        if every < 1:
            raise ValueError(f"progress lines are shown every n >= 1 steps; got every={every}")
        self.stream = sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode, self.every = mode, every
        self.max_steps, self.max_minutes, self.start_step = max_steps, max_minutes, start_step
        self.started = self.last = time.perf_counter()
        self.step, self.step_s, self.reward = start_step, None, None
        self.shown = start_step  # the last step a line was printed for
        self.drawn = False  # a bar line is on screen, to clear before printing text
        if mode == "bar":
            self._draw()  # the first step can take minutes (compilation): show the run started

    def update(self, step: int | None, step_s: float | None, reward: float | None) -> None:
        """A step finished: `step` steps are done, the last in `step_s` seconds."""
        now = time.perf_counter()
        self.step = self.step + 1 if step is None else step
        self.step_s = now - self.last if step_s is None else step_s
        self.last, self.reward = now, reward
        if self.mode == "bar":
            self._draw()
        # Steps 1, 1 + every, ...: the steps the trainer prints samples for; the first
        # shows early that the run works.
        elif self.mode == "lines" and (
            (self.step - 1) % self.every == 0 or self.step >= self.max_steps
        ):
            self._print_line()

    def above(self, text: str) -> None:
        """Print `text` to stdout, above the bar."""
        if self.drawn:
            self.stream.write(_CLEAR_LINE)  # no half bar left in front of the text
            self.stream.flush()
        print(text, flush=True)
        if self.drawn:
            self._draw()

    def close(self) -> None:
        # The time limit or an interruption ends a run at a step `every` may have skipped.
        if self.mode == "lines" and self.shown != self.step:
            self._print_line()
        if self.drawn:
            self.stream.write("\n")  # leave the last bar on screen
            self.stream.flush()
            self.drawn = False

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.started
        limits = (self.max_minutes, self.start_step)
        return progress_line(self.step, self.max_steps, elapsed, self.step_s, self.reward, *limits)

    def _print_line(self) -> None:
        print(self._line(), file=self.stream, flush=True)
        self.shown = self.step

    def _draw(self) -> None:
        # One column short: a line that fills the width wraps on some terminals.
        self.stream.write(_CLEAR_LINE + self._line()[: terminal_width(self.stream) - 1])
        self.stream.flush()
        self.drawn = True


def terminal_width(stream: TextIO) -> int:
    """Columns of the terminal `stream` shows on; 80 when it is not one or does not say."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80  # 0: size not set
    except (AttributeError, OSError, ValueError):  # no file descriptor, or not a terminal
        return 80


def progress_line(
    step: int,
    max_steps: int,
    elapsed_s: float,
    step_s: float | None,
    reward: float | None,
    max_minutes: float | None = None,
    start_step: int = 0,
) -> str:
    """One progress line: what limits the run, elapsed time and ETA, reward, seconds per step.

    `step` steps are done, `start_step` of them before this process started
    (a resumed run), the rest in `elapsed_s` seconds: their mean time gives
    the ETA. When `max_minutes` will stop the run before `max_steps`, the
    line counts minutes, and the ETA is the time left.

    Example:
        >>> progress_line(12, 100, 180.0, 15.3, 0.42)
        'step 12/100 | 3:00 elapsed, ETA 22:00 | reward 0.42 | 15.3 s/step'
    """
    done = step - start_step
    mean_s = elapsed_s / done if done > 0 else None
    steps_eta = None if mean_s is None else mean_s * max(max_steps - step, 0)
    time_left = None if max_minutes is None else max(60 * max_minutes - elapsed_s, 0.0)
    if time_left is not None and (steps_eta is None or time_left < steps_eta):
        limit = f"{elapsed_s / 60:.1f}/{max_minutes:g} min, step {step}"
        eta = None if mean_s is None else time_left  # no step yet: max_steps may come first
    else:
        limit, eta = f"step {step}/{max_steps}", steps_eta
    return (
        f"{limit} | {_clock(elapsed_s)} elapsed, ETA {_clock(eta)} | "
        f"reward {_number(reward)} | {_number(step_s)} s/step"
    )


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _number(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"  # 1234, not 1.23e+03
