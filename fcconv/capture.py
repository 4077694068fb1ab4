"""How a PyTorch model becomes the fx graph the rewriter reads.

:func:`captures` offers a model's graphs in the order the rewriter plans from them:

1. ``torch.export`` (non-strict), with the batch and spatial axes dynamic so that size
   arithmetic in ``forward()`` stays symbolic. It sees through what symbolic tracing
   cannot (Python control flow on sizes, Hugging Face ``transformers`` models, timm's
   VGG). Its ATen graph is lowered by :func:`lower_exported_program` into the
   vocabulary the rewriter reads and written as torch.fx writes it: each call of a
   module fx keeps whole is that module's call again, so layer names and reports are
   the same from either capture (docs/capture.md compares every torchvision classifier).
2. ``torch.fx`` symbolic tracing, with every ``nn.Linear`` subclass a leaf (timm's
   ``Linear`` calls ``F.linear``: it is a Linear) and the functions a model declares
   for fx to keep whole (``torch.fx.wrap``, timm's registry) kept whole. It is the
   fallback where the export fails, runs past its time limit, fixes a spatial axis to
   the traced size, or gives a graph the rewriter refuses (torchvision's Swin: its
   window attention, kept whole by fx, is taken apart by the export).

A model that declares parts for fx to keep whole goes to fx directly: timm's TF-padding
layers compute their padding from the map's size in Python, which takes the export's
symbolic shapes exponential time, and the functions torchvision's Swin, Video Swin and
MViT wrap with ``torch.fx.wrap`` run the export past its time limit into reshapes the
rewriter cannot read. Every graph is marked with the capture
that made it (``graph.meta[CAPTURED_BY]``): a value the export specialised to the
traced size makes the converted model compute something else at other sizes, and
verification reads the mark to compare an exported model with its eager original at
the larger sizes too. Where neither capture works the error names the file and line
where each stopped and the route that may work instead.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import operator
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.sizes import spatial_start

__all__ = [
    "CAPTURED_BY", "EXPORT", "EXPORT_SECONDS", "FIXED_AXES", "FIXED_BATCH", "FX", "capture", "captures", "export_graph",
    "lower_exported_program", "refuse_training_mode", "trace",
]  # fmt: skip

CAPTURED_BY = "fcconv_captured_by"
"""The key of ``GraphModule.meta`` that names the capture a graph came from: :data:`EXPORT` or :data:`FX`."""
EXPORT, FX = "torch.export", "torch.fx"


def _seconds_from_environment(default: float = 20.0) -> float:
    """``FCCONV_EXPORT_SECONDS`` as a number of seconds; the default where it is unset or not a number."""
    try:
        return float(os.environ.get("FCCONV_EXPORT_SECONDS", default))
    except ValueError:
        return default


EXPORT_SECONDS = _seconds_from_environment()
"""How long torch.export may take before the model is traced with torch.fx instead (``FCCONV_EXPORT_SECONDS``;
0 for no limit)."""


def captures(model: nn.Module, input_shape: tuple[int, ...]) -> Iterator[fx.GraphModule]:
    """``model``'s graphs (in eval mode), best first: the export, then the fx trace, then an export with a fixed axis.

    ``input_shape`` is the per-sample input (C, *S) the export is made at; its batch
    and spatial axes stay symbolic. An export that fixed a spatial axis comes after the
    trace, which keeps every size symbolic. A graph module is offered as it is. Each
    graph is made only when the one before it is not taken. Raises
    :class:`NotConvertibleError` naming where both captures stopped when neither can
    capture the model.
    """
    model.eval()
    if isinstance(model, fx.GraphModule):
        yield _copy(model)
        return
    exported: fx.GraphModule | None = None
    try:
        _refuse_declared_leaves(model)
        exported = export_graph(model, input_shape)
    except (Exception, _TimedOut) as failed:  # noqa: BLE001 - any export failure sends the model to torch.fx
        export_failure: BaseException = failed
    if exported is not None and not exported.meta[FIXED_AXES]:
        yield exported
    try:
        traced = trace(model)
    except Exception as failed:  # noqa: BLE001 - reported with the export's failure below
        if exported is None:
            raise NotConvertibleError(
                f"{type(model).__name__} cannot be captured: torch.export stopped {_where(export_failure)} and "
                f"torch.fx {_where(failed)}; change that line so that what forward() computes does not depend on the "
                "input's values, or export the model to ONNX (torch.onnx.export) and convert the .onnx file"
            ) from export_failure
    else:
        yield traced
    if exported is not None and exported.meta[FIXED_AXES]:
        yield exported


def capture(model: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """The first of :func:`captures`: the graph the rewriter plans from unless its plan is refused."""
    return next(captures(model, input_shape))


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    copied = fx.GraphModule(gm, gm.graph)
    copied.meta.update(gm.meta)
    return copied


# What nn.Module keeps in its own __dict__: parameters, buffers, children and hooks, never a computed cache.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


@contextlib.contextmanager
def state_kept(model: nn.Module) -> Iterator[None]:
    """Put back every plain attribute of ``model``'s modules after capturing or shape-propagating it.

    Capture and shape propagation run the model's own modules on fake tensors. A module
    that caches what it computes (timm's EfficientViT and LeViT keep their attention
    biases in a dict, by device) would keep a fake tensor, and the user's model would
    then fail, or the verification's eager run of it would read the fake value. Dicts
    and lists are put back with their contents; attributes added are removed.
    """
    saved = []
    for module in model.modules():
        attributes = {}
        for name, value in vars(module).items():
            if name not in _MODULE_INTERNALS:
                attributes[name] = (
                    value,
                    dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else None,
                )
        saved.append((module, attributes))
    try:
        yield
    finally:
        for module, attributes in saved:
            for name in [n for n in vars(module) if n not in _MODULE_INTERNALS and n not in attributes]:
                del module.__dict__[name]
            for name, (value, contents) in attributes.items():
                module.__dict__[name] = value
                if isinstance(value, dict):
                    value.clear()
                    value.update(contents)
                elif isinstance(value, list):
                    value[:] = contents


FIXED_AXES = "fcconv_fixed_axes"
"""The key of ``GraphModule.meta`` listing the input axes an export fixed to their traced size (axis 2 is H or D or L;
axis 1 is L for a channel-free input)."""
FIXED_BATCH = "fcconv_fixed_batch"
"""The key of ``GraphModule.meta`` holding the batch size a lowered program's input was exported with, where fixed."""


