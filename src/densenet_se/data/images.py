"""Find, check and load images: any file PIL reads becomes a uint8 RGB tensor [3, S, S]."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from densenet_se.errors import UserError
from densenet_se.names import display_name

log = logging.getLogger("densenet_se.data")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# PIL's own default: 1024**3 // 4 // 3 pixels, a 0.25 GiB RGB image. Anything bigger is treated as a bomb.
MAX_IMAGE_PIXELS = 89_478_485
# The largest side anything here resizes to (training, eval, a checkpoint's image_size): 4096 px is 50 MB per
# decoded image and ~4 GB of DenseNet-121 activations. The smallest: DenseNet downsamples 32x.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclass(frozen=True)
class ImageFolderScan:
    """What scan_image_folder found: class names and (relative posix path, label) per candidate file."""

    root: Path
    class_names: list[str]
    files: list[str]
    labels: list[int]


class BadImageError(Exception):
    """An image file that cannot be used; the message is the reason written to bad_files.txt."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def normalise_extensions(extensions: Iterable[str] | None) -> tuple[str, ...]:
    """data.extensions as lower-case suffixes with their dot (None: IMAGE_EXTENSIONS)."""
    exts = IMAGE_EXTENSIONS if extensions is None else tuple(extensions)
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in exts)


def _walk_files(top: Path, extensions: tuple[str, ...]) -> list[str]:
    """Image files under `top` (relative posix paths), following symlinks but never a directory twice."""
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in filenames:
            if _is_hidden(name) or not name.lower().endswith(extensions):
                continue
            path = Path(dirpath, name)
            if path.is_file():  # skips dangling symlinks and sockets
                found.append(path.relative_to(top.parent).as_posix())
    return sorted(found)


def scan_image_folder(
    root: str | os.PathLike[str], extensions: Iterable[str] | None = None
) -> ImageFolderScan:
    """Classes are the sorted immediate sub-folders of `root`; files are found recursively inside each."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist or is not a folder.")
    exts = normalise_extensions(extensions)
    class_names: list[str] = []
    files: list[str] = []
    labels: list[int] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():  # follows symlinks; plain files at the top level are not classes
            continue
        if _is_hidden(entry.name):
            log.warning("ignoring hidden folder %s", display_name(str(Path(root, entry.name))))
            continue
        class_files = _walk_files(Path(root, entry.name), exts)
        if not class_files:
            log.warning(
                "ignoring folder %s: it holds no image files", display_name(str(Path(root, entry.name)))
            )
            continue
        files.extend(class_files)
        labels.extend([len(class_names)] * len(class_files))
        class_names.append(entry.name)
    return ImageFolderScan(root=root, class_names=class_names, files=files, labels=labels)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparent pixels are composited on white, high bit depths are rescaled."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if im.mode.startswith("I;16") or peak > 255.0:
            arr = arr / 257.0  # 16-bit range 0..65535 onto 0..255
        elif im.mode == "F" and peak <= 1.0:
            arr = arr * 255.0  # float images in 0..1
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        # White, not black: lesion photos with cut-out backgrounds read as "paper", and black would look dark.
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def max_file_bytes(max_image_pixels: int) -> int:
    """The largest file an image within the pixel limit can be: 16-bit RGBA stored raw, plus 64 MiB of metadata."""
    return 8 * int(max_image_pixels) + (64 << 20)


def read_image_file(path: str | os.PathLike[str], max_image_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """A file's bytes, read once (to hash and decode the same bytes); BadImageError if too big or unreadable."""
    limit = max_file_bytes(max_image_pixels)
    too_big = f"file larger than {limit} bytes, more than an image of data.max_image_pixels holds"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise BadImageError(too_big)
            # size + 1, not limit + 1: read(n) allocates n bytes up front (hundreds of MB for the limit).
            data = f.read(size + 1)
            if len(data) > size:  # it grew since fstat: read on, still bounded by the limit
                data += f.read(limit + 1 - len(data))
    except FileNotFoundError:
        raise
    except OSError as err:  # no permission, a folder named like an image
        raise BadImageError(f"unreadable: {err.strerror or err}") from None
    if len(data) > limit:
        raise BadImageError(too_big)
    return data


