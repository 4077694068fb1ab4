"""Low-rank heads (``--rank``): each fully connected layer of the converted head as two convolutions.

A fully connected layer holds most of a classifier's weights (VGG16: 89 %), and few of its singular values
carry most of its action. With ``W = U S Vᵀ`` the Linear's weight and ``U_R`` its first R left singular
vectors (from an SVD in float64), the converted k×k convolution ``M`` (``W`` folded onto the map) becomes a k×k
convolution to R channels with weight ``U_Rᵀ M`` and a 1×1 convolution back with weight ``U_R`` and the
Linear's bias. Together they compute ``U_R U_Rᵀ W``, the rank-R truncation of ``W`` (the nearest rank-R matrix),
folded as ``W`` was: R·(C·k + K) weights in place of K·C·k.

This is an approximation the user asks for, never a silent one: the model the export equals is the original
with each fully connected weight replaced by its truncation (:func:`truncated_original`), which is what
verification compares it with, and how far that model is from the original is measured at every size and
reported (:func:`deviation`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from fcconv.conversion import Conversion, FactoredLayer
from fcconv.errors import BadInputError, NotConvertibleError
from fcconv.layers import linear_as_conv
from fcconv.metadata import LOW_RANK_KEY

__all__ = ["deviation", "factor_head", "parse_rank", "recorded_truncation", "truncated_original"]

RANK_FORMS = (
    "an integer of at least 1 (the rank of every layer) or a fraction above 0 and at most 1 (the share of each "
    "layer's singular-value energy to keep, e.g. 0.99)"
)


def parse_rank(value: str | float | None) -> int | float | None:
    """``--rank``: an integer R ≥ 1, or a fraction 0 < f ≤ 1 of each layer's energy (the sum of its squared
    singular values) to keep. Written with a decimal point, it is a fraction (``1.0`` keeps every singular value)."""
    if value is None:
        return None
    text = repr(value) if isinstance(value, float) else str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        rank = int(text)
        if rank < 1:
            raise BadInputError(f"--rank {text}: a rank is at least 1; give {RANK_FORMS}")
        return rank
    try:
        share = float(text)
    except ValueError:
        raise BadInputError(f"--rank {text!r} is not a number; give {RANK_FORMS}") from None
    if not 0 < share <= 1:
        raise BadInputError(f"--rank {text}: a fraction of the energy is above 0 and at most 1; give {RANK_FORMS}")
    return share


def factor_head(conversion: Conversion, rank: int | float) -> list[FactoredLayer]:
    """Replace each fully connected layer of ``conversion.module``'s head by its rank-R factors, in place, and
    record them in ``conversion.factored``.

    An integer ``rank`` larger than a layer's smaller dimension is refused naming the layer and the ranks it
    takes; a fraction picks, per layer, the fewest singular values that keep that share of the energy.
    """
    originals = [(layer, _original_linear(conversion, layer.name)) for layer in conversion.layers]
    if isinstance(rank, int):
        for layer, linear in originals:
            smaller = min(linear.weight.shape)
            if rank > smaller:
                raise BadInputError(
                    f"--rank {rank} is above the rank of {layer.name} ({layer.before}), whose smaller dimension is "
                    f"{smaller}: give a rank from 1 to {min(min(lin.weight.shape) for _, lin in originals)}, or a "
                    "fraction of the energy"
                )
    factored = []
    for layer, linear in originals:
        conv = conversion.module.get_submodule(layer.name)
        weight = linear.weight.detach()
        out_features = weight.shape[0]
        u, energy = _left_singular_vectors(weight.double())
        kept = rank if isinstance(rank, int) else _rank_keeping(energy, rank)
        # the 1×1 layer's weight as stored (rounded to the model's dtype) defines the model: the k×k layer is
        # computed from that, so that the two layers and the truncated original are the same function
        columns = u[:, :kept].to(weight.dtype)
        folded = conv.weight.detach().reshape(out_features, -1)
        down = nn.Linear(folded.shape[1], kept, bias=False, device="meta", dtype=weight.dtype)
        down.weight = nn.Parameter((columns.double().T @ folded.double()).to(weight.dtype), requires_grad=False)
        up = nn.Linear(kept, out_features, bias=conv.bias is not None, device="meta", dtype=weight.dtype)
        up.weight = nn.Parameter(columns.contiguous(), requires_grad=False)
        if conv.bias is not None:
            up.bias = conv.bias
        kernel = tuple(conv.kernel_size)
        pair = nn.Sequential(
            linear_as_conv(down, conv.in_channels, kernel), linear_as_conv(up, kept, (1,) * len(kernel))
        )
        conversion.module.set_submodule(layer.name, pair)
        window = folded.shape[1]
        bias = out_features if conv.bias is not None else 0
        factored.append(
            FactoredLayer(
                name=layer.name,
                rank=kept,
                full_rank=min(weight.shape),
                energy=float(energy[:kept].sum() / energy.sum()) if energy.sum() > 0 else 1.0,
                parameters=out_features * window + bias,
                factored_parameters=kept * (window + out_features) + bias,
                macs=out_features * window,
                factored_macs=kept * (window + out_features),
            )
        )
    conversion.module.recompile()
    conversion.factored = factored
    return factored


def _left_singular_vectors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The left singular vectors of ``weight`` (float64), largest first, and the squared singular values.

    Only these are needed, so a wide matrix (fc6 of VGG16 is 4096 × 25088) is decomposed through its Gram matrix
    ``W Wᵀ``, whose eigenvectors they are: about 7 times faster than a full SVD here, and in float64 the kept
    directions are exact to far below a float32 weight's rounding."""
    rows, columns = weight.shape
    if rows > columns:
        u, s, _ = torch.linalg.svd(weight, full_matrices=False)
        return u, s.square()
    values, vectors = torch.linalg.eigh(weight @ weight.T)
    return vectors.flip(1), values.flip(0).clamp_min(0)


