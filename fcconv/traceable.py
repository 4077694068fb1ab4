"""Equal forms of the layers whose PyTorch code fixes an input size while torch.export traces them.

A program (``-o NAME.pt2``) and the ONNX export by torch.onnx's torch.export-based exporter must keep
every spatial axis free; these layers would pin one to the traced size, or ask a question of the batch
that a free batch cannot answer. Each form computes the same values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn


def traceable_form(module: nn.Module, *, ceil_mode_pools: bool) -> nn.Module:
    """``module`` (an fx graph) with its 1D max poolings (modules or function calls) as 2D ones, with
    ``ceil_mode_pools`` its ceil-mode max pooling modules as padded floor-mode ones (:func:`max_pool`), and each
    adaptive average pooling given a contiguous input; any other module as it is.

    ATen's adaptive average pooling asks its input's layout; for a map laid out channels-last (ConvNeXt's
    blocks and Swin's permutes leave one) the answer reads whether the batch is above 1, which a free batch
    does not say, and the export would fail. A contiguous copy answers without it: the same values.
    Parameters are shared with ``module`` and the state_dict's names are the same.
    """
    if not isinstance(module, fx.GraphModule):
        return module
    modules = dict(module.named_modules())
    pools = [
        name for name, m in modules.items()
        if not getattr(m, "return_indices", True)
        and (type(m) is nn.MaxPool1d or (ceil_mode_pools and type(m) in (nn.MaxPool2d, nn.MaxPool3d) and m.ceil_mode))
    ]  # fmt: skip
    edited = [node for node in module.graph.nodes if _adaptive_average(node, modules) or _max_pool1d_call(node)]
    if not pools and not edited:
        return module
    # A new GraphModule has its own containers, and graph where it is edited (the layers themselves are shared):
    # ``module`` is left be.
    graph = copy.deepcopy(module.graph) if edited else module.graph
    for node in [n for n in graph.nodes if edited and _adaptive_average(n, modules)]:
        with graph.inserting_before(node):
            node.replace_input_with(node.args[0], graph.call_method("contiguous", (node.args[0],)))
    for node in [n for n in graph.nodes if edited and _max_pool1d_call(n)]:
        node.target = max_pool1d_as_2d
    module = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for name in pools:
        pool = module.get_submodule(name)
        module.set_submodule(
            name, (MaxPool1dAs2d if type(pool) is nn.MaxPool1d else CeilModeMaxPool)(pool), strict=False
        )
    return module


MAX_POOL_1D = (F.max_pool1d, torch.max_pool1d, torch.ops.aten.max_pool1d.default)
"""A 1D max pooling as a graph captured from a module calls it, or as a program lowered from torch.export holds it."""


def _max_pool1d_call(node: fx.Node) -> bool:
    """Whether ``node`` calls a 1D max pooling that returns the pooled values alone."""
    if node.op != "call_function" or node.target not in MAX_POOL_1D:
        return False
    return not (node.kwargs.get("return_indices", False) or (len(node.args) > 6 and node.args[6]))


def max_pool1d_as_2d(
    x: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False
) -> torch.Tensor:
    """``F.max_pool1d`` (or ATen's, whose empty stride means the kernel's) as :class:`MaxPool1dAs2d` computes it."""
    kernel = _single(kernel_size)
    step = kernel if stride is None or (isinstance(stride, (tuple, list)) and not stride) else _single(stride)
    pooled = max_pool(
        x.unsqueeze(-2), (1, kernel), (1, step), (0, _single(padding)), (1, _single(dilation)), bool(ceil_mode)
    )
    return pooled.squeeze(-2)


class MaxPool1dAs2d(nn.Module):
    """``nn.MaxPool1d`` computed as a 2D max pooling over a height-1 map: the same values.

    torch.export fixes the length of a 1D max pooling's input to the traced one
    (its ATen implementation reads the size in C++), and not a 2D one's.
    """

    def __init__(self, pool: nn.MaxPool1d) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool
        kernel, stride, padding, dilation = (_single(v) for v in (p.kernel_size, p.stride, p.padding, p.dilation))
        y = max_pool(x.unsqueeze(-2), (1, kernel), (1, stride), (0, padding), (1, dilation), p.ceil_mode)
        return y.squeeze(-2)


class CeilModeMaxPool(nn.Module):
    """``nn.MaxPool2d`` or ``nn.MaxPool3d`` with ``ceil_mode`` (SqueezeNet's, GoogLeNet's), computed by
    :func:`max_pool`: the same values, with the count of windows a program keeps at every size."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, rank = self.pool, 2 if isinstance(self.pool, nn.MaxPool2d) else 3
        kernel, stride, padding, dilation = (_tuple(v, rank) for v in (p.kernel_size, p.stride, p.padding, p.dilation))
        return max_pool(x, kernel, stride, padding, dilation, True)


def max_pool(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    ceil_mode: bool,
) -> torch.Tensor:
    """A 2D or 3D max pooling (by the kernel's rank); in ceil mode as a floor-mode one of ``x`` padded with -inf.

    PyTorch counts a ceil-mode pooling's windows with a branch in Python (one window less where the last
    would start past the input and its near padding), which fixes the count to the traced size's. Here the
    count is the smaller of the two counts that branch chooses between, a value a program keeps; ``x`` is
    padded to take that many windows in floor mode. Every window holds a cell of ``x``, so the padding
    never wins: the same values as the ceil-mode pooling.
    """
    pool = F.max_pool2d if len(kernel) == 2 else F.max_pool3d
    if not ceil_mode:
        return pool(x, kernel, stride, padding, dilation)
    pads = []
    for size, k, s, p, d in zip(x.shape[-len(kernel) :], kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        count = torch.sym_min((size + 2 * p - span + s - 1) // s + 1, (size + p - 1) // s + 1)
        pads.append((p, torch.sym_max((count - 1) * s + span - size - p, 0)))  # less than a stride too many
    flat = [side for near_far in reversed(pads) for side in near_far]  # F.pad lists the last axis first
    return pool(F.pad(x, flat, value=float("-inf")), kernel, stride, 0, dilation)


def _single(value: Any) -> int:
    """A 1D layer's size, given as an int or a 1-tuple."""
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def _tuple(value: Any, rank: int) -> tuple[int, ...]:
    """A layer's size per axis, given as an int or a tuple."""
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * rank


def _adaptive_average(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` is an adaptive average pooling of its first argument (a module or a function)."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d))
    return (
        node.op == "call_function"
        and node.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
        and bool(node.args)
    )
