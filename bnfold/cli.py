"""The `bnfold` command: parse, call the library, render, exit. The shared options are declared
in bnfold.options, the output (stderr lines, the `--json` report, exit codes) in bnfold.console.

Human output goes to stderr, `--json` reports to stdout. Heavy modules (onnx, numpy,
onnxruntime) are imported inside the commands, so `bnfold --help` starts fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from bnfold.console import NOTHING_TO_FOLD, Console, ProgressBar, say, show, width
from bnfold.errors import EXIT_FOLDABLE, EXIT_NOT_EQUIVALENT, EXIT_USER_ERROR, BnfoldError, MissingFile
from bnfold.options import (
    ABS_ATOL_OPT,
    ATOL_OPT,
    BIAS_CORRECTION_OPT,
    BRIEF_OPT,
    CALIBRATION_OPT,
    CUSTOM_LIB_OPT,
    INPUTS_OPT,
    INT_RANGE_OPT,
    JSON_OPT,
    MODEL_ARG,
    NO_REPARAM_OPT,
    PROVIDER_OPT,
    QUIET_OPT,
    REPORT_OPT,
    REQUANTIZE_OPT,
    RTOL_OPT,
    SEED_OPT,
    SHAPE_OPT,
    TRIALS_OPT,
    Command,
    check_verify_models,
    input_shapes,
    providers,
    verify_options,
)
from bnfold.supervise import command_of, supervised

EXIT_CODES = (
    "Exit codes: 0 success; 1 not equivalent (verify found a differing output; optimize wrote "
    "nothing); 2 could not run: missing file, not an ONNX model, invalid model, a model "
    "onnxruntime cannot load or run, unwritable output, bad option; 3 internal error, a bug in bnfold "
    "(nothing written); 4 `inspect --check` found BatchNormalization bnfold would fold."
)

app = typer.Typer(
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Fold BatchNormalization into the linear op next to it in ONNX models (and merge re-parameterizable "
    "branches into one Conv), and prove the result.\n\n"
    "See docs/verification.md for the tolerance policy behind verification.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from bnfold import __version__

        print(f"bnfold {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fold BatchNormalization into the linear op next to it in ONNX models, and prove the result."""


@app.command(cls=Command, epilog=EXIT_CODES)
def optimize(
    models: list[Path] = typer.Argument(
        ..., metavar="MODEL", help="ONNX model files, or folders of them.", show_default=False
    ),
    output: str | None = typer.Option(  # a str: a trailing "/" (a new folder) must survive
        None,
        "--output",
        "-o",
        metavar="PATH",
        help="Where to write: a file or a folder (a folder with several models). "
        "Default: beside each MODEL, with .folded.onnx.",
    ),
    no_verify: bool = typer.Option(
        False, "--no-verify", help="Skip the equivalence check: no onnxruntime runs (onnx.checker still does)."
    ),
    external_data: str = typer.Option(
        "auto",
        "--external-data",
        metavar="auto|always|never",
        help="Keep tensors in a data file beside the output: auto = when the input did or past 2 GiB.",
    ),
    jobs: int = typer.Option(1, "--jobs", "-j", metavar="N", help="Models processed in parallel."),
    no_reparam: bool = NO_REPARAM_OPT,
    requantize: bool = REQUANTIZE_OPT,
    bias_correction: bool | None = BIAS_CORRECTION_OPT,
    calibration: Path | None = CALIBRATION_OPT,
    json_report: bool = JSON_OPT,
    report_page: Path | None = REPORT_OPT,
    quiet: bool = QUIET_OPT,
    brief: bool = BRIEF_OPT,
    trials: int = TRIALS_OPT,
    seed: int = SEED_OPT,
    atol: list[str] | None = ATOL_OPT,
    rtol: list[str] | None = RTOL_OPT,
    abs_atol: list[str] | None = ABS_ATOL_OPT,
    input_shape: list[str] | None = SHAPE_OPT,
    int_range: str = INT_RANGE_OPT,
    inputs: list[Path] | None = INPUTS_OPT,
    provider: list[str] | None = PROVIDER_OPT,
    custom_lib: list[Path] | None = CUSTOM_LIB_OPT,
) -> None:
    """Fold every foldable BatchNormalization and write the folded model.

    Nothing is written unless the result passes onnx.checker and computes the same function as
    the original under onnxruntime (as `bnfold verify` checks); the write is atomic and never
    replaces the input. With several models (or a folder), one failure does not stop the
    others, and the exit code is the most severe of theirs (3, then 2, then 1).
    """
    from bnfold import pipeline

    def options() -> dict:
        return {
            "verify": not no_verify,
            "external_data": external_data,
            "progress": out.progress(),
            "reparam": not no_reparam,
            "requantize": requantize,
            "bias_correction": bias_correction,
            "calibration": calibration,
            "verify_options": verify_options(
                trials, seed, (atol, rtol, abs_atol), input_shape, int_range, inputs, provider, custom_lib
            ),
        }

    out = Console("optimize", json=json_report, quiet=quiet)
    from bnfold.batch import check_jobs

    out.guard(lambda: check_jobs(jobs))
    if report_page is not None and (len(models) != 1 or models[0].is_dir()):
        out.fail("--report writes the page of one model; fold the others without it", EXIT_USER_ERROR)
    out.report_page(report_page, [*models, *([Path(output)] if output else [])])
    if len(models) == 1 and not models[0].is_dir():
        result = out.guard(lambda: pipeline.optimize(models[0], output, **options()))
        if not quiet:
            show(result.report.table(brief=brief, width=width()))
            if result.verification is not None:
                show(result.verification.table(brief=brief, width=width()))
        elif result.verification is not None and not result.verification.equivalent:
            show(result.verification.table(failed_only=True, width=width()))
        if not result.written:
            message = "the folded model is not equivalent to the original; nothing was written"
            out.emit(result.to_dict(), EXIT_NOT_EQUIVALENT, message)
            out.fail(message, EXIT_NOT_EQUIVALENT)
        out.emit(result.to_dict(), 0)
        if not quiet:
            say(f"{NOTHING_TO_FOLD} ({result.output})" if result.unchanged else f"wrote {result.output}")
        return
    _optimize_batch(models, output, jobs, out, options)


