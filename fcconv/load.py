"""Read a trained classifier from disk without running code from the file.

Checkpoints are read with ``torch.load(weights_only=True, mmap=True)``: tensors
stay memory-mapped and are assigned into a model built on the meta device, so
loading costs no copy of the weights and never modifies the file. A whole
pickled module is only unpickled when the caller passes ``trust=True``.

A checkpoint may sit beside a JSON model card of the same stem
(``digits.pt`` + ``digits.json``) naming its ``arch`` and ``input_shape``; the
flags given on the command line win over it.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcconv.errors import BadInputError

__all__ = ["LoadedModel", "build_architecture", "load_model", "parse_input_shape", "read_model_card"]

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedModel:
    """A model ready to convert, and where it came from."""

    module: nn.Module
    path: Path
    arch: str
    input_shape: tuple[int, ...]
    card: dict[str, Any] = field(default_factory=dict)


def parse_input_shape(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"3,224,224"`` -> (3, 224, 224); accepts (C, L), (C, H, W) and (C, D, H, W)."""
    if isinstance(text, (tuple, list)):
        parts = [str(p) for p in text]
    else:
        parts = [p.strip() for p in text.replace("x", ",").replace("×", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise BadInputError(f"--input-shape {text!r} is not a list of integers like 3,224,224") from None
    if not 2 <= len(shape) <= 4 or any(s <= 0 for s in shape):
        raise BadInputError(f"--input-shape {text!r} must be C,L or C,H,W or C,D,H,W with positive sizes")
    return shape


def read_model_card(path: Path) -> dict[str, Any]:
    """The JSON model card beside ``path`` (same stem, ``.json``), or {}."""
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        return {}
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{card_path}: model card is not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise BadInputError(f"{card_path}: model card is not a JSON object")
    card["_dir"] = str(card_path.parent.resolve())
    return card


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory, not a checkpoint")
    if not os.access(path, os.R_OK):
        raise BadInputError(f"{path}: permission denied")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: file is empty")


def _refused_global(message: str) -> str | None:
    """The Python global a weights-only load refused (e.g. torchvision.models.vgg.VGG), if any."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1).rstrip(".") if found else None


def _torch_load(path: Path, trust: bool) -> Any:
    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure means the file is not a checkpoint
            raise BadInputError(f"{path} is not a PyTorch checkpoint ({_one_line(exc)})") from exc
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        what = _refused_global(text)
        if what is not None:
            raise BadInputError(
                f"{path} holds a pickled {what}, not a state_dict: unpickling it would run code from the file, "
                "so it was not loaded; pass --trust if you trust its source, or save model.state_dict() instead"
            ) from None
        raise BadInputError(f"{path} is not a PyTorch checkpoint ({_one_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - truncated, corrupted or foreign files all end here
        raise BadInputError(f"{path} is not a PyTorch checkpoint ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "…") if len(text) > 200 else (text or type(exc).__name__)


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict, unwrapped from training-code containers and stripped of wrapper prefixes."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_mapping(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], (Mapping, nn.Module))), None)
            if inner is None:
                break
            obj = inner
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not obj or not _is_tensor_mapping(obj):
        raise BadInputError(f"{path} holds no state_dict of tensors")
    result = {}
    for key, value in obj.items():
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        result[key] = value
    return result


def _is_tensor_mapping(obj: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _import_callable(spec: str, search_dir: str | None) -> Any:
    module_name, _, attr = spec.partition(":")
    for directory in (os.getcwd(), search_dir):
        if directory and directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - report the import failure in one line
        raise BadInputError(f"--arch {spec}: cannot import {module_name} ({_one_line(exc)})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BadInputError(f"--arch {spec}: {module_name} has no attribute {attr}") from None


def build_architecture(arch: str, num_classes: int | None = None, *, search_dir: str | None = None) -> nn.Module:
    """Build ``arch`` on the meta device (no memory, no initialisation).

    ``arch`` is a torchvision classification model name (``vgg16``) or
    ``package.module:callable``, a class or factory taking no arguments.
    """
    import torchvision

    if ":" in arch:
        factory = _import_callable(arch, search_dir)
        try:
            with torch.device("meta"):
                model = factory()
        except Exception as exc:  # noqa: BLE001 - user code failing is bad input
            raise BadInputError(f"--arch {arch}: calling it failed ({_one_line(exc)})") from None
        if not isinstance(model, nn.Module):
            raise BadInputError(f"--arch {arch} returned {type(model).__name__}, not an nn.Module")
        return model
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise BadInputError(
            f"--arch {arch} is not a torchvision classification model (e.g. vgg16, resnet18) "
            "nor package.module:callable"
        )
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if arch in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = False
    with torch.device("meta"):
        return torchvision.models.get_model(arch, **kwargs)


def _fit_report(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """One line naming what keeps ``state`` from loading into ``model``, or None when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if mismatched:
        k = mismatched[0]
        problems.append(f"{k} is {tuple(state[k].shape)} in the file but {tuple(expected[k].shape)} in the model")
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    return "; ".join(problems) or None


def _num_classes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count the checkpoint's last layer has, where it differs from ``model``'s."""
    expected = model.state_dict()
    weights = [k for k in expected if k.endswith("weight") and k in state]
    if not weights:
        return None
    last = weights[-1]
    if state[last].shape[1:] == expected[last].shape[1:] and state[last].shape[0] != expected[last].shape[0]:
        return int(state[last].shape[0])
    return None


def load_model(
    path: str | Path,
    arch: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    *,
    trust: bool = False,
) -> LoadedModel:
    """Load the classifier at ``path`` in eval mode.

    A state_dict needs ``arch`` (from the argument or the model card); the class
    count is read from its last layer. A whole pickled module loads only with
    ``trust=True``. Every failure raises :class:`BadInputError` with one line.
    """
    path = Path(path)
    _check_readable(path)
    card = read_model_card(path)
    arch = arch or card.get("arch")
    if input_shape is None:
        input_shape = parse_input_shape(card["input_shape"]) if "input_shape" in card else (3, 224, 224)
    if path.suffix == ".onnx":
        raise BadInputError(f"{path} is an ONNX model; convert reads PyTorch checkpoints")
    obj = _torch_load(path, trust)
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), path, arch or type(obj).__name__, tuple(input_shape), card)
    state = _state_dict(obj, path)
    if not arch:
        raise BadInputError(f"{path} is a state_dict: name its architecture with --arch (e.g. --arch vgg16)")
    model = build_architecture(arch, search_dir=card.get("_dir"))
    num_classes = _num_classes(model, state)
    if num_classes is not None and ":" not in arch:
        model = build_architecture(arch, num_classes)
    problem = _fit_report(model, state)
    if problem:
        raise BadInputError(f"{path} does not fit {arch}: {problem}")
    model.load_state_dict(state, strict=True, assign=True)
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise BadInputError(f"{path} does not fit {arch}: {on_meta[0]} is not in the file")
    return LoadedModel(model.eval(), path, arch, tuple(input_shape), card)
