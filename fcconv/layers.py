"""Convolutions that came from fully connected layers.

A Linear layer read as a convolution has stride 1, no padding and one group, and
its kernel usually covers the whole feature map it was trained on. Computed as a
convolution, such a kernel is slow: the convolution routines are tuned for small
kernels over large maps, while here the map is barely larger than the kernel.
The classes below keep a plain convolution's parameters and state_dict, and
export as a plain convolution, but compute each call as the GEMM it really is:

* the map is exactly the kernel (the native size): flatten + one GEMM, as the
  original Linear did;
* a 1×1 kernel: one GEMM over all positions, reading the map as it lies in
  memory (a channels-first map as columns on CUDA, a channels-last one as rows);
* a larger kernel over a larger map: every window is copied into one row
  (``Tensor.unfold`` views and a single copy) and the rows are multiplied by the
  weight in one GEMM, when that is cheaper than the convolution; otherwise the
  convolution.

The GEMM writes its output channels-last, as rows of positions, and the layer
returns that as a channels-first view, so that a following 1×1 layer reads it as
rows without a copy. Each step is one or two tensor operations: on a GPU, where
the host issuing them sets the pace for one image, every operation counts.

All of these are the same sums as the convolution, reordered, so they agree with
it to floating-point rounding.

Every choice between the paths is a plain Python condition on sizes (no generator,
nothing read from the data), which ``torch.compile(fullgraph=True, dynamic=True)``
traces into guards on the symbolic sizes: the module compiles whole, with one graph
for the native size and one for every larger size.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

# Above this many gathered window elements (positions × kernel volume × channels)
# the unfold copy costs more than the convolution saves; measured in bench/.
UNFOLD_MAX_ELEMENTS = 64 * 512 * 7 * 7 * 8


class FullyConnectedConvMixin:
    """Forward for a stride-1, unpadded, ungrouped convolution read as a GEMM."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    kernel_size: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see module docstring
        weight, bias, kernel = self.weight, self.bias, self.kernel_size
        spatial = x.shape[2:]
        if any(d != 1 for d in self.dilation):  # a head read à trous (--stride): windows of cells `dilation` apart
            return self._dilated_forward(x, weight, bias)
        if spatial == kernel:  # the native size: as few operations as the Linear itself, for batch-1 latency
            y = F.linear(x.flatten(1), weight.flatten(1), bias)
            return y.view(*y.shape, *(1,) * len(kernel))
        rank = len(kernel)
        if len(spatial) != rank or x.dim() != rank + 2:
            return self._conv_forward(x, weight, bias)
        if math.prod(kernel) == 1:
            return pointwise_linear(x, weight, bias)
        # A plain loop, not a generator: torch.compile traces it into guards on the symbolic sizes.
        gathered = x.shape[0] * math.prod(weight.shape[1:])
        for size, k in zip(spatial, kernel):
            if size < k:  # no window fits: the convolution says so
                return self._conv_forward(x, weight, bias)
            gathered = gathered * (size - k + 1)
        if gathered > UNFOLD_MAX_ELEMENTS:
            return self._conv_forward(x, weight, bias)
        return unfold_linear(x, weight, bias)

    def _dilated_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernel, dilation = self.kernel_size, self.dilation
        if x.dim() != len(kernel) + 2:
            return self._conv_forward(x, weight, bias)
        gathered = x.shape[0] * math.prod(weight.shape[1:])
        for size, k, d in zip(x.shape[2:], kernel, dilation):
            if size < (k - 1) * d + 1:
                return self._conv_forward(x, weight, bias)
            gathered = gathered * (size - (k - 1) * d)
        if gathered > UNFOLD_MAX_ELEMENTS:
            return self._conv_forward(x, weight, bias)
        return channels_first(rows_times_weight(window_rows(x, kernel, dilation), weight, bias))


