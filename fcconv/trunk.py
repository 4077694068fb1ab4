"""Trunk functions rewritten so that an export with free height and width computes what PyTorch computes.

Some trunks decide with Python code, from the size of the map they are given, what
to compute. PyTorch runs that code at every size; an ONNX export records the
decision taken at the size it was traced at and replays it at every other size.
The functions here compute the same values as the originals at every size, with
each such decision written as tensor arithmetic that the export keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["shifted_window_attention", "size_dependent_functions", "size_generic_replacements"]


def _roll_index(size: Any, shift: Any, device: torch.device) -> Tensor:
    """Indices that read a length-``size`` axis rolled back by ``shift`` (0 ≤ shift < size):
    ``out[i] = x[(i + shift) % size]``, the remainder written as a comparison, which ONNX export keeps for a
    symbolic ``size``."""
    index = torch.arange(size, device=device) + shift
    return torch.where(index >= size, index - size, index)


def _window_regions(size: Any, window: int, shift: Any, device: torch.device) -> Tensor:
    """Region of each cell of a padded axis for the shifted-window mask: 0, 1 or 2 (Swin's three slices).

    With no shift the last window is region 1 and every other cell region 0, so that
    no window mixes regions and the mask is zero everywhere.
    """
    cells = torch.arange(size, device=device)
    return (cells >= size - window).long() + (cells >= size - shift).long()


def _shift_where_longer(shift: int, padded: Any, window: int) -> Any:
    """``shift`` where the padded axis is longer than the window, else 0, as a value that tracing keeps.

    A traced size (a tensor) gives a tensor; a symbolic size of ``torch.export`` gives a symbolic choice, as its
    Python truth value would fix the choice made at the traced size.
    """
    if isinstance(padded, torch.SymInt):
        return torch.sym_ite(padded > window, shift, 0)
    return shift * (padded > window)


def shifted_window_attention(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Tensor | None = None,
    proj_bias: Tensor | None = None,
    logit_scale: Tensor | None = None,
    training: bool = True,
) -> Tensor:
    """torchvision's Swin window attention, with its size-dependent choices written as tensor arithmetic.

    torchvision disables the shift along an axis whose padded map is no longer than
    the window (at 224×224 the last stage's 7×7 map), rolls with ``torch.roll`` and
    builds the mask only when shifting. Here the shift is multiplied by that test,
    the roll is an index gather and the mask is always added (zero when there is no
    shift): the same values at every size, and an export that keeps the test.
    """
    batch, height, width, channels = input.shape
    wh, ww = window_size
    pad_r = (ww - width % ww) % ww
    pad_b = (wh - height % wh) % wh
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift_h = _shift_where_longer(shift_size[0], pad_h, wh)
    shift_w = _shift_where_longer(shift_size[1], pad_w, ww)
    device = x.device

    # cyclic shift, as a gather
    x = x.index_select(1, _roll_index(pad_h, shift_h, device)).index_select(2, _roll_index(pad_w, shift_w, device))

    # partition windows
    num_windows = (pad_h // wh) * (pad_w // ww)
    x = x.view(batch, pad_h // wh, wh, pad_w // ww, ww, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * num_windows, wh * ww, channels)

    # multi-head attention
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, channels // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        attn = attn * logit_scale
    else:
        q = q * (channels // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias

    # the shifted windows' mask (all zero without a shift)
    regions = _window_regions(pad_h, wh, shift_h, device).unsqueeze(1) * 3 + _window_regions(
        pad_w, ww, shift_w, device
    ).unsqueeze(0)
    attn_mask = regions.to(x.dtype).view(pad_h // wh, wh, pad_w // ww, ww)
    attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, wh * ww)
    attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
    attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
    attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
    attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
    attn = attn.view(-1, num_heads, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), channels)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)

    # reverse windows
    x = x.view(batch, pad_h // wh, pad_w // ww, wh, ww, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)

    # reverse cyclic shift
    x = x.index_select(1, _roll_index(pad_h, pad_h - shift_h, device))
    x = x.index_select(2, _roll_index(pad_w, pad_w - shift_w, device))

    # unpad features
    return x[:, :height, :width, :].contiguous()


def size_generic_replacements() -> dict[Callable[..., Any], Callable[..., Any]]:
    """Functions a traced trunk may call, each with the function here that replaces it."""
    from torchvision.models import swin_transformer

    return {swin_transformer.shifted_window_attention: shifted_window_attention}


def size_dependent_functions() -> dict[Callable[..., Any], str]:
    """Functions a traced trunk may call that choose what to compute from the map's size, with no replacement here.

    Each maps to the end of the sentence that refuses the model: what the function
    decides and why that keeps the model from converting.
    """
    from torchvision.models.video import swin_transformer as swin3d

    return {
        swin3d.shifted_window_attention_3d: (
            "whose window and shift are chosen in Python from the size of the map (torchvision's "
            "_get_window_and_shift_size shrinks the window to an axis no longer than it and drops the shift there, "
            "editing its list arguments, which a traced graph holds immutable); a traced or exported graph keeps the "
            "choice made at one size, and fcconv has a size-generic form of the 2D Swin's window attention but not "
            "of this 3D one, so the model is not converted"
        ),
    }
