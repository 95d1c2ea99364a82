"""The eval task: a checkpoint on the exact files of one split of its training run, with a metrics report.

The split is read from the run's `split.json` (never recomputed, so images added to the folder since training
change nothing) and the images are decoded and normalised by the same functions training used, in the same
order and batches: `best.ckpt` on `val` gives metrics.json's `best_val_acc` exactly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from densenet_se.checkpoint import build_classifier, load_checkpoint, pick_device, run_dir_of
from densenet_se.config import EvalConfig, EvalDataConfig  # noqa: F401  (schemas, registered in config)
from densenet_se.data.images import MAX_IMAGE_PIXELS
from densenet_se.errors import UserError
from densenet_se.io import atomic_write_text
from densenet_se.predict import probabilities

log = logging.getLogger("densenet_se")

SPLIT_CHOICES = ("val", "test", "all")
ON_MISSING = ("error", "skip")


# ---------------------------------------------------------------------------------------------------- inputs
def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(
            f"{what} {path} cannot be read ({err}); give split_file=<run dir>/split.json."
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a split.json written by train.py.")
    return data


def find_split_file(ckpt_path: str, split_file: str | None) -> Path:
    """`split_file`, else RUN/split.json for a checkpoint at RUN/checkpoints/x.ckpt."""
    if split_file:
        path = Path(split_file).expanduser()
        if not path.is_file():
            raise UserError(
                f"split_file={split_file} does not exist; give the split.json of the training run."
            )
        return path
    run_dir = run_dir_of(ckpt_path)
    if run_dir is None or not (run_dir / "split.json").is_file():
        where = run_dir / "split.json" if run_dir else "<run dir>/split.json"
        raise UserError(
            f"no split.json beside checkpoint {ckpt_path} (looked for {where}); "
            "give split_file=<run dir>/split.json."
        )
    return run_dir / "split.json"


def run_data_config(run_dir: Path | None) -> tuple[dict[str, Any], Path | None]:
    """(the training run's resolved `data` settings, the directory it ran in), from RUN/.hydra/ when present."""
    if run_dir is None or not (run_dir / ".hydra" / "config.yaml").is_file():
        return {}, None
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cwd = None
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        cwd = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd", default=None)
    # `${hydra:...}` only resolves inside that run: pin what it pointed at.
    with open_dict(cfg):
        if OmegaConf.select(cfg, "paths") is not None:
            cfg.paths.root_dir = cwd or os.getcwd()
            cfg.paths.output_dir = str(run_dir)
    data: dict[str, Any] = {}
    for key in ("root", "image_size", "batch_size", "max_image_pixels", "demo"):
        try:
            value = OmegaConf.select(cfg, f"data.{key}", throw_on_resolution_failure=True)
        except Exception as err:  # an interpolation this process cannot resolve: fall back to split.json
            log.debug("cannot resolve data.%s of %s: %s", key, run_dir, err)
            continue
        if value is not None:
            data[key] = value
    return data, Path(cwd) if cwd else None


@dataclass
class EvalData:
    root: Path
    image_size: int
    batch_size: int
    max_image_pixels: int
    demo: bool


def data_settings(
    cfg: DictConfig, hparams: dict[str, Any], split_info: dict[str, Any], run_dir: Path | None
) -> EvalData:
    """CLI `data.*` > the run's .hydra/config.yaml > split.json's root and the checkpoint's image size."""
    base, train_cwd = run_data_config(run_dir)
    given = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if v is not None}
    root = Path(str(given.get("root") or base.get("root") or split_info.get("root") or "")).expanduser()
    if not str(root) or str(root) == ".":
        raise UserError("the run records no data folder; give data.root=<the folder it was trained on>.")
    if "root" not in given and not root.is_absolute() and train_cwd is not None:
        root = train_cwd / root  # relative to where training ran, not to here
    image_size = int(given.get("image_size", hparams["image_size"]))
    if image_size != int(hparams["image_size"]):
        log.warning(
            "evaluating at data.image_size=%d px; the model was trained at %d px",
            image_size,
            hparams["image_size"],
        )
    if image_size < 32:
        raise UserError(f"data.image_size={image_size} must be at least 32 pixels.")
    batch_size = int(given.get("batch_size", base.get("batch_size", 32)))
    if batch_size < 1:
        raise UserError(f"data.batch_size={batch_size} must be at least 1.")
    max_pixels = int(given.get("max_image_pixels", base.get("max_image_pixels", MAX_IMAGE_PIXELS)))
    return EvalData(root, image_size, batch_size, max_pixels, bool(base.get("demo", False)))


