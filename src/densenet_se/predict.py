"""The predict task: class probabilities for an image file or a folder (recursive), written to a CSV.

Preprocessing comes from the checkpoint's hparams (image_size, mean, std, class_names) and the image helpers
training uses, so a file gets exactly the tensor it would have had as a validation image. Optional: TTA
(`tta=`), a temperature (`calibration=`) and a two-class threshold (`operating_point=` or `threshold=`), all
applied as eval.py applied them.
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

from densenet_se.calibration import load_calibration
from densenet_se.checkpoint import build_classifier, load_checkpoint, pick_device
from densenet_se.config import PredictConfig  # noqa: F401  (schemas, registered in config)
from densenet_se.console import print_logged
from densenet_se.data.filebatches import decoded_batches
from densenet_se.data.images import IMAGE_EXTENSIONS
from densenet_se.errors import UserError
from densenet_se.inference import check_tta, combine, to_model_input, view_logits
from densenet_se.io import atomic_write_text
from densenet_se.names import display_name, file_list_text
from densenet_se.operating_point import check_decision, decide, load_operating_point, positive_index
from densenet_se.paths import check_output, check_outside, resolved

log = logging.getLogger("densenet_se")


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


def decision_settings(cfg: DictConfig, class_names: list[str]) -> dict[str, Any]:
    """Temperature (calibration=), threshold and positive class (operating_point= or threshold=), checked."""
    temperature = 1.0
    if cfg.calibration:
        calibration = load_calibration(cfg.calibration, class_names)
        temperature = calibration["temperature"]
        if calibration["tta"] not in (None, cfg.tta):
            log.warning(
                "calibration=%s was fitted with tta=%s; predicting with tta=%s",
                cfg.calibration,
                calibration["tta"],
                cfg.tta,
            )
    if cfg.operating_point and cfg.threshold is not None:
        raise UserError("operating_point and threshold are both set; give one of them.")
    threshold, positive = None, 0
    if cfg.operating_point:
        point = load_operating_point(cfg.operating_point, class_names, cfg.tta, temperature)
        threshold, positive = point["threshold"], point["positive"]
    elif cfg.threshold is not None:
        check_decision({"threshold": cfg.threshold}, class_names)
        threshold, positive = float(cfg.threshold), positive_index(class_names, cfg.positive_class)
    if threshold is not None:
        log.info(
            "calling %s when its probability is >= %.6g, else %s",
            class_names[positive],
            threshold,
            class_names[1 - positive],
        )
    return {"temperature": temperature, "threshold": threshold, "positive": positive}


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
    check_tta(cfg.tta)
    ckpt = load_checkpoint(cfg.ckpt_path)
    hp = ckpt["hyper_parameters"]
    class_names = [str(c) for c in hp["class_names"]]
    decision = decision_settings(cfg, class_names)
    device = pick_device(cfg.device)
    module = build_classifier(ckpt, source=f"checkpoint {cfg.ckpt_path}").to(device)
    files = list_images(cfg.input)
    output = Path(cfg.output).expanduser()
    cam = cam_dir = None
    if cfg.gradcam:
        from densenet_se.explain import GradCAM

        cam = GradCAM(module)
        cam_dir = Path(cfg.gradcam_dir).expanduser() if cfg.gradcam_dir else output.parent / "gradcam"
    base = Path(cfg.input).expanduser() if Path(cfg.input).expanduser().is_dir() else None
    check_outputs(cfg, files, output, cam_dir, base)
    log.info("predicting %d image(s) with %s on %s", len(files), cfg.ckpt_path, device)

    rows: list[dict[str, Any]] = []
    skipped: list[tuple[Path, str]] = []
    # Worker processes decode the next batches while the model runs on this one.
    batches = decoded_batches(files, hp["image_size"], cfg.max_image_pixels, cfg.batch_size, cfg.num_workers)
    for batch in batches:
        good, images, bad = batch.paths, batch.images, batch.skipped
        for path, reason in bad:
            print_logged(log, f"skipped {display_name(str(path))}: {reason}", sys.stderr, logging.WARNING)
        skipped.extend(bad)
        if images is None:
            continue
        logits = view_logits(module, images, hp, cfg.batch_size, device, cfg.tta)
        combined = combine(logits, decision["temperature"])
        preds = decide(combined.probs, decision["threshold"], decision["positive"])
        if cam is not None:  # the map of the class called, on the image itself
            _, maps = cam(to_model_input(images.to(device), hp["mean"], hp["std"]), target=preds.to(device))
            _save_overlays(good, maps, cam_dir, base, cfg.max_image_pixels)
        for i, path in enumerate(good):
            rows.append(
                {
                    "path": str(path),
                    "predicted": class_names[int(preds[i])],
                    "probs": combined.probs[i].tolist(),
                    "uncertainty": float(combined.uncertainty[i]),
                }
            )

    if cam is not None:
        cam.close()
    write_csv(output, rows, class_names, with_uncertainty=cfg.tta != "none")
    listing = skipped_path(output)
    atomic_write_text(listing, file_list_text(skipped))
    log.info("wrote %d prediction(s) to %s", len(rows), output)
    if skipped:
        log.warning("skipped %d unreadable file(s), listed in %s", len(skipped), listing)
    if cam_dir is not None and rows:
        log.info("Grad-CAM overlays in %s", cam_dir)
    return {"rows": rows, "skipped": skipped, "output": output, "gradcam_dir": cam_dir, **decision}


def check_outputs(
    cfg: DictConfig, files: Sequence[Path], output: Path, cam_dir: Path | None, base: Path | None
) -> None:
    """Refuse outputs that would replace the checkpoint or an input image, or that lie in the input tree
    (where the next run would read them as images) unless allow_output_in_input=true."""
    if not cfg.allow_output_in_input:
        tree = {"input": Path(cfg.input).expanduser()}
        check_outside("output", output, tree, " (or pass allow_output_in_input=true)")
        if cam_dir is not None:
            check_outside("gradcam_dir", cam_dir, tree, " (or pass allow_output_in_input=true)")
    inputs = {resolved(f) for f in files}
    protected = {"the checkpoint ckpt_path": Path(cfg.ckpt_path).expanduser()}
    check_output("output", output, protected, inputs)
    check_output("output", output, protected, inputs, writes=skipped_path(output))
    if cam_dir is not None:
        from densenet_se.explain import overlay_path

        for path in files:
            check_output("gradcam_dir", cam_dir, protected, inputs, writes=overlay_path(path, cam_dir, base))


def write_csv(
    output: Path, rows: list[dict[str, Any]], class_names: list[str], with_uncertainty: bool = False
) -> None:
    """Columns: path, predicted, one probability per class name, and `uncertainty` with TTA."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "predicted", *class_names, *(["uncertainty"] if with_uncertainty else [])])
    for row in rows:
        extra = [f"{row['uncertainty']:.6g}"] if with_uncertainty else []
        writer.writerow([row["path"], row["predicted"], *(f"{p:.8g}" for p in row["probs"]), *extra])
    # A path that is not UTF-8 is written as the bytes the file system holds (csv quotes tabs and newlines).
    atomic_write_text(output, buffer.getvalue(), errors="surrogateescape")


def _save_overlays(
    paths: Sequence[Path], maps: torch.Tensor, out_dir: Path, base: Path | None, max_image_pixels: int
) -> None:
    from densenet_se.explain import overlay_path, save_overlay

    for path, heat in zip(paths, maps, strict=True):
        try:
            save_overlay(path, heat, overlay_path(path, out_dir, base), max_image_pixels)
        except Exception as err:  # the prediction stands; a missing picture must not stop the batch
            log.warning("could not write the Grad-CAM overlay of %s: %s", path, err)
