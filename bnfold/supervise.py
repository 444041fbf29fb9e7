"""The `bnfold` command runs its work in a child process, so that a native crash (onnxruntime
dereferencing a bad pointer on a model it should refuse, a custom-op library) costs one clear
line and exit 2, not a dead process with no report and half-written files.

Where the platform forks (not Windows), main() forks before anything heavy is imported (no
threads exist yet, so the child is a sound copy) and waits. The child's staged files are
journaled (bnfold.io.output): each hidden file is listed before it exists and struck when it is
committed or removed. When the child exits the parent removes every file the journal still
lists; a child that died by a signal (but Ctrl-C's) gets the line, with `--json` the report, and
exit 2; so does an exit status bnfold never gives (the dynamic loader's `_exit(127)` on a broken
custom-op library). Any other exit is the child's own, passed on unchanged. The child ends in
`os._exit` once its work is done and its output flushed: a library whose unloading crashes at
interpreter shutdown cannot undo a finished run. SIGTERM and SIGINT sent to
bnfold are passed on to the child, which takes the first SIGINT only (Ctrl-C on a terminal
reaches it from the terminal too).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

JOURNAL = "BNFOLD_STAGED_JOURNAL"  # the environment variable that names the journal file
COMMANDS = ("optimize", "verify", "inspect", "bench")


def command_of(words: list[str]) -> str:
    """The command a command line runs, for its JSON report ("usage" when it names none)."""
    return next((w for w in words if w in COMMANDS), "usage")


def supervised(work: Callable[[], None]) -> None:
    """Run `work` (which ends in sys.exit) in a forked child and exit as it did; see the module
    docstring. Without fork, or inside a supervised run already, `work` runs here."""
    if not hasattr(os, "fork") or JOURNAL in os.environ:
        work()
        return
    fd, journal = tempfile.mkstemp(prefix="bnfold-staged-", suffix=".txt")
    os.close(fd)
    os.environ[JOURNAL] = journal
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGINT, _interrupt_once)
        os._exit(_run_child(work))
    signal.signal(signal.SIGINT, lambda signum, frame: _pass_on(child, signum))
    signal.signal(signal.SIGTERM, lambda signum, frame: _pass_on(child, signum))
    status = _wait(child)
    try:
        _remove_staged(Path(journal))  # after any exit: nothing the child staged outlives the run
    finally:
        Path(journal).unlink(missing_ok=True)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGINT:
        sys.exit(_report_crash(signal_name(os.WTERMSIG(status))))
    if os.WIFSIGNALED(status):
        sys.exit(128 + os.WTERMSIG(status))
    code = os.WEXITSTATUS(status)
    if code not in BNFOLD_EXITS:  # native code ended the process: the dynamic loader's _exit(127), …
        sys.exit(_report_crash(f"exit status {code}"))
    sys.exit(code)


# The statuses bnfold itself exits with (bnfold.errors), and 130 after Ctrl-C.
BNFOLD_EXITS = (0, 1, 2, 3, 4, 130)


def _run_child(work: Callable[[], None]) -> int:
    """The child's whole life: `work`, its exit status, and its output flushed. It ends in
    os._exit, past the interpreter's shutdown: a custom-op library whose unloading crashes
    cannot turn a finished run into a crash."""
    try:
        work()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:  # as Python itself would end: the traceback, status 1
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the exit status still tells the outcome
            pass
    return code


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _pass_on(child: int, signum: int) -> None:
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass


def _interrupt_once(signum, frame) -> None:
    """In the child: Ctrl-C on a terminal reaches it twice (from the terminal, and passed on by
    the parent); the second must not cut the first one's cleanup short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _wait(child: int) -> int:
    while True:
        try:
            return os.waitpid(child, 0)[1]
        except InterruptedError:
            continue


def _remove_staged(journal: Path) -> None:
    """Remove the files the journal lists as staged and never committed or removed."""
    live: dict[str, None] = {}
    for line in journal.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        if line.startswith("+"):
            live[line[1:]] = None
        elif line.startswith("-"):
            live.pop(line[1:], None)
    for path in live:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _report_crash(how: str) -> int:
    """The line, the --json report, and the exit code for a child that died `how` (a signal's
    name, or an exit status bnfold never gives)."""
    from bnfold.console import Console
    from bnfold.errors import EXIT_USER_ERROR

    words = sys.argv[1:]
    if how == "SIGKILL":
        what = "was killed (SIGKILL: out of memory, perhaps)"
    elif "--custom-lib" in words:
        what = f"crashed ({how}) in native code: onnxruntime or the --custom-lib library"
    else:
        what = f"crashed ({how}) in native code, most likely onnxruntime; try another onnxruntime version"
    message = f"the run {what}; the files it was writing were removed"
    print(f"bnfold: error: {message}", file=sys.stderr, flush=True)
    Console(command_of(words), json="--json" in words).emit({}, EXIT_USER_ERROR, message)
    return EXIT_USER_ERROR
