"""Running models and comparing them: the only module that imports onnxruntime.

Sessions run with graph optimizations disabled: at its default level onnxruntime fuses Conv+BN
itself, and a check of the original would then compare bnfold against onnxruntime's own fold.

Tolerance policy (README "Tolerance policy"). An output element passes when

    |candidate − reference| ≤ atol · S + rtol · |reference|,

where S is the largest finite |reference| of that output in that trial (1 if the output is all
zero). Errors are judged against the output's own magnitude, so logits in the thousands and
probabilities below one are judged alike. Defaults, per output dtype, measured on the sample
models (BENCHMARKS.md): correct float32 folds drift ≤ 5e-7 · S, the mildest seeded folding
mistake (one channel's bias 3% off) ≥ 2.9e-4 · S, so atol = 5e-5 sits 100× above the one and 6×
below the other. float16 and bfloat16 keep 11 and 8 significant bits; integer and bool outputs
must match exactly. NaN and ±Inf must sit at the same positions in both.

Some models are numerically noisier than the policy assumes: on a ResNet-50 with calibrated BN,
any correct float32 fold (bnfold's and onnxruntime's alike) drifts 2e-5 · S, because the
unfolded conv output carries the mean that BN subtracts. So when an output fails the policy,
the check measures this model's own float32 noise: how far onnxruntime's BASIC-level graph
optimizations (its own Conv+BN fusion and constant folding, all float32) move the reference on
the same inputs. A difference within NOISE_FACTOR times that noise is float32 noise, and the
report says so with the numbers; the relaxed bound is capped at NOISE_CAP times the policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from bnfold.errors import BnfoldError, first_line
from bnfold.modelfile import check_external_data


class ModelLoadError(BnfoldError):
    """onnxruntime cannot load one of the two models; `role` says which."""

    def __init__(self, role: str, message: str):
        super().__init__(message)
        self.role = role  # "reference" or "candidate"


@dataclass(frozen=True)
class Tolerance:
    atol: float  # a fraction of the output's largest magnitude
    rtol: float  # a fraction of each element's own magnitude


DEFAULT_TOLERANCE = {
    "float64": Tolerance(1e-10, 0.0),
    "float32": Tolerance(5e-5, 0.0),
    "float16": Tolerance(1e-2, 0.0),
    "bfloat16": Tolerance(8e-2, 0.0),
}
EXACT = Tolerance(0.0, 0.0)
NOISE_FACTOR = 4.0  # a failing output passes within this many times the model's own noise
NOISE_CAP = 20.0  # …but never beyond this many times the policy's atol
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
DEFAULT_TRIALS = 3
DEFAULT_INT_RANGE = (0, 10)
SYMBOLIC_BATCH = 1  # a symbolic first dimension (the batch)
SYMBOLIC_OTHER = 16  # any other symbolic dimension
MAX_INPUT_BYTES = 1 << 30  # per trial; more is refused rather than allocated

# onnxruntime's input type strings → numpy dtypes bnfold can generate
ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


@dataclass
class OutputComparison:
    """One output over all trials; the error figures are the worst trial's."""

    name: str
    dtype: str
    shape: list
    passed: bool = True
    reason: str = ""  # why it failed, when it failed for something other than numbers
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    rel_l2_error: float = 0.0
    cosine_similarity: float = 1.0
    mismatched: int = 0
    elements: int = 0
    scale: float = 0.0  # S: the largest finite |reference| in the worst trial
    needed_atol: float = 0.0  # the smallest atol (with this rtol) that would have passed
    atol: float = 0.0
    rtol: float = 0.0
    noise: float | None = None  # this model's own float32 noise (as an atol), when measured