class _TimedOut(BaseException):
    """Raised into torch.export when it runs past :data:`EXPORT_SECONDS` (a BaseException: torch catches Exception)."""


def _refuse_declared_leaves(model: nn.Module) -> None:
    """Raise where ``model`` declares parts for torch.fx to keep whole, which the export would take apart.

    Two declarations: a module timm lists as computing from sizes in Python (``Conv2dSame``'s
    TF padding; the export's symbolic shapes take exponential time on it), and functions
    the module defining the model's class wraps with ``torch.fx.wrap`` (torchvision's Swin,
    Video Swin and MViT: their window attention and padding, which the export turns into
    reshapes the rewriter cannot read, after running long).
    """
    modules, _ = _timm_leaves()
    found = next((m for m in model.modules() if modules and isinstance(m, tuple(modules))), None)
    if found is not None:
        raise NotImplementedError(
            f"{type(found).__name__} computes its padding from the map's size in Python; torch.fx keeps it whole"
        )
    defining = sys.modules.get(type(model).__module__)
    wrapped = getattr(fx._symbolic_trace, "_wrapped_fns_to_patch", {})
    names = sorted(name for (scope, name) in wrapped if defining is not None and scope == id(vars(defining)))
    if names:
        raise NotImplementedError(
            f"{type(model).__module__} declares {', '.join(names)} for torch.fx to keep whole (torch.fx.wrap)"
        )


_REPEAT_SECONDS = 1.0
"""How often the time limit interrupts again after its first interruption, until the block has ended."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (where a timer can be set: the main thread, no timer of the caller's)."""
    usable = (
        seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )
    if not usable:
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise _TimedOut(f"it took longer than {seconds:g} s (FCCONV_EXPORT_SECONDS)")

    previous = signal.signal(signal.SIGALRM, expired)
    try:
        # The timer repeats: an interruption that lands in a finalizer (reported as ignored) or in code that catches
        # it is lost, and a one-shot timer would then let the export run on without limit. It is set inside the
        # try, so that it is cleared even where its first interruption comes before the block has started.
        signal.setitimer(signal.ITIMER_REAL, seconds, _REPEAT_SECONDS)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_SHAPE_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.utils._sympy.interp", "torch._export", "torch.export")


