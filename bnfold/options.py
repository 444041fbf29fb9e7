"""The command line's shared options, declared once for Typer, their parsing into the library's
keyword arguments and checks, and the command class every command's help is rendered by."""

from __future__ import annotations

import typer

from bnfold.errors import BnfoldError, MissingFile


class Command(typer.core.TyperCommand):
    """Typer's command, with its arguments' help lines free of Typer's annotation label
    (`MODEL <list[Path]>`): each argument's help says what it takes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, typer.core.TyperArgument):
                param.display_type_rich = lambda ctx: None


MODEL_ARG = typer.Argument(..., metavar="MODEL", help="The ONNX model file.", show_default=False)
JSON_OPT = typer.Option(False, "--json", help="Print a machine-readable report on stdout.")
REPORT_OPT = typer.Option(
    None,
    "--report",
    metavar="FILE.html",
    help="Also write the report as a self-contained HTML page: each fold site's error against what was allowed, "
    "the rules that decided, what was folded where.",
)
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="Print nothing on stderr except errors.")
BRIEF_OPT = typer.Option(
    False, "--brief", help="Only what needs a look: skipped BNs, failing tensors, notes, and the summary."
)
# Verification options, shared by `verify` and `optimize`.
TRIALS_OPT = typer.Option(3, "--trials", metavar="N", help="Input sets to generate.")
SEED_OPT = typer.Option(0, "--seed", metavar="N", help="Seed for generated inputs.")
ATOL_OPT = typer.Option(
    None,
    "--atol",
    metavar="[NAME:]X",
    help="Allowed error as a fraction of each output's scale S (the 99th percentile of its non-zero "
    "magnitudes; docs/verification.md), for every output or the one named (repeatable). Default by "
    "the precision it is computed in.",
)
RTOL_OPT = typer.Option(
    None, "--rtol", metavar="[NAME:]X", help="Allowed error as a fraction of each element (repeatable). Default 0."
)
ABS_ATOL_OPT = typer.Option(
    None,
    "--abs-atol",
    metavar="[NAME:]X",
    help="Allowed error in the output's own units, as Polygraphy's --atol (repeatable). Added to the others.",
)
SHAPE_OPT = typer.Option(
    None,
    "--input-shape",
    metavar="NAME:DIMS",
    help="Shape for an input: input:1x3x224x224 or input:1,3,224,224 (repeatable).",
)
INT_RANGE_OPT = typer.Option(
    "0:10", "--int-range", metavar="LOW:HIGH", help="Integer inputs are drawn from [LOW, HIGH)."
)
INPUTS_OPT = typer.Option(
    None,
    "--inputs",
    metavar="FILE|DIR",
    help=".npz (arrays by input name, or in.NAME beside out.NAME), Polygraphy's saved inputs (.json, one "
    "trial per iteration) or onnx test-data folder; one trial per set (repeatable).",
)
REQUANTIZE_OPT = typer.Option(
    False,
    "--requantize",
    help="Also fold a BN behind a quantizer on the conv's output (Conv → Q → DQ → BN), removing that quantizer: "
    "as if folded before quantizing; not exact, verified against the original with it bypassed.",
)
NO_REPARAM_OPT = typer.Option(
    False,
    "--no-reparam",
    help="Keep parallel branches (RepVGG, MobileOne, RepMixer) instead of merging them into one Conv.",
)
CALIBRATION_OPT = typer.Option(
    None,
    "--calibration",
    metavar="FILE|DIR",
    help="Inputs (.npz by input name, or an onnx test-data folder, as verify --inputs) on which to measure "
    "each conv's input statistics, to choose 16-bit folds' rounding with (turns --bias-correction on).",
)
BIAS_CORRECTION_OPT = typer.Option(
    None,
    "--bias-correction/--no-bias-correction",
    help="For float16/bfloat16 weights: choose each folded weight's second rounding with the statistics "
    "of its conv's input (from the graph, or measured on --calibration) instead of plain sum-preserving "
    "rounding. Default: on with --calibration, else off (docs/folding.md says where it helps).",
    show_default=False,
)
CUSTOM_LIB_OPT = typer.Option(
    None,
    "--custom-lib",
    metavar="FILE",
    help="An onnxruntime custom-op library (.so, .dll) for ops of another domain (repeatable).",
)
PROVIDER_OPT = typer.Option(
    None, "--provider", metavar="NAME", help="onnxruntime execution provider (repeatable). Default CPU."
)


def verify_options(trials, seed, tolerances, input_shape, int_range, inputs, provider, custom_lib) -> dict:
    """The CLI's verification options as keyword arguments of bnfold.verify; `tolerances` are
    the --atol, --rtol and --abs-atol values, checked here (one line, exit 2, before any work)."""
    from bnfold.verification.tolerance import stated

    atol, rtol, abs_atol = tolerances
    stated(atol, rtol, abs_atol)
    shapes = input_shapes(input_shape)
    low, _, high = int_range.partition(":")
    try:
        int_bounds = (int(low), int(high))
    except ValueError:
        raise BnfoldError(f"--int-range {int_range!r}: expected LOW:HIGH such as 0:1000") from None
    return {
        "trials": trials,
        "seed": seed,
        "atol": atol,
        "rtol": rtol,
        "abs_atol": abs_atol,
        "input_shapes": shapes,
        "int_range": int_bounds,
        "inputs": list(inputs or []),
        "custom_ops": [str(p) for p in custom_lib or []],
        **providers(provider),
    }


def check_verify_models(reference, candidate, load_outputs, not_with_stored: dict) -> None:
    """`verify` runs two models, or one with --load-outputs (and then none of `not_with_stored`,
    option → value); each must be a file that exists."""
    if load_outputs is not None and candidate is not None:
        raise BnfoldError("--load-outputs compares one model with stored outputs: give one model")
    if candidate is None and load_outputs is None:
        raise BnfoldError("verify needs two models, or one with --load-outputs")
    for path in [reference] if load_outputs is not None else [reference, candidate]:
        if path.is_dir():
            raise BnfoldError(f"{path}: is a directory, not an ONNX model")
        if not path.exists():
            raise MissingFile(f"{path}: no such file")
    unused = [option for option, value in not_with_stored.items() if value]
    if load_outputs is not None and unused:
        raise BnfoldError(f"{', '.join(unused)}: not with --load-outputs")


def input_shapes(input_shape: list[str] | None) -> dict[str, list[int]]:
    """--input-shape NAME:DIMS values as {name: dims}; DIMS as 1x3x224x224, or 1,3,224,224 as
    onnxsim and onnxslim write them."""
    shapes = {}
    for item in input_shape or []:
        name, _, dims = item.rpartition(":")  # input names may themselves contain ':'
        try:
            shapes[name] = [int(d) for d in dims.lower().replace(",", "x").split("x")]
        except ValueError:
            raise BnfoldError(f"--input-shape {item!r}: expected NAME:DIMS such as input:1x3x224x224") from None
        if not name or any(d < 0 for d in shapes[name]):
            raise BnfoldError(f"--input-shape {item!r}: expected NAME:DIMS such as input:1x3x224x224")
    return shapes


def providers(provider: list[str] | None) -> dict:
    """--provider as bnfold.verify's `providers` keyword, or nothing (its default)."""
    return {"providers": list(provider)} if provider else {}
