"""Hand-made checkpoint files, honest and hostile: a tiny real one, and archives torch.save would never write."""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from densenet_se.module import Classifier

TINY_MODEL = {"growth_rate": 4, "block_config": [1, 1], "num_init_features": 8, "se_reduction": 2}
# The tiny torchvision model of the tests: ResNet-18 (11 M parameters) runs 32 px images in milliseconds.
TINY_TORCHVISION = {"arch": "torchvision", "name": "resnet18"}


def tiny_checkpoint(
    path: Path, settings: dict[str, Any] | None = None, model: dict[str, Any] | None = None, **overrides: Any
) -> Classifier:
    """A checkpoint shaped like Lightning's (hyper_parameters + state_dict) without training, of a 3-class model
    with `settings` (default TINY_MODEL); `model` is written over its model settings (a dict is merged in,
    anything else replaces them) and `overrides` over the other hyper_parameters (crafted values that would
    never build)."""
    torch.manual_seed(0)
    module = Classifier(3, ["a", "b", "c"], image_size=32, model=settings or TINY_MODEL).eval()
    hparams = {**dict(module.hparams), **overrides}
    if model is not None:
        hparams["model"] = {**hparams["model"], **model} if isinstance(model, dict) else model
    torch.save({"epoch": 4, "hyper_parameters": hparams, "state_dict": module.state_dict()}, path)
    return module


def legacy_checkpoint(path: Path, drop: tuple[str, ...] = ()) -> Classifier:
    """tiny_checkpoint's file as versions before model.arch wrote it: DenseNetSE's settings flat in
    hyper_parameters (no `model`, no `arch`), without the settings named in `drop` (older still)."""
    module = tiny_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    hparams = ckpt.pop("hyper_parameters")
    model = hparams.pop("model")
    flat = {k: v for k, v in model.items() if k != "arch" and k not in drop}
    torch.save({**ckpt, "hyper_parameters": {**hparams, **flat}}, path)
    return module


def checkpoint_run(
    base: Path, classes: dict[str, int], settings: dict[str, Any] | None = None
) -> dict[str, Path]:
    """A tiny checkpoint (of `settings`) in base/run/checkpoints/best.ckpt, its split.json (every image in val),
    the images.

    `classes` must name tiny_checkpoint's classes (a, b, c) with a count of images each.
    """
    from helpers.images import make_image_folder

    run_dir = base / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    tiny_checkpoint(ckpt, settings)
    images = make_image_folder(base / "images", classes, size=40)
    files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    val = [[f, list(classes).index(f.split("/")[0])] for f in files]
    split = {"class_names": list(classes), "root": str(images), "train": [], "val": val, "test": []}
    (run_dir / "split.json").write_text(json.dumps(split))
    return {"run": run_dir, "ckpt": ckpt, "images": images, "split": run_dir / "split.json"}


def resumable_run(
    base: Path,
    overrides: tuple[str, ...] = (),
    settings: dict[str, Any] | None = None,
    tiny: list[str] | None = None,
) -> Path:
    """A run directory that resume accepts up to training, made without training: .hydra/config.yaml (`tiny`,
    by default TINY, then `overrides`), split.json from the data module, and tiny_checkpoint's model (of
    `settings`, by default TINY's layout) as checkpoints/last.ckpt."""
    from omegaconf import OmegaConf

    from densenet_se.config import compose_train_config, plain
    from densenet_se.data import ImageFolderDataModule
    from helpers.config import CONF, TINY
    from helpers.images import make_image_folder

    images = make_image_folder(base / "images", {"a": 4, "b": 4, "c": 4}, size=40)
    given = [*(TINY if tiny is None else tiny), f"data.root={images}", "print_config=false", *overrides]
    cfg = compose_train_config(given, base, CONF)
    run_dir = Path(cfg.paths.output_dir)
    ImageFolderDataModule(**plain(cfg.data), output_dir=str(run_dir)).setup("fit")  # writes split.json
    (run_dir / "checkpoints").mkdir(parents=True)
    tiny_checkpoint(run_dir / "checkpoints" / "last.ckpt", settings)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


def tiny_hparams() -> dict[str, Any]:
    """The hyper_parameters of tiny_checkpoint's model (plain values)."""
    module = Classifier(3, ["a", "b", "c"], image_size=32, model=TINY_MODEL)
    return dict(module.hparams)


# -------------------------------------------------------------------------------------- hand-written archives
class Storage:
    """A tensor storage as torch.save pickles it: a persistent id naming zip record data/<key>."""

    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class Tensor:
    """Pickles as torch's _rebuild_tensor_v2(storage, offset, size, stride) with any size and stride."""

    def __init__(self, storage: Storage, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        args = (self.storage, 0, self.size, self.stride, False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def data_pkl(obj: Any) -> bytes:
    """`obj` pickled the way torch.save writes data.pkl (Storage/Tensor stand-ins become real tensors)."""
    out = io.BytesIO()
    _Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def write_zip(path: Path, entries: list[tuple[str, bytes, int, int]]) -> Path:
    """A zip of (name, stored bytes, method, declared uncompressed size) entries, written byte by byte, so that
    it can say anything (CRCs are left 0: the readers under test must refuse before they would check one)."""
    body, directory = bytearray(), bytearray()
    for name, data, method, size in entries:
        raw = name.encode()
        offset = len(body)
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, 0, len(data), size, len(raw), 0)
        body += raw + data
        directory += struct.pack(
            "<4s6H3L5H2L",
            b"PK\x01\x02",
            20,
            20,
            0,
            method,
            0,
            0,
            0,
            len(data),
            size,
            len(raw),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        directory += raw
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), len(body), 0
    )
    path.write_bytes(bytes(body + directory + end))
    return path


def torch_zip(path: Path, obj: Any, records: list[tuple[str, bytes, int, int]] = ()) -> Path:
    """A torch.save-style archive: data.pkl of `obj`, version, byteorder, then data/<key> `records`."""
    pkl = data_pkl(obj)
    entries = [
        ("a/data.pkl", pkl, 0, len(pkl)),
        ("a/byteorder", b"little", 0, 6),
        ("a/version", b"3\n", 0, 2),
    ]
    return write_zip(path, entries + [(f"a/data/{k}", d, m, s) for k, d, m, s in records])


def zeros_deflated(mib: int) -> bytes:
    """A raw deflate stream of `mib` MiB of zeros, ~1 KB per MiB, made without ever holding the zeros."""
    chunk = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the packer's state is the same again, so the next MiB packs to the same bytes.
    return block * mib + packer.flush()


def deflate_bomb(path: Path, gib: int = 3) -> Path:
    """A checkpoint of a few MB whose one tensor record inflates to `gib` GiB of zeros."""
    numel = (gib << 30) // 4
    obj = {
        "epoch": 0,
        "hyper_parameters": tiny_hparams(),
        "state_dict": {"model.classifier.weight": Tensor(Storage("0", numel), (numel,), (1,))},
    }
    return torch_zip(path, obj, [("0", zeros_deflated(gib << 10), zipfile.ZIP_DEFLATED, gib << 30)])


def shared_list_bomb(depth: int = 60) -> list:
    """A list whose every level holds the level below twice: 2**depth leaves, a few bytes when pickled."""
    node: list = [0]
    for _ in range(depth):
        node = [node, node]
    return node