def _optimize_batch(models, output, jobs, out: Console, options) -> None:
    quiet = out.quiet
    from bnfold import batch

    paths = out.guard(lambda: batch.model_files(models))
    bar = ProgressBar(len(paths), enabled=not quiet and sys.stderr.isatty())
    batch_options = out.guard(options)
    del batch_options["progress"]  # per-model stages would garble the bar (and cannot be pickled)
    folder = Path(output) if output is not None else None

    pending = list(paths)  # in the order the workers take them: the first `running` are running
    running = max(1, min(jobs, os.cpu_count() or 1))
    bar.working_on([p.name for p in pending[:running]])

    def done(item) -> None:  # each model's line as it finishes, above the bar
        pending.remove(item.input)
        if not quiet or item.exit_code:  # -q still shows what failed
            bar.above(item.line())
        else:
            bar.advance()
        bar.working_on([p.name for p in pending[:running]])

    items = out.guard(lambda: batch.optimize_many(paths, folder, jobs=jobs, on_done=done, **batch_options))
    bar.clear()
    written = sum(item.exit_code == 0 for item in items)
    if not quiet:
        say(f"{len(items)} models: {written} written, {len(items) - written} failed")
    worst = max(item.exit_code for item in items)  # 3 internal, 2 could not run, 1 not equivalent, 0
    summary = {"models": len(items), "written": written, "failed": len(items) - written}
    out.emit({"models": [item.to_dict() for item in items], "summary": summary}, worst)
    if worst:
        raise typer.Exit(worst)


