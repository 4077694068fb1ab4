"""Why a model refuses its input shape, said as the shape it takes rather than as PyTorch's internals.

A wrong ``--input-shape`` surfaces deep inside shape propagation (``a and b must have same reduction
dim``, or, with two numbers for a 2D model, the batch of the probe reported as channels). When a step
fails, :func:`input_shape_explained` runs the model again on fake tensors at that shape and, only when
that run shows the shape to be the cause, replaces the error with one naming the shape the model takes:
its model card's, its program's exported input, or what its first (or failing) layer takes. Any other
failure is raised as it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fcconv.errors import BadInputError

SPATIAL = {1: "L", 2: "H×W", 3: "D×H×W"}


@contextlib.contextmanager
def input_shape_explained(loaded: Any | Callable[[], Any], given: str | None) -> Iterator[None]:
    """Raise :class:`BadInputError` naming the shape ``loaded.module`` takes when the block fails because the
    model cannot take ``loaded.input_shape`` (``given`` is the ``--input-shape`` text, None when not given).

    ``loaded`` is a :class:`~fcconv.load.LoadedModel`, or a function that loads it again, for a block that loads
    the model itself.

    Torch's fake tensors log a traceback for an operator that refuses its shapes before they raise; the
    error is reported in one line, so that log is kept off stderr while the block runs.
    """
    try:
        with _fake_tensor_log_off():
            yield
    except Exception as exc:
        refusal = input_shape_refusal(loaded, given)
        if refusal is None:
            raise
        raise BadInputError(refusal) from exc


def input_shape_refusal(loaded: Any | Callable[[], Any], given: str | None) -> str | None:
    """One line naming the shape ``loaded.module`` takes and the ``loaded.input_shape`` it was given, or None when
    the module runs at that shape or its run does not show what it takes."""
    try:
        loaded = loaded() if callable(loaded) else loaded
        return _refusal(loaded.module, tuple(loaded.input_shape), given, loaded.card, Path(loaded.path))
    except Exception:  # noqa: BLE001 - explaining must never hide the error being explained
        return None


def _refusal(module: Any, shape: tuple[int, ...], given: str | None, card: dict, path: Path) -> str | None:
    run = _FakeRun(module, shape)
    if run.error is None or _FakeRun(module, shape, batch=1).error is None:
        return None  # the model takes this shape (one input at a time, at least): the step failed for another reason
    card_name = path.with_suffix(".json").name
    if given is not None:
        source = f"--input-shape {given}"
    elif card.get("input_shape") is not None:
        source = f"the input_shape of its model card {card_name}"
    else:
        source = "no --input-shape given"
    refused = f"the model cannot take an input of shape {_text(shape)} ({source})"
    carded = _card_shape(card)
    if given is not None and carded is not None and carded != shape and _FakeRun(module, carded).error is None:
        return f"{refused}: it takes {_text(carded)} (the input_shape of {card_name})"
    exported = _program_input(module)
    if exported is not None and not _fits(shape, exported):
        return f"{refused}: it takes {_text(exported[1:])} (the input it was exported with)"
    if run.first is not None:
        name, layer, received = run.first
        takes = _what_layer_takes(layer, received)
        if takes is not None:
            return f"{refused}: its first layer, {name} ({type(layer).__name__}), {takes}{_what_model_takes(layer)}"
    if run.failing is not None:
        name, layer, received = run.failing
        takes = _what_layer_takes(layer, received)
        if takes is not None:
            return f"{refused}: at that size {name} ({type(layer).__name__}) {takes}; give the size it was trained at"
    return None


class _FakeRun:
    """``module`` run on a fake batch of ``shape`` inputs (no memory, no compute), recording the first
    convolution or Linear the input reaches and the layer that was running when the run failed.

    Two inputs, as the rewrite propagates shapes, so that a batch axis is never taken for a size-1 axis.
    """

    def __init__(self, module: Any, shape: tuple[int, ...], batch: int = 2) -> None:
        import torch
        from torch import nn
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.first: tuple[str, Any, tuple[int, ...]] | None = None
        self.failing: tuple[str, Any, tuple[int, ...]] | None = None
        self.error: BaseException | None = None
        running: list[tuple[str, Any, tuple[int, ...]]] = []
        handles = []

        def entered(name: str, layer: Any, inputs: tuple) -> None:
            received = tuple(inputs[0].shape) if inputs and isinstance(inputs[0], torch.Tensor) else ()
            running.append((name, layer, received))
            if self.first is None and received and isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
                self.first = (name, layer, received)

        def left(layer: Any, inputs: tuple, output: Any) -> None:  # returns None: the output stays as it is
            running.pop()

        for name, layer in module.named_modules():
            if next(layer.children(), None) is None:  # leaves: the layers that compute
                handles.append(layer.register_forward_pre_hook(lambda m, i, n=name: entered(n, m, i)))
                handles.append(layer.register_forward_hook(left))
        params = [p for p in module.parameters() if p.is_floating_point()]
        dtype = params[0].dtype if params else torch.float32
        device = params[0].device if params else torch.device("cpu")
        try:
            with _fake_tensor_log_off(), FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                module(torch.empty((batch, *shape), dtype=dtype, device=device))
        except Exception as exc:  # noqa: BLE001 - the failure is what is looked at
            self.error = exc
            self.failing = running[-1] if running else None
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def _fake_tensor_log_off() -> Iterator[None]:
    """Torch's fake tensors log the traceback of an operator that refuses its input's shape before raising."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _what_layer_takes(layer: Any, received: tuple[int, ...]) -> str | None:
    """What ``layer`` takes and gets, when the batched input it ``received`` does not fit it; None when it fits."""
    from torch import nn

    if not received:
        return None  # not called with a tensor: nothing to tell
    if isinstance(layer, nn.modules.conv._ConvNd):
        axes = len(layer.kernel_size)
        if len(received) == axes + 2 and received[1] == layer.in_channels:
            return None
        channels = f"{layer.in_channels} channel{'s' if layer.in_channels != 1 else ''}"
        if len(received) == axes + 2:
            return f"takes {channels}"
        return f"takes {channels} and {axes} spatial ax{'es' if axes != 1 else 'is'}"
    if isinstance(layer, nn.Linear):
        if received[-1] == layer.in_features:
            return None
        return f"takes {layer.in_features} features and gets {received[-1]}"
    return None