@contextlib.contextmanager
def _quiet_shape_logs() -> Iterator[None]:
    """Keep torch's warnings about the guards it could not simplify off stderr: a failed export is reported in one line."""
    loggers = [logging.getLogger(name) for name in _SHAPE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class LinearLeafTracer(fx.Tracer):
    """The default tracer, with every ``nn.Linear`` subclass and the layers timm declares untraceable kept whole.

    The default keeps only ``torch.nn`` modules whole; a subclass defined elsewhere
    (timm's ``Linear``, which calls ``F.linear`` with the same weight and bias) would be
    traced into and reach the rewriter as a function of attributes, not as a Linear.
    timm lists the modules and functions that compute from the map's size in Python
    (``Conv2dSame``'s TF "same" padding) for fx to keep whole; kept whole, they compute
    at every size what they compute in eager mode.
    """

    def __init__(self) -> None:
        modules, functions = _timm_leaves()
        super().__init__(autowrap_functions=tuple(functions))
        self._leaf_types = (nn.Linear, *modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)


def _timm_leaves() -> tuple[list[type[nn.Module]], list[Callable[..., Any]]]:
    """The modules and functions timm registers as fx leaves, when a timm model has imported timm."""
    registry = sys.modules.get("timm.layers._fx")
    if registry is None:
        return [], []
    modules = [m for m in registry.get_notrace_modules() if isinstance(m, type)]
    functions = [f for f in registry.get_notrace_functions() if callable(f)]
    return modules, functions


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` (in eval mode) symbolically traced with :class:`LinearLeafTracer`.

    Only the first argument of ``forward()`` is an input: the arguments after it that
    have defaults (``attn_mask=None``, ``return_features=False``) are traced at their
    defaults, as the model is called with one tensor. One without a default stays an input.
    """
    model.eval()
    if isinstance(model, fx.GraphModule):
        return _copy(model)
    tracer = LinearLeafTracer()
    defaults = _optional_arguments(model)
    with warnings.catch_warnings():  # a default fx cannot guard (a tensor) is still the one traced
        warnings.filterwarnings("ignore", message="Was not able to add assertion")
        graph = tracer.trace(model, concrete_args=defaults or None)
    _drop_bound_arguments(graph, model, defaults)
    for node in list(graph.nodes):  # ``*args`` and ``**kwargs`` the model never reads: it is called with one tensor
        if node.op == "placeholder" and str(node.target).startswith("*") and not node.users:
            graph.erase_node(node)
    traced = fx.GraphModule(tracer.root, graph, type(model).__name__)
    traced.meta[CAPTURED_BY] = FX
    return traced


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward() without a signature is traced as fx finds it
        return []


def _optional_arguments(model: nn.Module) -> dict[str, Any]:
    """The defaults of ``model.forward()``'s named arguments after the first, by name."""
    return {
        p.name: p.default
        for p in _forward_parameters(model)[1:]
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is not p.empty
    }


def _drop_bound_arguments(graph: fx.Graph, model: nn.Module, defaults: dict[str, Any]) -> None:
    """Remove the placeholders fx keeps for the arguments traced at their defaults, and the checks on them.

    fx still takes each such argument (as ``attn_mask_1``), only to assert that it has its
    default; the graph computes with the default, so the traced model takes one input.
    """
    if not defaults:
        return
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    unbound = {stars.get(p.kind, "") + p.name for p in _forward_parameters(model) if p.name not in defaults}
    bound = [n for n in graph.nodes if n.op == "placeholder" and n.target not in unbound]
    checks: set[fx.Node] = set()
    pending = list(bound)
    while pending:
        for user in pending.pop().users:
            if user not in checks:
                checks.add(user)
                pending.append(user)
    if any(n.op == "output" for n in checks):  # the graph reads an argument it was traced without: leave it whole
        return
    for node in reversed(list(graph.nodes)):
        if node in checks or node in bound:
            graph.erase_node(node)


def export_graph(
    model: nn.Module, input_shape: tuple[int, ...], *, as_traced: bool = True, seconds: float | None = None
) -> fx.GraphModule:
    """``model`` exported with torch.export at ``input_shape`` (batch 2, batch and spatial axes dynamic), lowered.

    Batch 2, not 1: torch.export specialises an axis of size 1 to 1. ``as_traced``
    writes the graph as torch.fx would (see :func:`lower_exported_program`). The export
    is interrupted after ``seconds`` (default :data:`EXPORT_SECONDS`). The graph is
    marked as exported, with the spatial axes the export fixed to their traced size.
    """
    model.eval()
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    dtype = tensors[0].dtype if tensors else torch.float32
    device = tensors[0].device if tensors else torch.device("cpu")
    sample = torch.zeros((2, *input_shape), dtype=dtype, device=device)
    axes = {axis: torch.export.Dim.AUTO for axis in (0, *range(spatial_start(input_shape), len(input_shape) + 1))}
    with _quiet_shape_logs(), _time_limit(EXPORT_SECONDS if seconds is None else seconds):
        program = torch.export.export(model, (sample,), strict=False, dynamic_shapes=(axes,))
    gm = lower_exported_program(program, model if as_traced else None)
    gm.meta[FIXED_AXES] = _fixed_axes(program)
    return gm


def _fixed_axes(program: torch.export.ExportedProgram) -> list[int]:
    """The spatial axes of the program's input whose size the export fixed (a number where a symbol was asked for)."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    shape = node.meta["val"].shape
    return [axis for axis in range(1 if len(shape) == 2 else 2, len(shape)) if is_concrete_int(shape[axis])]


def _where(exc: BaseException) -> str:
    """'at FILE:LINE (reason)': the last frame of the model's own code in ``exc``'s traceback, and its message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    reason = text.split(". ")[0][:200]
    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    own = [f for f in frames if not f.filename.startswith((torch_dir, here)) and "<" not in f.filename]
    if not own:
        return f"({reason})"
    frame = own[-1]
    return f"at {frame.filename}:{frame.lineno} ({reason})"


_ATEN = torch.ops.aten
_ATEN_DROPOUT = {
    _ATEN.dropout.default, _ATEN.feature_dropout.default, _ATEN.alpha_dropout.default,
    _ATEN.dropout_.default, _ATEN.feature_dropout_.default, _ATEN.alpha_dropout_.default,
}  # fmt: skip
_ATEN_ADAPTIVE_MAX = {
    _ATEN.adaptive_max_pool1d.default: F.adaptive_max_pool1d, _ATEN.adaptive_max_pool2d.default: F.adaptive_max_pool2d,
    _ATEN.adaptive_max_pool3d.default: F.adaptive_max_pool3d,
}  # fmt: skip
_ATEN_RESHAPE = {_ATEN.view.default, _ATEN.reshape.default, _ATEN._unsafe_view.default}
_ATEN_EXPAND = {_ATEN.expand.default}
_ATEN_AS_TORCH: dict[Any, Callable[..., Any]] = {
    _ATEN.flatten.using_ints: torch.flatten, _ATEN.mean.dim: torch.mean, _ATEN.amax.default: torch.amax,
    _ATEN.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d, _ATEN.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    _ATEN.adaptive_avg_pool3d.default: F.adaptive_avg_pool3d,
    _ATEN.relu.default: torch.relu, _ATEN.relu_.default: torch.relu_, _ATEN.sigmoid.default: torch.sigmoid,
    _ATEN.tanh.default: torch.tanh, _ATEN.gelu.default: F.gelu, _ATEN.silu.default: F.silu,
    _ATEN.silu_.default: F.silu, _ATEN.hardswish.default: F.hardswish, _ATEN.hardswish_.default: F.hardswish,
    _ATEN.hardtanh.default: F.hardtanh, _ATEN.hardtanh_.default: F.hardtanh, _ATEN.leaky_relu.default: F.leaky_relu,
    _ATEN.leaky_relu_.default: F.leaky_relu, _ATEN.clamp.default: torch.clamp, _ATEN.exp.default: torch.exp,
    _ATEN.add.Tensor: torch.add, _ATEN.sub.Tensor: torch.sub, _ATEN.mul.Tensor: torch.mul, _ATEN.div.Tensor: torch.div,
    _ATEN.softmax.int: torch.softmax, _ATEN.log_softmax.int: torch.log_softmax,
}  # fmt: skip
_ATEN_AS_TRACED: dict[Any, Callable[..., Any]] = {
    _ATEN.permute.default: torch.permute, _ATEN.transpose.int: torch.transpose, _ATEN.layer_norm.default: torch.layer_norm,
}  # fmt: skip


def lower_exported_program(program: torch.export.ExportedProgram, model: nn.Module | None = None) -> fx.GraphModule:
    """The program as a plain module whose head speaks the vocabulary the rewriter reads.

    ``program.module()`` computes with ATen operators; its linear layers are
    ``aten.linear`` calls on weights held by attribute containers. Here each of those
    becomes an ``nn.Linear`` (and each batch or layer norm over (N, C) features an ``nn.BatchNorm1d`` or
    ``nn.LayerNorm``)
    holding the same tensors, the other ATen operators of a head become their torch
    functions, eval-mode dropout is removed, a dict output (a ``transformers`` ModelOutput) stays a
    dict of its tensors, the input-shape guards are dropped (the
    converted model takes any size), and a reshape spelt with the traced batch size
    (``view(x, [1, -1])``) is written for any batch. The trunk is left as it is.

    Given the exported ``model``, the graph is also written as torch.fx traces it: each
    call of a module fx keeps whole is that module's call again
    (:func:`_restore_leaf_modules`), permutes and layer norms are torch functions, and
    a call the model wrote as a Tensor method (``x.flatten(1)``) is that method's call.
    The graph is marked as exported (``meta[CAPTURED_BY]``) either way.
    """
    unlifted = program.module()
    graph = copy.deepcopy(unlifted.graph)
    graph._tracer_cls, graph._tracer_extras = None, None  # the export's tracer cannot rebuild an unpickled module
    gm = fx.GraphModule(unlifted, graph, class_name="ExportedClassifier")
    gm.graph._codegen = fx.graph.CodeGen()
    to_torch = _ATEN_AS_TORCH
    if model is not None:
        _restore_leaf_modules(gm, model)
        to_torch = {**_ATEN_AS_TORCH, **_ATEN_AS_TRACED}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    batch = _static_size(placeholders[0], 0) if len(placeholders) == 1 else None
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
        elif node.op == "output" and _dict_keys(program) is not None:
            node.args = (dict(zip(_dict_keys(program), node.args[0])),)
        elif node.op == "output" and isinstance(node.args[0], (tuple, list)) and len(node.args[0]) == 1:
            node.args = (node.args[0][0],)
        elif node.op != "call_function":
            continue
        elif node.target is _ATEN.linear.default:
            _as_module(gm, node, _linear_from(gm, node))
        elif node.target is _ATEN.batch_norm.default and _rank(node) == 2 and not _arg(node, 5, "training", False):
            _as_module(gm, node, _batchnorm_from(gm, node))
        elif node.target is _ATEN.layer_norm.default and _rank(node) == 2:
            _as_module(gm, node, _layer_norm_from(gm, node))
        elif node.target in _ATEN_DROPOUT:
            # the identity, as in eval mode (how a live module is converted), also where the program was exported
            # from training mode and recorded the dropout as active: its random output is no classifier's reading
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.target in _ATEN_ADAPTIVE_MAX and all(
            user.target is operator.getitem and (user.args[1] == 0 or not user.users) for user in node.users
        ):
            # the pooled values, their indices unused: the torch function, as a live module's trace writes it
            node.target = _ATEN_ADAPTIVE_MAX[node.target]
            for item in list(node.users):
                item.replace_all_uses_with(node)
                gm.graph.erase_node(item)
        elif node.target in _ATEN_EXPAND and batch is not None and _expands_batch(node, batch):
            node.args = (node.args[0], [-1, *node.args[1][1:]], *node.args[2:])  # -1: the batch of its input
        elif node.target in _ATEN_RESHAPE:
            out = node.meta.get("val")
            if batch is not None and out is not None and out.dim() >= 1 and _static_size(node.args[0], 0) == batch:
                shape = list(
                    out.shape
                )  # a spatial axis the program keeps free is a SymInt here: not written as a number
                if shape[0] == batch and all(isinstance(s, int) for s in shape):
                    node.target, node.args = torch.reshape, (node.args[0], [-1, *map(int, shape[1:])])
                    continue
                sizes = node.args[1]
                if isinstance(sizes, (list, tuple)) and sizes and sizes[0] == batch and _static_size(node, 0) == batch:
                    # spatial axes free, batch fixed: ``view(x, [1, C, -1])`` reads the batch from its input instead
                    with gm.graph.inserting_before(node):
                        size = gm.graph.call_function(_ATEN.sym_size.int, (node.args[0], 0))
                    node.args = (node.args[0], [size, *sizes[1:]])
            node.target = torch.reshape
        elif node.target in to_torch:
            node.target = to_torch[node.target]
            if model is not None and _called_as_method(node):
                node.op, node.target = "call_method", node.target.__name__
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.meta[CAPTURED_BY] = EXPORT
    if batch is not None:
        gm.meta[FIXED_BATCH] = batch
    return gm.eval()


def refuse_training_mode(program: torch.export.ExportedProgram, source: Any) -> None:
    """Refuse a program exported from a model in training mode: its batch norms normalize with the batch's statistics.

    Its dropout is read as in eval mode (the identity), but a batch norm that holds running statistics and was
    recorded with ``training=True`` computes each sample from the others in its batch, which no eval-mode reading
    of the program can undo exactly.
    """
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is _ATEN.batch_norm.default:
            if _arg(node, 5, "training", False) and _arg(node, 3, "running_mean", None) is not None:
                raise BadInputError(
                    f"{source}: the program was exported in training mode ({node.name} normalizes with the batch's "
                    "statistics); export it from model.eval() and convert that"
                )


def _restore_leaf_modules(gm: fx.GraphModule, model: nn.Module) -> None:
    """Put back each call of a module torch.fx keeps whole, where the export took it apart into ATen operators.

    Every exported node records the modules it was computed in (``nn_module_stack``). The
    nodes computed inside one call of a module :class:`LinearLeafTracer` keeps whole
    (the outermost such module on the stack) become one ``call_module`` of ``model``'s
    module under its qualified name, as torch.fx writes it: layer names, and the head
    rules that read modules (``AdaptiveAvgPool2d``, ``LayerNorm``, ``Flatten``), see
    what they see in the traced graph. A call is restored only where it read one tensor
    computed outside it and gave one tensor used outside it.
    """
    tracer = LinearLeafTracer()
    owned = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    paths: dict[str, str] = {}
    for node in gm.graph.nodes:
        for key, (path, _kind) in (node.meta.get("nn_module_stack") or {}).items():
            module = owned.get(path)
            if module is not None and path and tracer.is_leaf_module(module, path):
                calls.setdefault(key, []).append(node)
                paths[key] = path
                break
    for key, nodes in calls.items():
        inside = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        val = outputs[0].meta.get("val") if len(outputs) == 1 else None
        if len(inputs) != 1 or not isinstance(val, torch.Tensor) or _required_inputs(owned[paths[key]]) != 1:
            continue
        gm.add_submodule(paths[key], owned[paths[key]])
        with gm.graph.inserting_after(outputs[0]):
            call = gm.graph.call_module(paths[key], (next(iter(inputs)),))
        call.meta = dict(outputs[0].meta)
        outputs[0].replace_all_uses_with(call)
        for node in reversed(nodes):
            gm.graph.erase_node(node)


def _called_as_method(node: fx.Node) -> bool:
    """Whether the export recorded ``node``'s call as the Tensor method of its torch function's name (``x.flatten(1)``)."""
    called = node.meta.get("torch_fn")
    name = getattr(node.target, "__name__", None)
    return isinstance(called, tuple) and len(called) == 2 and called[1] == f"method_descriptor.{name}"


def _required_inputs(module: nn.Module) -> int | None:
    """How many arguments ``module.forward`` requires (None when its signature cannot be read)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in parameters)


def _dict_keys(program: torch.export.ExportedProgram) -> list[str] | None:
    """The keys of the dict the program returns (a ``transformers`` ModelOutput is one), or None for another output.

    The lowered module returns a dict with the same keys, so that its outputs keep the names the original's have.
    """
    spec = program.call_spec.out_spec
    if spec is None or not isinstance(spec.type, type) or not issubclass(spec.type, dict):
        return None
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs  # torch < 2.10
    if any(not child.is_leaf() for child in children):
        return None
    return [str(key) for key in spec.context]


def _expands_batch(node: fx.Node, batch: int) -> bool:
    """Whether an ``expand`` spells the traced batch size as the size of its input's first axis (``expand(y, [1, C, H, W])``).

    Written ``-1`` (keep the input's size), it computes the same at the traced batch and follows any other.
    """
    sizes = node.args[1] if len(node.args) > 1 else None
    return (
        isinstance(sizes, (list, tuple))
        and len(sizes) >= 1
        and sizes[0] == batch
        and _static_size(node.args[0], 0) == batch
        and _static_size(node, 0) == batch
    )


def _static_size(node: Any, dim: int) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if val is None or not hasattr(val, "shape") or val.dim() <= dim:
        return None
    size = val.shape[dim]
    return int(size) if isinstance(size, int) else None


def _rank(node: fx.Node) -> int | None:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return val.dim() if hasattr(val, "dim") else None


def _attr(gm: fx.GraphModule, node: Any) -> tuple[str, torch.Tensor] | None:
    """(qualified name, tensor) of a get_attr node, or None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    *path, name = str(node.target).split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    return str(node.target), getattr(owner, name)


def _owner(qualified: str, node: fx.Node) -> str:
    """Where a module built from ``qualified``'s tensors goes: its container's path, e.g. ``classifier.0``.

    Only a tensor named ``weight`` names its container; another (``attention.in_proj_weight``) belongs to a
    container that holds more than this layer, which must stay as it is.
    """
    path, _, name = qualified.rpartition(".")
    return path if path and name == "weight" else f"fcconv_{node.name}"


def _linear_from(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    weight = _attr(gm, node.args[1])
    bias = _attr(gm, _arg(node, 2, "bias", None))
    if weight is None or (bias is None and _arg(node, 2, "bias", None) is not None):
        return None
    linear = nn.Linear(weight[1].shape[1], weight[1].shape[0], bias=bias is not None, device="meta")
    linear.weight = _as_parameter(weight[1])
    if bias is not None:
        linear.bias = _as_parameter(bias[1])
    return _owner(weight[0], node), linear


def _batchnorm_from(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    tensors = [_attr(gm, node.args[i]) for i in range(1, 5)]
    if any(t is None for t in tensors):
        return None
    (qualified, weight), (_, bias), (_, mean), (_, var) = tensors  # type: ignore[misc]
    bn = nn.BatchNorm1d(weight.shape[0], eps=float(_arg(node, 7, "eps", 1e-5)), device="meta")
    bn.weight, bn.bias = _as_parameter(weight), _as_parameter(bias)
    bn.register_buffer("running_mean", mean)
    bn.register_buffer("running_var", var)
    bn.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
    return _owner(qualified, node), bn.eval()


def _layer_norm_from(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    """An ``nn.LayerNorm`` holding the node's tensors; without a weight or a bias where the node has none."""
    normalized = _arg(node, 1, "normalized_shape", None)
    given = [_arg(node, 2, "weight", None), _arg(node, 3, "bias", None)]
    weight, bias = (_attr(gm, t) for t in given)
    if not isinstance(normalized, (list, tuple)) or len(normalized) != 1:
        return None
    if any(t is not None and held is None for t, held in zip(given, (weight, bias))) or (weight is None and bias):
        return None  # a tensor computed in the graph, or a bias without a weight: no nn.LayerNorm holds it
    norm = nn.LayerNorm(int(normalized[0]), eps=float(_arg(node, 4, "eps", 1e-5)), elementwise_affine=weight is not None,
                        bias=bias is not None, device="meta")  # fmt: skip
    if weight is not None:
        norm.weight = _as_parameter(weight[1])
    if bias is not None:
        norm.bias = _as_parameter(bias[1])
    return _owner(weight[0] if weight is not None else "", node), norm


def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _as_module(gm: fx.GraphModule, node: fx.Node, built: tuple[str, nn.Module] | None) -> None:
    """Replace the call ``node`` with a call of the module ``built`` (left as it is when None)."""
    if built is None:
        return
    target, module = built
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(target, (node.args[0],))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
