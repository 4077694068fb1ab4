"""Read a trained classifier from disk without running code from the file.

A checkpoint is a state_dict (``torch.save``, possibly wrapped the way training code
saves it), a safetensors file, an ExportedProgram (``torch.export.save``, ``.pt2``) or,
only when the caller trusts it, a whole pickled module. State_dicts are read with
``torch.load(weights_only=True, mmap=True)``: tensors stay memory-mapped and are
assigned into a model built on the meta device, so loading costs no copy of the
weights and never modifies the file. Loading asks what ``load_state_dict(strict=True)``
asks: the module versions ``torch.save`` records are kept, and non-persistent buffers,
which no state_dict holds, come from the architecture's constructor. Their architecture
is named by the caller, by a JSON model card of the same stem beside the file
(``digits.pt`` + ``digits.json``, with ``arch`` and ``input_shape``), by the
``config.json`` of a Hugging Face folder (``model.safetensors`` or ``pytorch_model.bin``
beside it, naming one ``...ForImageClassification``), or detected by matching keys and
shapes against torchvision's classifiers (GoogLeNet and Inception v3 with or without
their auxiliary classifiers).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import json
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcconv.archive import load_exported_program, refused_global
from fcconv.errors import BadInputError, reason
from fcconv.files import check_archive_sizes, check_readable, file_format, read_model_card
from fcconv.sizes import check_tensor_size, parse_input_shape
from fcconv.zoos import (
    ZOOS,
    build_zoo_model,
    exit_text,
    hf_architecture_beside,
    parameters_on_meta,
    timm_architecture_recorded,
    zoo_input_shape,
    zoo_prefix,
)

__all__ = [
    "LoadedModel",
    "build_architecture",
    "card_architecture_refusal",
    "check_readable",
    "check_tensor_size",
    "code_beside",
    "detect_architecture",
    "load_model",
    "native_input_shape",
    "parse_input_shape",
    "read_model_card",
    "torchvision_classifier_names",
    "torchvision_signatures",
]

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
    detected: bool = False  # the architecture was found by matching the state_dict against torchvision's

    @property
    def dtype(self) -> torch.dtype:
        params = [p for p in self.module.parameters() if p.is_floating_point()]
        return params[0].dtype if params else torch.float32


def _torch_load(path: Path, trust: bool) -> Any:
    mmap = zipfile.is_zipfile(path)
    if mmap:  # trusted or not: a zip bomb is no checkpoint
        check_archive_sizes(path, path)
    if trust:
        try:
            # a trusted pickle's classes are found where --arch finds its module: the working directory first
            with _importable_from([os.getcwd()]):
                return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure means the file is not a checkpoint
            raise BadInputError(f"{path} is not a PyTorch checkpoint ({reason(exc)})") from exc
    try:
        # a training script's arguments (timm's saves them beside the weights) are a plain bag of values
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        what = refused_global(text)
        if what is not None:
            raise BadInputError(
                f"{path} holds a pickled {what}, not a state_dict: unpickling it would run code from the file, "
                "so it was not loaded; pass --trust if you trust its source, or save model.state_dict() instead"
            ) from None
        raise BadInputError(f"{path} is not a PyTorch checkpoint ({reason(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - truncated, corrupted or foreign files all end here
        raise BadInputError(f"{path} is not a PyTorch checkpoint ({reason(exc)})") from None


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict, unwrapped from training-code containers and stripped of wrapper prefixes.

    The module versions ``torch.save`` keeps beside the tensors (the ``_metadata`` of the
    state_dict) are kept too, under the same stripped names: modules read them on loading
    (MNASNet's stem depends on its version).
    """
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
    result = OrderedDict((_strip_prefixes(key), value) for key, value in obj.items())
    metadata = getattr(obj, "_metadata", None)
    if isinstance(metadata, Mapping):
        # a module's entry is named by its prefix without the final dot ("" for the root); a wrapper's
        # own entry ("module" stripped to "") gives way to the wrapped model's
        kept: dict[str, Any] = {}
        for stripped in (False, True):
            for name, value in metadata.items():
                if isinstance(name, str) and isinstance(value, Mapping):
                    key = _strip_prefixes(name + ".").removesuffix(".") if name else ""
                    if (key != name) == stripped:
                        kept[key] = dict(value)
        result._metadata = kept  # type: ignore[attr-defined]
    return result


