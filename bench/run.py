"""bnfold against the cost of reading and writing the model file (issue 6's targets).

    python bench/run.py [--repeats 5] [--sizes 100,500] [--folder DIR] [--quick]

Builds ResNet-50-shaped models (Conv→BN→ReLU bottlenecks, random weights, BN statistics that
are not the identity) with numpy and onnx alone: ~100 MB at width 1, ~500 MB at width 2.25,
and the 100 MB one with external data. For each, in fresh processes, alternating, `repeats`
times:
  floor   python -c 'onnx.load(m); onnx.save(m2)' (external data: loaded, saved as external)
  bnfold  bnfold optimize MODEL --no-verify -q
and reports median wall time and peak memory (ru_maxrss of the child) and their ratios; a
third command, bnfold with os.fsync stubbed out, shows what bnfold's durable commit costs
(the floor never waits for the disk). Each run starts after os.sync(), so no run pays for
writing back the previous one's files.
Then: `bnfold verify` against a script that only creates the two onnxruntime sessions and runs
them as often (the cost verification cannot avoid); `bnfold --help` start-up; and fold time
against the number of Conv→BN pairs in a chain of tiny convs (it should grow linearly).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BNFOLD = [sys.executable, "-m", "bnfold"]
RUNNER: ProcessPoolExecutor  # a small process that starts the measured ones (see run)
FLOOR = "import onnx, sys; m = onnx.load(sys.argv[1]); onnx.save(m, sys.argv[2])"
FLOOR_EXTERNAL = (
    "import onnx, sys, os; m = onnx.load(sys.argv[1]); "
    "onnx.save(m, sys.argv[2], save_as_external_data=True, location=os.path.basename(sys.argv[2]) + '.data')"
)
# bnfold with fsync turned off, only to show what the durable commit costs (bnfold always syncs).
BNFOLD_NO_FSYNC = [
    sys.executable,
    "-c",
    "import os, sys; os.fsync = lambda fd: None; from bnfold.cli import main; sys.argv[0] = 'bnfold'; main()",
]
# What `bnfold verify` cannot avoid: parse both files, build both sessions, run them as often.
SESSIONS = """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
a, b = (ort.InferenceSession(p, o, providers=["CPUExecutionProvider"]) for p in sys.argv[1:3])
for t in range(int(sys.argv[3])):
    x = np.random.default_rng([0, t]).standard_normal((1, 3, 224, 224)).astype(np.float32)
    a.run(None, {"input": x}); b.run(None, {"input": x})
