"""The trunk as torch.fx sees it: layers that act on each position, squeeze-and-excitation gates, and the checks
that a kept trunk takes larger inputs (size-dependent Python; token sequences are :mod:`fcconv.fx_tokens`).

Nothing here is rewritten into a convolution over a window; what is found is kept, or rewritten per position.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fcconv.conversion import RewrittenLayer
from fcconv.errors import NotConvertibleError
from fcconv.fx_edits import _replace_linear, _replace_submodule, _replace_with_input, _set_kwarg
from fcconv.fx_nodes import (
    _ARITHMETIC,
    _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_METHODS,
    _ELEMENTWISE_MODULES,
    _MEAN_FUNCTIONS,
    _MEAN_METHODS,
    _adaptive_pool,
    _ancestors,
    _arg,
    _descendants,
    _describe,
    _is_collapse,
    _is_feature_layer_norm,
    _is_reshape,
    _permute_dims,
    _shape,
)
from fcconv.layers import layer_norm_over_channels, pointwise_conv
from fcconv.sizes import batched_shape, spatial_size


def _is_elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An element-wise layer of one tensor (activations, dropout, arithmetic with numbers)."""
    if node.op == "call_module":
        mod = modules[node.target]
        return isinstance(mod, _ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1)
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        return len([a for a in node.all_input_nodes if _shape(a) is not None]) == 1
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return len([a for a in node.all_input_nodes if _shape(a) is not None]) == 1
    if node.op == "call_function" and node.target in _ARITHMETIC:
        return len(node.all_input_nodes) == 1 and all(
            isinstance(a, (int, float)) or a is node.all_input_nodes[0] for a in node.args
        )
    return False


