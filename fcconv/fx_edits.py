"""Edits of a traced graph, each a closure the plan records and applies to a copy of the traced model.

Each edit finds its node by name, which survives the deep copy of the graph.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from fcconv.conversion import _Plan
from fcconv.layers import linear_as_conv

_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _find(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _replace_with_input(name: str) -> Callable[[fx.GraphModule], None]:
    def edit(gm: fx.GraphModule) -> None:
        node = _find(gm, name)
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)

    return edit


def _set_kwarg(name: str, key: str, value: Any, *, positional_index: int) -> Callable[[fx.GraphModule], None]:
    def edit(gm: fx.GraphModule) -> None:
        node = _find(gm, name)
        if len(node.args) > positional_index:
            args = list(node.args)
            args[positional_index] = value
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, key: value}

    return edit


def _replace_with_module(node: fx.Node, module: nn.Module) -> Callable[[fx.GraphModule], None]:
    name = node.name
    target = node.target if node.op == "call_module" else f"fcconv_{node.name}"

    def edit(gm: fx.GraphModule) -> None:
        n = _find(gm, name)
        gm.add_submodule(target, module)
        if n.op == "call_module":
            return
        with gm.graph.inserting_after(n):
            new = gm.graph.call_module(target, (n.args[0],))
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)

    return edit


def _replace_submodule(target: str, build: Callable[[nn.Module], nn.Module]) -> Callable[[fx.GraphModule], None]:
    """Replace the module at ``target`` with ``build(module)``."""

    def edit(gm: fx.GraphModule) -> None:
        gm.add_submodule(target, build(gm.get_submodule(target)))

    return edit


def _replace_with_function(name: str, function: Callable[..., Any], *extra: Any) -> Callable[[fx.GraphModule], None]:
    """Replace the node ``name`` with ``function(its first argument, *extra)``."""

    def edit(gm: fx.GraphModule) -> None:
        node = _find(gm, name)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(function, (node.args[0], *extra))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    return edit


def _set_target(name: str, function: Callable[..., Any]) -> Callable[[fx.GraphModule], None]:
    def edit(gm: fx.GraphModule) -> None:
        _find(gm, name).target = function

    return edit


def _append_global_pool(kind: str, rank: int) -> Callable[[fx.GraphModule], None]:
    """Pool each score map the model returns over its spatial axes: (N, K, *map) -> (N, K), output by output
    (as the ONNX front end pools each output of an ONNX classifier)."""

    def edit(gm: fx.GraphModule) -> None:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        for value in output.all_input_nodes:
            with gm.graph.inserting_before(output):
                pooled = gm.graph.call_function(
                    torch.mean if kind == "avg" else torch.amax, (value, tuple(range(2, rank + 2)))
                )
            output.replace_input_with(value, pooled)

    return edit


def _squeeze_outputs(axes: tuple[int, ...]) -> Callable[[fx.GraphModule], None]:
    """Squeeze the map axes a channel-free input does not have (one position each) from every output the model
    returns: (N, K, P, 1) -> (N, K, P)."""

    def edit(gm: fx.GraphModule) -> None:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        for value in output.all_input_nodes:
            with gm.graph.inserting_before(output):
                squeezed = gm.graph.call_function(torch.squeeze, (value, tuple(2 + axis for axis in axes)))
            output.replace_input_with(value, squeezed)

    return edit


def _replace_linear(
    target: str, in_channels: int, kernel: tuple[int, ...], fold: Callable[[torch.Tensor], torch.Tensor] | None
) -> Callable[[fx.GraphModule], None]:
    def edit(gm: fx.GraphModule) -> None:
        linear = gm.get_submodule(target)
        if fold is not None:
            # the folded weight is new data: the one copy this rewrite makes
            folded = nn.Linear(
                in_channels * math.prod(kernel), linear.out_features, bias=linear.bias is not None, device="meta"
            )
            folded.weight = nn.Parameter(fold(linear.weight), requires_grad=linear.weight.requires_grad)
            if linear.bias is not None:
                folded.bias = linear.bias
            linear = folded
        gm.add_submodule(target, linear_as_conv(linear, in_channels, kernel))

    return edit


def _replace_batchnorm(target: str, rank: int) -> Callable[[fx.GraphModule], None]:
    def edit(gm: fx.GraphModule) -> None:
        bn1d = gm.get_submodule(target)
        bn = _BATCH_NORM[rank](
            bn1d.num_features, eps=bn1d.eps, momentum=bn1d.momentum, affine=bn1d.affine,
            track_running_stats=bn1d.track_running_stats, device="meta",
        )  # fmt: skip
        for name, value in list(bn1d.named_parameters(recurse=False)):
            setattr(bn, name, value)
        for name, value in list(bn1d.named_buffers(recurse=False)):
            bn.register_buffer(name, value)
        bn.eval()
        gm.add_submodule(target, bn)

    return edit


def _reshape_per_channel(name: str, order: Any, rank: int) -> Callable[[fx.GraphModule], None]:
    """Lay each per-feature constant the node ``name`` reads out along the channel axis of the map: (F,) becomes
    (F, 1, ...), feature i on channel ``order[i]``; one-value constants stay as they are."""
    gather = [int(i) for i in sorted(range(len(order)), key=lambda i: int(order[i]))]

    def edit(gm: fx.GraphModule) -> None:
        node = _find(gm, name)
        args = list(node.args)
        for index, arg in enumerate(args):
            if not isinstance(arg, fx.Node) or arg.op != "get_attr":
                continue
            if math.prod(_attribute(gm, arg.target).shape) in (0, 1):
                continue
            with gm.graph.inserting_before(node):
                flat = gm.graph.call_function(torch.reshape, (arg, (-1,)))
                if gather != list(range(len(gather))):
                    flat = gm.graph.call_function(operator.getitem, (flat, gather))
                args[index] = gm.graph.call_function(torch.reshape, (flat, (-1, *(1,) * rank)))
        node.args = tuple(args)

    return edit


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    """The tensor a ``get_attr`` node reads (its target may be dotted)."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _apply(plan: _Plan) -> fx.GraphModule:
    gm = fx.GraphModule(plan.traced, plan.traced.graph.__deepcopy__(), class_name="FullyConvolutional")
    # node names survive the deep copy, which is what the edits look up
    for edit in plan.edits:
        edit(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    bind_submodules(gm)
    return gm


def bind_submodules(gm: fx.GraphModule) -> None:
    """Make each submodule lookup in ``gm``'s generated forward a plain attribute read.

    That forward reaches every layer as ``getattr(self.features, "0")``, and each
    step goes through ``nn.Module.__getattr__``, a Python call: for VGG16's 38
    layers about 50 µs per forward on a fast host, 3 % of its batch-1 latency on
    a GPU, where the host sets the pace. Binding the children of ``gm`` and of the
    containers torch.fx built for it as instance attributes skips that call. The
    original model's own modules are left alone; ``nn.Module.__setattr__`` drops
    a binding when its child is replaced, so the bindings cannot go stale that way.
    """
    pending: list[nn.Module] = [gm]
    while pending:
        parent = pending.pop()
        for name, child in parent.named_children():
            parent.__dict__[name] = child
            if type(child) is nn.Module:  # a container torch.fx made for a dotted target
                pending.append(child)