"""
# The same, side by side: both sessions created and run in two threads, half the cores each.
SESSIONS_SIDE_BY_SIDE = """
import os, sys, numpy as np, onnxruntime as ort
from concurrent.futures import ThreadPoolExecutor
o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
o.intra_op_num_threads = max(1, os.cpu_count() // 2)
pool = ThreadPoolExecutor(2)
s = list(pool.map(lambda p: ort.InferenceSession(p, o, providers=["CPUExecutionProvider"]), sys.argv[1:3]))
for t in range(int(sys.argv[3])):
    x = np.random.default_rng([0, t]).standard_normal((1, 3, 224, 224)).astype(np.float32)
    list(pool.map(lambda session: session.run(None, {"input": x}), s))
"""


# ---- models ------------------------------------------------------------------------------------
class Builder:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def tensor(self, base: str, values: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        fan_in = cin * k * k
        w = self.tensor(
            "W", self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32((2 / fan_in) ** 0.5)
        )
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w], [y], name=y, pads=[k // 2] * 4, strides=[stride] * 2))
        params = [
            self.tensor("gamma", self.rng.uniform(0.5, 1.5, cout)),
            self.tensor("beta", self.rng.normal(0, 0.1, cout)),
            self.tensor("mean", self.rng.normal(0, 0.1, cout)),
            self.tensor("var", self.rng.uniform(0.5, 2, cout)),
        ]
        z = self.name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [y, *params], [z], name=z))
        if not relu:
            return z
        r = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [z], [r], name=r))
        return r

    def add_relu(self, a: str, b: str) -> str:
        s, r = self.name("add"), self.name("relu")
        self.nodes += [helper.make_node("Add", [a, b], [s], name=s), helper.make_node("Relu", [s], [r], name=r)]
        return r

    def model(self, x_shape, out: str, out_shape) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "bench",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def resnet50(width: float) -> onnx.ModelProto:
    """ResNet-50's layout (3-4-6-3 bottlenecks), channels × width: 25.6 M parameters at 1."""
    b = Builder()
    c = lambda n: max(8, int(round(n * width / 8)) * 8)  # noqa: E731
    x = b.conv_bn("input", 3, c(64), 7, stride=2)
    p = b.name("pool")
    b.nodes.append(helper.make_node("MaxPool", [x], [p], name=p, kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = p, c(64)
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            cout = c(mid) * 4
            y = b.conv_bn(x, cin, c(mid), 1)
            y = b.conv_bn(y, c(mid), c(mid), 3, stride=s)
            y = b.conv_bn(y, c(mid), cout, 1, relu=False)
            shortcut = b.conv_bn(x, cin, cout, 1, stride=s, relu=False) if (s != 1 or cin != cout) else x
            x, cin = b.add_relu(y, shortcut), cout
    g, f = b.name("gap"), b.name("flat")
    b.nodes += [helper.make_node("GlobalAveragePool", [x], [g], name=g), helper.make_node("Flatten", [g], [f], name=f)]
    fc = b.tensor("fc", b.rng.standard_normal((1000, cin), dtype=np.float32) * np.float32(cin**-0.5))
    out = "logits"
    b.nodes.append(helper.make_node("Gemm", [f, fc], [out], name="fc", transB=1))
    return b.model([1, 3, 224, 224], out, [1, 1000])


def conv_chain(pairs: int, shared: bool = False) -> onnx.ModelProto:
    """`pairs` Conv(4→4, 1×1)→BN→ReLU in a row: many nodes, tiny tensors. With `shared`, every
    pair reads the same weight and BN parameters (as initializer de-duplication leaves them):
    every fold's new tensors then come from one base name."""
    b = Builder()
    x = "input"
    for _ in range(pairs):
        x = b.conv_bn(x, 4, 4, 1)
    model = b.model([1, 4, 8, 8], x, [1, 4, 8, 8])
    if shared:
        first = {node.op_type: list(node.input) for node in reversed(model.graph.node)}
        for node in model.graph.node:
            if node.op_type in ("Conv", "BatchNormalization"):
                node.input[1:] = first[node.op_type][1:]
        used = {name for node in model.graph.node for name in node.input}
        kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model


def repvit_chain(blocks: int, channels: int = 4) -> onnx.ModelProto:
    """`blocks` RepViT token mixers in a row, BN(DWConv3x3(x) + DWConv1x1(x) + x): every BN folds
    only once its sum is merged, so every block costs two rounds of the fixed point."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "input"
    for i in range(blocks):
        for k, branch in ((3, "a"), (1, "b")):
            weight = f"W{branch}{i}"
            inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (channels, 1, k, k)).astype(np.float32), weight))
            nodes.append(helper.make_node("Conv", [x, weight], [f"c{branch}{i}"], group=channels, pads=[k // 2] * 4))
        nodes += [
            helper.make_node("Add", [f"ca{i}", f"cb{i}"], [f"s{i}"]),
            helper.make_node("Add", [f"s{i}", x], [f"t{i}"]),
        ]
        params = (rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.3, channels), rng.normal(0, 0.3, channels))
        params += (rng.uniform(0.5, 2, channels),)
        names = [f"{k}{i}" for k in ("gamma", "beta", "mean", "var")]
        inits += [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(params, names)]
        nodes.append(helper.make_node("BatchNormalization", [f"t{i}", *names], [f"bn{i}"]))
        x = f"bn{i}"
    shape = [1, channels, 8, 8]
    graph = helper.make_graph(
        nodes, "repvit", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ---- measuring ---------------------------------------------------------------------------------
def run(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one child process (which must succeed). Call it
    through RUNNER: Linux carries a parent's peak into a forked child's ru_maxrss, so children
    must come from a small process, not from this one after it built a 500 MB model."""
    os.sync()  # write back the previous run's files now, not while this one runs
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{process.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def measured(command: list[str]) -> tuple[float, float]:
    """run(command), started from RUNNER."""
    return RUNNER.submit(run, command).result()


def alternate(commands: dict[str, list[str]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall s, peak MB) per command, running them in turn `repeats` times after one
    untimed round (which warms the page cache and Python's bytecode cache)."""
    for command in commands.values():
        measured(command)
    samples = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            samples[name].append(measured(command))
    return {
        name: (statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
        for name, runs in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="100,500", help="model sizes in MB (width = sqrt(size / 100))")
    parser.add_argument("--chain", default="250,500,1000,2000,4000", help="Conv→BN pairs for the scaling table")
    parser.add_argument("--folder", type=Path, default=None, help="where to build the models (default: a temp folder)")
    parser.add_argument("--verify-only", action="store_true", help="only the verify table (on the 100 MB model)")
    args = parser.parse_args()
    global RUNNER
    RUNNER = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bnfold-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"onnx {onnx.__version__}, {time.strftime('%Y-%m-%d')}"
    )

    print("\n## optimize --no-verify against onnx.load + onnx.save (medians of fresh processes)\n")
    print("| model | size | floor | bnfold | time ratio | without fsync | floor peak | bnfold peak | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    models = []
    for size in (int(s) for s in args.sizes.split(",")):
        width = (size / 100) ** 0.5
        path = folder / f"resnet50_x{width:.2f}.onnx"
        if not path.exists():
            onnx.save(resnet50(width), str(path))
        models.append((f"ResNet-50 ×{width:.2f}", path, FLOOR, path.stat().st_size))
        if size == 100:
            external = folder / "external" / "resnet50.onnx"
            data = external.with_name("resnet50.data")
            if not external.exists():
                external.parent.mkdir(exist_ok=True)
                onnx.save(onnx.load(str(path)), str(external), save_as_external_data=True, location=data.name)
            models.append(
                ("ResNet-50, external data", external, FLOOR_EXTERNAL, external.stat().st_size + data.stat().st_size)
            )
    if args.verify_only:  # just the folded model the verify table needs
        path = models[0][1]
        subprocess.run([*BNFOLD, "optimize", str(path), "-o", str(path.with_name(path.stem + ".out.onnx")), "-q"])
        models = []
    for label, path, floor, size in models:
        out = path.with_name(path.stem + ".out.onnx")
        result = alternate(
            {
                "floor": [sys.executable, "-c", floor, str(path), str(out.with_name(path.stem + ".floor.onnx"))],
                "bnfold": [*BNFOLD, "optimize", str(path), "-o", str(out), "--no-verify", "-q"],
                "no fsync": [*BNFOLD_NO_FSYNC, "optimize", str(path), "-o", str(out), "--no-verify", "-q"],
            },
            args.repeats,
        )
        (ft, fm), (bt, bm), (nt, _) = result["floor"], result["bnfold"], result["no fsync"]
        print(
            f"| {label} | {size / 1e6:.0f} MB | {ft:.2f} s | {bt:.2f} s | {bt / ft:.2f} | {nt / ft:.2f} | "
            f"{fm:.0f} MB | {bm:.0f} MB | {bm / fm:.2f} |",
            flush=True,
        )

    print("\n## verify against the two onnxruntime sessions it runs (3 trials)\n")
    path = folder / "resnet50_x1.00.onnx"
    folded = path.with_name(path.stem + ".out.onnx")
    result = alternate(
        {
            "sessions": [sys.executable, "-c", SESSIONS, str(path), str(folded), "3"],
            "side by side": [sys.executable, "-c", SESSIONS_SIDE_BY_SIDE, str(path), str(folded), "3"],
            "verify": [*BNFOLD, "verify", str(path), str(folded), "-q"],
        },
        args.repeats,
    )
    (st, sm), (pt, pm), (vt, vm) = result["sessions"], result["side by side"], result["verify"]
    print("| | two bare sessions, one after the other | side by side | bnfold verify | ratio to each |")
    print("|---|---|---|---|---|")
    print(f"| wall time | {st:.2f} s | {pt:.2f} s | {vt:.2f} s | {vt / st:.2f} / {vt / pt:.2f} |")
    print(f"| peak memory | {sm:.0f} MB | {pm:.0f} MB | {vm:.0f} MB | {vm / sm:.2f} / {vm / pm:.2f} |")
    if args.verify_only:
        return

    print("\n## start-up\n")
    help_time = statistics.median(measured([*BNFOLD, "--help"])[0] for _ in range(args.repeats))
    bare = statistics.median(measured([sys.executable, "-c", "pass"])[0] for _ in range(args.repeats))
    print(f"`bnfold --help`: {help_time:.2f} s (a bare `python -c pass`: {bare:.2f} s)")

    print("\n## fold time against Conv→BN pairs (`bnfold optimize --no-verify`, in process)\n")
    print("| pairs | nodes | fold + check + write | per pair |")
    print("|---|---|---|---|")
    from bnfold import optimize

    for shared in (False, True):
        if shared:
            print(
                "\nThe same, every pair reading one weight and one set of BN parameters (fresh names from one base):\n"
            )
            print("| pairs | nodes | fold + check + write | per pair |")
            print("|---|---|---|---|")
        for pairs in (int(p) for p in args.chain.split(",")):
            path = folder / f"chain_{pairs}{'_shared' if shared else ''}.onnx"
            onnx.save(conv_chain(pairs, shared), str(path))
            times = []
            for _ in range(3):
                start = time.perf_counter()
                result = optimize(path, path.with_suffix(".out.onnx"), verify=False)
                times.append(time.perf_counter() - start)
                assert result.report.folded == pairs
            best = min(times)
            print(f"| {pairs} | {3 * pairs} | {best:.2f} s | {1e3 * best / pairs:.2f} ms |", flush=True)
    print("\n## fixed point: fold time against RepViT blocks (a merge, then a fold, per block)\n")
    print("| blocks | fold + check + write | per block |")
    print("|---|---|---|")
    for blocks in (int(p) // 2 for p in args.chain.split(",")):
        path = folder / f"repvit_{blocks}.onnx"
        onnx.save(repvit_chain(blocks), str(path))
        start = time.perf_counter()
        result = optimize(path, path.with_suffix(".out.onnx"), verify=False)
        seconds = time.perf_counter() - start
        assert result.report.folded == blocks
        print(f"| {blocks} | {seconds:.2f} s | {1e3 * seconds / blocks:.2f} ms |", flush=True)
    if args.folder is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
