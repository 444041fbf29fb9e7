"""Tensor shapes of one graph: declared (inputs, outputs, value_info) or else inferred once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

SMALL_TENSOR = 1 << 12  # initializers up to this many elements keep their data for shape inference


class Shapes:
    def __init__(self, graph: onnx.GraphProto, opset_imports: list, holds_data: Callable[[onnx.TensorProto], bool]):
        """`holds_data` says whether an initializer's values are in the tree (not pending, not
        stored elsewhere): only those can help shape inference propagate Reshape targets."""
        self.graph, self.opset_imports, self.holds_data = graph, opset_imports, holds_data
        self._declared = {v.name: v.type.tensor_type for v in (*graph.input, *graph.value_info, *graph.output)}
        self._inferred: dict[str, onnx.TypeProto.Tensor] | None = None

    def rank(self, name: str) -> int | None:
        """The rank of a tensor, or None when unknown."""
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        """A tensor's dims (None where only known at run time), from declared types or else one
        shape inference; None when even the rank is unknown."""
        dims = self.symbolic_shape(name)
        return None if dims is None else tuple(d if isinstance(d, int) else None for d in dims)

    def symbolic_shape(self, name: str) -> tuple[int | str | None, ...] | None:
        """shape(), with a named symbolic dimension ("batch") as its name: two dims of one name
        are equal at run time, whatever it is."""
        declared = self._declared.get(name)
        if declared is None or not declared.HasField("shape"):
            if self._inferred is None:
                self._inferred = self._infer()
            declared = self._inferred.get(name)
        if declared is None or not declared.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in declared.shape.dim)

    def declared_type(self, name: str) -> int:
        """The declared element type (onnx.TensorProto.DataType), 0 when none is declared."""
        declared = self._declared.get(name)
        return declared.elem_type if declared is not None else 0

    def declared_shape(self, name: str) -> tuple[int, ...] | None:
        """The declared shape when every dimension is a number, else None."""
        declared = self._declared.get(name)
        if declared is None or not declared.HasField("shape"):
            return None
        dims = declared.shape.dim
        if not all(d.HasField("dim_value") for d in dims):
            return None
        return tuple(d.dim_value for d in dims)

    def _infer(self) -> dict[str, onnx.TypeProto.Tensor]:
        """onnx shape inference on a copy of the graph whose large initializers keep their dims
        but not their data, so weights are never copied; small ones (Reshape targets, axes) keep
        their values for data propagation."""
        light = onnx.GraphProto()
        light.node.extend(self.graph.node)
        light.input.extend(self.graph.input)
        light.output.extend(self.graph.output)
        light.value_info.extend(self.graph.value_info)
        for tensor in self.graph.initializer:
            small = np.prod(tensor.dims, dtype=np.float64) <= SMALL_TENSOR
            if small and self.holds_data(tensor):
                light.initializer.append(tensor)
            else:
                light.initializer.append(
                    onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
                )
        model = onnx.helper.make_model(light, opset_imports=self.opset_imports)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
        except Exception:  # inference is a convenience here; without it ranks stay unknown
            return {}
        return {v.name: v.type.tensor_type for v in (*inferred.value_info, *inferred.output, *inferred.input)}
