"""Safe checkpoint loading: `torch.load(weights_only=True)` only, then the classifier rebuilt from plain hparams.

Lightning's `load_from_checkpoint` may unpickle with weights_only=False in some versions, so nothing here relies
on it: a checkpoint that needs arbitrary unpickling is refused before any of its code can run. The archive is
checked before it is read (densenet_se.archive) and every hyperparameter before the model is allocated, so a
crafted file is refused within bounded memory.
"""

from __future__ import annotations

import inspect
import logging
import pickle
import re
from dataclasses import fields
from numbers import Real
from pathlib import Path
from typing import Any

import torch

from densenet_se import backbones
from densenet_se.archive import ArchiveError, load_archive
from densenet_se.data.images import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from densenet_se.data.sources.base import MAX_CLASS_NAME
from densenet_se.errors import UserError, shown
from densenet_se.module import Classifier

log = logging.getLogger("densenet_se")

HINT = "pass the best.ckpt or last.ckpt written by train.py (<run dir>/checkpoints/best.ckpt)"
# What predict/eval/export need from `hyper_parameters` to rebuild the network and its preprocessing.
REQUIRED_HPARAMS = ("num_classes", "class_names", "image_size", "mean", "std")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# The data module always normalises with ImageNet statistics; a std near 0 would blow inputs up to inf.
MIN_STD = 1e-3


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at `path`, read with weights_only=True within bounded memory and its hyper_parameters
    checked; UserError (one sentence) for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; {HINT}.")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file; {HINT}.")
    try:
        ckpt = load_archive(path)
    except ArchiveError as err:
        raise UserError(_archive_message(path, err)) from None
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found:
            raise UserError(
                f"refusing to load checkpoint {path}: it needs arbitrary code to unpickle ({found.group(1)}), "
                f"so nothing in it was run; only files holding tensors and plain values are loaded ({HINT})."
            ) from None
        raise UserError(
            f"refusing to load checkpoint {path}: it is not a PyTorch checkpoint that loads with "
            f"weights_only=True ({HINT})."
        ) from None
    except EOFError:
        raise UserError(f"checkpoint {path} is empty or truncated; {HINT}.") from None
    except PermissionError:
        raise UserError(f"checkpoint {path} cannot be read (permission denied).") from None
    except (RuntimeError, OSError):  # a cut-off zip archive fails as either, depending on where it ends
        raise UserError(f"checkpoint {path} is truncated or corrupt and cannot be loaded; {HINT}.") from None
    except Exception as err:  # torch.load raises KeyError, ValueError... for text and other foreign files
        raise UserError(
            f"checkpoint {path} is not a PyTorch checkpoint ({type(err).__name__} while reading it); {HINT}."
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{path} holds no Lightning checkpoint (no 'state_dict'); {HINT}.")
    hparams = ckpt.get("hyper_parameters")
    missing = [k for k in REQUIRED_HPARAMS if not isinstance(hparams, dict) or k not in hparams]
    if missing:
        raise UserError(
            f"{path} is not a densenet-se checkpoint (its hyper_parameters lack {', '.join(missing)}); {HINT}."
        )
    ckpt["hyper_parameters"] = hparams = upgrade_hparams(hparams)
    try:
        check_hparams(hparams)
        _check_progress(ckpt)
    except ValueError as err:
        raise UserError(f"refusing to load checkpoint {path}: {err}; {HINT}.") from None
    return ckpt


def _archive_message(path: Path, err: ArchiveError) -> str:
    if err.kind == "empty":
        return f"checkpoint {path} is empty or truncated; {HINT}."
    if err.kind == "truncated":
        return f"checkpoint {path} is truncated or corrupt and cannot be loaded ({err}); {HINT}."
    if err.kind == "foreign":
        return f"checkpoint {path} is not a PyTorch checkpoint ({err}); {HINT}."
    return f"refusing to load checkpoint {path}: {err}; {HINT}."


def _numbers(name: str, value: object, low: float, high: float) -> list[float]:
    """Three finite numbers in [low, high] (mean or std of the R, G, B channels)."""
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, Real) and not isinstance(v, bool) and low <= float(v) <= high for v in value)
    )
    if not ok:  # NaN fails every comparison, so it is refused here too
        raise ValueError(f"its {name} must be 3 numbers in [{low:g}, {high:g}] (R, G, B), got {shown(value)}")
    return [float(v) for v in value]