@app.command(cls=Command, epilog=EXIT_CODES)
def verify(
    reference: Path = typer.Argument(..., metavar="REFERENCE", help="The original model.", show_default=False),
    candidate: Path | None = typer.Argument(
        None,
        metavar="CANDIDATE",
        help="The model that should compute the same function (none with --load-outputs).",
        show_default=False,
    ),
    json_report: bool = JSON_OPT,
    report_page: Path | None = REPORT_OPT,
    quiet: bool = QUIET_OPT,
    brief: bool = BRIEF_OPT,
    trials: int = TRIALS_OPT,
    seed: int = SEED_OPT,
    atol: list[str] | None = ATOL_OPT,
    rtol: list[str] | None = RTOL_OPT,
    abs_atol: list[str] | None = ABS_ATOL_OPT,
    input_shape: list[str] | None = SHAPE_OPT,
    int_range: str = INT_RANGE_OPT,
    inputs: list[Path] | None = INPUTS_OPT,
    provider: list[str] | None = PROVIDER_OPT,
    custom_lib: list[Path] | None = CUSTOM_LIB_OPT,
    requantize: bool = typer.Option(
        False,
        "--requantize",
        help="The candidate was folded with --requantize: judge it against REFERENCE with the quantizers it "
        "removed bypassed.",
    ),
    localize: bool = typer.Option(
        False,
        "--localize",
        help="When an output differs, find the first intermediate tensor both models share that does.",
    ),
    save_inputs: Path | None = typer.Option(
        None,
        "--save-inputs",
        metavar="DIR",
        help="Save the inputs run to this new folder (onnx test-data layout; replay with --inputs).",
    ),
    save_outputs: Path | None = typer.Option(
        None,
        "--save-outputs",
        metavar="DIR",
        help="Save both models' outputs to this new folder (onnx test-data layout).",
    ),
    load_outputs: Path | None = typer.Option(
        None,
        "--load-outputs",
        metavar="FILE|DIR",
        help="Compare one model with stored outputs instead of a second model: .npz (out.NAME, with in.NAME "
        "inputs), Polygraphy's --save-outputs JSON (inputs from --inputs), or onnx test data.",
    ),
) -> None:
    """Run both models with onnxruntime (graph optimizations off) and compare every output, by name.

    With --load-outputs, run one model on stored inputs and compare it with stored outputs.
    Exit 0 when every output matches within the tolerance policy, 1 when one does not.
    """

    def run():
        stored_only = {"--save-inputs": save_inputs, "--save-outputs": save_outputs, "--localize": localize}
        check_verify_models(reference, candidate, load_outputs, stored_only)
        tolerances = (atol, rtol, abs_atol)
        options = verify_options(trials, seed, tolerances, input_shape, int_range, inputs, provider, custom_lib)
        if load_outputs is not None:
            from bnfold.verification.golden import verify_against_outputs

            keep = ("inputs", "atol", "rtol", "abs_atol", "input_shapes", "providers", "custom_ops")
            return verify_against_outputs(
                reference, load_outputs, progress=out.progress(), **{k: options[k] for k in keep if k in options}
            )
        from bnfold.verification.verify import verify as run_verify

        saving = {"save_inputs": save_inputs, "save_outputs": save_outputs}
        return run_verify(
            reference, candidate, progress=out.progress(), localize=localize, requantize=requantize, **saving, **options
        )

    out = Console("verify", json=json_report, quiet=quiet)
    out.report_page(report_page, [m for m in (reference, candidate, load_outputs) if m is not None])
    report = out.guard(run)
    if brief and not quiet:
        show(report.table(brief=True, width=width()))
    out.render(report.to_dict(), report, 0 if report.equivalent else EXIT_NOT_EQUIVALENT, quiet=quiet or brief)
    if quiet and not report.equivalent:
        show(report.table(failed_only=True, width=width()))
    if not report.equivalent:
        raise typer.Exit(EXIT_NOT_EQUIVALENT)


