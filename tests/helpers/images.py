"""Tiny images for tests: learnable ImageFolder trees, noise images in every mode, every kind of bad file."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (40, 40)) -> Image.Image:
    """A reproducible RGB image whose pixels differ, so batches from different files differ."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def write_image(path: Path, image: Image.Image, fmt: str | None = None, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **save_args)
    return path


def make_tree(root: Path, counts: dict[str, int], size: int = 40, ext: str = "png", seed: int = 0) -> Path:
    """root/<class>/img_XXX.<ext> with `counts[class]` distinct noise images per class."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(
                root / name / f"img_{i:03d}.{ext}", noise_image(seed * 100_000 + c * 1000 + i, (size, size))
            )
    return root


def jpeg_bytes(size: int = 64, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed, (size, size)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG header that claims width x height pixels (10 gigapixels by default) with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def corrupt_png(size: int = 32) -> bytes:
    """A PNG with a valid header whose compressed pixel data is garbage."""
    buffer = io.BytesIO()
    noise_image(1, (size, size)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 8
    data[start : start + 200] = bytes(range(200))
    return bytes(data)


def write_bad_files(folder: Path) -> dict[str, str]:
    """One file of each bad kind in `folder`; returns {file name: word expected in its reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg_bytes(64)[:400])
    (folder / "corrupt.png").write_bytes(corrupt_png())
    (folder / "notes.jpg").write_text("this is a text file, not a picture\n")
    (folder / "bomb.png").write_bytes(bomb_png())
    return {
        "empty.jpg": "empty",
        "truncated.jpg": "truncated",
        "corrupt.png": "unreadable",
        "notes.jpg": "not an image",
        "bomb.png": "bomb",
    }


def make_image_folder(
    root: Path, classes: dict[str, int] | None = None, size: int = 40, seed: int = 0, ext: str = "png"
) -> Path:
    """An ImageFolder tree whose classes differ by a learnable pattern (bright disc vs. stripes)."""
    classes = classes or {"Monkeypox": 12, "Others": 12}
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for c, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = rng.integers(60, 160, size=3)
            img = np.ones((size, size, 3)) * base
            if c % 2 == 0:
                cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] = 240
            else:
                img[:, (xx[0] // max(2, c + 1)) % 2 == 0] = 20
            img += rng.normal(0, 8, img.shape)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{name.lower()}_{i:03d}.{ext}")
    return root


def split_files(split_json: Path, name: str) -> list:
    """The [relative path, label] entries of one split in a run's split.json."""
    return json.loads(Path(split_json).read_text())[name]


def class_files(counts: list[int]) -> tuple[list[str], list[int]]:
    """Relative paths and labels of `counts[c]` files per class c (for split tests that need no images)."""
    files, labels = [], []
    for label, n in enumerate(counts):
        files += [f"c{label}/img_{i:04d}.jpg" for i in range(n)]
        labels += [label] * n
    return files, labels