@dataclass
class VerifyReport:
    reference: str
    candidate: str
    equivalent: bool = True
    trials: int = 0
    seed: int = 0
    providers: list[str] = field(default_factory=list)
    inputs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: list[OutputComparison] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        if self.equivalent:
            verdict = f"equivalent: all {len(self.outputs)} outputs match"
        else:
            verdict = f"NOT equivalent: {len(self.failed)} of {len(self.outputs)} outputs differ"
        return f"{verdict} over {self.trials} trials (seed {self.seed}) · {self.seconds:.2f} s"

    def table(self) -> str:
        rows = [("output", "dtype", "shape", "max abs", "rel L2", "cosine", "mismatched", "needed atol", "result")]
        for o in self.outputs:
            if o.passed and o.noise is not None:
                result = f"ok: within {NOISE_FACTOR:.0f}× this model's float32 noise {o.noise:.1e}"
            elif o.passed:
                result = f"ok (atol {o.atol:.0e})"
            else:
                result = o.reason or f"FAIL (atol {o.atol:.0e})"
            rows.append(
                (
                    o.name,
                    o.dtype,
                    "x".join(map(str, o.shape)) or "scalar",
                    f"{o.max_abs_error:.2e}",
                    f"{o.rel_l2_error:.2e}",
                    f"{o.cosine_similarity:.6f}",
                    f"{o.mismatched}/{o.elements}",
                    f"{o.needed_atol:.2e}",
                    result,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
        return "\n".join([*self.notes, *lines, self.summary()])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 4)
        return data


def make_session(
    model: onnx.ModelProto | str | Path, *, providers: Sequence[str] = DEFAULT_PROVIDERS, optimize: bool = False
) -> ort.InferenceSession:
    """A session on a ModelProto or a model file (a path lets onnxruntime read external data).
    `optimize` turns on onnxruntime's BASIC graph optimizations (float32-exact rewrites)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: keep onnxruntime's warnings off the report
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=list(providers))


def verify(
    reference: onnx.ModelProto | str | Path,
    candidate: onnx.ModelProto | str | Path,
    *,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    int_range: tuple[int, int] = DEFAULT_INT_RANGE,
    inputs: Sequence[str | Path] = (),
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    progress: Callable[[str], None] = lambda stage: None,
    locations_checked: bool = False,
) -> VerifyReport:
    """Run both models on the same inputs and compare every output (see the module docstring).

    `inputs` are .npz files (arrays by input name) or onnx test-data folders; each is one trial.
    Without them, `trials` input sets are generated from `seed`. Raises BnfoldError when the
    comparison cannot run; a difference is reported, not raised. Model files' external-data
    locations are checked before onnxruntime reads them, unless the caller has done that
    (`locations_checked`: optimize read the input and wrote the candidate itself).
    """
    start = time.perf_counter()
    if trials < 1:
        raise BnfoldError("--trials must be at least 1")
    if int_range[0] >= int_range[1]:
        raise BnfoldError(f"--int-range {int_range[0]}:{int_range[1]} is empty")
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise BnfoldError(f"provider {missing[0]} is not available; have {', '.join(ort.get_available_providers())}")
    report = VerifyReport(_describe(reference), _describe(candidate), seed=seed, providers=list(providers))
    progress("loading both models in onnxruntime")
    sessions = [
        load_session(m, role, providers, check_locations=not locations_checked)
        for m, role in ((reference, "reference"), (candidate, "candidate"))
    ]
    if any(o.type == "tensor(bfloat16)" for o in sessions[0].get_outputs()):
        raise BnfoldError("the model has bfloat16 outputs, which onnxruntime's Python API cannot return")
    signature = _signature_difference(*sessions)
    if signature:
        report.equivalent, report.notes = False, [signature]
        report.seconds = time.perf_counter() - start
        return report
    specs, report.notes = input_specs(sessions[0], input_shapes or {})
    if inputs:
        feeds = [feed for path in inputs for feed in load_input_sets(Path(path), specs)]
        report.inputs = [{"name": n, "source": ", ".join(map(str, inputs))} for n in specs]
    else:
        feeds = [generate_inputs(specs, np.random.default_rng([seed, t]), int_range) for t in range(trials)]
        report.inputs = [
            {"name": n, "dtype": str(np.dtype(d) if d != "bfloat16" else d), "shape": list(s), "source": "generated"}
            for n, (d, s) in specs.items()
        ]
    report.trials = len(feeds)
    comparisons: dict[str, list[OutputComparison]] = {}
    output_names = [o.name for o in sessions[0].get_outputs()]
    references = []
    for t, feed in enumerate(feeds, 1):
        progress(f"trial {t} of {len(feeds)}")
        want, got = (run_session(s, feed, label) for s, label in zip(sessions, (report.reference, report.candidate)))
        references.append(want)
        for name, w, g in zip(output_names, want, got):
            comparisons.setdefault(name, []).append(compare(name, w, g, atol, rtol))
    report.outputs = [_worst(trial_results) for trial_results in comparisons.values()]
    if not all(o.passed for o in report.outputs) and atol is None:
        progress("measuring the reference's own float32 noise")
        _judge_by_noise(report.outputs, reference, feeds, references, providers)
    report.equivalent = all(o.passed for o in report.outputs)
    report.seconds = time.perf_counter() - start
    return report


def _judge_by_noise(outputs, reference, feeds, references, providers) -> None:
    """Give failing float outputs a second look against the model's own float32 noise: how far
    onnxruntime's BASIC optimizations move the reference (module docstring)."""
    try:
        optimized = make_session(reference, providers=providers, optimize=True)
    except Exception:  # no yardstick, no relaxation: the policy's verdict stands
        return
    noise: dict[str, float] = {}
    for feed, want in zip(feeds, references):
        moved = run_session(optimized, feed, "the optimized reference")
        for o, w, m in zip(outputs, want, moved):
            if w.dtype.kind == "f" and m.shape == w.shape and m.dtype == w.dtype:
                noise[o.name] = max(noise.get(o.name, 0.0), compare(o.name, w, m, 0.0, 0.0).needed_atol)
    for o in outputs:
        if o.passed or o.name not in noise or o.reason:
            continue
        o.noise = noise[o.name]
        bound = min(NOISE_FACTOR * o.noise, NOISE_CAP * o.atol)
        if o.needed_atol <= bound:
            o.passed = True  # mismatched keeps counting the elements beyond the policy
        elif NOISE_FACTOR * o.noise > NOISE_CAP * o.atol:
            o.reason = f"FAIL: this model's own float32 noise ({o.noise:.1e}) is too large to tell a fold from noise"


def compare(
    name: str, want: np.ndarray, got: np.ndarray, atol: float | None = None, rtol: float | None = None
) -> OutputComparison:
    """Compare one output of one trial under the tolerance policy."""
    result = OutputComparison(name, str(want.dtype), list(want.shape), elements=int(want.size))
    if got.shape != want.shape or got.dtype != want.dtype:
        result.passed = False
        result.reason = f"candidate gives {got.dtype} {list(got.shape)}"
        return result
    default = DEFAULT_TOLERANCE.get(str(want.dtype), EXACT)
    tolerance = Tolerance(default.atol if atol is None else atol, default.rtol if rtol is None else rtol)
    result.atol, result.rtol = tolerance.atol, tolerance.rtol
    if want.dtype.kind not in "fc":
        result.mismatched = int((want != got).sum())
        result.passed = result.mismatched == 0
        result.max_abs_error = float(np.abs(want.astype(np.float64) - got.astype(np.float64)).max(initial=0.0))
        return result
    w, g = want.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(w) & np.isfinite(g)
    # NaN and ±Inf must agree position by position (equal_nan: NaN == NaN; inf == inf)
    special_mismatch = int((~finite & ~((w == g) | (np.isnan(w) & np.isnan(g)))).sum())
    w_f, g_f = w[finite], g[finite]
    error = np.abs(g_f - w_f)
    scale = float(np.abs(w_f).max(initial=0.0)) or 1.0
    allowed = tolerance.atol * scale + tolerance.rtol * np.abs(w_f)
    result.scale = scale
    result.mismatched = int((error > allowed).sum()) + special_mismatch
    result.passed = result.mismatched == 0
    result.max_abs_error = float(error.max(initial=0.0))
    nonzero = np.abs(w_f) > 0
    result.max_rel_error = float((error[nonzero] / np.abs(w_f[nonzero])).max(initial=0.0))
    norm = float(np.linalg.norm(w_f))
    result.rel_l2_error = float(np.linalg.norm(g_f - w_f)) / norm if norm else float(np.linalg.norm(g_f))
    denominator = norm * float(np.linalg.norm(g_f))
    if denominator:
        result.cosine_similarity = float(np.dot(w_f, g_f)) / denominator
    else:  # an all-zero output: similar only to another all-zero output
        result.cosine_similarity = 1.0 if norm == 0 and not g_f.any() else 0.0
    result.needed_atol = float(np.maximum(error - tolerance.rtol * np.abs(w_f), 0).max(initial=0.0)) / scale
    if special_mismatch:
        result.reason = f"NaN/Inf at {special_mismatch} different positions"
    return result


def generate_inputs(specs: dict, rng: np.random.Generator, int_range: tuple[int, int]) -> dict:
    """Standard normal floats (not zeros: they would hide a dropped scale), integers uniform in
    int_range (token ids, indices), random booleans."""
    feed = {}
    for name, (dtype, shape) in specs.items():
        if dtype == "bfloat16":
            feed[name] = _bfloat16_value(rng.standard_normal(shape).astype(np.float32))
        elif np.dtype(dtype).kind == "f":
            feed[name] = rng.standard_normal(shape).astype(dtype)
        elif np.dtype(dtype).kind == "b":
            feed[name] = rng.random(shape) < 0.5
        else:
            info = np.iinfo(dtype)
            low, high = max(int_range[0], info.min), min(int_range[1], info.max + 1)
            feed[name] = rng.integers(low, high, shape, dtype=dtype)
    return feed


def load_input_sets(path: Path, specs: dict) -> list[dict]:
    """Input sets from an .npz (arrays by input name) or an onnx test-data folder: a folder of
    `input_K.pb` files, or a model folder of `test_data_set_N` folders. Pickles are refused."""
    if path.is_dir():
        sets = sorted(p for p in path.glob("test_data_set_*") if p.is_dir()) or [path]
        return [_load_test_data_set(folder, specs) for folder in sets]
    if not path.is_file():
        raise BnfoldError(f"{path}: no such input file or folder")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise BnfoldError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    return [_check_feed(arrays, specs, path)]


# ---- internals ---------------------------------------------------------------------------------
def _describe(model) -> str:
    return str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "<in memory>")


