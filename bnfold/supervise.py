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

When bnfold itself is killed outright (`kill -9`, `timeout -s KILL`, a CI runner's cancel), no
code of its own runs. On Linux the child is killed with it (PR_SET_PDEATHSIG): an orphan would
go on and write its output after the run was reported dead. The parent holds a lock on its
journal (flock) as long as it lives, which the kernel releases whatever kills it; the next
`bnfold` run removes the staged files of every journal nobody holds, then the journal.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

JOURNAL = "BNFOLD_STAGED_JOURNAL"  # the environment variable that names the journal file
JOURNAL_PREFIX = "bnfold-staged-"  # journals are <temporary folder>/bnfold-staged-*.txt
PR_SET_PDEATHSIG = 1  # linux/prctl.h
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
    import fcntl  # POSIX, like fork

    _sweep_abandoned()
    fd, journal = tempfile.mkstemp(prefix=JOURNAL_PREFIX, suffix=".txt")
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process is gone: a sweep leaves the journal alone
    os.environ[JOURNAL] = journal
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # keeps the journal's lock too: an orphan's files are not abandoned while it runs
        die_with(parent, signal.SIGKILL)
        signal.signal(signal.SIGINT, _interrupt_once)
        os._exit(_run_child(work))
    signal.signal(signal.SIGINT, lambda signum, frame: _pass_on(child, signum))
    signal.signal(signal.SIGTERM, lambda signum, frame: _pass_on(child, signum))
    status = _wait(child)
    try:
        _remove_staged(Path(journal))  # after any exit: nothing the child staged outlives the run
    finally:
        Path(journal).unlink(missing_ok=True)
        os.close(fd)
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


def die_with(parent: int, signum: int) -> None:
    """In a child process, on Linux: `signum` when its parent dies, whatever kills it; that
    signal now if the parent already has. Elsewhere an orphan runs to its end."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ulong = ctypes.c_ulong  # prctl is variadic: every argument a full register
    try:
        done = ctypes.CDLL(None, use_errno=True).prctl(ctypes.c_int(PR_SET_PDEATHSIG), ulong(signum), *[ulong(0)] * 3)
    except (OSError, AttributeError):  # no prctl: as elsewhere
        return
    if done != 0:
        return
    if os.getppid() != parent:  # the parent died before the prctl took hold
        os.kill(os.getpid(), signum)


def _sweep_abandoned(folder: str | None = None, young: float = 60.0) -> None:
    """Remove what runs killed outright left behind: the staged files of each of this user's
    journals in the temporary folder that no live process holds locked, then the journal. An
    empty journal younger than `young` seconds may be a run between creating and locking it."""
    import fcntl

    for path in Path(folder or tempfile.gettempdir()).glob(f"{JOURNAL_PREFIX}*.txt"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            info = os.fstat(fd)
            if info.st_uid != os.getuid() or info.st_size == 0 and time.time() - info.st_mtime < young:
                continue
            _remove_staged(path)
            path.unlink(missing_ok=True)
        except OSError:  # locked by a live run, or gone meanwhile
            continue
        finally:
            os.close(fd)


def _remove_staged(journal: Path) -> None:
    """Remove the files the journal lists as staged and never committed or removed: only
    bnfold's own hidden names (`.<name>.<hex>.tmp`), whatever else a journal may say."""
    live: dict[str, None] = {}
    for line in journal.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        if line.startswith("+"):
            live[line[1:]] = None
        elif line.startswith("-"):
            live.pop(line[1:], None)
    for path in live:
        name = os.path.basename(path)
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        try:
            os.unlink(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
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
