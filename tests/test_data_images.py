"""Scanning, checking and loading single images: colour modes, EXIF, bad files, normalisation."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from densenet_se.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_image,
    load_image,
    normalize,
    scan_image_folder,
    standardize,
)
from densenet_se.errors import UserError
from helpers.images import bomb_png, noise_image, write_bad_files, write_image

S = 32


def _uniform(result: torch.Tensor) -> tuple[int, int, int]:
    """The single colour of an image that should be uniform."""
    assert result.shape == (3, S, S) and result.dtype == torch.uint8
    flat = result.reshape(3, -1)
    assert (flat.max(1).values - flat.min(1).values).max() <= 1, "image is not uniform"
    return tuple(int(v) for v in flat[:, 0])


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("RGB", (10, 200, 30), (10, 200, 30)),
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("LA", (0, 0), (255, 255, 255)),  # fully transparent black: white background
        ("LA", (40, 255), (40, 40, 40)),
        ("RGBA", (200, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (200, 0, 0, 255), (200, 0, 0)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half transparent black on white
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),  # 128 * 257
        ("I", 51400, (200, 200, 200)),  # 16-bit data held in a 32-bit mode
        ("I", 100, (100, 100, 100)),
        ("F", 0.5, (128, 128, 128)),
    ],
)
def test_every_colour_mode_becomes_rgb(tmp_path, mode, value, expected):
    path = tmp_path / f"{mode.replace(';', '')}.tiff"
    write_image(path, Image.new(mode, (20, 12), value))
    assert _uniform(load_image(path, S)) == pytest.approx(expected, abs=1)


def test_palette_with_transparency_composites_on_white(tmp_path):
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(0, (0, 0, 16, 8))  # top half uses index 0, which is transparent
    path = write_image(tmp_path / "p.png", image, transparency=0)
    out = load_image(path, S)
    assert out[:, : S // 2 - 1].flatten(1).float().mean(1).tolist() == [255.0, 255.0, 255.0]
    assert out[:, S // 2 + 1 :].flatten(1).float().mean(1).tolist() == [0.0, 0.0, 255.0]


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert _uniform(load_image(write_image(tmp_path / "p.gif", image), S)) == (10, 20, 30)


def test_sixteen_bit_png_is_scaled(tmp_path):
    array = np.full((10, 10), 257 * 60, dtype=np.uint16)
    path = write_image(tmp_path / "deep.png", Image.fromarray(array))
    assert _uniform(load_image(path, S)) == (60, 60, 60)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 means "rotate 90 degrees
    # clockwise to display", which puts the left half on top.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = write_image(tmp_path / "rotated.jpg", image, exif=exif, quality=95)
    out = load_image(path, S).float()
    top, bottom = out[:, : S // 2 - 2].mean((1, 2)), out[:, S // 2 + 2 :].mean((1, 2))
    assert top[0] > 200 and top[2] < 50, f"top should be red, got {top.tolist()}"
    assert bottom[2] > 200 and bottom[0] < 50, f"bottom should be blue, got {bottom.tolist()}"


def test_first_frame_of_animated_gif(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    red, green, blue = _uniform(load_image(path, S))
    assert red > 240 and blue < 15


def test_resize_is_bilinear_like_pil(tmp_path):
    image = noise_image(3, (50, 70))
    path = write_image(tmp_path / "a.png", image)
    expected = np.asarray(image.resize((S, S), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert torch.equal(load_image(path, S), torch.from_numpy(expected.copy()))


def test_each_bad_file_kind_has_a_reason(tmp_path):
    expected = write_bad_files(tmp_path)
    for name, word in expected.items():
        reason = check_image(tmp_path / name)
        assert reason is not None and word in reason, f"{name}: {reason!r}"
    assert check_image(write_image(tmp_path / "good.png", noise_image(0))) is None


def test_pixel_limit_is_configurable(tmp_path):
    path = write_image(tmp_path / "big.png", noise_image(0, (100, 100)))
    assert check_image(path) is None
    assert "bomb" in check_image(path, max_image_pixels=5_000)
    (tmp_path / "huge.png").write_bytes(bomb_png(20_000, 20_000))
    assert "bomb" in check_image(tmp_path / "huge.png")


def test_load_image_errors_name_the_path(tmp_path):
    write_bad_files(tmp_path)
    with pytest.raises(UserError, match="truncated.jpg"):
        load_image(tmp_path / "truncated.jpg", S)
    with pytest.raises(UserError, match="does not exist"):
        load_image(tmp_path / "missing.jpg", S)


def test_normalize_matches_imagenet_formula():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    out = normalize(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(normalize(images[0]), expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(standardize(images.float() / 255), expected, rtol=0, atol=1e-5)


def test_scan_finds_classes_and_nested_files(tmp_path, caplog):
    root = tmp_path / "root"
    write_image(root / "b" / "x.PNG", noise_image(0))
    write_image(root / "b" / "deep" / "er" / "y.JpEg", noise_image(1), fmt="JPEG")
    write_image(root / "a" / "z.webp", noise_image(2))
    write_image(root / "a" / ".hidden.png", noise_image(3))
    write_image(root / "a" / ".ipynb_checkpoints" / "z-checkpoint.png", noise_image(4))
    (root / "a" / "readme.txt").write_text("not an image extension")
    (root / "a" / ".DS_Store").write_bytes(b"\0\1")
    write_image(root / ".git" / "c.png", noise_image(5))
    (root / "empty").mkdir()
    (root / "loose.png").write_bytes(b"top-level files are not classes")
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        scan = scan_image_folder(root)
    assert scan.class_names == ["a", "b"]
    assert scan.files == ["a/z.webp", "b/deep/er/y.JpEg", "b/x.PNG"]
    assert scan.labels == [0, 1, 1]
    assert "empty" in caplog.text and ".git" in caplog.text


def test_scan_follows_symlinks_without_looping(tmp_path):
    outside = tmp_path / "outside"
    write_image(outside / "o.png", noise_image(0))
    root = tmp_path / "root"
    write_image(root / "a" / "a.png", noise_image(1))
    write_image(root / "b" / "b.png", noise_image(2))
    os.symlink(root / "a", root / "a" / "loop")  # a/loop -> a
    os.symlink(outside, root / "b" / "linked")
    os.symlink(tmp_path / "nowhere.png", root / "b" / "dangling.png")
    scan = scan_image_folder(root)
    assert scan.files == ["a/a.png", "b/b.png", "b/linked/o.png"]


def test_scan_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