def _rank_keeping(energy: torch.Tensor, share: float) -> int:
    """The fewest leading singular values whose squares sum to at least ``share`` of all of them."""
    total = float(energy.sum())
    if total == 0:
        return 1
    cumulative = torch.cumsum(energy, 0) / total
    # a share of 1 keeps them all; otherwise the first index where the share is reached (rounding aside)
    reached = torch.nonzero(cumulative >= share - 1e-12)
    return int(reached[0]) + 1 if len(reached) else len(energy)


def _original_linear(conversion: Conversion, name: str) -> nn.Linear:
    source = conversion.source
    try:
        linear = source.get_submodule(name) if source is not None else None
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise NotConvertibleError(f"--rank: the original's {name} is not an nn.Linear whose weight fcconv can factor")
    return linear


def _truncated(columns: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` projected onto the span of ``columns`` (orthonormal, float64): ``U_R U_Rᵀ W``, in its dtype."""
    return (columns @ (columns.T @ weight.double())).to(weight.dtype)


@contextlib.contextmanager
def _lent(weights: Iterable[tuple[nn.Linear, torch.Tensor]]) -> Iterator[None]:
    """Within the block each Linear holds the given weight, as a new Parameter (never written in place: the
    original may be the checkpoint's pages); leaving puts back the very Parameters they had."""
    swapped: list[tuple[nn.Linear, nn.Parameter]] = []
    try:
        for linear, weight in weights:
            swapped.append((linear, linear.weight))
            linear.weight = nn.Parameter(weight, requires_grad=False)
        yield
    finally:
        for linear, weight in reversed(swapped):
            linear.weight = weight


@contextlib.contextmanager
def truncated_original(conversion: Conversion) -> Iterator[None]:
    """Within the block, the original's factored Linear layers (and the head that the sliding window runs, where
    it holds its own) carry their rank-R weights ``U_R U_Rᵀ W``; leaving restores the very tensors they had.
    The weights are swapped as new Parameters, never written in place (they may be the checkpoint's pages)."""
    lent = []
    for layer in conversion.factored:
        linear = _original_linear(conversion, layer.name)
        columns = conversion.module.get_submodule(layer.name)[1].weight.detach().flatten(1).double()
        truncated = _truncated(columns, linear.weight.detach())
        holders = {id(linear): linear}
        with contextlib.suppress(AttributeError):
            other = conversion.head.get_submodule(layer.name)
            if isinstance(other, nn.Linear):
                holders[id(other)] = other
        lent += [(holder, truncated) for holder in holders.values()]
    with _lent(lent):
        yield


@contextlib.contextmanager
def recorded_truncation(model: nn.Module, recorded: str | None) -> Iterator[None]:
    """Within the block, ``model``'s Linear layers that an export's ``fcconv.low_rank`` metadata (``recorded``)
    names carry their rank-R truncations, as ``fcconv verify`` compares the export with; nothing changes when
    ``recorded`` is None. The truncation is recomputed from the layer's own weight (in float64), so it agrees
    with the export's to the model dtype's rounding."""
    if recorded is None:
        yield
        return
    try:
        ranks = {str(name): int(layer["rank"]) for name, layer in json.loads(recorded).items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise BadInputError(f"the export's {LOW_RANK_KEY} metadata is not what fcconv writes") from None
    lent = []
    for name, rank in ranks.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear) or not 1 <= rank <= min(linear.weight.shape):
            raise BadInputError(
                f"the export's {LOW_RANK_KEY} metadata names {name} at rank {rank}, which the original's "
                "layers do not have: is this the export's original?"
            )
        weight = linear.weight.detach()
        lent.append((linear, _truncated(_left_singular_vectors(weight.double())[0][:, :rank], weight)))
    with _lent(lent):
        yield


def deviation(original: Any, truncated: Any) -> list[dict[str, Any]]:
    """How far the truncated original's readings are from the original's, per verification size: the largest
    absolute difference, that relative to the original's largest magnitude, and the share of positions (and
    samples) whose top class is the same. Both are :class:`~fcconv.verify.References` on the same inputs."""
    rows = []
    for exact, approximate in zip(original.cases, truncated.cases):
        max_abs, scale, same, positions = 0.0, 0.0, 0, 0
        for reading, outputs in exact.expected.items():
            for name, value in outputs.items():
                other = approximate.expected[reading][name]
                max_abs = max(max_abs, float((value - other).abs().max()))
                scale = max(scale, float(value.abs().max()))
                if value.ndim >= 2 and value.shape[1] > 1:
                    same += int((value.argmax(1) == other.argmax(1)).sum())
                    positions += math.prod(value.argmax(1).shape)
        rows.append(
            {
                "input_size": tuple(exact.input_size),
                "max_abs": max_abs,
                "max_rel": max_abs / scale if scale else 0.0,
                "top1_agreement": same / positions if positions else None,
            }
        )
    return rows