def load_session(
    model, role: str, providers, *, optimize: bool = False, check_locations: bool = True
) -> ort.InferenceSession:
    """make_session, with the external-data check first and a ModelLoadError naming the role."""
    if check_locations and not isinstance(model, onnx.ModelProto):
        check_external_data(model)  # onnxruntime reads external data itself: check it first
    try:
        return make_session(model, providers=providers, optimize=optimize)
    except Exception as exc:
        raise ModelLoadError(role, f"onnxruntime cannot load {_describe(model)}: {first_line(exc)}") from None


def _signature_difference(reference: ort.InferenceSession, candidate: ort.InferenceSession) -> str:
    for kind in ("inputs", "outputs"):
        ref = [(v.name, v.type) for v in getattr(reference, f"get_{kind}")()]
        cand = [(v.name, v.type) for v in getattr(candidate, f"get_{kind}")()]
        if sorted(ref) != sorted(cand):
            return f"the models' {kind} differ: reference {ref}, candidate {cand}"
    return ""


def input_specs(session: ort.InferenceSession, shapes: dict[str, Sequence[int]]) -> tuple[dict, list[str]]:
    """name → (dtype, concrete shape) for every input, and notes on the dimensions chosen."""
    unknown = set(shapes) - {v.name for v in session.get_inputs()}
    if unknown:
        raise BnfoldError(f"--input-shape names no input of the model: {', '.join(sorted(unknown))}")
    specs, notes, symbols = {}, [], {}
    for value in session.get_inputs():
        dtype = ORT_TYPES.get(value.type)
        if dtype is None:
            raise BnfoldError(
                f"input '{value.name}' has type {value.type}, which bnfold cannot generate; pass --inputs"
            )
        if value.name in shapes:
            shape = list(shapes[value.name])
            if value.shape is not None and len(shape) != len(value.shape):
                raise BnfoldError(
                    f"--input-shape {value.name}: rank {len(shape)}, the model declares rank {len(value.shape)}"
                )
        elif value.shape is None:
            raise BnfoldError(f"input '{value.name}' declares no shape; pass --input-shape {value.name}:DIMS")
        else:
            shape = []
            for axis, dim in enumerate(value.shape):
                if isinstance(dim, int) and dim >= 0:
                    shape.append(dim)
                    continue
                default = SYMBOLIC_BATCH if axis == 0 else SYMBOLIC_OTHER
                size = symbols.setdefault(dim, default) if dim else default  # one symbol, one size
                notes.append(f"note: input '{value.name}' axis {axis} is {dim or 'unknown'!s}: used {size}")
                shape.append(size)
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if itemsize * int(np.prod(shape, dtype=np.float64)) > MAX_INPUT_BYTES:
            raise BnfoldError(
                f"input '{value.name}' of shape {shape} needs more than {MAX_INPUT_BYTES >> 30} GiB; "
                "pass a smaller --input-shape"
            )
        specs[value.name] = (dtype, tuple(shape))
    return specs, sorted(set(notes), key=notes.index)


