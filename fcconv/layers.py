"""Convolutions that came from fully connected layers.

A Linear layer read as a convolution has stride 1, no padding and one group, and
its kernel usually covers the whole feature map it was trained on. Computed as a
convolution, such a kernel is slow: the convolution routines are tuned for small
kernels over large maps, while here the map is barely larger than the kernel.
The classes below keep a plain convolution's parameters and state_dict, and
export as a plain convolution, but compute each call as the GEMM it really is:

* the map is exactly the kernel (the native size): flatten + one GEMM, as the
  original Linear did;
* a 1×1 kernel: one GEMM over all positions in channels-last order;
* a larger kernel over a larger map: the windows are gathered (unfold) and
  multiplied by the weight in one GEMM, when that is cheaper than the
  convolution; otherwise the convolution.

How the windows are gathered depends on the device. On the CPU, strided slices
of the map are stacked into rows. On CUDA, where each of those slices is a
kernel launch that costs more than its copy, a 2D map is gathered by one im2col
kernel (``F.unfold``) and the weight multiplies the columns directly, which
gives the channels-first output without a transpose; a 1×1 kernel needs no
gathering there at all.

All three are the same sums as the convolution, reordered, so they agree with it
to floating-point rounding.
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
        if spatial == kernel:  # the native size: as few operations as the Linear itself, for batch-1 latency
            y = F.linear(x.flatten(1), weight.flatten(1), bias)
            return y.view(*y.shape, *(1,) * len(kernel))
        rank = len(kernel)
        if len(spatial) != rank or x.dim() != rank + 2:
            return self._conv_forward(x, weight, bias)
        pointwise = math.prod(kernel) == 1
        if pointwise and x.is_cuda:
            return im2col_linear(x, weight, bias)
        if pointwise:
            y = F.linear(x.movedim(1, -1), weight.reshape(weight.shape[0], -1), bias)
            return y.movedim(-1, 1)
        positions = math.prod(s - k + 1 for s, k in zip(spatial, kernel))
        if positions <= 0:
            return self._conv_forward(x, weight, bias)
        gathered = x.shape[0] * positions * weight[0].numel()
        if gathered > UNFOLD_MAX_ELEMENTS:
            return self._conv_forward(x, weight, bias)
        if x.is_cuda and rank == 2:
            return im2col_linear(x, weight, bias)
        return unfold_linear(x, weight, bias)


def gather_windows(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...] | None = None) -> torch.Tensor:
    """Every ``kernel``-sized window of ``x`` (N, C, *S), at ``stride`` (default 1), as rows.

    Returns (N, *positions, C·∏kernel), each row in (C, *kernel) order, as a
    Linear's weight over an NCHW-flattened window expects. Built from strided
    slices, so it exports to ONNX with free spatial axes.
    """
    rank = len(kernel)
    stride = stride or (1,) * rank
    channels = x.shape[1]
    positions = [(size - k) // step + 1 for size, k, step in zip(x.shape[2:], kernel, stride)]
    pieces = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None), slice(None)]
        index += [slice(o, o + (p - 1) * step + 1, step) for o, p, step in zip(offset, positions, stride)]
        pieces.append(x[tuple(index)])  # (N, C, *positions): cell `offset` of every window
    stacked = torch.stack(pieces, dim=2)  # (N, C, cells, *positions)
    rows = stacked.permute(0, *range(3, 3 + rank), 1, 2)
    return rows.reshape(*rows.shape[: 1 + rank], channels * math.prod(kernel))


def channels_first(y: torch.Tensor) -> torch.Tensor:
    """(N, *S, C) -> (N, C, *S), written with a non-negative permutation so that it exports cleanly."""
    rank = y.dim() - 2
    return y.permute(0, rank + 1, *range(1, rank + 1))


def channels_last(y: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) -> (N, *S, C), the inverse of :func:`channels_first`."""
    return y.permute(0, *range(2, y.dim()), 1)


def unfold_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Stride-1 valid convolution of any rank as window gathering plus one GEMM over all windows.

    ``x`` is (N, C, *S), ``weight`` (O, C, *K); returns (N, O, *(S - K + 1)).
    """
    rows = gather_windows(x, tuple(weight.shape[2:]))
    return channels_first(F.linear(rows, weight.reshape(weight.shape[0], -1), bias))


def im2col_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Stride-1 valid convolution as im2col columns times the weight: (N, O, *(S - K + 1)).

    A 1×1 kernel of any rank reads the map itself as columns; a larger kernel needs
    a 2D map, gathered by ``F.unfold`` in the (C, kh, kw) order of the weight.
    """
    kernel = tuple(weight.shape[2:])
    n, channels = x.shape[:2]
    if math.prod(kernel) == 1:
        columns = x.reshape(n, channels, -1)
    else:
        columns = F.unfold(x, kernel)  # (N, C·kh·kw, positions)
    flat = weight.reshape(weight.shape[0], -1)
    if n == 1 and bias is not None:  # one fused GEMM with the bias: fewer kernel launches at batch 1
        y = torch.addmm(bias[:, None], flat, columns[0])[None]
    else:
        y = torch.matmul(flat, columns)  # (N, O, positions)
        if bias is not None:
            y = y + bias[:, None]
    return y.reshape(n, weight.shape[0], *(s - k + 1 for s, k in zip(x.shape[2:], kernel)))


class WindowGemm(nn.Module):
    """A fully connected convolution written as gathered windows and a GEMM, for export.

    The same function as the convolution; onnxruntime runs it as one GEMM over every
    window of the batch, reading the weight once per batch instead of once per image.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.kernel_size = tuple(conv.kernel_size)
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if math.prod(self.kernel_size) > 1:
            return unfold_linear(x, self.weight, self.bias)
        rows = x.permute(0, *range(2, x.dim()), 1)  # pointwise: no windows to gather
        return channels_first(F.linear(rows, self.weight.reshape(self.weight.shape[0], -1), self.bias))


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
        bias=conv.bias is not None,
        device="meta",
        dtype=conv.weight.dtype,
    )
    plain.weight = conv.weight
    if conv.bias is not None:
        plain.bias = conv.bias
    return plain


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