def _what_model_takes(first: Any) -> str:
    """The input shape a model whose first layer is ``first`` takes, as far as that layer says."""
    from torch import nn

    if isinstance(first, nn.modules.conv._ConvNd) and len(first.kernel_size) in SPATIAL:
        return f", so it takes {first.in_channels}×{SPATIAL[len(first.kernel_size)]}"
    return ""


def _card_shape(card: dict) -> tuple[int, ...] | None:
    from fcconv.sizes import parse_input_shape

    try:
        return parse_input_shape(card["input_shape"]) if card.get("input_shape") is not None else None
    except (BadInputError, TypeError, ValueError):
        return None


def _program_input(module: Any) -> tuple[Any, ...] | None:
    """The batched input shape an ExportedProgram's module was exported with (a free axis as a symbol), or None."""
    graph = getattr(module, "graph", None)
    for node in getattr(graph, "nodes", ()):
        if node.op == "placeholder":
            value = node.meta.get("val")
            return tuple(d if isinstance(d, int) else None for d in value.shape) if value is not None else None
    return None


def _fits(shape: tuple[int, ...], exported: tuple[Any, ...]) -> bool:
    return len(shape) + 1 == len(exported) and all(e is None or e == s for s, e in zip(shape, exported[1:]))


def _text(shape: tuple[Any, ...]) -> str:
    return "×".join("?" if d is None else str(d) for d in shape)
