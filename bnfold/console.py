"""What the CLI prints: people's lines on stderr, the `--json` report on stdout, and the exit
code every outcome maps to (bnfold.errors). One `Console` per command run carries whether a
JSON report was asked for; nothing here is module state."""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Callable
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
        self._emitted = False

    def emit(self, data: dict, exit_code: int, error: str | None = None) -> None:
        """The --json report on stdout, once: every command's, every outcome's, one envelope."""
        if not self.json or self._emitted:
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
        try:
            print(json.dumps({**envelope, **data}, indent=2), flush=True)
        except BrokenPipeError:  # the reader left (`| head -c0`): the exit code still tells the outcome
            _silence_stdout()

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
            show(report.table())
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
    """`[#####-----] 5/10` on stderr, redrawn in place: only on a terminal, never with --quiet."""

    def __init__(self, total: int, *, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self._draw()

    def advance(self) -> None:
        self.done += 1
        self._draw()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def _draw(self) -> None:
        if self.enabled:
            filled = 30 * self.done // max(self.total, 1)
            sys.stderr.write(f"\r[{'#' * filled}{'-' * (30 - filled)}] {self.done}/{self.total} models")
            sys.stderr.flush()
