"""Exceptions and the exit codes they map to (documented in docs/cli.md and `bnfold --help`)."""

EXIT_OK = 0
EXIT_NOT_EQUIVALENT = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_FOLDABLE = 4  # `bnfold inspect --check`: a model still holds what bnfold would fold

NO_RUNTIME = (
    "onnxruntime is not installed: verification runs the models in it; "
    "pip install 'bnfold[cpu]' (or 'bnfold[gpu]' for onnxruntime-gpu), or fold with --no-verify"
)


class BnfoldError(Exception):
    """Something the user can fix: a missing file, a file that is not a valid model, a bad option.

    The CLI prints it as one line and exits with EXIT_USER_ERROR; no traceback.
    """


class MissingFile(BnfoldError, FileNotFoundError):
    """A file the user named is not there: a BnfoldError for the CLI, a FileNotFoundError for
    Python code that catches that (`except FileNotFoundError` around `bnfold.fold(path)`)."""


class InternalError(Exception):
    """bnfold produced something it must not hand over (a bug); nothing was written."""


def one_line(exc: BaseException, limit: int = 600) -> str:
    """An exception's whole message on one line (onnxruntime puts the detail that matters, such
    as "index: 2 Got: 64 Expected: 32", on its second line), cut at `limit` characters."""
    text = " ".join((str(exc).strip() or type(exc).__name__).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: what a one-line error report shows."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