def decode_image(
    path: str | os.PathLike[str],
    image_size: int,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    data: bytes | None = None,
) -> torch.Tensor:
    """Decode, orient (EXIF), convert to RGB and resize one file; raises BadImageError with a reason.

    `data`: the file's bytes when already read (`path` then only names it).
    """
    path = Path(path)
    try:
        if (len(data) if data is not None else path.stat().st_size) == 0:
            raise BadImageError("empty file (0 bytes)")
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            width, height = im.size
            if width * height > max_image_pixels:
                raise BadImageError(
                    f"decompression bomb: {width}x{height} pixels is over the limit of {max_image_pixels}"
                )
            im.seek(0)  # first frame of a GIF or multi-page TIFF
            # JPEG can decode straight at 1/2, 1/4 or 1/8 scale: big photos load several times faster.
            im.draft(None, (image_size, image_size))
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception as err:  # a broken EXIF block should not cost a good image
                log.debug("ignoring unreadable EXIF orientation in %s: %s", path, err)
            rgb = to_rgb(im).resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)
    except (BadImageError, FileNotFoundError):
        raise
    except UnidentifiedImageError:
        raise BadImageError("not an image PIL can read (unknown format or corrupt header)") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(f"decompression bomb: {err}") from None
    except OSError as err:
        reason = str(err) or type(err).__name__
        if "truncated" in reason.lower():
            reason = "truncated image file"
        raise BadImageError(f"unreadable: {reason}") from None
    except Exception as err:  # PIL plugins raise all sorts (SyntaxError, struct.error, ValueError...)
        raise BadImageError(f"unreadable: {type(err).__name__}: {err}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def check_image(path: str | os.PathLike[str], max_image_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why `path` is unusable (empty, truncated, corrupt, not an image, too many pixels), or None if fine."""
    try:
        decode_image(path, 32, max_image_pixels)
    except BadImageError as err:
        return str(err)
    except FileNotFoundError:
        return "file not found"
    return None


def load_image(
    path: str | os.PathLike[str], image_size: int, max_image_pixels: int = MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """One image as uint8 [3, image_size, image_size], preprocessed exactly as in training."""
    try:
        return decode_image(path, image_size, max_image_pixels)
    except FileNotFoundError:
        raise UserError(f"image file {path} does not exist.") from None
    except BadImageError as err:
        raise UserError(f"cannot use image file {path}: {err}.") from None


_NORM_CACHE: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _scale_shift(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x/255 - mean)/std as x*scale + shift, kept per device so no host-to-device copy per batch."""
    key = (str(device), dtype)
    if key not in _NORM_CACHE:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
        scale = (1.0 / (255.0 * std)).to(dtype).view(1, 3, 1, 1).to(device)
        shift = (-mean / std).to(dtype).view(1, 3, 1, 1).to(device)
        _NORM_CACHE[key] = (scale, shift)
    return _NORM_CACHE[key]


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N,3,H,W] (or [3,H,W]) to float with ImageNet mean/std, on the tensor's own device."""
    scale, shift = _scale_shift(images.device, dtype)
    if images.dim() == 3:
        scale, shift = scale[0], shift[0]
    if images.dtype == torch.uint8 and dtype == torch.float32:
        # One pass: addcmul reads the bytes and computes in float32 (the same values, several times faster
        # than converting to float first).
        return torch.addcmul(shift, images, scale)
    return torch.addcmul(shift, images.to(dtype), scale)


def standardize(unit_images: torch.Tensor) -> torch.Tensor:
    """float [N,3,H,W] in 0..1 to ImageNet mean/std (normalize() for images already divided by 255)."""
    scale, shift = _scale_shift(unit_images.device, unit_images.dtype)
    return torch.addcmul(shift, unit_images, scale * 255.0)


# LOAD_TRUNCATED_IMAGES is a process-wide PIL switch; we rely on it being off so truncation is an error.
if ImageFile.LOAD_TRUNCATED_IMAGES:  # pragma: no cover - only if another library turned it on
    log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images will not be detected")
