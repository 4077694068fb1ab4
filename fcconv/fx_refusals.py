"""Refusals of models that have no fully convolutional form, asked while the head is planned: a Linear that reads
a channel-free input's samples as its features, an input axis torch.export fixed where nothing could show the
converted model wrong at other sizes, a Linear with no input or no output features.

Each names the layer (or the axis) and why.
"""

from __future__ import annotations

from torch import fx, nn

from fcconv.capture import FIXED_AXES
from fcconv.conversion import HeadGeometry
from fcconv.errors import NotConvertibleError
from fcconv.fx_nodes import _ancestors, _describe, _shape
from fcconv.sizes import spatial_size, spatial_start


def _refuse_vector_input(
    gm: fx.GraphModule, modules: dict[str, nn.Module], placeholder: fx.Node, input_shape: tuple[int, ...]
) -> None:
    """Refuse, naming it, a Linear that reads a channel-free input's samples as its features (no map before it)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear) and placeholder in _ancestors(node):
            shape = _shape(node.args[0])
            if shape is not None and len(shape) == 2:
                raise NotConvertibleError(
                    f"{_describe(node, modules)} reads the {input_shape[0]} input samples as {shape[1]} features, "
                    "with no convolution sliding along the input before it: there is no feature map whose "
                    "windows the head reads, so the model has no fully convolutional form"
                )


def _refuse_unverifiable_fixed_axes(gm: fx.GraphModule, geometry: HeadGeometry) -> None:
    """Refuse an export that fixed an input axis where nothing could show the converted model wrong at other sizes.

    Such a graph is planned only where torch.fx cannot trace the model. With a head that
    reads the whole map the eager original takes every size, and verification compares
    with it; a head that reads a fixed window (or ``dense``) has no such reference.
    """
    fixed = gm.meta.get(FIXED_AXES) or []
    if not fixed or (geometry.window is None and not geometry.dense):
        return
    sizes, first = spatial_size(geometry.input_shape), spatial_start(geometry.input_shape)
    names = {1: ["length"], 2: ["height", "width"], 3: ["depth", "height", "width"]}[len(sizes)]
    axes = " and ".join(f"{names[axis - first]} at {sizes[axis - first]}" for axis in fixed)
    raise NotConvertibleError(
        f"torch.export fixed the input's {axes} (forward() computes from that size in Python, e.g. int() of it or a "
        "loop over it) and torch.fx cannot trace the model, so the converted model would compute something else at "
        "other sizes and no reference could show it; keep that size symbolic in forward()"
    )


def _refuse_zero_width(model: nn.Module) -> None:
    """Refuse a Linear with no input or output features: a convolution needs at least one channel each way."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and 0 in (module.in_features, module.out_features):
            side = "output" if module.out_features == 0 else "input"
            raise NotConvertibleError(
                f"{name} is Linear({module.in_features} → {module.out_features}), with no {side} features: a "
                "convolution needs at least one channel in and out, so the model cannot be made fully convolutional"
            )
