"""Safe checkpoint loading: `torch.load(weights_only=True)` only, then the classifier rebuilt from plain hparams.

Lightning's `load_from_checkpoint` may unpickle with weights_only=False in some versions, so nothing here relies
on it: a checkpoint that needs arbitrary unpickling is refused before any of its code can run.
"""

from __future__ import annotations

import inspect
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from densenet_se.errors import UserError
from densenet_se.module import DenseNetSEClassifier

log = logging.getLogger("densenet_se")

HINT = "pass the best.ckpt or last.ckpt written by train.py (<run dir>/checkpoints/best.ckpt)"
# What predict/eval/export need from `hyper_parameters` to rebuild the network and its preprocessing.
REQUIRED_HPARAMS = ("num_classes", "class_names", "image_size", "mean", "std")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at `path`, read with weights_only=True; UserError (one sentence) for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; {HINT}.")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file; {HINT}.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
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
    return ckpt


def build_classifier(ckpt: dict[str, Any], source: str = "the checkpoint") -> DenseNetSEClassifier:
    """A DenseNetSEClassifier rebuilt from `ckpt["hyper_parameters"]` with its weights, on the CPU, in eval mode."""
    params = inspect.signature(DenseNetSEClassifier.__init__).parameters
    hparams = dict(ckpt["hyper_parameters"])
    unknown = sorted(k for k in hparams if k not in params)
    if unknown:  # a newer version's extra settings: the weights still define the network
        log.warning("ignoring hyper_parameters this version does not know: %s", ", ".join(unknown))
    kwargs = {k: v for k, v in hparams.items() if k in params}
    # The weights come from the checkpoint: never read the pretrained source (a file that may be gone, or
    # the network). compile only costs start-up time for inference.
    kwargs.update(pretrained=None, compile=False)
    try:
        module = DenseNetSEClassifier(**kwargs)
    except (UserError, ValueError, TypeError) as err:
        raise UserError(
            f"{source} has hyper_parameters this version cannot build a model from: {err}"
        ) from None
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
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
