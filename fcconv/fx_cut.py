"""Where a traced head may be ended and cutting the traced model there: at the head's input into features and
head (the verifier's reference), or after a head layer and before a trailing softmax (``until``, ``logits``)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from fcconv.errors import BadInputError
from fcconv.fx_edits import _find, _replace_with_input
from fcconv.fx_nodes import (
    _SQUASHING_FUNCTIONS,
    _SQUASHING_METHODS,
    _SQUASHING_MODULES,
    _ancestors,
    _descendants,
    _describe,
    _is_reshape,
    _shape,
)

if TYPE_CHECKING:
    from fcconv.rewrite import _Located


def _output_items(value: Any) -> list[tuple[str, fx.Node]]:
    """The nodes the graph's output returns, named as :func:`fcconv.outputs.named_outputs` names a model's outputs."""
    from fcconv.outputs import named_items

    return [(name, item) for name, item in named_items(value, fx.Node) or [] if isinstance(item, fx.Node)]


def _is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A node a person would call a layer of the head: a module other than dropout and identity, or a softmax."""
    if node.op == "call_module":
        return not isinstance(modules[node.target], (nn.Dropout, nn.AlphaDropout, nn.Identity))
    return _is_squashing(node, modules)


def _layer_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _layers_on_path(value: fx.Node, head_nodes: list[fx.Node], modules: dict[str, nn.Module]) -> list[str]:
    """The head layers ``value`` is computed through, in graph order."""
    ancestors = _ancestors(value)
    return [_layer_name(n) for n in head_nodes if n in ancestors and _is_layer(n, modules)]


def _cut_points(head_nodes: list[fx.Node], modules: dict[str, nn.Module]) -> list[str]:
    """The head's module layers from its first Linear on: where :func:`truncate` may end the model."""
    linears = {n for n in head_nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Linear)}
    names: list[str] = []
    for node in head_nodes:
        if node.op == "call_module" and (node in linears or _ancestors(node) & linears):
            if node.target not in names:
                names.append(str(node.target))
    return names


def _is_squashing(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A softmax, log-softmax or sigmoid: what turns raw scores into probabilities."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _SQUASHING_MODULES)
    if node.op == "call_function":
        return node.target in _SQUASHING_FUNCTIONS
    return node.op == "call_method" and node.target in _SQUASHING_METHODS


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A node that hands its input on unchanged in value: dropout in eval, identity, a no-op reshape or copy."""
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.Dropout, nn.AlphaDropout, nn.Identity))
    if node.op == "call_method" and node.target in ("contiguous", "float"):
        return True
    return _is_reshape(node, modules) and _shape(node) == _shape(node.args[0])


def end_early(located: _Located, model_name: str, *, logits: bool = False, until: str | None = None) -> fx.GraphModule:
    """The traced model of ``located`` ended at the head layer ``until`` and (``logits``) before a trailing softmax:
    :func:`fcconv.rewrite.truncate`'s cut, once the head is located."""
    gm, modules = located.gm, located.modules
    head_nodes = [n for n in gm.graph.nodes if n in _descendants(located.collapse) and n is not located.collapse]
    cut = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=f"Truncated{model_name}")
    cut.meta.update(gm.meta)
    output = next(n for n in cut.graph.nodes if n.op == "output")
    dropped: list[str] = []
    if until is not None:
        accepted = _cut_points(head_nodes, modules)
        if until not in accepted:
            raise BadInputError(
                f"--until {until!r} is not a layer of the head; it accepts {', '.join(accepted) or 'none'}"
            )
        end = next(n for n in head_nodes if n.op == "call_module" and n.target == until)
        output.args = (_find(cut, end.name),)
        dropped.append(f"everything after {until} (--until {until})")
    if logits:
        items = _output_items(next(n for n in gm.graph.nodes if n.op == "output").args[0])
        if until is not None:
            items = [(name, _find(gm, node.name)) for name, node in _output_items(output.args[0])]
        found, ends = [], []
        for name, value in items:
            node = value
            while _is_passthrough(node, modules) and isinstance(node.args[0], fx.Node):
                node = node.args[0]
            if _is_squashing(node, modules):
                found.append(node)
            else:
                ends.append(f"{name} ends in {_describe(node, modules)}")
        if not found:
            raise BadInputError(
                f"--logits: no output ends in a softmax, log-softmax or sigmoid to drop ({'; '.join(ends)})"
            )
        for node in dict.fromkeys(found):
            _replace_with_input(node.name)(cut)
            dropped.append(f"{_describe(node, modules)} (--logits: the raw scores instead)")
    cut.graph.eliminate_dead_code()
    cut.delete_all_unused_submodules()
    cut.recompile()
    cut.fcconv_truncated = dropped
    return cut.eval()


def _split(
    gm: fx.GraphModule, entry: fx.Node, trunk: set[fx.Node], flatten: fx.Node | None
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut the traced original at ``entry``: (features: input -> entry, head: entry -> output).

    The head's flatten is written as ``torch.flatten(x, 1)``: at the native size it is
    that (the plan checked it), and the original may have spelt it with the input's
    batch size (``x.view(x.shape[0], -1)``), which the head, fed a batch of windows,
    must not use.
    """
    features_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in trunk:
            env[node] = features_graph.node_copy(node, lambda n: env[n])
    features_graph.output(env[entry])

    head_graph = fx.Graph()
    henv: dict[fx.Node, fx.Node] = {entry: head_graph.placeholder("features")}
    downstream = _descendants(entry)
    for node in gm.graph.nodes:
        if node is entry or not (node in downstream or node.op == "get_attr"):
            continue
        if node is flatten:
            henv[node] = head_graph.call_function(torch.flatten, (henv[node.args[0]], 1))
            continue
        henv[node] = head_graph.node_copy(node, lambda n: henv[n])
    features = fx.GraphModule(gm, features_graph, class_name="Features")
    head = fx.GraphModule(gm, head_graph, class_name="Head")
    head.graph.eliminate_dead_code()
    head.recompile()
    return features, head