def check_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyper_parameters that rebuild the network and its preprocessing, checked for type,
    range and size before anything is allocated; ValueError names the first bad one."""
    num_classes, names, image_size = hparams["num_classes"], hparams["class_names"], hparams["image_size"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"its num_classes must be an integer >= 2, got {shown(num_classes)}")
    if not isinstance(names, list) or len(names) != num_classes:
        raise ValueError(
            f"its class_names must be a list of num_classes={num_classes} names, got {shown(names)}"
        )
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_CLASS_NAME for n in names) or len(set(names)) != len(
        names
    ):
        raise ValueError(
            f"its class_names must be distinct non-empty strings of at most {MAX_CLASS_NAME} characters, "
            f"got {shown(names)}"
        )
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
    ):
        raise ValueError(
            f"its image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {shown(image_size)}"
        )
    inference = {
        "num_classes": num_classes,
        "class_names": list(names),
        "image_size": image_size,
        "mean": _numbers("mean", hparams["mean"], 0.0, 1.0),
        "std": _numbers("std", hparams["std"], MIN_STD, 1.0),
    }
    model = hparams.get("model")
    if not isinstance(model, dict) or not all(isinstance(k, str) for k in model):
        raise ValueError(f"its model settings must be a dict of named values, got {shown(model)}")
    try:
        model = backbones.checked(num_classes, image_size, _known_settings(model))
    except ValueError as err:
        raise ValueError(
            f"its hyper_parameters describe a model this version refuses to build ({str(err).rstrip('.')})"
        ) from None
    return {**inference, "model": model}


def _known_settings(model: dict[str, Any]) -> dict[str, Any]:
    """The settings of `model` its arch knows (a newer version's extra ones are left out); ValueError for an
    arch that is not registered."""
    known = backbones.get(model.get("arch", backbones.DEFAULT_ARCH)).defaults()
    return {k: v for k, v in model.items() if k in known}


def upgrade_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """hyper_parameters in today's layout. Checkpoints written before model.arch existed hold DenseNetSE's settings
    flat at the top level (growth_rate, block_config, ...); they move, as they are, under `model` with
    arch=densenet_se, and settings they lack take today's defaults when the model is built."""
    if "model" in hparams:
        return hparams
    flat = [f.name for f in fields(backbones.get(backbones.DEFAULT_ARCH).schema) if f.name != "arch"]
    model = {"arch": backbones.DEFAULT_ARCH, **{k: hparams[k] for k in flat if k in hparams}}
    return {**{k: v for k, v in hparams.items() if k not in flat}, "model": model}


def _check_progress(ckpt: dict[str, Any]) -> None:
    """epoch / global_step (ints) and val_acc_best (a number or None), which eval and resume read."""
    for key in ("epoch", "global_step"):
        value = ckpt.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise ValueError(f"its {key} must be a non-negative integer, got {shown(value)}")
    best = ckpt.get("val_acc_best")
    if best is not None and (
        isinstance(best, bool) or not isinstance(best, Real) or not 0 <= float(best) <= 1
    ):
        raise ValueError(f"its val_acc_best must be a number in [0, 1] or null, got {shown(best)}")


def build_classifier(ckpt: dict[str, Any], source: str = "the checkpoint") -> Classifier:
    """The Classifier rebuilt from `ckpt["hyper_parameters"]` with its weights, on the CPU, in eval mode."""
    params = inspect.signature(Classifier.__init__).parameters
    hparams = upgrade_hparams(ckpt["hyper_parameters"])
    unknown = sorted(str(k) for k in hparams if k not in params)
    given = hparams.get("model")
    try:
        unknown += sorted(f"model.{k}" for k in set(given) - set(_known_settings(given)))
    except (ValueError, TypeError, AttributeError):
        pass  # not a dict, or an arch that is not registered: check_hparams says so below
    if unknown:  # a newer version's extra settings: the weights still define the network
        log.warning(
            "ignoring hyper_parameters this version does not know: %s", shown(", ".join(unknown), 200)
        )
    try:
        # Only what rebuilds the network and its preprocessing; training settings (optimizer...) play no part.
        # The weights come from the checkpoint: never read the pretrained source (a file that may be gone, or
        # the network). compile only costs start-up time for inference.
        kwargs = check_hparams(hparams)
        module = Classifier(**kwargs | {"model": kwargs["model"] | {"pretrained": None, "compile": False}})
    except (UserError, ValueError, TypeError) as err:
        raise UserError(
            f"{source} has hyper_parameters this version cannot build a model from: {err}"
        ) from None
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
        detail = detail if len(detail) <= 300 else f"{detail[:290]}..."  # a crafted file may list 1M keys
        raise UserError(
            f"{source}'s weights do not fit the model its hyper_parameters describe ({detail})."
        ) from None
    return module.eval()


def run_dir_of(ckpt_path: str | Path) -> Path | None:
    """The training run directory of RUN/checkpoints/x.ckpt, or None when the file is not laid out that way."""
    path = Path(ckpt_path).expanduser().resolve()
    if path.parent.name != "checkpoints":
        return None
    return path.parent.parent


def pick_device(name: str) -> torch.device:
    """`device=auto|cpu|cuda|cuda:N|mps`: auto takes the first GPU if there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but no CUDA GPU is available; use device=cpu.")
    return device
