"""Reading torch.fx nodes: what a node is (an element-wise layer, a flatten, a softmax ...) and its shapes.

The recognisers here name the modules, functions and methods fcconv understands in a head and around it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Threshold,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS: set[Callable[..., Any]] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.alpha_dropout, torch.dropout,
    torch.nn.functional.threshold, torch.exp, torch.abs, torch.neg, torch.clamp, torch.clip,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "clamp", "clip",
    "clamp_", "contiguous", "float", "to", "type_as",
}  # fmt: skip
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_CHANNEL_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_CHANNEL_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_MEAN_FUNCTIONS = {torch.mean, torch.amax}
_MEAN_METHODS = {"mean", "amax"}
_ADAPTIVE_POOL_MODULES = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_ADAPTIVE_POOL_FUNCTIONS = {
    F.adaptive_avg_pool1d: "avg", F.adaptive_avg_pool2d: "avg", F.adaptive_avg_pool3d: "avg",
    F.adaptive_max_pool1d: "max", F.adaptive_max_pool2d: "max", F.adaptive_max_pool3d: "max",
}  # fmt: skip
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_NORMALIZATIONS = (nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.RMSNorm)
_PERMUTING = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
_SQUASHING_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)
_SQUASHING_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.sigmoid, F.sigmoid}
_SQUASHING_METHODS = {"softmax", "log_softmax", "sigmoid"}


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"{node.name} ({getattr(node.target, '__name__', str(node.target))})"
    if node.op == "call_method":
        return f"{node.name} (.{node.target}())"
    return node.name


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_reshape(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten, view or reshape, as a module, function or method."""
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Flatten)
    return (node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS) or (
        node.op == "call_method" and node.target in _FLATTEN_METHODS
    )


def _is_feature_layer_norm(mod: nn.Module, node: fx.Node) -> bool:
    """A LayerNorm over the last axis, which holds the C features (channels) of each position."""
    shape = _shape(node)
    return (
        isinstance(mod, nn.LayerNorm)
        and len(mod.normalized_shape) == 1
        and shape is not None
        and shape[-1] == mod.normalized_shape[0]
    )


def _adaptive_pool(node: Any, modules: dict[str, nn.Module]) -> str | None:
    """'avg' or 'max' when ``node`` is an adaptive pooling."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module" and isinstance(modules[node.target], _ADAPTIVE_POOL_MODULES):
        mod = modules[node.target]
        if getattr(mod, "return_indices", False):
            return None
        return "max" if "Max" in type(mod).__name__ else "avg"
    if node.op == "call_function" and node.target in _ADAPTIVE_POOL_FUNCTIONS:
        return _ADAPTIVE_POOL_FUNCTIONS[node.target]
    return None


def _reachable(node: fx.Node, step: Callable[[fx.Node], Any]) -> set[fx.Node]:
    """``node`` and every node reached from it by repeatedly following ``step``."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def _ancestors(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.all_input_nodes)


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.users)


def _is_collapse(node: fx.Node, modules: dict[str, nn.Module], rank: int) -> str | None:
    """'flatten' or 'global-avg'/'global-max' when ``node`` collapses a (N, C, *S) map to (N, F)."""
    out = _shape(node)
    source = node.args[0] if node.args else None
    src = _shape(source)
    if out is None or src is None or len(out) != 2 or len(src) != rank + 2:
        return None
    if _is_reshape(node, modules) and out[0] == src[0] and out[1] == math.prod(src[1:]):
        return "flatten"
    if (node.op == "call_function" and node.target in _MEAN_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MEAN_METHODS
    ):
        return "global-avg" if getattr(node.target, "__name__", node.target) == "mean" else "global-max"
    return "other"


def _permute_dims(node: Any) -> list[int] | None:
    """The permutation of a ``permute`` call (function or method), or None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    if getattr(node.target, "__name__", node.target) != "permute":
        return None
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if not dims and "dims" in node.kwargs:
        dims = node.kwargs["dims"]
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None
