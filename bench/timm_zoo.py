"""timm networks nobody here built, through both PyTorch exporters, folded and verified.

    python bench/timm_zoo.py --export DIR [NAME ...]     # needs torch, torchvision and timm
    python bench/timm_zoo.py DIR                          # bnfold optimize --json on DIR/*.onnx

`--export` writes `<name>.ts.onnx` (TorchScript exporter, `do_constant_folding=False`) and
`<name>.dynamo.onnx` (dynamo exporter, `optimize=False`), BN kept, and checks the exported BN
count against the module's. Weights are timm's random initialization, with trained-looking BN
statistics drawn per channel. torch 2.13 cannot load torchvision here; on x86_64
`pip install torch==2.14.1 torchvision==0.29.1 timm` can (this machine's environment notes).

The second form runs `bnfold optimize --json` on every export and prints, per model, the exit
code, BN folded of BN in the graph, the Mul/Add/Sub/Div folded and branch sums merged, the
verdict and the time, and the reasons of the BNs left.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

NAMES = (
    "starnet_s050", "efficientformerv2_s0", "efficientvit_m0", "repvit_m0_9", "fastvit_t8", "mobileone_s0",
    "ghostnetv2_100", "regnetx_002", "mobilenetv3_small_050", "densenet121", "dla34", "lcnet_050", "rexnet_100",
    "hgnetv2_b0",
)  # fmt: skip


def export(folder: Path, names) -> None:
    import timm
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in names:
        model = timm.create_model(name, pretrained=False).eval()
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        with torch.no_grad():
            for norm in norms:
                c = norm.num_features
                norm.running_mean.copy_(0.3 * torch.randn(c))
                norm.running_var.copy_(0.3 + torch.rand(c))
                if norm.affine:
                    norm.weight.copy_(0.5 + torch.rand(c))
                    norm.bias.copy_(0.2 * torch.randn(c))
        x = torch.randn(1, *model.default_cfg.get("input_size", (3, 224, 224)))
        for exporter in ("ts", "dynamo"):
            path = folder / f"{name}.{exporter}.onnx"
            common = {"input_names": ["input"], "output_names": ["output"]}
            if exporter == "ts":
                torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False, opset_version=17,
                                  **common)  # fmt: skip
            else:
                torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False, external_data=False, **common)
            import onnx

            exported = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
            assert exported == len(norms), f"{path.name}: {exported} BN exported, the module has {len(norms)}"
            print(f"{path.name}: {exported} BatchNormalization", flush=True)


def fold(folder: Path) -> None:
    totals = collections.Counter()
    for path in sorted(folder.glob("*.onnx")):
        if ".folded." in path.name:
            continue
        out = path.with_name(path.name.replace(".onnx", ".folded.onnx"))
        run = subprocess.run([sys.executable, "-m", "bnfold", "optimize", str(path), "-o", str(out), "--json", "-q"],
                             capture_output=True, text=True)  # fmt: skip
        report = json.loads(run.stdout)
        summary, verdict = report.get("summary") or {}, report.get("verification") or {}
        totals.update(bn=summary.get("batch_normalization_nodes", 0), folded=summary.get("folded", 0),
                      written=run.returncode == 0, models=1)  # fmt: skip
        folded, bn = summary.get("folded"), summary.get("batch_normalization_nodes")
        print(f"{path.name}: exit {run.returncode}, {folded} of {bn} BN, {summary.get('channel_affines_folded')} "
              f"Mul/Add/Sub/Div, {summary.get('branch_merges')} merges, equivalent {verdict.get('equivalent')}, "
              f"{summary.get('seconds')} s", flush=True)  # fmt: skip
        left = [b["reason"] for b in report.get("batch_normalizations", []) if b["status"] != "folded"]
        for reason, count in collections.Counter(left).most_common(3):
            print(f"    {count}× {reason}")
    print(f"{totals['written']} of {totals['models']} written; {totals['folded']} of {totals['bn']} BN folded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("names", nargs="*", default=list(NAMES))
    parser.add_argument("--export", action="store_true", help="export the networks into FOLDER (needs timm)")
    args = parser.parse_args()
    if args.export:
        export(args.folder, args.names)
    else:
        fold(args.folder)


if __name__ == "__main__":
    main()