def _is_layer_norm_call(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A LayerNorm over the last axis only, as a module or as ``F.layer_norm``."""
    if node.op == "call_module":
        return _is_feature_layer_norm(modules[node.target], node) and len(node.all_input_nodes) == 1
    if node.op == "call_function" and node.target in (F.layer_norm, torch.layer_norm):
        normalized = _arg(node, 1, "normalized_shape", None)
        return isinstance(normalized, (list, tuple)) and len(normalized) == 1
    return False


def _global_pool_kind(node: fx.Node, modules: dict[str, nn.Module], rank: int) -> str | None:
    """'avg' or 'max' when ``node`` pools a (N, C, *S) map to (N, C, 1, ...): an adaptive pooling or a kept-dim mean."""
    shape = _shape(node)
    if shape is None or len(shape) != rank + 2 or any(s != 1 for s in shape[2:]):
        return None
    kind = _adaptive_pool(node, modules)
    if kind is not None:
        return kind
    if (node.op == "call_function" and node.target in _MEAN_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MEAN_METHODS
    ):
        dims = _arg(node, 1, "dim", None)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if {d % (rank + 2) for d in dims} == set(range(2, rank + 2)) and _arg(node, 2, "keepdim", False):
            return "avg" if getattr(node.target, "__name__", node.target) == "mean" else "max"
    return None


def _pooled_chain(
    collapsed: fx.Node, modules: dict[str, nn.Module], rank: int
) -> tuple[fx.Node, str, list[fx.Node], int] | None:
    """A global pooling followed, before the flatten, only by layers that act on each position of the map.

    Returns (pooling, 'avg' or 'max', the layers in order, the channel axis at the
    flatten) or None. The layers may permute the axes, normalize over the channels
    once they are the last axis (a LayerNorm), or act element-wise; on the pooled
    1×1 map each acts on the one position, and on a whole map (``dense``) on each.
    """
    chain: list[fx.Node] = []
    node = collapsed
    while True:
        if len(node.users) != 1:
            return None
        kind = _global_pool_kind(node, modules, rank)
        if kind is not None:
            break
        if _permute_dims(node) is not None or _is_layer_norm_call(node, modules) or _is_elementwise(node, modules):
            chain.append(node)
            node = node.args[0]
            if not isinstance(node, fx.Node):
                return None
            continue
        return None
    chain.reverse()
    axis = 1
    for step in chain:
        dims = _permute_dims(step)
        if dims is not None:
            if len(dims) != rank + 2 or sorted(d % (rank + 2) for d in dims) != list(range(rank + 2)):
                return None
            dims = [d % (rank + 2) for d in dims]
            if dims[0] != 0:
                return None
            axis = dims.index(axis)
        elif _is_layer_norm_call(step, modules) and axis != rank + 1:
            return None
    return node, kind, chain, axis


@dataclass
class _Gate:
    """A squeeze-and-excitation gate written with Linear layers: pool, flatten, Linears, reshape to (N, C, 1, ...)."""

    nodes: set[fx.Node]
    edits: list[Callable[[fx.GraphModule], None]]
    layers: list[RewrittenLayer]


def _is_unflatten(node: fx.Node, modules: dict[str, nn.Module], rank: int) -> bool:
    """A reshape or unsqueeze of (N, F) or (N, F, 1, ...) to (N, F, 1, ...)."""
    shape, src = _shape(node), _shape(node.args[0] if node.args else None)
    if shape is None or src is None or len(shape) > rank + 2 or len(shape) <= len(src):
        return False
    reshape = _is_reshape(node, modules) or (
        node.op in ("call_function", "call_method") and getattr(node.target, "__name__", node.target) == "unsqueeze"
    )
    return reshape and shape[:2] == src[:2] and all(s == 1 for s in shape[2:])


def _find_gates(graph: fx.Graph, modules: dict[str, nn.Module], rank: int, live: set[fx.Node]) -> list[_Gate]:
    """Squeeze-and-excitation gates written with Linear layers (SENet), each rewritten as 1×1 convolutions.

    The pooled map is flattened, passed through Linear and element-wise layers and
    reshaped back to (N, C, 1, ...) to scale the map. On the pooled (N, C, 1, ...)
    map the Linear layers are 1×1 convolutions and the reshapes do nothing: the
    same function, for any input size, since the pooling is global.
    """
    gates = []
    for node in graph.nodes:
        if node not in live:
            continue
        kind = _is_collapse(node, modules, rank)
        if kind not in ("flatten", "global-avg", "global-max"):
            continue
        if kind == "flatten" and any(s != 1 for s in _shape(node.args[0])[2:]):
            continue
        if kind != "flatten":
            dims = _arg(node, 1, "dim", None)
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if {d % (rank + 2) for d in dims} != set(range(2, rank + 2)):
                continue
        linears: list[fx.Node] = []
        unflatten: list[fx.Node] = []
        current = node
        while len(current.users) == 1:
            step = next(iter(current.users))
            if step.args[:1] != (current,) and step.all_input_nodes != [current]:
                break
            if step.op == "call_module" and isinstance(modules[step.target], nn.Linear) and not unflatten:
                linears.append(step)
            elif _is_unflatten(step, modules, rank):
                unflatten.append(step)
                if len(_shape(step)) == rank + 2:
                    break
            elif _is_elementwise(step, modules) and not unflatten:
                pass
            else:
                break
            current = step
        if not linears or not unflatten or len(_shape(unflatten[-1])) != rank + 2:
            continue
        calls = [n for n in graph.nodes if n.op == "call_module"]
        if any(sum(c.target == lin.target for c in calls) != 1 for lin in linears):
            continue  # a Linear called elsewhere too keeps its form
        edits: list[Callable[[fx.GraphModule], None]] = [
            _replace_with_input(node.name)
            if kind == "flatten"
            else _set_kwarg(node.name, "keepdim", True, positional_index=2)
        ]
        layers = []
        for lin in linears:
            mod = modules[lin.target]
            edits.append(_replace_linear(lin.target, mod.in_features, (1,) * rank, None))
            layers.append(
                RewrittenLayer(
                    name=lin.target,
                    before=f"Linear({mod.in_features} → {mod.out_features})",
                    after=f"Conv{rank}d({mod.in_features} → {mod.out_features})",
                    in_map=(mod.in_features, *(1,) * rank),
                    kernel=(1,) * rank,
                    parameters=mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0),
                    note="squeeze-and-excitation gate",
                )
            )
        edits.extend(_replace_with_input(u.name) for u in unflatten)
        nodes = _descendants(node) & _ancestors(unflatten[-1])
        gates.append(_Gate(nodes, edits, layers))
    return gates + _convolutional_gates(graph, modules, rank, live, {n for gate in gates for n in gate.nodes})


def _convolutional_gates(
    graph: fx.Graph, modules: dict[str, nn.Module], rank: int, live: set[fx.Node], claimed: set[fx.Node]
) -> list[_Gate]:
    """Gates that scale a map by what they compute from its global pooling with no Linear layer (ResNeSt's split
    attention: pool, 1×1 convolutions, a softmax over reshaped groups, a reshape back), kept as they are.

    Whatever such a gate computes from the pooled map is the same function at any input size, since the pooling
    is global; its reshapes are of pooled values, not a collapse of the feature map.
    """
    gates = []
    for node in graph.nodes:
        if node not in live or node in claimed or _global_pool_kind(node, modules, rank) is None:
            continue
        below, above = _descendants(node), _ancestors(node)
        for product in below:
            if not (
                (product.op == "call_function" and product.target in (operator.mul, torch.mul))
                or (product.op == "call_method" and product.target == "mul")
            ):
                continue
            gate_side = [a for a in product.all_input_nodes if a in below]
            map_side = [a for a in product.all_input_nodes if a not in below]
            if len(gate_side) != 1 or len(map_side) != 1 or map_side[0] not in above:
                continue
            nodes = below & _ancestors(gate_side[0])
            if any(n.op == "call_module" and isinstance(modules[n.target], nn.Linear) for n in nodes):
                continue  # a Linear reads the pooled vector: the gates above rewrite it, or it is the head's
            gates.append(_Gate(nodes, [], []))
            claimed |= nodes
            break
    return gates


def _pool_channels_first(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> bool:
    """Write a mean or maximum over the spatial axes of a channels-last map (timm's Swin and MambaOut heads:
    ``x.mean((1, 2))`` on N×H×W×C) as the same reduction of the map made channels-first, so that the head is read
    as a global pooling; True where the graph changed.

    A map is channels-last where its axes 1 to rank grow with the input and its last does not (found at twice the
    native size), so a reduction over C and H of an N×C×H×W map is never taken for one.
    """
    rank = len(input_shape) - 1
    spatial = set(range(1, rank + 1))
    candidates = []
    for node in gm.graph.nodes:
        is_reduction = (node.op == "call_method" and node.target in ("mean", "amax")) or (
            node.op == "call_function" and node.target in (torch.mean, torch.amax)
        )
        source = node.args[0] if node.args else None
        shape = _shape(source) if isinstance(source, fx.Node) else None
        if not is_reduction or shape is None or len(shape) != rank + 2:
            continue
        dims = _arg(node, 1, "dim", None)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if {d % (rank + 2) for d in dims if isinstance(d, int)} == spatial and len(dims) == rank:
            candidates.append(node)
    if not candidates:
        return False
    larger, refused_at, _ = _larger_input_shapes(gm, input_shape)
    changed = False
    for node in candidates:
        source = node.args[0]
        native, double = _shape(source), larger.get(source.name)
        if double is None and refused_at is not None:  # the trunk refuses a larger input before: say where
            _probe_larger_input(gm, input_shape, dict(gm.named_modules()))
        if double is None or len(double) != len(native):
            continue
        grows = [b > a for a, b in zip(native, double)]
        if not (all(grows[1 : rank + 1]) and not grows[-1]):
            continue
        keepdim = _arg(node, 2, "keepdim", False)
        to_first = (0, rank + 1, *range(1, rank + 1))
        with gm.graph.inserting_before(node):
            first = gm.graph.call_method("permute", (source, to_first))
        node.args = (first, tuple(range(2, rank + 2)), *node.args[2:])
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "dim"}
        if keepdim:  # the pooled N×1×…×C the model reads next
            with gm.graph.inserting_after(node):
                back = gm.graph.call_method("permute", (node, (0, *range(2, rank + 2), 1)))
            node.replace_all_uses_with(back, delete_user_cb=functools.partial(operator.is_not, back))
        changed = True
    if changed:
        gm.recompile()
    return changed


def _refuse_size_dependent_trunk(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Refuse a model whose trunk calls a function that chooses what to compute from the map's size in Python,
    where fcconv has no size-generic form of it (an export would keep the choice made at one size)."""
    try:
        from fcconv.trunk import size_dependent_functions
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return
    refused = size_dependent_functions()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in refused:
            stack = node.meta.get("nn_module_stack") or {}
            where = node.name
            if stack:
                path, cls = list(stack.values())[-1]
                where = f"{path} ({getattr(cls, '__name__', cls)})"
            function = f"{node.target.__module__}.{node.target.__name__}"
            raise NotConvertibleError(f"{where} calls {function}, {refused[node.target]}")


class _NodeShapes(fx.Interpreter):
    """Runs a graph on fake tensors, recording each node's output shape and the node it failed at.

    The module's own parameters enter the fake computation as they are used, so no
    fake copy of the module is made (and its graph's recorded shapes are left alone).
    """

    def __init__(self, module: fx.GraphModule, fake_mode: Any) -> None:
        super().__init__(module)
        self.fake_mode = fake_mode
        self.current: fx.Node | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run(self, *args: Any, **kwargs: Any) -> Any:
        from fcconv.capture import state_kept

        with state_kept(self.module):
            return super().run(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        with self.fake_mode:
            result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n.name] = tuple(int(s) for s in result.shape)
        return result


@contextlib.contextmanager
def _fake_tensor_errors_unlogged() -> Iterator[None]:
    """Keep torch's fake tensors from logging a traceback for an operator that refuses its shapes.

    The refusal is reported in one line by the caller; the log would put a traceback on stderr.
    """
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _larger_input_shapes(
    features: fx.GraphModule, input_shape: tuple[int, ...]
) -> tuple[dict[str, tuple[int, ...]], fx.Node | None, Exception | None]:
    """Shapes of the trunk's nodes at twice the native size, on fake tensors; where the trunk cannot take that
    size, the shapes up to it, the node that refused it and why."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    large = batched_shape(input_shape, [2 * s for s in spatial_size(input_shape)], 2)
    params = [p for p in features.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        sample = torch.empty(large, dtype=dtype, device=device)
    prop = _NodeShapes(features, fake_mode)
    try:
        with _fake_tensor_errors_unlogged():
            prop.run(sample)
    except Exception as exc:  # noqa: BLE001 - the trunk refused the larger input: the caller says where and why
        return prop.shapes, prop.current, exc
    return prop.shapes, None, None


def _probe_larger_input(
    features: fx.GraphModule, input_shape: tuple[int, ...], modules: dict[str, nn.Module]
) -> dict[str, tuple[int, ...]]:
    """Shapes of the trunk's nodes at twice the native size; refuse the model when its trunk cannot take it."""
    shapes, node, exc = _larger_input_shapes(features, input_shape)
    if exc is not None:
        where = ""
        if node is not None:
            where = _describe(node, modules) if node.op != "call_module" or node.target in modules else node.name
            stack = node.meta.get("nn_module_stack") or {}
            if stack and node.op != "call_module":
                path, cls = list(stack.values())[-1]
                where += f" in {path} ({getattr(cls, '__name__', cls)})"
        cause = exc.__cause__ or exc
        text = " ".join(str(cause).split()).split(" While executing")[0][:200]
        native = "×".join(map(str, spatial_size(input_shape)))
        bigger = "×".join(str(2 * s) for s in spatial_size(input_shape))
        raise NotConvertibleError(
            f"{where or 'the trunk'} cannot take a {bigger} input ({text}): the layers before the head are fixed "
            f"to the native {native} size, so the model cannot be made fully convolutional"
        ) from exc
    return shapes


def _pointwise_linears(
    gm: fx.GraphModule,
    modules: dict[str, nn.Module],
    rank: int,
    trunk: set[fx.Node],
    larger: dict[str, tuple[int, ...]],
    *,
    rewrite: bool,
) -> tuple[list[RewrittenLayer], list[Callable[[fx.GraphModule], None]]]:
    """Linear layers of the trunk that act on each position of a channels-last map, and (``rewrite``) their edits.

    A Linear's input is channels-last when its spatial axes, found as the axes whose
    size follows the input's (native versus twice the native size), are 1..rank and
    its last axis is not. Each becomes a 1×1 convolution. Where such Linear layers
    sit, with LayerNorms over the channels and element-wise layers, between a
    permutation to channels-last and one back (ConvNeXt's block), both permutations
    are removed and the LayerNorms become LayerNorms over axis 1; elsewhere (Swin)
    each convolution reads the channels-last map through a permutation pair.
    """
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def spatial(node: Any) -> set[int] | None:
        native, large = _shape(node), larger.get(node.name) if isinstance(node, fx.Node) else None
        if native is None or large is None or len(native) != len(large):
            return None
        return {axis for axis, (a, b) in enumerate(zip(native, large)) if a != b}

    channels_last_axes = set(range(1, rank + 1))
    found: dict[fx.Node, bool] = {}  # Linear node -> still channels-last after the rewrite
    for node in gm.graph.nodes:
        if node in trunk and node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            source = node.args[0]
            shape = _shape(source)
            if shape is not None and len(shape) == rank + 2 and spatial(source) == channels_last_axes:
                if calls.get(node.target) == 1:
                    found[node] = True
    if not found:
        return [], []

    edits: list[Callable[[fx.GraphModule], None]] = []
    to_channels_last = [0, *range(2, rank + 2), 1]
    to_channels_first = [0, rank + 1, *range(1, rank + 1)]
    for start in gm.graph.nodes:
        if start not in trunk or _permute_dims(start) != to_channels_last or len(start.users) != 1:
            continue
        if spatial(start.args[0]) != set(range(2, rank + 2)):
            continue
        inside: list[fx.Node] = []
        step = next(iter(start.users))
        while step in trunk and _permute_dims(step) != to_channels_first:
            ok = step in found or _is_elementwise(step, modules)
            ok = ok or (_is_layer_norm_call(step, modules) and step.op == "call_module" and calls[step.target] == 1)
            if not ok or len(step.users) != 1 or step.all_input_nodes != [inside[-1] if inside else start]:
                break
            inside.append(step)
            step = next(iter(step.users))
        else:
            if step not in trunk or not any(n in found for n in inside):
                continue
            if rewrite:
                edits += [_replace_with_input(start.name), _replace_with_input(step.name)]
                edits += [
                    _replace_submodule(n.target, layer_norm_over_channels)
                    for n in inside
                    if n not in found and _is_layer_norm_call(n, modules)
                ]
            for n in inside:
                if n in found:
                    found[n] = False

    layers = []
    for node, channels_last in found.items():
        mod = modules[node.target]
        native = _shape(node.args[0])
        layers.append(
            RewrittenLayer(
                name=node.target,
                before=f"Linear({mod.in_features} → {mod.out_features})",
                after=f"Conv{rank}d({mod.in_features} → {mod.out_features})" if rewrite else "kept (per position)",
                in_map=(native[-1], *native[1:-1]),
                kernel=(1,) * rank,
                parameters=mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0),
                note=("" if not rewrite else "channels-last, transposed" if channels_last else "permutes removed"),
            )
        )
        if rewrite:
            edits.append(_replace_submodule(node.target, _pointwise_builder(channels_last, rank)))
    return layers, edits


