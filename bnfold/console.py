"""What the CLI prints: people's lines on stderr, the `--json` report on stdout, and the exit
code every outcome maps to (bnfold.errors). One `Console` per command run carries whether a
JSON report was asked for; nothing here is module state."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer

from bnfold.errors import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, BnfoldError, InternalError

T = TypeVar("T")
REPORT_SCHEMA_VERSION = 1  # bnfold/report.schema.json; raised when a field changes meaning or goes
NOTHING_TO_FOLD = "nothing to fold: written unchanged"


def say(text: str) -> None:
    print(text, file=sys.stderr)


# On a terminal (and without NO_COLOR), what needs a look stands out: failures in red.
_ATTENTION = re.compile(r"\bFAIL\b|\bNOT equivalent\b|\bskipped\b")


def width() -> int | None:
    """How wide a table may be: the terminal's width (or $COLUMNS) where stderr is a terminal or
    COLUMNS is set; unlimited in a pipe, so that a log keeps one row per line."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stderr.isatty():
        try:
            return os.get_terminal_size(sys.stderr.fileno()).columns or None
        except OSError:
            return None
    return None


def show(table: str) -> None:
    """A report's table on stderr, failures in red where stderr is a terminal that wants colour."""
    if sys.stderr.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb":
        table = _ATTENTION.sub(lambda m: f"\033[1;31m{m.group(0)}\033[0m", table)
    say(table)


class Console:
    """One command's output: `json` (a report on stdout, exactly once, for every outcome) and
    `quiet` (nothing on stderr but errors)."""

    def __init__(self, command: str, *, json: bool, quiet: bool = False):
        self.command, self.json, self.quiet = command, json, quiet
        self.page: Path | None = None  # --report FILE.html: the same report as a page
        self.models: list[Path] = []  # …never written over one of these
        self._emitted = False

    def report_page(self, page: Path | None, models: list[Path]) -> None:
        """Write the report as a page too (bnfold.page); refused now, before any work, if the
        page would replace a model or what is not a regular file."""
        if page is not None:
            from bnfold.io.output import refuse_to_write_over

            self.guard(lambda: refuse_to_write_over(page, models))
        self.page, self.models = page, models

    def emit(self, data: dict, exit_code: int, error: str | None = None) -> None:
        """The --json report on stdout and the --report page, once: every command's, every
        outcome's, one envelope."""
        if self._emitted or not (self.json or self.page):
            return
        self._emitted = True
        from bnfold import __version__

        envelope = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "bnfold_version": __version__,
            "command": self.command,
            "exit_code": exit_code,
            "error": error,
        }
        report = {**envelope, **data}
        # a page that cannot be written fails a run that had not failed otherwise
        page_failed = self.page is not None and not self._write_page(report) and not exit_code
        if page_failed:
            report.update(exit_code=EXIT_USER_ERROR, error=f"cannot write {self.page}")
        if self.json:
            try:
                print(json.dumps(report, indent=2), flush=True)
            except BrokenPipeError:  # the reader left (`| head -c0`): the exit code still tells the outcome
                _silence_stdout()
        if page_failed:
            raise typer.Exit(EXIT_USER_ERROR)

    def _write_page(self, report: dict) -> bool:
        from bnfold import page
        from bnfold.io.output import write_text

        try:
            write_text(self.page, page.render(report), keep=self.models)
        except BnfoldError as exc:
            say(f"bnfold: error: {exc}")
            return False
        return True

    def fail(self, message: str, code: int) -> None:
        say(f"bnfold: error: {message}")
        self.emit({}, code, message)  # with --json, a report even when nothing ran
        raise typer.Exit(code)

    def guard(self, action: Callable[[], T]) -> T:
        """Run a library call; turn its failures into one line and the documented exit code."""
        try:
            return action()
        except BnfoldError as exc:
            self.fail(str(exc), EXIT_USER_ERROR)
        except InternalError as exc:
            self.fail(f"internal error, please report: {exc}", EXIT_INTERNAL_ERROR)
        except Exception:  # anything else is a bug: show where, but never exit 1 ("not equivalent")
            traceback.print_exc()
            self.fail("internal error, please report the traceback above", EXIT_INTERNAL_ERROR)
        raise AssertionError("unreachable")

    def render(self, data: dict, report, exit_code: int = 0, *, quiet: bool | None = None) -> None:
        """The report's table on stderr (unless quiet), then the JSON report."""
        if not (self.quiet if quiet is None else quiet):
            show(report.table(width=width()))
        self.emit(data, exit_code)

    def progress(self) -> Callable[[str], None]:
        """Stage messages for a person watching a terminal; silent in pipes and with --quiet."""
        if self.quiet or not sys.stderr.isatty():
            return lambda stage: None
        return lambda stage: say(f"… {stage}")


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that nothing later (nor the interpreter's own flush at exit)
    fails on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class ProgressBar:
    """`[#####-----] 5/10 models · 0:42, about 0:40 left · now a.onnx` on stderr, redrawn in
    place every second: only on a terminal, never with --quiet. Lines printed through `above`
    appear above it."""

    def __init__(self, total: int, *, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.now: list[str] = []  # what is being worked on
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if enabled:
            self._draw()
            threading.Thread(target=self._tick, daemon=True).start()

    def working_on(self, names: list[str]) -> None:
        with self._lock:
            self.now = names
            self._draw()

    def above(self, line: str) -> None:
        """One finished model's line, printed above the bar; the bar moves on by one."""
        with self._lock:
            self._erase()
            say(line)
            self.done += 1
            self._draw()

    def advance(self) -> None:
        with self._lock:
            self.done += 1
            self._draw()

    def clear(self) -> None:
        self._stop.set()
        with self._lock:
            self._erase()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                self._draw()

    def _erase(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def _draw(self) -> None:
        if not self.enabled or self._stop.is_set():
            return
        filled = 30 * self.done // max(self.total, 1)
        elapsed = time.monotonic() - self._started
        line = f"[{'#' * filled}{'-' * (30 - filled)}] {self.done}/{self.total} models · {_clock(elapsed)}"
        if 0 < self.done < self.total:
            line += f", about {_clock(elapsed / self.done * (self.total - self.done))} left"
        if self.now:
            line += " · now " + ", ".join(self.now)
        columns = width() or 80
        sys.stderr.write("\r\033[K" + (line if len(line) < columns else line[: columns - 2] + "…"))
        sys.stderr.flush()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"
