"""The margins of the verdict's channel rule (bnfold.verification.verdict), measured on the sample
models: how far a correct fold moves a site's channels as a whole (the largest per-channel mean
difference in units of the channel's RMS, and the largest per-channel slope), against the
reference's own when its parameters are rounded the other way; and how far seeded mistakes move
them.

    python bench/channel_margins.py [SAMPLE…]

The channel rule is made to measure every site (its floors set to zero) and records, per site,
the candidate's figures and the yardstick's. Mistakes: one channel of the middle folded bias 3%
off; one channel of the middle folded weight ×1.01; ε 1e-3 for 1e-5 in every fold.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_verify import mutate  # noqa: E402

import bnfold  # noqa: E402
from bnfold.verification import tolerance, verdict  # noqa: E402

SAMPLES = ROOT / "sample_models"


def folded_params(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The folded linear ops' (weight, bias) initializers, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    return [
        (inits[n.input[1]], inits[n.input[2]])
        for n in model.graph.node
        if n.op_type in ("Conv", "ConvTranspose", "Gemm") and n.input[2:3] and n.input[2] in inits
        and n.input[1] in inits and n.input[2].endswith("_bnfold")
    ]  # fmt: skip


def seeded(original: Path, mistake: str | None) -> onnx.ModelProto | None:
    with pytest.MonkeyPatch.context() as patch:
        if mistake == "epsilon 1e-3 for 1e-5":
            mutate(patch, mistake)
        model = bnfold.fold(original).model
    if mistake in (None, "epsilon 1e-3 for 1e-5"):
        return model
    params = folded_params(model)
    if not params:
        return None
    weight, bias = params[len(params) // 2]
    tensor = bias if mistake == "bias 3% off" else weight
    values = numpy_helper.to_array(tensor).copy()
    if mistake == "bias 3% off":
        values[0] = values[0] + 0.03 * abs(values[0])
    else:
        values[0] = values[0] * 1.01
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


def measure(original: Path, candidate: onnx.ModelProto, folder: Path) -> list[tuple]:
    """(site, precision, shift, own shift, gain, own gain) of every site with channels."""
    path = folder / "candidate.onnx"
    onnx.save(candidate, str(path))
    rows = []

    def record(m, so_far, ev):
        own = ev.site_channels.get(m.name)
        if m.channels is not None and m.channels.judged and own is not None:
            c = m.channels
            rows.append((m.name, m.comparison.precision, c.shift, own.shift, c.gain, own.gain))
        return None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verdict, "RULES", (*verdict.RULES, verdict.Rule("record", (verdict.SITE,), record)))
        patch.setattr(verdict, "CHANNEL_FLOOR", {k: (0.0, 0.0) for k in tolerance.CHANNEL_FLOOR})
        bnfold.verify(original, path)
    return rows


def main(names: list[str]) -> None:
    mistakes = [None, "bias 3% off", "one channel's weight ×1.01", "epsilon 1e-3 for 1e-5"]
    table: dict[tuple[str, str | None], list[tuple]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for original in sorted(SAMPLES.glob("*.onnx")):
            if names and original.stem not in names:
                continue
            for mistake in mistakes:
                model = seeded(original, mistake)
                if model is None:
                    continue
                rows = measure(original, model, Path(folder))
                for precision in sorted({r[1] for r in rows}):
                    mine = [r for r in rows if r[1] == precision]
                    table.setdefault((precision, mistake), []).extend(mine)
                    shift = max(r[2] for r in mine)
                    ratio = max(_of_bound(r, 0) for r in mine)
                    gain = max(r[4] for r in mine)
                    gratio = max(_of_bound(r, 1) for r in mine)
                    print(
                        f"{original.stem:28} {mistake or 'correct fold':26} {precision:8} {len(mine):3} sites  "
                        f"shift {shift:.1e} ({ratio:8.2f}× bound)  gain {gain:.1e} ({gratio:8.2f}× bound)",
                        flush=True,
                    )
    print()
    for (precision, mistake), rows in sorted(table.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        shifts = np.array([r[2] for r in rows])
        ratios = np.array([_of_bound(r, 0) for r in rows])
        gains = np.array([r[4] for r in rows])
        gratios = np.array([_of_bound(r, 1) for r in rows])
        print(
            f"{precision:8} {mistake or 'correct fold':26} {len(rows):4} sites: shift ≤ {shifts.max():.1e} "
            f"(≤ {ratios.max():.2f}× bound), gain ≤ {gains.max():.1e} (≤ {gratios.max():.2f}× bound); "
            f"sites past the bound: {int(((ratios > 1) | (gratios > 1)).sum())}"
        )


def _of_bound(row, which: int) -> float:
    """A site's shift (which 0) or gain (1) as a multiple of the bound the channel rule fails it
    past: SHIFT_FACTOR × the yardstick's, and at least the precision's floor."""
    value, own = row[2 + 2 * which], row[3 + 2 * which]
    return value / max(tolerance.SHIFT_FACTOR[row[1]] * own, tolerance.CHANNEL_FLOOR[row[1]][which])


if __name__ == "__main__":
    main(sys.argv[1:])
