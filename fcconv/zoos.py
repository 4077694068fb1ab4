"""Architectures from the model zoos: timm's models and Hugging Face ``transformers`` classifiers, built on the meta device.

``--arch timm:NAME`` builds timm's model NAME with the checkpoint's class count, ``--arch
hf:CLASS`` a ``transformers`` class from the ``config.json`` beside the weights (local files
only). Each package is imported only when named. Also the meta-device building both
:mod:`fcconv.load` and the zoos use.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcconv.errors import BadInputError, reason
from fcconv.files import read_json_object
from fcconv.sizes import parse_input_shape

__all__ = [
    "HF_WEIGHTS", "ZOOS", "build_zoo_model", "exit_text", "hf_architecture_beside", "parameters_on_meta",
    "timm_architecture_recorded", "zoo_input_shape", "zoo_prefix",
]  # fmt: skip


def exit_text(exc: SystemExit) -> str:
    return f"sys.exit({exc.code!r})"


# The packages of architectures a model card may name without --trust: building one of their
# models runs only the package's own code. Any other callable (builtins:input, os:fork) is code
# the card chose to run.
@contextlib.contextmanager
def parameters_on_meta(buffers: bool = True) -> Iterator[None]:
    """Build modules with each parameter, and each buffer unless ``buffers`` is False, moved to meta as registered."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer_on_meta(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter = parameter_on_meta  # type: ignore[method-assign]
    if buffers:
        nn.Module.register_buffer = buffer_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]


ZOOS = {"timm": "timm", "hf": "transformers"}

# The weights files of a Hugging Face model folder, beside its config.json.
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def zoo_prefix(arch: str) -> tuple[str, str] | None:
    """``("timm", NAME)`` or ``("hf", CLASS)`` when ``arch`` names a model zoo's architecture, else None."""
    prefix, colon, name = arch.partition(":")
    return (prefix, name) if colon and prefix in ZOOS else None


def _importzoo_prefix(prefix: str, arch: str) -> Any:
    """The zoo's package, imported only when an architecture names it: neither is a dependency of fcconv."""
    package = ZOOS[prefix]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise BadInputError(f"--arch {arch} needs the {package} package, which is not installed") from None
    except Exception as exc:  # noqa: BLE001 - a broken installation is reported in one line
        raise BadInputError(f"--arch {arch}: cannot import {package} ({reason(exc)})") from None


def build_zoo_model(
    arch: str, num_classes: int | None, config_dir: str | Path | None, building: Any, real_buffers: bool
) -> nn.Module:
    """Build a timm model (``num_classes`` from the checkpoint) or a transformers class from its config.json."""
    prefix, name = zoo_prefix(arch)  # type: ignore[misc]
    if prefix == "timm":
        timm = _importzoo_prefix(prefix, arch)
        if not name or not timm.is_model(name):
            raise BadInputError(f"--arch {arch}: timm has no model {name!r}{_close_timm_names(timm, name)}")
        kwargs: dict[str, Any] = {"pretrained": False}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return _built(arch, building, real_buffers, lambda: timm.create_model(name, **kwargs))
    transformers = _importzoo_prefix(prefix, arch)
    try:
        cls = getattr(transformers, name, None) if name.isidentifier() else None
    except Exception:  # noqa: BLE001 - a class whose own dependencies are missing
        cls = None
    if not (
        isinstance(cls, type)
        and issubclass(cls, transformers.PreTrainedModel)
        and getattr(cls, "config_class", None) is not None
    ):
        raise BadInputError(
            f"--arch {arch}: transformers has no model class {name!r} (hf: names one, e.g. ResNetForImageClassification)"
        )
    config = _hf_config(arch, cls, config_dir)
    return _built(arch, building, real_buffers, lambda: cls(config))


def _close_timm_names(timm: Any, name: str) -> str:
    """`` (close: a, b)`` naming timm's models like ``name``, or where to find their names."""
    close = timm.list_models(f"*{name}*")[:5] if name else []
    close = close or difflib.get_close_matches(name, timm.list_models(), n=5)
    return f" (close: {', '.join(close)})" if close else " (timm.list_models() names them)"


def _hf_config(arch: str, cls: type, config_dir: str | Path | None) -> Any:
    """``cls``'s configuration read from the config.json in ``config_dir``: local files only, nothing downloaded."""
    if config_dir is None:
        raise BadInputError(f"--arch {arch} is built from the config.json beside its weights; no folder was given")
    path = Path(config_dir) / "config.json"
    if not path.is_file():
        raise BadInputError(f"--arch {arch}: no {path} beside the weights (a Hugging Face model is built from it)")
    values = read_json_object(path, "model configuration")
    config_class = cls.config_class  # type: ignore[attr-defined]
    expected, found = getattr(config_class, "model_type", ""), values.get("model_type")
    if expected and found and found != expected:
        raise BadInputError(f"{path} configures a {found} model, not the {expected} model {cls.__name__} is")
    try:
        return config_class.from_dict(values)
    except Exception as exc:  # noqa: BLE001 - a configuration its class refuses
        raise BadInputError(f"{path} is not a configuration of {cls.__name__} ({reason(exc)})") from None


def _built(arch: str, building: Any, real_buffers: bool, make: Any) -> nn.Module:
    """``make()`` on the meta device, or with real buffers where its constructor computes with them."""
    try:
        try:
            with building():
                return make()
        except (NotImplementedError, RuntimeError):  # computing with a meta tensor's values (.item(), .tolist())
            with parameters_on_meta(buffers=not real_buffers):
                return make()
    except SystemExit as exc:
        raise BadInputError(f"--arch {arch}: building it tried to end the process ({exit_text(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - the zoo refusing its own arguments is bad input
        raise BadInputError(f"--arch {arch}: building it failed ({reason(exc)})") from None


def hf_architecture_beside(path: Path) -> str | None:
    """``hf:CLASS`` when ``path`` is a Hugging Face folder's weights and its config.json names one image classifier."""
    config = path.parent / "config.json"
    if path.name not in HF_WEIGHTS or not config.is_file():
        return None
    try:
        names = read_json_object(config, "model configuration").get("architectures")
    except BadInputError:
        return None
    if isinstance(names, list) and len(names) == 1 and isinstance(names[0], str):
        if names[0].isidentifier() and names[0].endswith("ForImageClassification"):
            return f"hf:{names[0]}"
    return None


def timm_architecture_recorded(obj: Any) -> str | None:
    """``timm:NAME`` where a checkpoint records the timm model it was trained as: timm's training script saves
    ``{"arch": NAME, "state_dict": ..., "args": ...}``. Only a name timm knows counts, and only with timm installed."""
    name = obj.get("arch") if isinstance(obj, Mapping) else None
    if not isinstance(name, str) or not name or not isinstance(obj.get("state_dict"), Mapping):
        return None
    try:
        import timm
    except ImportError:
        return None
    return f"timm:{name}" if timm.is_model(name) else None


def zoo_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The input size a timm model's pretrained configuration or a Hugging Face configuration gives, or None."""
    size: Any = None
    pretrained = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained, Mapping):
        size = pretrained.get("input_size")
    config = getattr(model, "config", None)
    if size is None and config is not None:
        side = getattr(config, "image_size", None)
        side = (side, side) if isinstance(side, int) else side
        if isinstance(side, (list, tuple)) and len(side) == 2:
            size = (getattr(config, "num_channels", 3), *side)
    if not isinstance(size, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
        return None
    try:
        return parse_input_shape(list(size))
    except BadInputError:  # a configuration's size no input can have: the default stands
        return None
