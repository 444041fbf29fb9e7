"""`bnfold optimize` over several models: files and folders, in parallel processes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError, InternalError
from bnfold.io.output import SUFFIX, folded_name
from bnfold.pipeline import OptimizeResult, optimize


@dataclass
class BatchItem:
    """One model of a batch: its result, or the error that stopped it, with its exit code."""

    input: Path
    exit_code: int
    result: OptimizeResult | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        data = self.result.to_dict() if self.result else {"input": str(self.input), "written": False}
        return {**data, "exit_code": self.exit_code, "error": self.error}

    def line(self) -> str:
        """Its line in `bnfold optimize`'s batch output."""
        from bnfold.console import NOTHING_TO_FOLD

        if self.result is not None and self.result.written:
            done = NOTHING_TO_FOLD if self.result.unchanged else self.result.report.summary().split(" · ")[0]
            return f"ok    {self.input} → {self.result.output} ({done})"
        if self.result is not None:
            return f"FAIL  {self.input}: the folded model is not equivalent; nothing written"
        error = str(self.error)
        return f"FAIL  {error}" if error.startswith(f"{self.input}:") else f"FAIL  {self.input}: {error}"


def model_files(paths: list[Path]) -> list[Path]:
    """The models to fold: files as given, and the `*.onnx` entries in a folder (not earlier
    `*.folded.onnx` outputs), in a stable order. A FIFO or a dangling link named `*.onnx` is
    listed too, so that it gets its own line (and exit 2) instead of vanishing."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.glob("*.onnx") if not p.is_dir() and not p.name.endswith(SUFFIX))
        else:
            found.append(path)
    if not found:
        raise BnfoldError(f"no .onnx files in {', '.join(map(str, paths))}")
    return found


def check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise BnfoldError(f"--jobs {jobs}: must be at least 1")


def optimize_many(
    paths: list[Path],
    output_folder: Path | None,
    *,
    jobs: int = 1,
    on_done: Callable[[BatchItem], None] = lambda item: None,
    **options: Any,
) -> list[BatchItem]:
    """optimize() for each model, `jobs` at a time in separate processes (never more than the
    models, nor the cores); one model's failure does not stop the others. Results come back in
    input order."""
    check_jobs(jobs)
    jobs = max(1, min(jobs, len(paths), os.cpu_count() or 1))
    if output_folder is not None:
        if output_folder.exists() and not output_folder.is_dir():
            raise BnfoldError(f"{output_folder}: with several models, -o must name a folder")
        if not output_folder.exists() and output_folder.suffix == ".onnx":
            raise BnfoldError(f"{output_folder}: with several models, -o names a folder, not a model file")
        output_folder.mkdir(parents=True, exist_ok=True)
    _refuse_shared_outputs(paths, output_folder)
    if jobs > 1 and options.get("verify", True):
        # each worker's onnxruntime sessions get their share of the cores: J workers all using
        # every core oversubscribe the machine (bench/batch.py measures it)
        cores = max(1, (os.cpu_count() or 1) // jobs)
        options = {**options, "verify_options": {**(options.get("verify_options") or {}), "cores": cores}}
    tasks = [(path, output_folder, options) for path in paths]
    items: dict[Path, BatchItem] = {}
    if jobs == 1:
        for task in tasks:
            items[task[0]] = item = _optimize_one(task)
            on_done(item)
        return [items[path] for path in paths]
    broken = _in_processes(tasks, jobs, items, on_done)
    for task in broken:  # a worker died (the OOM killer, a native crash): each alone, to tell which
        _in_processes([task], 1, items, on_done, died=True)
    return [items[path] for path in paths]


def _in_processes(tasks, jobs: int, items: dict, on_done, died: bool = False) -> list:
    """Run `tasks` in `jobs` worker processes, each item reported as it finishes. Returns the
    tasks lost to a worker that died; with `died`, such a task is reported as exit 3."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from bnfold.errors import EXIT_INTERNAL_ERROR

    broken = []
    # spawn, not fork: a process forked while other threads hold locks (onnxruntime's pools, a
    # library caller's threads, a test runner's) can wait forever on one; measured under pytest
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=spawn, initializer=_exit_on_terminate,
                               initargs=(os.getpid(),))  # fmt: skip
    with pool:
        futures = {pool.submit(_optimize_one, task): task for task in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                item = future.result()
            except BrokenProcessPool:
                if not died:
                    broken.append(task)
                    continue
                reason = "its worker process died (killed, perhaps out of memory, or a crash in native code)"
                item = BatchItem(task[0], EXIT_INTERNAL_ERROR, error=reason)
            items[item.input] = item
            on_done(item)
    return broken


def _refuse_shared_outputs(paths: list[Path], output_folder: Path | None) -> None:
    """Two models of one batch may not write one output (`a/m.onnx b/m.onnx -o out`)."""
    writers: dict[str, Path] = {}
    for path in paths:
        folder = output_folder if output_folder is not None else path.parent
        target = os.path.normcase(os.path.abspath(folder / folded_name(path)))
        if target in writers:
            raise BnfoldError(f"{path} and {writers[target]} would both be written to {target}; fold them separately")
        writers[target] = path


def _exit_on_terminate(parent: int) -> None:
    """In a worker: SIGTERM removes the hidden files the worker has staged and exits. When one
    worker dies the pool terminates the others; one that was writing its output leaves nothing
    behind, at whatever line the signal finds it (killed outright, it would leave them). The
    worker gets that SIGTERM too when `parent`, the process that started it, dies, even by
    SIGKILL (Linux), or has died while the worker was starting: it does not go on to write its
    model after the batch was killed."""
    import signal

    from bnfold.supervise import die_with

    def stop(signum, frame):
        from bnfold.io.output import discard_staged

        discard_staged()
        os._exit(128 + signum)  # SystemExit would end only the task: the worker would wait for another

    signal.signal(signal.SIGTERM, stop)
    die_with(parent, signal.SIGTERM)


def _optimize_one(task) -> BatchItem:
    """One model of a batch, with every failure turned into its exit code (a worker process
    must return, not raise)."""
    import traceback

    from bnfold.errors import EXIT_INTERNAL_ERROR, EXIT_NOT_EQUIVALENT, EXIT_OK, EXIT_USER_ERROR

    path, output_folder, options = task
    try:
        result = optimize(path, output_folder, **options)
    except BnfoldError as exc:
        return BatchItem(path, EXIT_USER_ERROR, error=str(exc))
    except Exception as exc:  # InternalError and any bug: report it, keep the batch going
        detail = str(exc) if isinstance(exc, InternalError) else traceback.format_exc()
        return BatchItem(path, EXIT_INTERNAL_ERROR, error=f"internal error, please report: {detail}")
    return BatchItem(path, EXIT_OK if result.written else EXIT_NOT_EQUIVALENT, result=result)