def split_entries(split_info: dict[str, Any], split: str, path: Path) -> list[tuple[str, int]]:
    """The (relative path, label) pairs of `split` in split.json; `all` is train + val + test."""
    names = ("train", "val", "test") if split == "all" else (split,)
    if any(not isinstance(split_info.get(n), list) for n in names):
        raise UserError(f"{path} has no '{split}' list; is it a split.json written by train.py?")
    entries = sorted((str(rel), int(label)) for n in names for rel, label in split_info[n])
    if not entries:
        hint = " (the run had data.test_fraction=0)" if split == "test" else ""
        raise UserError(f"the {split} split in {path} is empty{hint}; choose split=val or split=all.")
    return entries


def load_split_images(
    data: EvalData, entries: list[tuple[str, int]], on_missing: str, split: str
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """(uint8 images, labels, [(path, reason)] missing or unreadable), decoded as training's cache does."""
    from densenet_se.data.cache import decode_files

    if data.demo and not data.root.exists():
        from densenet_se.data.demo import ensure_demo_dataset

        ensure_demo_dataset(data.root)  # the synthetic set is regenerated identically
    if not data.root.is_dir():
        raise UserError(
            f"data folder {data.root} of the training run does not exist; set data.root=<the folder it trained on>."
        )
    files = [rel for rel, _ in entries]
    good, images, bad = decode_files(data.root, files, data.image_size, data.max_image_pixels)
    missing = [
        (str(data.root / rel), reason if (data.root / rel).exists() else "missing") for rel, reason in bad
    ]
    if missing:
        shown = "; ".join(f"{p} ({r})" for p, r in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        if on_missing == "error":
            raise UserError(
                f"{len(missing)} of the {len(files)} {split} images of the training run are missing or unreadable "
                f"now: {shown}{more}; restore them, set data.root to the folder the run trained on, or pass "
                "on_missing=skip to evaluate the rest."
            )
        log.warning(
            "evaluating %d of %d %s images: %d are missing or unreadable now (%s%s); the metrics are not "
            "comparable with training's",
            len(good),
            len(files),
            split,
            len(missing),
            shown,
            more,
        )
    if not good:
        raise UserError(f"none of the {len(files)} {split} images can be read under {data.root}.")
    labels = torch.tensor([entries[i][1] for i in good], dtype=torch.long)
    return images, labels, missing


# ---------------------------------------------------------------------------------------------------- metrics
def compute_metrics(
    probs: torch.Tensor, labels: torch.Tensor, class_names: list[str], positive_class: str | None
) -> dict[str, Any]:
    """Flat metrics; acc/f1/auroc are the torchmetrics definitions training logs (micro acc, macro F1/AUROC)."""
    k = len(class_names)
    acc = MulticlassAccuracy(k, average="micro")(probs, labels)
    f1 = MulticlassF1Score(k, average="macro")(probs, labels)
    auroc = MulticlassAUROC(k, average="macro")(probs, labels)
    matrix = [[int(v) for v in row] for row in MulticlassConfusionMatrix(k)(probs, labels).tolist()]
    out: dict[str, Any] = {
        "n": int(labels.numel()),
        "acc": float(acc),
        "f1": float(f1),
        "auroc": float(auroc),
    }
    for c, name in enumerate(class_names):
        predicted = sum(matrix[r][c] for r in range(k))
        actual = sum(matrix[c])
        out[f"precision_{name}"] = matrix[c][c] / predicted if predicted else None
        out[f"recall_{name}"] = matrix[c][c] / actual if actual else None
        out[f"support_{name}"] = actual
    if k == 2:
        positive = positive_class if positive_class is not None else class_names[0]
        if positive not in class_names:
            raise UserError(
                f"positive_class={positive!r} is not a class; choose one of: {', '.join(class_names)}."
            )
        negative = class_names[1 - class_names.index(positive)]
        out["positive_class"] = positive
        out["sensitivity"] = out[f"recall_{positive}"]
        out["specificity"] = out[f"recall_{negative}"]
    out["class_names"] = list(class_names)
    out["confusion_matrix"] = matrix
    return out


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_report(metrics: dict[str, Any], logged_val_acc: float | None = None) -> str:
    """A plain-text table of the metrics, per class and the confusion matrix."""
    names = metrics["class_names"]
    lines = [
        f"split {metrics['split']}: {metrics['n']} images"
        + (" (includes the training images)" if metrics["split"] == "all" else ""),
        f"  accuracy     {_fmt(metrics['acc'])}"
        + (
            f"   (training logged {logged_val_acc:.4f} for this checkpoint)"
            if logged_val_acc is not None
            else ""
        ),
        f"  F1 (macro)   {_fmt(metrics['f1'])}",
        f"  AUROC        {_fmt(metrics['auroc'])}",
    ]
    if "sensitivity" in metrics:
        lines.append(
            f"  sensitivity  {_fmt(metrics['sensitivity'])}   (positive class: {metrics['positive_class']})"
        )
        lines.append(f"  specificity  {_fmt(metrics['specificity'])}")
    width = max(12, *(len(n) for n in names))
    lines += ["", f"  {'class':<{width}} {'precision':>9} {'recall':>9} {'support':>8}"]
    for name in names:
        lines.append(
            f"  {name:<{width}} {_fmt(metrics[f'precision_{name}']):>9} {_fmt(metrics[f'recall_{name}']):>9} "
            f"{metrics[f'support_{name}']:>8}"
        )
    cell = max(9, *(len(n) for n in names))
    lines += [
        "",
        "  confusion matrix (rows: true, columns: predicted)",
        f"  {'':<{width}} " + " ".join(f"{n:>{cell}}" for n in names),
    ]
    for name, row in zip(names, metrics["confusion_matrix"], strict=True):
        lines.append(f"  {name:<{width}} " + " ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def logged_val_acc(run_dir: Path | None, ckpt: dict[str, Any]) -> float | None:
    """The val/acc training logged for the checkpoint's epoch (metrics.json), to compare with."""
    if run_dir is None or not (run_dir / "metrics.json").is_file() or "epoch" not in ckpt:
        return None
    try:
        epochs = json.loads((run_dir / "metrics.json").read_text()).get("epochs", [])
    except (OSError, ValueError):
        return None
    row = next((r for r in epochs if r.get("epoch") == ckpt["epoch"]), None)
    return row.get("val_acc") if row else None


# ---------------------------------------------------------------------------------------------------- task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` on `cfg.split`; write eval.json and confusion_matrix.png; return the metrics."""
    if not cfg.ckpt_path:
        raise UserError("ckpt_path is required: python eval.py ckpt_path=<run dir>/checkpoints/best.ckpt")
    if cfg.split not in SPLIT_CHOICES:
        raise UserError(f"split={cfg.split!r} is not allowed; choose one of: {', '.join(SPLIT_CHOICES)}.")
    if cfg.on_missing not in ON_MISSING:
        raise UserError(
            f"on_missing={cfg.on_missing!r} is not allowed; choose one of: {', '.join(ON_MISSING)}."
        )
    ckpt = load_checkpoint(cfg.ckpt_path)
    hp = ckpt["hyper_parameters"]
    run_dir = run_dir_of(cfg.ckpt_path)
    split_path = find_split_file(cfg.ckpt_path, cfg.split_file)
    split_info = _load_json(split_path, "split file")
    class_names = [str(c) for c in hp["class_names"]]
    if split_info.get("class_names") not in (None, class_names):
        raise UserError(
            f"{split_path} lists classes {split_info['class_names']} but the checkpoint predicts {class_names}; "
            "give the split.json of the run that wrote this checkpoint."
        )
    data = data_settings(cfg, hp, split_info, run_dir)
    entries = split_entries(split_info, cfg.split, split_path)
    images, labels, missing = load_split_images(data, entries, cfg.on_missing, cfg.split)

    device = pick_device(cfg.device)
    module = build_classifier(ckpt, source=f"checkpoint {cfg.ckpt_path}").to(device)
    eval_hp = {**hp, "image_size": data.image_size}
    probs = probabilities(module, images, eval_hp, data.batch_size, device)
    metrics = {"split": cfg.split, **compute_metrics(probs, labels, class_names, cfg.positive_class)}
    metrics.update(
        ckpt_path=str(Path(cfg.ckpt_path).expanduser().resolve()),
        epoch=ckpt.get("epoch"),
        split_file=str(split_path.resolve()),
        data_root=str(data.root),
        image_size=data.image_size,
        missing=[list(m) for m in missing],
    )

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "eval.json", json.dumps(metrics, indent=2) + "\n")
    from densenet_se import plots

    title = f"{cfg.split}, {Path(cfg.ckpt_path).name}"
    plots.save_png(
        plots.confusion_matrix_image(metrics["confusion_matrix"], class_names, title),
        out_dir / "confusion_matrix.png",
    )
    logged = logged_val_acc(run_dir, ckpt) if cfg.split == "val" else None
    print(format_report(metrics, logged), flush=True)
    print(f"eval.json and confusion_matrix.png written to {out_dir}", flush=True)
    return metrics
