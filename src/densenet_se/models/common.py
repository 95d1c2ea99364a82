"""What every network builder shares: plausible sizes for untrusted settings, and pretrained weights (a state dict
read within bounded memory or downloaded once, then loaded by key with a report of what was used)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from torch import Tensor, nn

from densenet_se.archive import load_archive
from densenet_se.errors import shown

# Plausible sizes, checked before anything is allocated: a checkpoint or a resumed run's config may come from
# someone else, and the network is built from its numbers. DenseNet-264 has ~33M parameters, ConvNeXt-Large
# ~198M; DenseNet-121 needs ~13 MB of activations per 224 px image (~4.3 GB at 4096 px).
MAX_PARAMETERS = 200_000_000
MAX_FEATURE_BYTES = 8 << 30


def too_many_parameters(count: int, what: str) -> str | None:
    """The sentence refusing `count` parameters for `what` (a layout, a model name), or None when plausible."""
    if count <= MAX_PARAMETERS:
        return None
    return (
        f"{what} has {f'{count:.3g}' if count < 10**300 else 'over 1e300'} parameters, more than "
        f"the {MAX_PARAMETERS:.0e} allowed; use a smaller model"
    )


def too_many_feature_bytes(need: int, what: str) -> str | None:
    """The sentence refusing `need` bytes of activations per image for `what`, or None when plausible."""
    if need <= MAX_FEATURE_BYTES:
        return None
    return (
        f"{what} needs about {f'{need / 2**30:.3g}' if need < 10**300 else 'over 1e300'} GiB of activations "
        f"per image, more than the {MAX_FEATURE_BYTES >> 30} GiB allowed; use smaller images or a smaller model"
    )


@dataclass(frozen=True)
class LoadReport:
    """What a pretrained loader did with each tensor."""

    source: str
    loaded: tuple[str, ...]  # model keys now holding the file's values
    new: tuple[str, ...]  # model keys left at their fresh init (SE, a classifier for another num_classes)
    skipped: tuple[str, ...]  # file keys not used (another num_classes' classifier, SE of another layout)

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors from {self.source}; "
            f"new: {', '.join(self.new) or 'none'}; skipped: {', '.join(self.skipped) or 'none'}"
        )


def load_matching(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    label: str,
    is_head: Callable[[str], bool],
    mismatch: Callable[[str], NoReturn],
    unused: Callable[[str], bool] = lambda key: False,
) -> LoadReport:
    """Load `state_dict` into `model` by key: every backbone key must be in the file with the model's shape
    (else `mismatch(detail)` raises); head keys (`is_head`) load where their shapes fit and are otherwise new
    (model side) or skipped (file side); file keys the model lacks are refused unless head or `unused`."""
    own = model.state_dict()
    loaded, new, skipped, to_load = [], [], [], {}
    for key, value in own.items():
        found = state_dict.get(key)
        if found is not None and found.shape == value.shape:
            to_load[key] = found
        elif is_head(key):
            new.append(key)
        elif found is not None:
            mismatch(
                f"{key} has shape {tuple(found.shape)} in the file but {tuple(value.shape)} in the model"
            )
        elif not key.endswith("num_batches_tracked"):  # absent from files written before torch 0.4.1
            mismatch(f"{key} is in the model but not in the file")
    for key in state_dict:
        if key in to_load:
            loaded.append(key)
        elif is_head(key) or unused(key):
            skipped.append(key)
        else:
            mismatch(f"{key} is in the file but not in the model")
    model.load_state_dict(to_load, strict=False)
    return LoadReport(label, tuple(loaded), tuple(new), tuple(skipped))


def strip_prefix(state_dict: Mapping[str, Tensor], anchor: str) -> dict[str, Tensor] | None:
    """The keys under the wrapper prefix ("model.", "module.", none) of the key `anchor`, with that prefix
    removed; None when no key is `anchor` under a prefix."""
    prefixes = [k[: -len(anchor)] for k in state_dict if k == anchor or k.endswith(f".{anchor}")]
    if not prefixes:
        return None
    prefix = min(prefixes, key=len)  # "conv1.weight" also ends "layer1.0.conv1.weight"
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# Tensors of at least this many elements are created on the meta device by build_on_meta.
_META_NUMEL = 1 << 16


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """The network `build()` makes, on the meta device (shapes only), allocating none of its large tensors.

    A plain `with torch.device("meta")` would do, but some builders compute their widths with small tensors
    (torchvision's RegNets call .tolist()), which meta tensors cannot do: only tensors of _META_NUMEL elements
    or more (weights) are made on the meta device, and the small rest is moved there afterwards.
    """
    from torch.overrides import TorchFunctionMode

    factories = {
        torch.empty,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.rand,
        torch.randn,
        torch.empty_strided,
    }

    def numel(args: tuple, kwargs: dict) -> int:
        size = kwargs.get("size", args[0] if args else ())
        dims = args if isinstance(size, int) else size
        count = 1
        for d in dims if isinstance(dims, (tuple, list, torch.Size)) else ():
            count *= int(d) if isinstance(d, int) else 1
        return count

    class LargeOnMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            kwargs = dict(kwargs or {})
            if func in factories and kwargs.get("device") is None and numel(args, kwargs) >= _META_NUMEL:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    with LargeOnMeta():
        net = build()
    return net.to("meta").eval()


def download_state_dict(url: str) -> dict[str, Tensor]:
    """The state dict at `url`, from torch's hub cache or downloaded into it (hash checked, weights only)."""
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash is a RuntimeError
        raise ValueError(
            f"pretrained='imagenet' could not fetch {url} ({first_line(exc)}); on a machine without "
            f"internet put {url.rsplit('/', 1)[-1]} in {Path(torch.hub.get_dir()) / 'checkpoints'}, "
            "or set pretrained to the path of a state-dict file, or to null"
        ) from exc


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a state-dict file (or of a Lightning checkpoint's `state_dict`); ValueError otherwise."""
    if not path.is_file():
        raise ValueError(
            f"pretrained file {path} does not exist; set pretrained to an existing state-dict file, "
            "'imagenet' or null"
        )
    try:
        with path.open("rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        # A zip (what torch.save writes) is read within bounded memory; torch's legacy format (older
        # torchvision weights) cannot be bounded, but it is a file the user chose on their own command line.
        obj = load_archive(path) if zipped else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip and weights_only refusals all mean "not a state dict we load"
        raise ValueError(
            f"pretrained file {path} is not a readable PyTorch state dict ({first_line(exc)}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"pretrained file {path} holds a {type(obj).__name__}, not a state dict; "
            "save one with torch.save(model.state_dict(), path)"
        )
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def check_pretrained(value: object) -> None:
    """pretrained must be None, "imagenet" or a path (a non-empty string or os.PathLike)."""
    if value is None or isinstance(value, os.PathLike) or (isinstance(value, str) and value):
        return
    raise ValueError(
        f"pretrained must be null, 'imagenet' or the path to a state-dict file, got {shown(value)}"
    )


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