def _load_test_data_set(folder: Path, specs: dict) -> dict:
    files = sorted(
        folder.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]) if p.stem.split("_")[1].isdigit() else 0
    )
    if not files:
        raise BnfoldError(f"{folder}: no input_*.pb files")
    arrays = {}
    for position, file in enumerate(files):
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(file.read_bytes())
            value = numpy_helper.to_array(tensor)
        except Exception as exc:
            raise BnfoldError(f"{file}: not a TensorProto ({first_line(exc)})") from None
        name = tensor.name or (list(specs)[position] if position < len(specs) else f"input_{position}")
        arrays[name] = value
    return _check_feed(arrays, specs, folder)


def _check_feed(arrays: dict, specs: dict, source: Path) -> dict:
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise BnfoldError(f"{source}: no array for input '{missing[0]}'")
    feed = {}
    for name, (dtype, _) in specs.items():
        array = arrays[name]
        if dtype == "bfloat16":
            array = _bfloat16_value(array.astype(np.float32))
        elif array.dtype != np.dtype(dtype):
            raise BnfoldError(f"{source}: input '{name}' is {array.dtype}, the model takes {np.dtype(dtype)}")
        feed[name] = array
    return feed


def _bfloat16_value(values: np.ndarray) -> ort.OrtValue:
    """onnxruntime's Python API takes bfloat16 only as an OrtValue with the ONNX type given."""
    import ml_dtypes

    bits = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx.TensorProto.BFLOAT16)


def run_session(session: ort.InferenceSession, feed: dict, label: str) -> list[np.ndarray]:
    try:
        if any(isinstance(v, ort.OrtValue) for v in feed.values()):
            values = {
                k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()
            }
            return [v.numpy() for v in session.run_with_ort_values(None, values)]
        return session.run(None, feed)
    except Exception as exc:
        raise BnfoldError(f"onnxruntime could not run {label}: {first_line(exc)}") from None


def _worst(trials: list[OutputComparison]) -> OutputComparison:
    failed = [t for t in trials if not t.passed]
    return max(failed or trials, key=lambda t: (t.mismatched, t.needed_atol))
