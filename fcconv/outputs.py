"""A model's outputs as one flat list of named tensors.

A classifier returns one tensor; a model with several heads returns a tuple, a
named tuple or a dict of them (class scores beside box regression). The converted
model returns the same structure, one dense map per output, and every stage
(verification, export, check) handles the outputs as this flat, ordered list.

Names are the dict's keys or the named tuple's fields; a plain tuple's outputs are
``output_0``, ``output_1``…; a single tensor is ``scores``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SINGLE_OUTPUT_NAME", "like", "named_items", "named_outputs", "output_names"]

SINGLE_OUTPUT_NAME = "scores"


def named_items(value: Any, leaf: type | tuple[type, ...] = torch.Tensor) -> list[tuple[str, Any]] | None:
    """``value`` (a ``leaf``, or a tuple, named tuple, list or dict of them) as ``[(name, item), ...]`` in order.

    None for a value that is neither; the items are not checked to be ``leaf`` (the
    rewriter names a traced graph's output nodes the same way, with ``leaf=fx.Node``).
    """
    if isinstance(value, leaf):
        return [(SINGLE_OUTPUT_NAME, value)]
    if isinstance(value, dict):
        return [(str(key), item) for key, item in value.items()]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return [(str(key), item) for key, item in zip(value._fields, value)]
    if isinstance(value, (tuple, list)):
        if len(value) == 1 and isinstance(value[0], leaf):
            return [(SINGLE_OUTPUT_NAME, value[0])]
        return [(f"output_{i}", item) for i, item in enumerate(value)]
    return None


def named_outputs(value: Any) -> list[tuple[str, torch.Tensor]]:
    """``value`` (a tensor, tuple, named tuple, list or dict of tensors) as ``[(name, tensor), ...]`` in order."""
    items = named_items(value)
    if items is None:
        raise TypeError(f"the model returned a {type(value).__name__}, not a tensor, tuple or dict of tensors")
    for name, item in items:
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"the model's output {name} is a {type(item).__name__}, not a tensor")
    return items


def output_names(value: Any) -> list[str]:
    """The names :func:`named_outputs` gives ``value``'s tensors."""
    return [name for name, _ in named_outputs(value)]


def like(template: Any, tensors: list[torch.Tensor]) -> Any:
    """``tensors`` in the container ``template`` has (the inverse of :func:`named_outputs`)."""
    if isinstance(template, torch.Tensor):
        (tensor,) = tensors
        return tensor
    if isinstance(template, dict):
        return dict(zip(template.keys(), tensors))
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*tensors)
    return type(template)(tensors)