def gather_windows(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...] | None = None,
    dilation: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Every ``kernel``-sized window of ``x`` (N, C, *S), at ``stride`` (default 1), as rows; the cells of a window
    lie ``dilation`` apart (default 1).

    Returns (N, *positions, C·∏kernel), each row in (C, *kernel) order, as a
    Linear's weight over an NCHW-flattened window expects. Built from strided
    slices, so it exports to ONNX with free spatial axes.
    """
    rank = len(kernel)
    stride = stride or (1,) * rank
    dilation = dilation or (1,) * rank
    channels = x.shape[1]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    positions = [(size - span) // step + 1 for size, span, step in zip(x.shape[2:], spans, stride)]
    pieces = []
    for cell in itertools.product(*(range(k) for k in kernel)):
        offset = [c * d for c, d in zip(cell, dilation)]
        index = [slice(None), slice(None)]
        index += [slice(o, o + (p - 1) * step + 1, step) for o, p, step in zip(offset, positions, stride)]
        pieces.append(x[tuple(index)])  # (N, C, *positions): cell `offset` of every window
    stacked = torch.stack(pieces, dim=2)  # (N, C, cells, *positions)
    rows = stacked.permute(0, *range(3, 3 + rank), 1, 2)
    return rows.reshape(*rows.shape[: 1 + rank], channels * math.prod(kernel))


def window_rows(x: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...] | None = None) -> torch.Tensor:
    """Every stride-1 ``kernel``-sized window of ``x`` (N, C, *S) as a row: (N, *positions, C·∏kernel).

    The same rows as :func:`gather_windows`, made from ``Tensor.unfold`` views and
    one copy: a handful of operations instead of one slice per kernel cell.
    """
    rank = len(kernel)
    windows = x
    for axis, k in enumerate(kernel, start=2):
        span = k if dilation is None else (k - 1) * dilation[axis - 2] + 1
        windows = windows.unfold(axis, span, 1)  # (N, C, *positions, *kernel) once every axis is unfolded
    if dilation is not None and any(d != 1 for d in dilation):
        windows = windows[(Ellipsis, *(slice(None, None, d) for d in dilation))]
    rows = windows.permute(0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
    return rows.reshape(*rows.shape[: 1 + rank], -1)


def channels_first(y: torch.Tensor) -> torch.Tensor:
    """(N, *S, C) -> (N, C, *S), written with a non-negative permutation so that it exports cleanly."""
    rank = y.dim() - 2
    return y.permute(0, rank + 1, *range(1, rank + 1))


def channels_last(y: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) -> (N, *S, C), the inverse of :func:`channels_first`."""
    return y.permute(0, *range(2, y.dim()), 1)


def rows_times_weight(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, bias_after: bool | None = None
) -> torch.Tensor:
    """``rows`` (…, C·∏K) times a (O, C, *K) convolution weight, plus the bias: (…, O), as one GEMM.

    ``F.linear`` folds contiguous rows of any rank into one 2D GEMM with the bias
    fused, without further Python-side operations. The bias is added after the
    GEMM instead (``bias_after``) by default for float32 on CUDA: cuBLASLt's
    fused-bias kernel for float32 at these shapes took 1.8 times as long as the
    plain GEMM (bench/).
    """
    flat = weight.flatten(1)
    if bias_after is None:
        bias_after = rows.is_cuda and rows.dtype == torch.float32
    if bias is not None and bias_after:
        return torch.matmul(rows, flat.t()) + bias
    return F.linear(rows, flat, bias)


def unfold_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Stride-1 valid convolution of any rank as window rows times the weight in one GEMM.

    ``x`` is (N, C, *S), ``weight`` (O, C, *K); returns (N, O, *(S - K + 1)), laid out channels-last.
    """
    return channels_first(rows_times_weight(window_rows(x, tuple(weight.shape[2:])), weight, bias))


def pointwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1×1 convolution of any rank as one GEMM, reading ``x`` (N, C, *S) as it lies in memory.

    A channels-first map on CUDA is multiplied as columns (:func:`pointwise_columns`),
    which needs no transpose; otherwise the map is read as channels-last rows, a
    view when it is laid out that way (as the other layers here write their output).
    """
    if x.is_cuda and x.is_contiguous():
        return pointwise_columns(x, weight, bias)
    return channels_first(rows_times_weight(channels_last(x), weight, bias))


