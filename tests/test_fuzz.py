"""Hostile and odd input: random and mutated image bytes only ever take the documented bad-file path, and
a large tree of tiny files with awkward names, a symlink loop and read-only folders is handled in one pass."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from densenet_se.data import ImageFolderDataModule
from densenet_se.data import images as images_lib
from densenet_se.data.images import BadImageError, check_image, decode_image, load_image
from densenet_se.errors import UserError

# A small pixel limit keeps mutated headers that claim huge sizes cheap; the code path is the same.
LIMIT = 1_000_000
FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _encoded(fmt: str, mode: str = "RGB", **save_args) -> bytes:
    rng = np.random.default_rng(len(fmt))
    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


VALID = {
    "png": _encoded("PNG"),
    "png-palette": _encoded("PNG", "P"),
    "jpeg": _encoded("JPEG", quality=80),
    "jpeg-progressive": _encoded("JPEG", progressive=True),
    "gif": _encoded("GIF", "P"),
    "bmp": _encoded("BMP"),
    "tiff": _encoded("TIFF", compression="tiff_deflate"),
    "webp": _encoded("WEBP"),
}


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid small image with bytes replaced, a slice removed or inserted, or cut short."""
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[at:]
    return bytes(data)


def assert_only_bad_file_path(path: Path) -> None:
    """decode_image gives an image or BadImageError; check_image and load_image agree with it."""
    try:
        image = decode_image(path, 32, LIMIT)
    except BadImageError as err:
        reason = str(err)
        assert reason and "\n" not in reason
        assert check_image(path, LIMIT) == reason
        with pytest.raises(UserError) as user_error:
            load_image(path, 32, LIMIT)
        assert str(user_error.value) == f"cannot use image file {path}: {reason}."
        return
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert check_image(path, LIMIT) is None
    assert torch.equal(load_image(path, 32, LIMIT), image)


@pytest.mark.slow
@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_bad_files(tmp_path, data):
    path = tmp_path / "random bytes é.jpg"
    path.write_bytes(data)
    assert_only_bad_file_path(path)


@pytest.mark.slow
@FUZZ
@given(data=mutated_images())
def test_mutated_images_decode_or_are_bad_files(tmp_path, data):
    path = tmp_path / "mutated 画像.png"
    path.write_bytes(data)
    assert_only_bad_file_path(path)


def test_every_seed_image_is_valid(tmp_path):
    for name, data in VALID.items():  # the mutations start from images that decode
        path = tmp_path / f"{name}.img"
        path.write_bytes(data)
        assert check_image(path, LIMIT) is None, name


@pytest.mark.slow
def test_thousands_of_tiny_files_with_awkward_names_in_a_read_only_tree(tmp_path, monkeypatch):
    root = tmp_path / "data set ü"
    rng = np.random.default_rng(0)
    names = {"Monkeypox": "mpox lesion №", "Others": "other (copy) "}
    for cls, stem in names.items():
        folder = root / cls / "sub folder"
        folder.mkdir(parents=True)
        for i in range(1000):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{stem}{i:04d}.png")
        (folder / "loop").symlink_to(root / cls, target_is_directory=True)  # a symlink loop
    (root / "Others" / "sub folder" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    folders = [Path(d) for d, _, _ in os.walk(root)]
    for folder in folders:  # read-only data: nothing may be written into it
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)

    decodes = []
    real_decode = images_lib.decode_image

    def counting_decode(path, *args, **kwargs):
        decodes.append(path)
        return real_decode(path, *args, **kwargs)

    monkeypatch.setattr(images_lib, "decode_image", counting_decode)
    try:
        dm = ImageFolderDataModule(
            str(root), image_size=32, batch_size=64, cache="disk", cache_dir=str(tmp_path / "c")
        )
        dm.prepare_data()
        dm.setup("fit")
        assert dm.class_names == ["Monkeypox", "Others"]
        assert len(dm.files) == 2000 and len(dm.bad_files) == 1
        assert len(decodes) == 2001  # every file decoded exactly once, the symlink loop not followed
        images, labels = next(iter(dm.train_dataloader()))
        assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8

        decodes.clear()  # a second run reads the disk cache: no file is decoded again
        again = ImageFolderDataModule(str(root), image_size=32, cache="disk", cache_dir=str(tmp_path / "c"))
        again.prepare_data()
        again.setup("fit")
        assert decodes == [] and again.files == dm.files
    finally:
        for folder in folders:
            folder.chmod(stat.S_IRWXU)
    written = [p for p in root.rglob("*") if p.suffix != ".png" and not p.is_symlink() and p.is_file()]
    assert written == []
