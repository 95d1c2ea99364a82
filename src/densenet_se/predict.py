"""The predict task: class probabilities for an image file or a folder (recursive), written to a CSV.

Preprocessing comes from the checkpoint's hparams (image_size, mean, std, class_names) and the image helpers
training uses, so a file gets exactly the tensor it would have had as a validation image.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from densenet_se.checkpoint import build_classifier, load_checkpoint, pick_device
from densenet_se.config import PredictConfig  # noqa: F401  (schemas, registered in config)
from densenet_se.data.filebatches import decoded_batches
from densenet_se.data.images import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, normalize
from densenet_se.errors import UserError
from densenet_se.io import atomic_write_text

log = logging.getLogger("densenet_se")


def to_model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N,3,H,W] to the float32 the model was trained on: (x/255 - mean) / std."""
    if _same(mean, IMAGENET_MEAN) and _same(std, IMAGENET_STD):
        return normalize(images)  # training's own function, so values match it bit for bit
    # The data module always normalises with ImageNet statistics; other values only come from a
    # hand-made checkpoint, and then its own statistics are the best guess.
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    scale, shift = (1.0 / (255.0 * s)).float().to(images.device), (-m / s).float().to(images.device)
    return torch.addcmul(shift, images.float(), scale)


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-9 for x, y in zip(a, b, strict=True))


@torch.inference_mode()
def probabilities(
    module: torch.nn.Module,
    images: torch.Tensor,
    hparams: dict[str, Any],
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Softmax probabilities [N, C] for uint8 images [N,3,S,S], computed batch by batch as validation does."""
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size].to(device), hparams["mean"], hparams["std"])
        out.append(module(x).float().softmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, hparams["num_classes"])


def list_images(source: str | Path) -> list[Path]:
    """`source` itself if it is a file, else every image file under it (recursive, hidden entries skipped)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"input={source} does not exist; give an image file or a folder of images.")
    found = [
        p
        for p in path.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.is_file()
    ]
    if not found:
        raise UserError(
            f"input={source} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), even in sub-folders."
        )
    return sorted(found)


def skipped_path(output: Path) -> Path:
    """Where the list of skipped files goes: predictions.csv -> predictions_skipped.txt."""
    return output.with_name(f"{output.stem}_skipped.txt")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image of `cfg.input`; returns {"rows": [...], "skipped": [(path, reason)], "output": path}."""
    if not cfg.ckpt_path:
        raise UserError(
            "ckpt_path is required: python predict.py ckpt_path=<run>/checkpoints/best.ckpt input=..."
        )
    if not cfg.input:
        raise UserError("input is required: python predict.py ckpt_path=... input=<image file or folder>")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be at least 1.")
    ckpt = load_checkpoint(cfg.ckpt_path)
    hp = ckpt["hyper_parameters"]
    device = pick_device(cfg.device)
    module = build_classifier(ckpt, source=f"checkpoint {cfg.ckpt_path}").to(device)
    class_names = [str(c) for c in hp["class_names"]]
    files = list_images(cfg.input)
    output = Path(cfg.output).expanduser()
    cam = cam_dir = None
    if cfg.gradcam:
        from densenet_se.explain import GradCAM

        cam = GradCAM(module)
        cam_dir = Path(cfg.gradcam_dir).expanduser() if cfg.gradcam_dir else output.parent / "gradcam"
    base = Path(cfg.input).expanduser() if Path(cfg.input).expanduser().is_dir() else None
    log.info("predicting %d image(s) with %s on %s", len(files), cfg.ckpt_path, device)

    rows: list[dict[str, Any]] = []
    skipped: list[tuple[Path, str]] = []
    # Worker processes decode the next batches while the model runs on this one.
    batches = decoded_batches(files, hp["image_size"], cfg.max_image_pixels, cfg.batch_size, cfg.num_workers)
    for batch in batches:
        good, images, bad = batch.paths, batch.images, batch.skipped
        for path, reason in bad:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        skipped.extend(bad)
        if images is None:
            continue
        if cam is not None:
            x = to_model_input(images.to(device), hp["mean"], hp["std"])
            probs, maps = cam(x)
            _save_overlays(good, maps, cam_dir, base, cfg.max_image_pixels)
        else:
            probs = probabilities(module, images, hp, cfg.batch_size, device)
        for path, p in zip(good, probs.tolist(), strict=True):
            best = max(range(len(p)), key=p.__getitem__)
            rows.append({"path": str(path), "predicted": class_names[best], "probs": p})

    if cam is not None:
        cam.close()
    write_csv(output, rows, class_names)
    listing = skipped_path(output)
    atomic_write_text(listing, "".join(f"{p}\t{r}\n" for p, r in skipped))
    log.info("wrote %d prediction(s) to %s", len(rows), output)
    if skipped:
        log.warning("skipped %d unreadable file(s), listed in %s", len(skipped), listing)
    if cam_dir is not None and rows:
        log.info("Grad-CAM overlays in %s", cam_dir)
    return {"rows": rows, "skipped": skipped, "output": output, "gradcam_dir": cam_dir}


def write_csv(output: Path, rows: list[dict[str, Any]], class_names: list[str]) -> None:
    """Columns: path, predicted, then one probability column per class name."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "predicted", *class_names])
    for row in rows:
        writer.writerow([row["path"], row["predicted"], *(f"{p:.8g}" for p in row["probs"])])
    atomic_write_text(output, buffer.getvalue())


def _save_overlays(
    paths: Sequence[Path], maps: torch.Tensor, out_dir: Path, base: Path | None, max_image_pixels: int
) -> None:
    from densenet_se.explain import overlay_path, save_overlay

    for path, heat in zip(paths, maps, strict=True):
        try:
            save_overlay(path, heat, overlay_path(path, out_dir, base), max_image_pixels)
        except Exception as err:  # the prediction stands; a missing picture must not stop the batch
            log.warning("could not write the Grad-CAM overlay of %s: %s", path, err)