def pointwise_columns(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1×1 convolution of a channels-first ``x`` (N, C, *S) as weight @ (C, positions) for each image."""
    n, channels = x.shape[:2]
    columns = x.reshape(n, channels, -1)
    flat = weight.flatten(1)
    if n == 1 and bias is not None:  # one fused GEMM with the bias: fewer kernel launches at batch 1
        y = torch.addmm(bias[:, None], flat, columns[0])[None]
    else:
        y = torch.matmul(flat, columns)  # (N, O, positions)
        if bias is not None:
            y = y + bias[:, None]
    return y.view(n, weight.shape[0], *x.shape[2:])


class WindowGemm(nn.Module):
    """A fully connected convolution written as gathered windows and a GEMM, for export.

    The same function as the convolution; onnxruntime runs it as one GEMM over every
    window of the batch, reading the weight once per batch instead of once per image.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.kernel_size = tuple(conv.kernel_size)
        self.dilation = tuple(conv.dilation)
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(self.weight.shape[0], -1)
        if math.prod(self.kernel_size) > 1:
            # The same rows either way: strided slices for the ONNX graph, Tensor.unfold views elsewhere
            # (a handful of operations instead of one slice per kernel cell, for eager calls and torch.compile).
            if torch.onnx.is_in_onnx_export():
                rows = gather_windows(x, self.kernel_size, dilation=self.dilation)
            else:
                rows = window_rows(x, self.kernel_size, self.dilation)
            return channels_first(F.linear(rows, flat, self.bias))
        return channels_first(F.linear(channels_last(x), flat, self.bias))  # pointwise: no windows to gather


class FullyConnectedConv1d(FullyConnectedConvMixin, nn.Conv1d):
    """A Linear layer as a Conv1d; a Conv1d's parameters, computed as a GEMM."""


class FullyConnectedConv2d(FullyConnectedConvMixin, nn.Conv2d):
    """A Linear layer as a Conv2d; a Conv2d's parameters, computed as a GEMM."""


class FullyConnectedConv3d(FullyConnectedConvMixin, nn.Conv3d):
    """A Linear layer as a Conv3d; a Conv3d's parameters, computed as a GEMM."""


FULLY_CONNECTED_CONV: dict[int, type[nn.Module]] = {
    1: FullyConnectedConv1d,
    2: FullyConnectedConv2d,
    3: FullyConnectedConv3d,
}
PLAIN_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def linear_as_conv(linear: nn.Linear, in_channels: int, kernel: tuple[int, ...]) -> nn.Module:
    """The convolution equal to ``linear`` over a (C, *kernel) window, sharing its storage.

    The weight is a reshaped view of the Linear's (C, *kernel) flattened in C-major
    order, as NCHW flattening lays it out; the bias is the same Parameter.
    """
    out_features, in_features = linear.weight.shape
    if in_features != in_channels * math.prod(kernel):
        raise ValueError(
            f"Linear takes {in_features} features, the window holds {in_channels}×{'×'.join(map(str, kernel))}"
        )
    conv = FULLY_CONNECTED_CONV[len(kernel)](
        in_channels,
        out_features,
        kernel_size=kernel,
        bias=linear.bias is not None,
        device="meta",
        dtype=linear.weight.dtype,
    )
    weight = linear.weight.detach().reshape(out_features, in_channels, *kernel)
    conv.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        conv.bias = linear.bias
    return conv


def as_plain_conv(conv: nn.Module) -> nn.Module:
    """The same convolution as the plain torch.nn class, sharing parameters (for export)."""
    rank = len(conv.kernel_size)
    plain = PLAIN_CONV[rank](
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        device="meta",
        dtype=conv.weight.dtype,
    )
    plain.weight = conv.weight
    if conv.bias is not None:
        plain.bias = conv.bias
    return plain


class AvgPoolAtrous(nn.Module):
    """A stride-1 average pooling whose window's cells lie ``dilation`` apart (``--stride``), which
    ``nn.AvgPoolNd`` cannot express: a depthwise convolution with equal weights, zero padding counted.

    ``divisor`` replaces the window's size as the divisor where the original pooling overrode it.
    """

    def __init__(
        self, kernel_size: tuple[int, ...], dilation: tuple[int, ...], padding: tuple[int, ...], divisor: int | None
    ) -> None:
        super().__init__()
        self.kernel_size, self.dilation, self.padding = tuple(kernel_size), tuple(dilation), tuple(padding)
        self.divisor = divisor or math.prod(self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = len(self.kernel_size)
        channels = x.shape[1]
        weight = x.new_full((channels, 1, *self.kernel_size), 1.0 / self.divisor)
        conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
        return conv(x, weight, None, 1, self.padding, self.dilation, channels)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, dilation={self.dilation}, padding={self.padding}"


class ChannelLayerNorm(nn.LayerNorm):
    """A LayerNorm over the channel axis (axis 1) of (N, C, *S): the LayerNorm of each position's C vector.

    The same parameters and state_dict as ``nn.LayerNorm(C)``; on (N, C) it is that
    LayerNorm. Written with reductions over axis 1, so that it needs no permutation
    to channels-last and exports as plain ONNX arithmetic.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        mean = x.mean(1, keepdim=True)
        centred = x - mean
        y = centred * torch.rsqrt(centred.square().mean(1, keepdim=True) + self.eps)
        shape = (1, -1, *(1,) * (x.dim() - 2))
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y


def layer_norm_over_channels(norm: nn.LayerNorm) -> ChannelLayerNorm:
    """``norm`` (a LayerNorm over one axis of C features) as a :class:`ChannelLayerNorm`, sharing its parameters."""
    (channels,) = norm.normalized_shape
    out = ChannelLayerNorm(channels, eps=norm.eps, elementwise_affine=False, device="meta")
    out.elementwise_affine = norm.elementwise_affine
    out.weight, out.bias = norm.weight, norm.bias
    return out


class PointwiseConv1d(FullyConnectedConv1d):
    """A Linear that acted on each position of a channels-last (N, L, C) map, now a 1-wide Conv1d on (N, C, L)."""


class PointwiseConv2d(FullyConnectedConv2d):
    """A Linear that acted on each position of a channels-last map, now a 1×1 Conv2d on the channels-first map."""


class PointwiseConv3d(FullyConnectedConv3d):
    """A Linear that acted on each position of a channels-last (N, D, H, W, C) map, now a 1×1×1 Conv3d."""


POINTWISE_CONV: dict[int, type[nn.Module]] = {1: PointwiseConv1d, 2: PointwiseConv2d, 3: PointwiseConv3d}


class ChannelsLastPointwiseMixin:
    """Forward for a Linear over the last axis of a channels-last (N, *S, C) map, held as a pointwise convolution.

    It computes the Linear's GEMM in PyTorch, and exports as Transpose → Conv →
    Transpose, so the ONNX graph holds a Conv, not a MatMul, for it.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    kernel_size: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see class docstring
        if torch.onnx.is_in_onnx_export() and x.dim() == len(self.kernel_size) + 2:
            return channels_last(self._conv_forward(channels_first(x), self.weight, self.bias))
        return F.linear(x, self.weight.reshape(self.weight.shape[0], -1), self.bias)


class ChannelsLastPointwiseConv1d(ChannelsLastPointwiseMixin, nn.Conv1d):
    """A Linear over the last axis of a channels-last (N, L, C) map, held as a 1-wide Conv1d (a Conv1d's state_dict)."""


class ChannelsLastPointwiseConv2d(ChannelsLastPointwiseMixin, nn.Conv2d):
    """A Linear over the last axis of a channels-last (N, H, W, C) map, held as a 1×1 Conv2d (a Conv2d's state_dict)."""


class ChannelsLastPointwiseConv3d(ChannelsLastPointwiseMixin, nn.Conv3d):
    """A Linear over the last axis of a channels-last (N, D, H, W, C) map, held as a 1×1×1 Conv3d."""


CHANNELS_LAST_POINTWISE_CONV: dict[int, type[nn.Module]] = {
    1: ChannelsLastPointwiseConv1d,
    2: ChannelsLastPointwiseConv2d,
    3: ChannelsLastPointwiseConv3d,
}


def pointwise_conv(linear: nn.Linear, *, channels_last: bool, rank: int = 2) -> nn.Module:
    """``linear`` as a pointwise convolution of ``rank`` sharing its storage: on the channels-first map, or on the
    channels-last one."""
    cls = (CHANNELS_LAST_POINTWISE_CONV if channels_last else POINTWISE_CONV)[rank]
    conv = cls(
        linear.in_features,
        linear.out_features,
        kernel_size=(1,) * rank,
        bias=linear.bias is not None,
        device="meta",
        dtype=linear.weight.dtype,
    )
    conv.weight = nn.Parameter(
        linear.weight.detach().reshape(linear.out_features, linear.in_features, *(1,) * rank),
        requires_grad=linear.weight.requires_grad,
    )
    if linear.bias is not None:
        conv.bias = linear.bias
    return conv
