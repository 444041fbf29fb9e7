"""One graph as the folding rules see it: its index, constants, shapes and tensor store."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex
from bnfold.graph.shapes import Shapes
from bnfold.graph.tensors import Names, TensorStore


@dataclass(frozen=True)
class ModelScope:
    """What every graph of one model shares while it is folded."""

    ir_version: int
    opset: int  # the ai.onnx opset
    opset_imports: list
    names: Names  # every name in the model: fresh names must shadow none
    tensors: TensorStore
    bias_correction: bool = True  # correct 16-bit folds' rounding (bnfold.folding.correction)
    requantize: bool = False  # fold across a quantizer, removing it (bnfold.folding.quantized)
    moments: dict = field(default_factory=dict)  # tensor name → InputMoments found in the graph
    calibrated: dict = field(default_factory=dict)  # tensor name → InputMoments measured (calibration)


@dataclass(frozen=True)
class GraphContext:
    index: GraphIndex
    constants: Constants
    shapes: Shapes
    scope: ModelScope
    # what one pass over the graph has learnt, by the mechanism that learnt it (the branch merge's
    # trees that cannot merge); the walk empties it before each pass
    memo: dict = field(default_factory=dict)

    @classmethod
    def build(cls, graph: onnx.GraphProto, scope: ModelScope, parent: GraphContext | None = None) -> GraphContext:
        """`parent` is the enclosing graph's context, for a subgraph (If/Loop/Scan body)."""
        index = GraphIndex(graph, initializers_are_defaults=scope.ir_version >= 4 or parent is not None)
        tensors = scope.tensors

        def holds_data(tensor: onnx.TensorProto) -> bool:
            return not tensors.is_pending(tensor) and tensor.data_location != onnx.TensorProto.EXTERNAL

        shapes = Shapes(graph, scope.opset_imports, holds_data)
        constants = Constants(index, shapes, tensors.read, scope.opset, parent.constants if parent else None)
        return cls(index, constants, shapes, scope)

    @property
    def opset(self) -> int:
        return self.scope.opset

    def constant(self, name: str) -> np.ndarray:
        """The value of `name`, or NotConstant saying why it has none before run time."""
        return self.constants.value(name)

    def add_initializer(self, values: np.ndarray, base_name: str) -> str:
        """Store `values` under a fresh name; existing tensors are never rewritten in place."""
        name = self.scope.names.fresh(base_name)
        data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
        self.index.add_initializer(name, data_type, values.shape)
        self.scope.tensors.put(name, values)
        return name

    def fresh_name(self, base: str) -> str:
        return self.scope.names.fresh(base)

    def finish(self) -> None:
        """Sweep what the edits left dead and write the removals into the GraphProto."""
        self.index.sweep()
        self.scope.tensors.drop(self.index.commit())