@app.command(cls=Command, epilog=EXIT_CODES)
def inspect(
    models: list[Path] = typer.Argument(
        ..., metavar="MODEL", help="ONNX model files, or folders of them.", show_default=False
    ),
    no_reparam: bool = NO_REPARAM_OPT,
    requantize: bool = REQUANTIZE_OPT,
    bias_correction: bool | None = BIAS_CORRECTION_OPT,
    calibration: Path | None = CALIBRATION_OPT,
    check: bool = typer.Option(
        False,
        "--check",
        help=f"For CI and pre-commit: exit {EXIT_FOLDABLE} when a model still holds BatchNormalization that "
        "bnfold would fold (or branches it would merge).",
    ),
    json_report: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Report what optimize would fold and skip, and why, without writing anything."""
    from bnfold.pipeline import fold

    out = Console("inspect", json=json_report, quiet=quiet)
    if any(model.is_dir() for model in models):  # a folder's models, as optimize takes them
        from bnfold.batch import model_files

        models = out.guard(lambda: model_files(models))
    foldable, items = [], []
    for model in models:

        def run(model=model):
            return fold(
                model, reparam=not no_reparam, bias_correction=bias_correction, calibration=calibration,
                requantize=requantize,
            )  # fmt: skip

        if len(models) > 1:  # one model's failure does not stop the others
            try:
                result = run()
            except BnfoldError as exc:
                say(f"bnfold: error: {exc}")
                items.append({"input": str(model), "exit_code": EXIT_USER_ERROR, "error": str(exc)})
                continue
            except Exception:
                result = out.guard(run)  # internal errors: the one line and exit 3, as always
        else:
            result = out.guard(run)
        report = result.report
        would = report.folded + sum(o.folded for o in report.branch_merges) + len(report.channel_affines)
        code = EXIT_FOLDABLE if check and would else 0
        data = {"input": str(model), "output": None, "written": False, **report.to_dict()}
        if len(models) == 1:
            out.render(data, report, code, quiet=quiet or check)
        else:
            if not (quiet or check):
                show(f"{model}:\n{report.table(width=width())}")
            items.append({**data, "exit_code": code, "error": None})
        if would:
            foldable.append(f"{model}: {report.summary().split(' · ')[0]}; run `bnfold optimize {model}`")
    worst = max((item["exit_code"] for item in items), default=0)
    if len(models) > 1:
        worst = EXIT_USER_ERROR if any(item["error"] for item in items) else worst
        summary = {"models": len(items), "failed": sum(item["error"] is not None for item in items)}
        out.emit({"models": items, "summary": summary}, worst)
    if check and foldable:
        for line in foldable:
            say(f"bnfold: unfolded: {line}")
    if worst or (check and foldable):
        raise typer.Exit(worst or EXIT_FOLDABLE)


@app.command(cls=Command, epilog=EXIT_CODES)
def bench(
    model: Path = MODEL_ARG,
    folded: Path | None = typer.Argument(
        None,
        metavar="FOLDED",
        help="The folded model. Default: fold MODEL now (verified) into a temporary folder.",
        show_default=False,
    ),
    runs: int = typer.Option(20, "--runs", metavar="N", help="Timed runs per model and setting (median reported)."),
    warmup: int = typer.Option(3, "--warmup", metavar="N", help="Untimed runs first."),
    input_shape: list[str] | None = SHAPE_OPT,
    provider: list[str] | None = PROVIDER_OPT,
    custom_lib: list[Path] | None = CUSTOM_LIB_OPT,
    requantize: bool = REQUANTIZE_OPT,
    json_report: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Time the original and the folded model in onnxruntime: session creation and latency,
    with graph optimizations disabled and enabled."""
    import tempfile

    from bnfold import benchmark, pipeline

    def run():
        for path in (model, folded):
            if path is not None and not path.is_file():
                raise (
                    MissingFile(f"{path}: no such file") if not path.exists() else BnfoldError(f"{path}: is not a file")
                )
        libraries = [str(p) for p in custom_lib or []]
        session_options = {"input_shapes": input_shapes(input_shape), **providers(provider), "custom_ops": libraries}
        if provider:
            from bnfold.verification.runtime import check_providers

            check_providers(provider)  # here, not as a verification failure: bench has no --no-verify
        timing = {"runs": runs, "warmup": warmup, "progress": out.progress(), **session_options}
        if folded is not None:
            return benchmark.bench(model, folded, **timing)
        with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as folder:
            result = pipeline.optimize(
                model, Path(folder), verify_options=session_options, progress=out.progress(), requantize=requantize
            )
            if not result.written:
                raise BnfoldError("the folded model is not equivalent to the original; nothing to time")
            report = benchmark.bench(model, result.output, **timing)
            report.folded, report.fold_summary = None, result.report.summary()  # the file is gone
            return report

    out = Console("bench", json=json_report, quiet=quiet)
    report = out.guard(run)
    out.render(report.to_dict(), report)


def main() -> None:
    """The `bnfold` command: Typer's app, with a usage error (an unknown option, a value that is
    not a number) exit 2 and, with --json, a report on stdout like every other outcome; run in a
    child process that a native crash cannot take down with it (bnfold.supervise)."""
    supervised(_command)


def _command() -> None:
    # click's UsageError (an unknown option, a bad value), whichever click Typer runs on
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="bnfold", standalone_mode=False)
    except usage_error as exc:
        exc.show()
        words = sys.argv[1:]
        if "--json" in words:
            command = command_of(words)
            Console(command, json=True).emit({}, EXIT_USER_ERROR, exc.format_message())
        sys.exit(EXIT_USER_ERROR)
    except typer.Abort:
        say("Aborted!")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
