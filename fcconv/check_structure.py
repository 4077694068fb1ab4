"""The checks of an exported graph's structure, from its declared and inferred shapes, without running it:
``free spatial axes`` (the input fixes no spatial size) and ``no collapse`` (no contraction with weights reads
an axis that grows with the input)."""

from __future__ import annotations

from typing import Any

from fcconv.check_result import FAIL, PASS, CheckResult
from fcconv.metadata import SPATIAL_AXIS_NAMES
from fcconv.onnx_shapes import inferred_shapes, shapes_only
from fcconv.sizes import batched_shape, spatial_size, spatial_start

__all__ = ["free_axes_check", "no_collapse_check"]


def free_axes_check(name: str, dims: list[int | str | None], input_shape: tuple[int, ...]) -> CheckResult:
    rank = len(spatial_size(input_shape))
    axis_names = SPATIAL_AXIS_NAMES.get(rank, tuple(f"axis {2 + i}" for i in range(rank)))
    spatial = dims[spatial_start(input_shape) :]
    fixed = [f"{axis} to {dim}" for axis, dim in zip(axis_names, spatial) if isinstance(dim, int) and dim > 0]
    if fixed:
        return CheckResult(
            "free spatial axes",
            FAIL,
            f"input {name!r} fixes {' and '.join(fixed)}, so the model cannot take larger inputs",
        )
    if not spatial:
        return CheckResult("free spatial axes", PASS, f"input {name!r} declares no sizes")
    shown = ", ".join(str(d) if d is not None else "?" for d in spatial)
    return CheckResult("free spatial axes", PASS, f"input {name!r} spatial axes: {shown}")


def no_collapse_check(
    model: Any, input_name: str, input_shape: tuple[int, ...], channels_last: bool = False
) -> CheckResult:
    """Shape inference at the native size and at a larger one: no contraction may read an axis that grows with it."""
    light = shapes_only(model)
    native = spatial_size(input_shape)

    def batch_of_one(size: tuple[int, ...]) -> tuple[int, ...]:
        return (1, *size, input_shape[0]) if channels_last else batched_shape(input_shape, size, 1)

    small = inferred_shapes(light, input_name, batch_of_one(native))
    # A larger odd size, unless shape inference fails there and not at twice the native size: a trunk that takes
    # only sizes whole strides apart (an upsampled map added to a skip connection) is judged at a size it takes.
    larger = tuple(2 * n + 1 for n in native)
    large = inferred_shapes(light, input_name, batch_of_one(larger))
    if any(_fails_beyond_native(node, small, large) for node in light.graph.node):
        twice = tuple(2 * n for n in native)
        at_twice = inferred_shapes(light, input_name, batch_of_one(twice))
        if not any(_fails_beyond_native(node, small, at_twice) for node in light.graph.node):
            larger, large = twice, at_twice
    producers = {out: node for node in light.graph.node for out in node.output}
    shown_small, shown_large = "×".join(map(str, native)), "×".join(map(str, larger))
    undetermined = 0
    for node in light.graph.node:
        for index, axis in _contracted_axes(node):
            if index >= len(node.input) or not node.input[index]:
                continue
            value = node.input[index]
            a, b = small.get(value), large.get(value)
            if a is None or b is None or len(a) != len(b) or not a:
                undetermined += 1
                continue
            k = axis % len(a)
            if a[k] is None or b[k] is None:
                undetermined += 1
                continue
            if a[k] != b[k]:
                origin = _collapse_origin(value, producers)
                made = f", made from the spatial axes by {_node_name(origin)}" if origin is not None else ""
                return CheckResult(
                    "no collapse",
                    FAIL,
                    f"{_node_name(node)} contracts an axis that grows with the input ({a[k]} at {shown_small}, "
                    f"{b[k]} at {shown_large}){made}: the spatial axes collapse into features",
                )
        if _fails_beyond_native(node, small, large):
            return CheckResult(
                "no collapse",
                FAIL,
                f"{_node_name(node)} takes the native {shown_small} input but not a {shown_large} one "
                "(ONNX shape inference fails there): it is sized for the native input",
            )
    note = f"; {undetermined} contracted axes of unknown size, left to the runs below" if undetermined else ""
    return CheckResult(
        "no collapse",
        PASS,
        f"nothing folds the spatial axes into features (shapes at {shown_small} and {shown_large}){note}",
    )


def _fails_beyond_native(node: Any, small: dict[str, Any], large: dict[str, Any]) -> bool:
    """Whether shape inference gives ``node`` outputs at the native size and none at the larger one, from known
    inputs."""
    outputs_known_small = all(small.get(o) is not None for o in node.output if o)
    inputs_known_large = all(large.get(i) is not None for i in node.input if i)
    return outputs_known_small and inputs_known_large and any(large.get(o) is None for o in node.output if o)


def _node_name(node: Any) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node (output {node.output[0]!r})"


def _contracted_axes(node: Any) -> list[tuple[int, int]]:
    """(input index, axis) pairs that ``node`` sums over with weights: features, never positions."""
    if node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type == "MatMul":
        return [(0, -1), (1, -2)]
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        return [(0, 0 if attrs.get("transA") else 1), (1, 1 if attrs.get("transB") else 0)]
    if node.op_type in ("Conv", "ConvTranspose"):
        return [(0, 1)]
    return []


def _collapse_origin(value: str, producers: dict[str, Any]) -> Any:
    """The Flatten or Reshape that made ``value``, walking back through the ops between (at most 32 steps)."""
    for _ in range(32):
        node = producers.get(value)
        if node is None:
            return None
        if node.op_type in ("Flatten", "Reshape"):
            return node
        if not node.input:
            return None
        value = node.input[0]
    return None
