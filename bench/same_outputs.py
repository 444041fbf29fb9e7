"""Record what `bnfold optimize` writes for every sample, to show a refactoring changed nothing.

    python bench/same_outputs.py record before/     # on the old code
    python bench/same_outputs.py record after/      # on the new code
    python bench/same_outputs.py compare before/ after/

For each sample model it runs `bnfold optimize --json` twice, once with the default external
data mode and once with `--external-data always`, and keeps the written files and the JSON
report. Normalized before comparing: the 8-hex part of a data file's name (random before
2026-11-30, now from its content; in the file name and inside the model that points at it),
the timings in the report and the temporary folder's paths. Everything else must be byte-identical.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
MODES = {"default": [], "external": ["--external-data", "always"]}
_DATA_NAME = re.compile(rb"\.folded\.onnx\.[0-9a-f]{8}\.data")


def record(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for model in sorted(SAMPLES.glob("*.onnx")):
        for mode, flags in MODES.items():
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / (model.stem + ".folded.onnx")
                run = subprocess.run(
                    [sys.executable, "-m", "bnfold", "optimize", str(model), "-o", str(out), "--json", "-q", *flags],
                    capture_output=True,
                    text=False,
                )
                report = json.loads(run.stdout) if run.stdout else {}
                report = _normalized_report(report, folder)
                report["exit_code"] = run.returncode
                stem = f"{model.stem}.{mode}"
                (target / f"{stem}.json").write_text(json.dumps(report, indent=1, sort_keys=True))
                for written in sorted(Path(folder).iterdir()):
                    name = _DATA_NAME.sub(b".folded.onnx.DATA.data", written.name.encode()).decode()
                    data = _DATA_NAME.sub(b".folded.onnx.DATA.data", written.read_bytes())
                    (target / f"{stem}.{name}").write_bytes(data)
        print(f"recorded {model.name}", file=sys.stderr)


def _normalized_report(report: dict, folder: str) -> dict:
    text = json.dumps(report).replace(folder, "TMP")
    report = json.loads(text)

    def scrub(value):
        if isinstance(value, dict):
            return {k: ("T" if k == "seconds" else scrub(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, str):
            return re.sub(r"[0-9.]+ s\b", "T s", value)
        return value

    return scrub(report)


def compare(before: Path, after: Path) -> int:
    names = sorted({p.name for p in before.iterdir()} | {p.name for p in after.iterdir()})
    differ = [n for n in names if not (before / n).is_file() or not (after / n).is_file()]
    differ += [n for n in names if n not in differ and (before / n).read_bytes() != (after / n).read_bytes()]
    for name in differ:
        print(f"differs: {name}")
    print(f"{len(names) - len(differ)} of {len(names)} files identical")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("record").add_argument("folder", type=Path)
    pair = sub.add_parser("compare")
    pair.add_argument("before", type=Path)
    pair.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        if args.folder.exists():
            shutil.rmtree(args.folder)
        record(args.folder)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