def _strip_prefixes(key: str) -> str:
    for prefix in PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _is_tensor_mapping(obj: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _put_first_on_path(directories: Sequence[str]) -> list[str]:
    """Put ``directories`` first on ``sys.path`` (those not on it already); returns the ones added."""
    added = []
    for directory in directories:
        if directory not in sys.path:
            sys.path.insert(0, directory)
            added.append(directory)
    return added


@contextlib.contextmanager
def _importable_from(directories: Sequence[str]) -> Iterator[None]:
    """Modules in ``directories`` are found first, as ``--arch`` finds them, for the block only."""
    added = _put_first_on_path(directories)
    try:
        yield
    finally:
        for directory in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(directory)


def _import_callable(spec: str, search_dirs: Sequence[str]) -> Any:
    module_name, _, attr = spec.partition(":")
    _put_first_on_path(search_dirs)
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:
        raise BadInputError(
            f"--arch {spec}: importing {module_name} tried to end the process ({exit_text(exc)})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - report the import failure in one line
        raise BadInputError(f"--arch {spec}: cannot import {module_name} ({reason(exc)})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BadInputError(f"--arch {spec}: {module_name} has no attribute {attr}") from None


ARCHITECTURE_PACKAGES = ("torchvision.models", "timm", "fcconv.samples")


def card_architecture_refusal(spec: str, card_path: Path, folders: Sequence[str | Path]) -> str | None:
    """Why the model card at ``card_path`` may not name ``spec`` (``module:callable``) without trust, or None.

    A card may name an architecture of :data:`ARCHITECTURE_PACKAGES` or of a model zoo
    (``timm:NAME``, ``hf:CLASS``), unless the module would be found in one of ``folders``
    (the checkpoint's, the working directory) instead of where it is installed. Nothing is
    imported to find out.
    """
    zoo = zoo_prefix(spec)
    shipped = code_beside(f"{ZOOS[zoo[0]]}:" if zoo else spec, folders)
    if shipped is not None:
        return f"{card_path} names Python code as the architecture ({spec}): building it would run {shipped}"
    if zoo:
        return None
    module = spec.partition(":")[0]
    if not any(module == package or module.startswith(package + ".") for package in ARCHITECTURE_PACKAGES):
        return (
            f"{card_path} names Python code as the architecture ({spec}), not a torchvision or timm "
            "architecture: calling it could do anything"
        )
    return None


def code_beside(spec: str, folders: Sequence[str | Path]) -> Path | None:
    """The file in one of ``folders`` that importing ``spec``'s module would run, or None.

    Code already imported (fcconv itself, torch, the standard library) is not looked for
    again; a module found in the checkpoint's folder or the working directory came with
    the files.
    """
    top = spec.partition(":")[0].split(".")[0]
    if not top or top in sys.modules:
        return None
    for folder in folders:
        found = importlib.machinery.PathFinder.find_spec(top, [str(folder)])
        if found is not None:
            return Path(found.origin) if found.origin else Path(folder) / top
    return None


# The model zoos an architecture is named in by prefix, before package.module:callable is considered:
# ``timm:NAME`` is timm's model NAME, ``hf:CLASS`` a transformers class built from the config.json beside the
# weights. (A module of the working directory named timm or hf is not what these name.)
def build_architecture(
    arch: str,
    num_classes: int | None = None,
    *,
    search_dirs: Sequence[str] | None = None,
    aux_logits: bool = False,
    real_buffers: bool = False,
    config_dir: str | Path | None = None,
) -> nn.Module:
    """Build ``arch`` on the meta device (no memory, no initialisation).

    ``arch`` is a torchvision classification model name (``vgg16``, or a video
    classifier such as ``r3d_18``), ``timm:NAME`` (timm's model NAME, with
    ``num_classes``), ``hf:CLASS`` (a transformers class, built from the
    ``config.json`` in ``config_dir``) or ``package.module:callable``, a class or
    factory taking no arguments, imported with ``search_dirs`` (default: the working
    directory) put first on ``sys.path``. ``aux_logits`` builds GoogLeNet and
    Inception v3 with their auxiliary classifiers (idle in eval mode). With
    ``real_buffers`` only the parameters are on the meta device: the buffers hold
    what the constructor computes, as the non-persistent ones, which no state_dict
    holds, must.
    """
    import torchvision

    def building() -> contextlib.AbstractContextManager:
        return parameters_on_meta(buffers=False) if real_buffers else torch.device("meta")

    if zoo_prefix(arch):
        return build_zoo_model(arch, num_classes, config_dir, building, real_buffers)
    if ":" in arch:
        factory = _import_callable(arch, [os.getcwd()] if search_dirs is None else search_dirs)
        try:
            with building():
                model = factory()
        except SystemExit as exc:
            raise BadInputError(f"--arch {arch}: calling it tried to end the process ({exit_text(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - user code failing is bad input
            raise BadInputError(f"--arch {arch}: calling it failed ({reason(exc)})") from None
        if not isinstance(model, nn.Module):
            raise BadInputError(f"--arch {arch} returned {type(model).__name__}, not an nn.Module")
        _refuse_deep_nesting(model, f"--arch {arch}")
        return model
    if arch not in torchvision_classifier_names():
        raise BadInputError(
            f"--arch {arch} is not a torchvision classification model (e.g. vgg16, resnet18, r3d_18) "
            "nor timm:NAME, hf:CLASS or package.module:callable"
        )
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if arch in AUX_HEADS:
        kwargs["aux_logits"] = aux_logits
        kwargs["init_weights"] = False
    try:
        with building():
            return torchvision.models.get_model(arch, **kwargs)
    except NotImplementedError:  # builders that compute their widths with tensors (RegNet) need real ones
        with parameters_on_meta(buffers=not real_buffers):
            return torchvision.models.get_model(arch, **kwargs)


# The torchvision classifiers that torchvision builds with auxiliary classifiers unless told otherwise
# (weights=None), and the prefixes of their keys: a checkpoint trained from scratch holds them.
AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _aux_keys(arch: str, keys: Iterable[str]) -> set[str]:
    """The keys among ``keys`` that belong to ``arch``'s auxiliary classifiers, if it has any."""
    prefixes = AUX_HEADS.get(arch, ())
    return {k for k in keys if k.startswith(prefixes)} if prefixes else set()


def torchvision_classifier_names() -> list[str]:
    """torchvision's image classifiers (``torchvision.models``) and video classifiers (``torchvision.models.video``)."""
    import torchvision

    models = torchvision.models
    return [*models.list_models(module=models), *models.list_models(module=models.video)]


# The Kinetics-400 weights of torchvision's video ResNets and MViTs were evaluated on 16-frame clips;
# their metadata gives the frame size only.
CLIP_FRAMES = 16


def native_input_shape(arch: str) -> tuple[int, ...] | None:
    """The input size torchvision's weights for ``arch`` were trained at (their crop size), or None.

    An image classifier's is (3, H, W); a video classifier's (3, T, H, W), with T the
    16 frames its weights were evaluated on, or more where its weights need more.
    """
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch)
    except Exception:  # noqa: BLE001 - not a torchvision model name
        return None
    # The smallest: larger crops belong to weights that also change the architecture (vit_h_14's
    # 518×518 SWAG weights come with a larger position embedding than the model built without them).
    crops = [getattr(w.transforms, "keywords", {}).get("crop_size") for w in weights]
    if arch in torchvision.models.list_models(module=torchvision.models.video):
        frames = max([CLIP_FRAMES, *(w.meta.get("min_temporal_size", 1) for w in weights)])
        sides = [tuple(c) for c in crops if isinstance(c, (tuple, list)) and len(c) == 2]
        return (3, frames, *min(sides)) if sides else None
    crops = [c for c in crops if isinstance(c, int)]
    return (3, min(crops), min(crops)) if crops else None


def _cache_dir() -> Path:
    base = os.environ.get("FCCONV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fcconv"
    )
    return Path(base)


def torchvision_signatures() -> dict[str, dict[str, list[int]]]:
    """Every torchvision classifier's state_dict (image and video) as {arch: {key: shape}}, at its default class count.

    Building all of them takes tens of seconds, so the table is kept in the cache folder
    (``$FCCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/fcconv`` or ``~/.cache/fcconv``), one
    file per torchvision version; where that folder cannot be written it is rebuilt.
    """
    import torchvision

    # named apart from the tables of earlier fcconv versions, which held the image classifiers only
    cache = _cache_dir() / f"torchvision-{torchvision.__version__}-image-and-video-classifiers.json"
    with contextlib.suppress(OSError, ValueError):
        table = json.loads(cache.read_text())
        if isinstance(table, dict) and table:
            return table
    table = {}
    for arch in torchvision_classifier_names():
        model = build_architecture(arch)
        table[arch] = {key: list(t.shape) for key, t in model.state_dict().items()}
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        staged = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        staged.write_text(json.dumps(table))
        os.replace(staged, cache)
    return table


def detect_architecture(state: Mapping[str, torch.Tensor], path: Path) -> str:
    """The torchvision classifier whose state_dict ``state`` is, with any class count.

    A state_dict fits an architecture when it has the same keys and every tensor the
    same shape, except the class count of the last layer; the keys of GoogLeNet's and
    Inception v3's auxiliary classifiers (:data:`AUX_HEADS`) are not compared here,
    :func:`load_model` builds them and checks them. Several fits or none raise
    :class:`BadInputError` naming the candidates, or the closest one and where it differs.
    """
    fits: list[str] = []
    closest: tuple[float, str, str] | None = None
    for arch, expected in torchvision_signatures().items():
        # a checkpoint trained from scratch holds the auxiliary classifiers the table leaves out; load_model
        # builds them and requires each of their keys to fit
        keys = set(state) - _aux_keys(arch, state)
        last = [k for k in expected if k.endswith("weight")][-1:]
        differences = []
        for key, shape in expected.items():
            if key not in state:
                differences.append(f"{key} is missing")
            elif list(state[key].shape) != shape and not (
                key in last or (key.endswith("bias") and key[: -len("bias")] + "weight" in last)
            ):
                differences.append(f"{key} is {tuple(state[key].shape)} in the file but {tuple(shape)} in {arch}")
            elif key in last and list(state[key].shape[1:]) != shape[1:]:
                differences.append(f"{key} is {tuple(state[key].shape)} in the file but {tuple(shape)} in {arch}")
        extra = sorted(keys - set(expected))
        if extra:
            differences.append(f"{extra[0]} is not in {arch}")
        if not differences:
            fits.append(arch)
            continue
        score = len(keys & set(expected)) / len(keys | set(expected)) - len(differences) * 1e-6
        if closest is None or score > closest[0]:
            closest = (score, arch, differences[0])
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise BadInputError(f"{path} fits several torchvision models ({', '.join(fits)}); name one with --arch")
    hint = f"; closest is {closest[1]}: {closest[2]}" if closest else ""
    raise BadInputError(
        f"{path} is a state_dict that fits no torchvision classifier{hint}; "
        "name its architecture with --arch (a torchvision name, timm:NAME, hf:CLASS or package.module:callable)"
    )


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


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load_model(
    path: str | Path,
    arch: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    *,
    trust: bool = False,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load the classifier at ``path`` in eval mode.

    ``path`` is a state_dict saved by torch.save (possibly wrapped by training code)
    or a safetensors file; its architecture is ``arch`` (from the argument or the model
    card), else the one image classifier a Hugging Face folder's config.json names
    (``model.safetensors`` or ``pytorch_model.bin`` beside it), else detected among
    torchvision's classifiers (:func:`detect_architecture`). The class count is read
    from the last layer (a Hugging Face model's is its config's). A whole pickled module loads only
    with ``trust=True``. The model keeps the checkpoint's floating-point dtype (the
    dtype of most of its weights, where they differ) unless ``dtype`` is given.
    Every failure raises :class:`BadInputError` with one line.
    """
    path = Path(path)
    check_readable(path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise BadInputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    card = read_model_card(path)
    search_dirs = None  # --arch: the working directory
    if not arch and isinstance(card.get("arch"), str) and ":" in card["arch"]:
        # a card's code is imported from its folder only when trusted; otherwise only installed code is
        search_dirs = [os.getcwd(), card["_dir"]] if trust else []
        refusal = card_architecture_refusal(card["arch"], path.with_suffix(".json"), [card["_dir"], os.getcwd()])
        if refusal is not None and not trust:
            raise BadInputError(
                f"{refusal}; it was not run: pass --trust if you trust its source, or name the architecture with --arch"
            )
    arch = arch or card.get("arch")
    if input_shape is None and "input_shape" in card:
        input_shape = parse_input_shape(card["input_shape"])
    kind = file_format(path)
    if kind == "onnx":
        raise BadInputError(f"{path} is an ONNX model; convert reads PyTorch checkpoints")
    detected = False
    if kind == "pt2":
        module, example_shape = _read_exported_program(path, trust)
        shape = tuple(input_shape or example_shape)
        return LoadedModel(_cast(module, dtype), path, arch or "ExportedProgram", shape, card)
    if kind == "safetensors":
        state = _read_safetensors(path)
    else:
        obj = _torch_load(path, trust)
        if isinstance(obj, nn.Module):
            _refuse_deep_nesting(obj, str(path))
            model = _cast(obj.eval(), dtype)
            shape = tuple(input_shape or (native_input_shape(arch) if arch else None) or DEFAULT_INPUT_SHAPE)
            return LoadedModel(model, path, arch or type(obj).__name__, shape, card)
        state = _state_dict(obj, path)
        arch = arch or timm_architecture_recorded(obj)
    arch = arch or hf_architecture_beside(path)
    if not arch:
        arch = detect_architecture(state, path)
        detected = True
    zoo = zoo_prefix(arch)
    # torchvision's and timm's builders take the class count; a callable and a Hugging Face config fix their own
    sized = ":" not in arch or (zoo is not None and zoo[0] == "timm")
    aux_logits = bool(_aux_keys(arch, state)) if ":" not in arch else False
    model = build_architecture(arch, search_dirs=search_dirs, aux_logits=aux_logits, config_dir=path.parent)
    num_classes = _num_classes(model, state)
    if num_classes is not None and sized:
        model = build_architecture(arch, num_classes, aux_logits=aux_logits, config_dir=path.parent)
    problem = _fit_report(model, state)
    if problem:
        raise BadInputError(f"{path} does not fit {arch}: {problem}")
    kinds = {t.dtype for t in state.values()}
    if not any(k.is_floating_point for k in kinds):
        raise BadInputError(f"{path} holds no floating-point weights ({', '.join(sorted(map(str, kinds)))})")
    _refuse_integer_weights(model, state, path)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except Exception as exc:  # noqa: BLE001 - a module's own loading (its version checks) may refuse the file
        raise BadInputError(f"{path} does not load into {arch} ({reason(exc)})") from None
    _fill_non_persistent_buffers(model, arch, num_classes if sized else None, search_dirs, aux_logits, path.parent)
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise BadInputError(f"{path} does not fit {arch}: {on_meta[0]} is not in the file")
    if dtype is None:
        dtype = _main_dtype(state.values())
    native = native_input_shape(arch) if ":" not in arch else zoo_input_shape(model) if zoo else None
    shape = tuple(input_shape or native or DEFAULT_INPUT_SHAPE)
    return LoadedModel(_cast(model.eval(), dtype), path, arch, shape, card, detected=detected)


DEFAULT_INPUT_SHAPE = (3, 224, 224)


def _fill_non_persistent_buffers(
    model: nn.Module,
    arch: str,
    num_classes: int | None,
    search_dirs: Sequence[str] | None,
    aux_logits: bool,
    config_dir: Path | None = None,
) -> None:
    """Give ``model``'s non-persistent buffers the values its constructor computes.

    A state_dict does not hold them (``load_state_dict(strict=True)`` does not ask for them:
    timm's anti-aliasing filter, a fixed window), so the model built on the meta device has
    none; the architecture is built again with its buffers real and its parameters on the
    meta device, and they are taken from there.
    """

    def on_meta(module: nn.Module) -> list[str]:
        return [n for n in module._non_persistent_buffers_set if _is_meta(module._buffers.get(n))]

    wanted = {prefix: names for prefix, module in model.named_modules() if (names := on_meta(module))}
    if not wanted:
        return
    built = build_architecture(
        arch, num_classes, search_dirs=search_dirs, aux_logits=aux_logits, real_buffers=True, config_dir=config_dir
    )
    modules, fresh = dict(model.named_modules()), dict(built.named_modules())
    for prefix, names in wanted.items():
        for name in names:  # one of a different shape or dtype stays on meta, and is refused as not in the file
            held, made = modules[prefix]._buffers[name], getattr(fresh.get(prefix), "_buffers", {}).get(name)
            if (
                isinstance(made, torch.Tensor)
                and not made.is_meta
                and (made.shape, made.dtype) == (held.shape, held.dtype)
            ):
                modules[prefix]._buffers[name] = made


def _is_meta(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_meta


# torch walks a model's submodules recursively (state_dict, fx tracing), several Python frames a level:
# under Python's default recursion limit (1000 frames) tracing fails between 130 and 150 levels. The
# deepest torchvision classifier (maxvit_t) nests 9.
MAX_NESTING = 100


def _refuse_deep_nesting(model: nn.Module, what: str) -> None:
    """Refuse a model whose submodules nest deeper than :data:`MAX_NESTING`, measured without recursion."""
    depth, seen, level = 0, {id(model)}, [model]
    while True:  # one level of submodules at a time, each module once
        children = {id(c): c for m in level for c in m._modules.values() if c is not None and id(c) not in seen}
        if not children:
            break
        seen.update(children)
        level = list(children.values())
        depth += 1
    if depth > MAX_NESTING:
        raise BadInputError(
            f"{what}: the model's modules nest {depth} levels deep; fcconv reads models nested at most "
            f"{MAX_NESTING} levels (torch walks them recursively, within Python's recursion limit)"
        )


def _refuse_integer_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse integer tensors where the model has floating-point ones (a quantized or half-converted checkpoint).

    They cannot be loaded as they are, and cast they would be wrong: a quantized tensor's
    scale and zero point are not in a state_dict.
    """
    expected = model.state_dict()
    for key, tensor in state.items():
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            floats = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
            raise BadInputError(
                f"{path}: {key} is {str(tensor.dtype).removeprefix('torch.')} while the other weights are "
                f"{' and '.join(floats)}: fcconv reads floating-point weights, and an integer (quantized) tensor's "
                "scale is not in a state_dict; save the checkpoint with floating-point weights"
            )


def _main_dtype(tensors: Any) -> torch.dtype:
    """The floating-point dtype that holds the most elements."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__)


def _cast(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``model`` with its floating-point parameters and buffers in ``dtype``; tensors already in it are not copied."""
    if dtype is None:
        return model
    if any(t.is_floating_point() and t.dtype != dtype for t in [*model.parameters(), *model.buffers()]):
        model.to(dtype)
    return model


def _read_exported_program(path: Path, trust: bool) -> tuple[nn.Module, tuple[int, ...]]:
    """The program saved at ``path`` as a module the rewriter reads, and its example input's per-sample shape."""
    from fcconv.capture import lower_exported_program, refuse_training_mode

    program = load_exported_program(path, trust=trust)
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in _user_inputs(program)]
    if len(inputs) != 1:
        raise BadInputError(f"{path}: the program takes {len(inputs)} inputs; fcconv converts models with one")
    shape = tuple(inputs[0].meta["val"].shape)[1:]
    if not all(isinstance(s, int) for s in shape):
        example = program.example_inputs
        shape = tuple(example[0][0].shape[1:]) if example and example[0] else ()
    if not shape or not all(isinstance(s, int) for s in shape):
        raise BadInputError(f"{path}: the program's input size is not fixed; give the native one with --input-shape")
    refuse_training_mode(program, path)
    return lower_exported_program(program), tuple(int(s) for s in shape)


def _user_inputs(program: Any) -> set[str]:
    return set(program.graph_signature.user_inputs)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise BadInputError(f"{path} is not a readable safetensors file ({reason(exc)})") from None
    if not state:
        raise BadInputError(f"{path} holds no tensors")
    return _state_dict(state, path)
