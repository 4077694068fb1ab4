"""The refusals of models that turn their map into a sequence of tokens: a fixed-length position embedding, a
class token the classifier reads, a layer that mixes every position with every other, a pooling of the tokens.

Asked only where no collapse of a feature map was found, each names the first layer that keeps the model from
being a sliding window.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from fcconv.errors import NotConvertibleError
from fcconv.fx_nodes import _arg, _describe, _shape
from fcconv.fx_trunk import _larger_input_shapes, _probe_larger_input
from fcconv.sizes import spatial_size


def _refuse_token_sequence(
    gm: fx.GraphModule, modules: dict[str, nn.Module], rank: int, live: set[fx.Node], input_shape: tuple[int, ...]
) -> None:
    """Refuse, naming it, a model that adds a fixed-length position embedding to a token sequence (ViT)."""
    for node in gm.graph.nodes:
        if node not in live or node.op != "call_function" or node.target not in (operator.add, torch.add):
            continue
        for tokens, table in (node.args[:2], node.args[1::-1]):
            if not isinstance(table, fx.Node) or table.op != "get_attr" or tokens not in live:
                continue
            seq, emb = _shape(tokens), _shape(table)
            if seq is None or emb is None or len(seq) != 3 or len(emb) != 3 or emb[0] != 1 or emb[1:] != seq[1:]:
                continue
            class_tokens = [
                n.target
                for n in gm.graph.nodes
                if n.op == "get_attr" and (_shape(n) or ())[:2] == (1, 1) and len(_shape(n)) == 3
            ]
            cls = f" (with the class token {class_tokens[0]}, which the classifier reads)" if class_tokens else ""
            native = "×".join(map(str, spatial_size(input_shape)))
            raise NotConvertibleError(
                f"{table.target} is a position embedding of fixed length {emb[1]}{cls}, added to the token sequence "
                f"of the native {native} input at {node.name}; a larger input gives more tokens than it has "
                "positions, so the model has no fully convolutional form"
            )


# Products of two activations: attention's query-key and attention-value products, by their
# names as torch.fx (functions, methods) and torch.export (ATen operators) write them.
_PRODUCTS = {"matmul", "__matmul__", "bmm", "baddbmm", "mm", "einsum", "multi_head_attention_forward"}


def _call_name(node: fx.Node) -> str:
    """A call's bare name: ``matmul`` for ``torch.matmul``, ``operator.matmul``, ``.matmul()`` and ``aten.matmul.default``."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return name.removeprefix("aten.").split(".")[0]


