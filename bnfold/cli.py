"""The `bnfold` command: parse, call the library, render, exit. Nothing else lives here.

Human output goes to stderr, `--json` reports to stdout. Heavy modules (onnx, numpy,
onnxruntime) are imported inside the commands, so `bnfold --help` starts fast.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Optional, TypeVar

import typer

from bnfold.errors import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, BnfoldError, InternalError

EXIT_CODES = (
    "Exit codes: 0 success; 1 the folded model is not equivalent to the original (nothing "
    "written); 2 user error: missing file, not an ONNX model, invalid model, unwritable output; "
    "3 internal error, a bug in bnfold (nothing written)."
)

app = typer.Typer(
    help="Fold BatchNormalization into the Conv before it in ONNX models, and prove the result.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

T = TypeVar("T")

MODEL_ARG = typer.Argument(..., help="The ONNX model file.", show_default=False)
JSON_OPT = typer.Option(False, "--json", help="Print a machine-readable report on stdout.")
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="Print nothing on stderr except errors.")


@app.command(epilog=EXIT_CODES)
def optimize(
    model: Path = MODEL_ARG,
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Where to write (a file or a folder). Default: MODEL with .folded.onnx."
    ),
    json_report: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Fold every foldable BatchNormalization and write the folded model.

    Nothing is written unless the result passes onnx.checker and loads in onnxruntime; the write
    is atomic and never replaces the input.
    """
    from bnfold.pipeline import optimize as run_optimize

    result = _guard(lambda: run_optimize(model, output, progress=_progress(quiet)))
    _render(result.to_dict(), result.report, json_report, quiet)
    if not quiet:
        _say(f"wrote {result.output}")


@app.command(epilog=EXIT_CODES)
def inspect(model: Path = MODEL_ARG, json_report: bool = JSON_OPT, quiet: bool = QUIET_OPT) -> None:
    """Report what optimize would fold and skip, and why, without writing anything."""
    from bnfold.folding import fold

    result = _guard(lambda: fold(model))
    data = {"input": str(model), "output": None, "written": False, **result.report.to_dict()}
    _render(data, result.report, json_report, quiet)


def _guard(action: Callable[[], T]) -> T:
    """Run a library call; turn its failures into one line and the documented exit code."""
    try:
        return action()
    except BnfoldError as exc:
        _fail(str(exc), EXIT_USER_ERROR)
    except InternalError as exc:
        _fail(f"internal error, please report: {exc}", EXIT_INTERNAL_ERROR)
    except Exception:  # anything else is a bug: show where, but never exit 1 ("not equivalent")
        traceback.print_exc()
        _fail("internal error, please report the traceback above", EXIT_INTERNAL_ERROR)
    raise AssertionError("unreachable")


def _render(data: dict, report, json_report: bool, quiet: bool) -> None:
    if not quiet:
        _say(report.table())
    if json_report:
        print(json.dumps(data, indent=2))


def _progress(quiet: bool) -> Callable[[str], None]:
    """Stage messages for a person watching a terminal; silent in pipes and with --quiet."""
    if quiet or not sys.stderr.isatty():
        return lambda stage: None
    return lambda stage: _say(f"… {stage}")


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _fail(message: str, code: int) -> None:
    _say(f"bnfold: error: {message}")
    raise typer.Exit(code)


def main() -> None:
    app()