def _pointwise_builder(channels_last: bool, rank: int) -> Callable[[nn.Module], nn.Module]:
    return lambda linear: pointwise_conv(linear, channels_last=channels_last, rank=rank)


def _size_generic_replacements() -> dict[Callable[..., Any], Callable[..., Any]]:
    try:
        from fcconv.trunk import size_generic_replacements
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return {}
    return size_generic_replacements()


def _adaptive_avg_fold(
    channels: int, feature_size: tuple[int, ...], pooled: tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map a Linear's (O, C·∏pooled) weight to the (O, C·∏feature_size) weight that includes the pooling.

    Adaptive average pooling is linear and separable per axis, so pooling then
    applying the Linear equals one Linear over the unpooled window.
    """

    def pooling_matrix(size: int, out: int) -> torch.Tensor:
        eye = torch.eye(size, dtype=torch.float64).unsqueeze(0)  # row i of the batch is basis vector i
        return F.adaptive_avg_pool1d(eye, out)[0]  # (size, out): input cell -> its weight in each output cell

    mats = [pooling_matrix(s, p) for s, p in zip(feature_size, pooled)]

    def fold(weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().double().reshape(weight.shape[0], channels, *pooled)
        for axis, mat in enumerate(mats):
            # contract the pooled axis with the pooling weights, giving the unpooled axis
            w = torch.movedim(torch.tensordot(w, mat, dims=([2 + axis], [1])), -1, 2 + axis)
        return w.reshape(weight.shape[0], -1).to(weight.dtype)

    return fold