def _module_path(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The module a node runs in (``blocks.0.attn``) where the capture recorded it, else the node itself."""
    if node.op == "call_module":
        return _describe(node, modules)
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), (None, None))[0] if stack else None
    return f"{path} ({_call_name(node)})" if path else _describe(node, modules)


def _refuse_token_mixing(
    gm: fx.GraphModule, modules: dict[str, nn.Module], live: set[fx.Node], input_shape: tuple[int, ...]
) -> None:
    """Refuse, naming the layer, a model that mixes all positions of its map with each other.

    Attention (a product of two activations) and a Linear across an axis that grows with
    the input (MLP-Mixer's token mixing) make every output read the whole input, so no
    output is a sliding window's reading. Asked only where no collapse of a feature map
    was found.
    """
    larger, refused_at, _ = _larger_input_shapes(gm, input_shape)
    mixers: list[tuple[fx.Node, str]] = []
    for node in gm.graph.nodes:
        if node not in live or node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.op == "call_module" and isinstance(modules[node.target], nn.MultiheadAttention):
            mixers.append((node, "is attention"))
        elif (
            node.op != "call_module"
            and (_call_name(node) in _PRODUCTS or "scaled_dot_product" in _call_name(node))
            and len([a for a in node.all_input_nodes if a in live]) >= 2
        ):
            mixers.append((node, "multiplies two activations (attention)"))
        elif _is_linear_call(node, modules) and _grows(node.args[0], larger, refused_at is node):
            mixing = f"is a Linear across the {_shape(node.args[0])[-1]} positions of the map (token mixing)"
            mixers.append((node, mixing))
    if mixers:
        node, mixing = mixers[0]
        raise NotConvertibleError(
            f"{_module_path(node, modules)} {mixing}: every position of the map is mixed with every other, so "
            "no output reads a window of the input and the model has no fully convolutional form"
        )
    if refused_at is not None:  # what stops a larger input before any layer is seen to mix positions
        _probe_larger_input(gm, input_shape, modules)
    for node in gm.graph.nodes:
        pooled = _token_pooling_axis(node, modules)
        source = node.args[0] if pooled is not None and node.args else None
        native = _shape(source) if isinstance(source, fx.Node) else None
        double = larger.get(source.name) if isinstance(source, fx.Node) else None
        if node not in live or native is None or double is None or len(native) != 3 or len(double) != 3:
            continue
        axis = pooled % 3
        spatial = len(input_shape) - 1
        if double[axis] >= native[axis] * 2**spatial:  # the flattened positions of every spatial axis
            raise NotConvertibleError(
                f"{_module_path(node, modules)} pools the {native[axis]} positions of the map after they were "
                "flattened into a sequence of tokens; fcconv reads only a global pooling of the feature map itself, "
                "where its height and width are still axes, so it cannot tell what each position of this one reads"
            )


def _token_pooling_axis(node: fx.Node, modules: dict[str, nn.Module]) -> int | None:
    """The axis a one-axis pooling of a three-axis tensor reduces (``AdaptiveAvgPool1d(1)``, ``x.mean(1)``), else
    None."""
    if node.op == "call_module" and isinstance(modules.get(node.target), (nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)):
        size = modules[node.target].output_size
        return -1 if size in (1, (1,)) else None
    if _call_name(node) in ("mean", "amax", "max", "sum") and node.op in ("call_method", "call_function"):
        dims = _arg(node, 1, "dim", None)
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        return dims[0] if len(dims) == 1 and isinstance(dims[0], int) else None
    return None


def _is_linear_call(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Linear)
    return node.op == "call_function" and _call_name(node) == "linear"


def _grows(node: Any, larger: dict[str, tuple[int, ...]], refused: bool) -> bool:
    """Whether ``node``'s last axis grows with the input: longer at twice the native size, or the Linear
    reading it refused that size."""
    native = _shape(node) if isinstance(node, fx.Node) else None
    if not native:
        return False
    at_double = larger.get(node.name)
    return refused if at_double is None else len(at_double) == len(native) and at_double[-1] > native[-1]


def _refuse_class_token(
    gm: fx.GraphModule, modules: dict[str, nn.Module], live: set[fx.Node], input_shape: tuple[int, ...]
) -> None:
    """Refuse, naming it, a model whose classifier reads one token of a token sequence (MViT's class token).

    The reason given is the first one the model has: where its layers cannot take a
    larger input (MViT's fixed-length position embedding, or its attention's fixed
    token grid), that layer; otherwise that one token has no per-position reading.
    """
    for node in gm.graph.nodes:
        if node not in live or node.op != "call_function" or node.target is not operator.getitem:
            continue
        sequence, out, index = _shape(node.args[0]), _shape(node), node.args[1]
        if sequence is None or out is None or len(sequence) != 3 or len(out) != 2:
            continue
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], int)):
            continue
        reads = (
            f"{_describe(node, modules)} reads token {index[1] % sequence[1]} of a sequence of {sequence[1]} tokens "
            "(a class token), not a pooled or flattened feature map"
        )
        try:
            _probe_larger_input(gm, input_shape, modules)
        except NotConvertibleError as exc:
            raise NotConvertibleError(f"{reads}; {exc}") from exc
        raise NotConvertibleError(
            f"{reads}: one token has no per-position reading, so the model has no fully convolutional form"
        )
