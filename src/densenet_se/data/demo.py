"""A SYNTHETIC demo data set: drawn skin-lesion-like photos in Monkeypox/ and Others/, made on first use.

The pictures are cartoons for trying the pipeline end to end, not medical data. `Monkeypox` images show
round pustules (pale domes with a red rim and a darker dimpled centre); `Others` show irregular flat
patches, small solid papules, pale macules or clear skin. Skin tone, lighting, blur and JPEG quality are
drawn from the same distributions for both classes, and every image is rescaled so its mean colour equals
that of its lesion-free skin: mean colour alone says nothing about the class.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from densenet_se.errors import UserError

log = logging.getLogger("densenet_se.data")

GENERATOR_VERSION = 1  # bump whenever the pictures change, so existing demo sets are regenerated
MARKER = ".densenet_se_demo.json"
CLASSES = ("Monkeypox", "Others")
IMAGES_PER_CLASS = 350
IMAGE_SIZE = 96

_LIGHT_SKIN = np.array([0.95, 0.80, 0.70], dtype=np.float32)
_DARK_SKIN = np.array([0.36, 0.23, 0.17], dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Noise in -1..1 varying over about size/cells pixels (bicubic upsampling of a coarse grid)."""
    coarse = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _blend(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    """img <- img * (1 - alpha) + colour * alpha, in place; colour is [3] or [H,W,3], alpha [H,W]."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    img *= 1.0 - a
    img += colour * a


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    """Lesion-free skin albedo [H,W,3]: a tone between light and dark, mottling and pores."""
    tone = rng.uniform(0.0, 1.0)
    base = (1 - tone) * _LIGHT_SKIN + tone * _DARK_SKIN + rng.normal(0.0, 0.02, 3).astype(np.float32)
    mottling = 1.0 + 0.05 * _smooth_noise(rng, size, 5)[..., None]
    pores = 1.0 + 0.025 * rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32)
    return base * mottling * pores


def _window(cy: float, cx: float, reach: float, size: int) -> tuple[slice, slice]:
    """The square of pixels within `reach` of a centre: local lesions only touch these (10x faster)."""
    y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 2)
    x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 2)
    return slice(y0, y1), slice(x0, x1)


def _pustule(img, skin, yy, xx, cy, cx, r, light, rng) -> None:
    """A round pustule: red rim, pale dome with a highlight, darker dimple (umbilication) in the middle."""
    w = _window(cy, cx, 2.2 * r, img.shape[0])
    img, skin, yy, xx = img[w], skin[w], yy[w], xx[w]
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
    red = skin * np.array([1.0, 0.55, 0.52], dtype=np.float32)
    _blend(img, red, rng.uniform(0.45, 0.8) * np.exp(-(((d - 1.05) / 0.35) ** 2)))
    cream = np.array([0.96, 0.90, 0.74], dtype=np.float32) * rng.uniform(0.8, 1.0)
    _blend(img, cream, rng.uniform(0.4, 0.9) * np.clip((1.0 - d) * 4.0, 0.0, 1.0))
    hy, hx = cy - 0.4 * r * light[0], cx - 0.4 * r * light[1]
    highlight = np.exp(-(((yy - hy) ** 2 + (xx - hx) ** 2) / (0.25 * r) ** 2))
    _blend(img, np.ones(3, dtype=np.float32), 0.35 * highlight)
    dimple = skin * np.array([0.55, 0.42, 0.38], dtype=np.float32)
    _blend(img, dimple, rng.uniform(0.5, 0.8) * np.exp(-((d / 0.28) ** 2)))


def _spot(img, skin, yy, xx, cy, cx, r, colour, opacity) -> None:
    """A small solid round spot (papule, milium, mole) of `colour` times the skin."""
    w = _window(cy, cx, 1.5 * r, img.shape[0])
    d = np.sqrt((yy[w] - cy) ** 2 + (xx[w] - cx) ** 2) / r
    _blend(img[w], skin[w] * colour, opacity * np.clip((1.2 - d) * 3.0, 0.0, 1.0))


def _patch(img, skin, yy, xx, size, colour, rng) -> None:
    """An irregular flat patch: an ellipse with a noisy, soft edge."""
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ry, rx = rng.uniform(0.12, 0.3, 2) * size
    angle = rng.uniform(0, np.pi)
    y, x = yy - cy, xx - cx
    u, v = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
    inside = 1.0 - np.sqrt((u / rx) ** 2 + (v / ry) ** 2) + 0.45 * _smooth_noise(rng, size, 7)
    _blend(img, skin * colour, rng.uniform(0.35, 0.65) * np.clip(inside * 5.0, 0.0, 1.0))


def _distractors(img, skin, yy, xx, size, rng) -> None:
    """Moles and hairs, equally likely in both classes."""
    for _ in range(rng.integers(0, 4)):
        cy, cx = rng.uniform(0, size, 2)
        _spot(img, skin, yy, xx, cy, cx, rng.uniform(0.8, 2.0), np.array([0.35, 0.25, 0.2], np.float32), 0.8)
    if rng.random() < 0.4:
        mask = Image.new("L", (size, size))
        draw = ImageDraw.Draw(mask)
        for _ in range(rng.integers(1, 5)):
            x0, y0, x1, y1 = rng.uniform(0, size, 4)
            draw.line([(x0, y0), (x1, y1)], fill=int(rng.integers(90, 200)), width=1)
        _blend(img, np.array([0.12, 0.08, 0.06], dtype=np.float32), np.asarray(mask, np.float32) / 255.0)


def _positions(rng: np.random.Generator, count: int, size: int, radius: float) -> list[tuple[float, float]]:
    """Up to `count` centres inside the image that keep lesions from overlapping much."""
    centres: list[tuple[float, float]] = []
    for _ in range(count * 10):
        cy, cx = rng.uniform(radius, size - radius, 2)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (1.8 * radius) ** 2 for y, x in centres):
            centres.append((cy, cx))
            if len(centres) == count:
                break
    return centres


def render_image(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One synthetic photo: label 0 = Monkeypox-like pustules, 1 = other lesions or clear skin."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    skin = _skin(rng, size)
    img = skin.copy()
    theta = rng.uniform(0, 2 * np.pi)
    light = (np.sin(theta), np.cos(theta))
    if label == 0:
        if rng.random() < 0.3:  # some redness around the rash, as in the other class
            _patch(img, skin, yy, xx, size, np.array([0.9, 0.65, 0.6], dtype=np.float32), rng)
        r = rng.uniform(0.05, 0.1) * size
        for cy, cx in _positions(rng, int(rng.integers(2, 9)), size, r):
            _pustule(img, skin, yy, xx, cy, cx, r * rng.uniform(0.85, 1.15), light, rng)
    else:
        kind = rng.choice(["patches", "papules", "milia", "pale", "clear"], p=[0.3, 0.3, 0.15, 0.1, 0.15])
        if kind == "patches":
            for _ in range(rng.integers(1, 4)):
                colour = np.array([0.85, 0.58, 0.52] if rng.random() < 0.6 else [0.7, 0.55, 0.45], np.float32)
                _patch(img, skin, yy, xx, size, colour, rng)
        elif kind == "papules":
            r = rng.uniform(0.02, 0.055) * size
            for cy, cx in _positions(rng, int(rng.integers(3, 16)), size, r):
                colour = np.array([0.95, 0.5, 0.48], np.float32) * rng.uniform(0.8, 1.0)
                _spot(img, skin, yy, xx, cy, cx, r * rng.uniform(0.8, 1.2), colour, rng.uniform(0.6, 0.9))
        elif kind == "milia":  # small pale spots: no red rim, no dimple
            r = rng.uniform(0.02, 0.045) * size
            for cy, cx in _positions(rng, int(rng.integers(2, 9)), size, r):
                colour = np.array([1.25, 1.2, 1.1], np.float32)
                _spot(img, skin, yy, xx, cy, cx, r * rng.uniform(0.8, 1.2), colour, rng.uniform(0.5, 0.9))
        elif kind == "pale":  # pale flat macules balance the pale pustules of the other class
            for _ in range(rng.integers(1, 4)):
                _patch(img, skin, yy, xx, size, np.array([1.15, 1.12, 1.1], np.float32), rng)
    _distractors(img, skin, yy, xx, size, rng)
    # Lighting: a gradient across the picture, overall exposure and a colour cast, the same for both classes.
    gradient = 1.0 + rng.uniform(0.0, 0.3) * ((xx / size - 0.5) * light[1] + (yy / size - 0.5) * light[0])
    cast = np.array([1.0, 1.0, 1.0], np.float32) + rng.uniform(-0.06, 0.06) * np.array([1, 0, -1], np.float32)
    lighting = gradient[..., None] * rng.uniform(0.7, 1.15) * cast
    img *= lighting
    # Mean colour equal to that of the same skin without lesions: the class cannot be read off the mean.
    target = (skin * lighting).reshape(-1, 3).mean(0)
    img *= target / np.maximum(img.reshape(-1, 3).mean(0), 1e-6)
    picture = Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="RGB")
    blur = rng.uniform(0.0, 1.0)
    if blur > 0.3:
        picture = picture.filter(ImageFilter.GaussianBlur(blur))
    return picture


def _jpeg_bytes(picture: Image.Image, rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=int(rng.integers(40, 96)))
    return buffer.getvalue()


def _params(images_per_class: int, image_size: int, seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "images_per_class": int(images_per_class),
        "image_size": int(image_size),
        "seed": int(seed),
        "classes": list(CLASSES),
        "note": "SYNTHETIC images drawn by densenet_se.data.demo, not medical data",
    }


def make_demo_dataset(
    root: str | os.PathLike[str],
    images_per_class: int = IMAGES_PER_CLASS,
    image_size: int = IMAGE_SIZE,
    seed: int = 0,
) -> Path:
    """Write the synthetic set into `root` (<root>/<class>/<class>_0000.jpg ...) and its marker file, last."""
    root = Path(root)
    if images_per_class < 1 or image_size < 32:
        raise UserError(
            f"demo images_per_class={images_per_class} must be >= 1 and image_size={image_size} >= 32."
        )
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            # One generator per image: image i is the same whatever images_per_class is.
            rng = np.random.default_rng([seed, label, i])
            picture = render_image(label, rng, image_size)
            (folder / f"{name.lower()}_{i:04d}.jpg").write_bytes(_jpeg_bytes(picture, rng))
    (root / MARKER).write_text(json.dumps(_params(images_per_class, image_size, seed), indent=2) + "\n")
    return root


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_temporaries(root: Path, max_age_s: float = 3600.0) -> None:
    """Delete temp folders that interrupted generations left beside `root` (old enough to be dead)."""
    for path in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            if time.time() - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def ensure_demo_dataset(
    root: str | os.PathLike[str],
    images_per_class: int = IMAGES_PER_CLASS,
    image_size: int = IMAGE_SIZE,
    seed: int = 0,
) -> Path:
    """The demo set at `root`, generated first if missing or made with other parameters.

    Generation goes to a temp folder beside `root` that is renamed into place when complete, so an
    interrupted run never leaves a half-made set and concurrent runs end with one complete set.
    """
    root = Path(root).expanduser()
    params = _params(images_per_class, image_size, seed)
    current = _read_marker(root) if root.is_dir() else None
    if current == params:
        return root
    if root.exists() and current is None and (not root.is_dir() or any(root.iterdir())):
        raise UserError(
            f"data.root={root} exists but is not the generated demo data set; with data.demo=true point "
            "data.root at a new folder (it is created), or set data.demo=false to train on this folder."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "making the synthetic demo data set (once): %d images in %s", len(CLASSES) * images_per_class, root
    )
    _remove_stale_temporaries(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700 folders; the set should be readable like any data folder
        make_demo_dataset(tmp, images_per_class, image_size, seed)
        try:
            os.replace(tmp, root)  # atomic; also succeeds over an empty folder
        except OSError:
            if _read_marker(root) == params:  # another process finished the same set first
                return root
            # an older demo set (different version or parameters): move it aside, then swap in the new one
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-old-", dir=root.parent))
            os.replace(root, old / "set")
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
