"""The eval task: a checkpoint on the exact files of one split of its training run, with a metrics report.

The split is read from the run's `split.json` (never recomputed, so images added to the folder since training
change nothing) and the images are decoded and normalised by the same functions training used, in the same
order and batches: `best.ckpt` on `val` gives metrics.json's `best_val_acc` exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from densenet_se import bootstrap
from densenet_se.assessment import Assessment, Outputs, Settings, assess, compute_metrics  # noqa: F401
from densenet_se.calibration import check_calibrate
from densenet_se.checkpoint import build_classifier, load_checkpoint, pick_device, run_dir_of
from densenet_se.checks import check
from densenet_se.config import EvalConfig, EvalDataConfig  # noqa: F401  (schemas, registered in config)
from densenet_se.console import print_logged
from densenet_se.data.datamodule import ALLOWED as DATA_ALLOWED
from densenet_se.data.images import MAX_IMAGE_PIXELS
from densenet_se.data.split import read_split_file
from densenet_se.errors import UserError
from densenet_se.eval_outputs import OUTPUT_FILES, write_outputs
from densenet_se.inference import check_tta, view_logits
from densenet_se.names import display_name
from densenet_se.operating_point import DECISION_KEYS, check_decision
from densenet_se.paths import check_output, check_outside
from densenet_se.rundir import load_run_yaml

log = logging.getLogger("densenet_se")

SPLIT_CHOICES = ("val", "test", "all")
ON_MISSING = ("error", "skip")


# ---------------------------------------------------------------------------------------------------- inputs
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
    cfg = load_run_yaml(run_dir / ".hydra" / "config.yaml")
    cwd = None
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        cwd = OmegaConf.select(load_run_yaml(hydra_yaml), "hydra.runtime.cwd", default=None)
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
    batch_size = int(given.get("batch_size", base.get("batch_size", 32)))
    check({"image_size": image_size, "batch_size": batch_size}, DATA_ALLOWED, "data.")  # training's own rules
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
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]], list[str]]:
    """(uint8 images, labels, [(path, reason)] missing or unreadable, relative paths of the images loaded)."""
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
    return images, labels, missing, [entries[i][0] for i in good]


# ---------------------------------------------------------------------------------------------------- report
def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _interval(bounds: Any) -> str:
    return f"{bounds[0]:.4f} to {bounds[1]:.4f}" if bounds else "-"


def format_report(metrics: dict[str, Any], logged_val_acc: float | None = None) -> str:
    """A plain-text table of the metrics with their intervals, per class and the confusion matrix."""
    names = metrics["class_names"]
    shown = {name: display_name(name) for name in names}  # undecodable or control characters escaped
    plain = metrics.get("without_tta") or {}
    level = metrics.get("bootstrap", {}).get("level", 0.95)
    lines = [
        f"split {metrics['split']}: {metrics['n']} images"
        + (" (includes the training images)" if metrics["split"] == "all" else ""),
        f"  {'metric':<24} {'value':>7}   {f'{100 * level:g} % interval':<18}"
        + (f"   {'without TTA':>11}" if plain else ""),
    ]
    headline = {**bootstrap.HEADLINE, **(bootstrap.BINARY if len(names) == 2 else {})}
    for key, label in headline.items():
        label = (
            f"{label} ({display_name(metrics['positive_class'])})" if key in ("sensitivity", "ppv") else label
        )
        method = (metrics.get("ci_method") or {}).get(key)
        wilson = " " if method is None else "*" if method == "wilson" else "+"
        line = f"  {label:<24} {_fmt(metrics[key]):>7}   {_interval(metrics.get(f'{key}_ci')) + wilson:<18}"
        if plain:
            line += f"   {_fmt(plain.get(key)):>11}"
        if key == "acc" and logged_val_acc is not None:
            line += f"   (training logged {logged_val_acc:.4f} for this checkpoint)"
        lines.append(line)
    for key, label in (("ece", "ECE (15 bins)"), ("nll", "NLL"), ("brier", "Brier score")):
        line = f"  {label:<24} {_fmt(metrics[key]):>7}   {'':<18}"
        lines.append(line + (f"   {_fmt(plain.get(key)):>11}" if plain and key in plain else ""))
    methods = set((metrics.get("ci_method") or {}).values())
    if "wilson" in methods:
        lines.append(
            "  * every resample gave the same value: the Wilson score interval of the proportion instead"
        )
    if methods - {"wilson"}:
        lines.append("  + every resample gave the same value: no interval (which is not certainty)")
    calibrated = metrics.get("calibration")
    if calibrated:
        before = calibrated["before"]
        lines.append(
            f"  temperature {calibrated['temperature']:.4f} (fitted on val): ECE {before['ece']:.4f} -> "
            f"{metrics['ece']:.4f}, NLL {before['nll']:.4f} -> {metrics['nll']:.4f}"
        )
    point = metrics.get("operating_point")
    if point:
        lines.append(
            f"  decision: {point['rule']}"
            + ("  (optimistic: chosen on this split)" if point["optimistic"] else "")
        )
    width = max(12, *(len(n) for n in shown.values()))
    auroc = len(names) > 2  # one-vs-rest AUROC per class
    lines += [
        "",
        f"  {'class':<{width}} {'precision':>9} {'recall':>9} {'support':>8}" + ("  AUROC" if auroc else ""),
    ]
    for name in names:
        lines.append(
            f"  {shown[name]:<{width}} {_fmt(metrics[f'precision_{name}']):>9} {_fmt(metrics[f'recall_{name}']):>9} "
            f"{metrics[f'support_{name}']:>8}"
            + (
                f"  {_fmt(metrics[f'auroc_{name}'])} ({_interval(metrics.get(f'auroc_{name}_ci'))})"
                if auroc
                else ""
            )
        )
    cell = max(9, *(len(n) for n in shown.values()))
    lines += [
        "",
        "  confusion matrix (rows: true, columns: predicted)",
        f"  {'':<{width}} " + " ".join(f"{n:>{cell}}" for n in shown.values()),
    ]
    for name, row in zip(names, metrics["confusion_matrix"], strict=True):
        lines.append(f"  {shown[name]:<{width}} " + " ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(line.rstrip() for line in lines)


def logged_val_acc(run_dir: Path | None, ckpt: dict[str, Any]) -> float | None:
    """The val/acc training logged for the checkpoint's epoch (metrics.json), to compare with."""
    recorded = run_metrics(run_dir) if "epoch" in ckpt else None
    epochs = recorded.get("epochs") if recorded else None
    if not isinstance(epochs, list):
        return None
    row = next((r for r in epochs if isinstance(r, dict) and r.get("epoch") == ckpt["epoch"]), None)
    return row.get("val_acc") if row else None


def run_metrics(run_dir: Path | None) -> dict[str, Any] | None:
    """The training run's metrics.json (untrusted: size-bounded), or None if it is missing or unreadable."""
    from densenet_se.io import read_json_object

    if run_dir is None or not (run_dir / "metrics.json").is_file():
        return None
    try:
        return read_json_object(run_dir / "metrics.json", "metrics.json", "a metrics.json")
    except UserError:
        return None


# ---------------------------------------------------------------------------------------------------- task
# Reports of the training run that an eval output_dir pointed at the run directory would replace.
RUN_REPORTS = ("confusion_matrix.png", "report.html")


def check_outputs(out_dir: Path, data_root: Path, protected: dict[str, Path | None]) -> None:
    """Refuse an output_dir inside the data folder, or one where eval's files would replace a file it reads."""
    check_outside("output_dir", out_dir, {"data.root": data_root})
    for name in OUTPUT_FILES:
        check_output("output_dir", out_dir, protected, writes=out_dir / name)


TOP_LOSSES_MAX = 64


def settings_from(cfg: DictConfig, class_names: list[str]) -> Settings:
    """eval.py's keys as assessment Settings; UserError (one sentence) for a bad value or combination."""
    check_tta(cfg.tta)
    check_calibrate(cfg.calibrate)
    bootstrap.check_settings(cfg.bootstrap.n, cfg.bootstrap.level)
    if not 0 <= cfg.top_losses <= TOP_LOSSES_MAX:
        raise UserError(
            f"top_losses={cfg.top_losses} is out of range; it must be 0 (none) to {TOP_LOSSES_MAX}."
        )
    key = check_decision({k: cfg[k] for k in DECISION_KEYS}, class_names)
    target = key if key and key != "threshold" else None
    return Settings(
        class_names=class_names,
        positive_class=cfg.positive_class,
        tta=cfg.tta,
        bootstrap_n=cfg.bootstrap.n,
        bootstrap_seed=cfg.bootstrap.seed,
        bootstrap_level=cfg.bootstrap.level,
        threshold=cfg.threshold,
        target=target,
        target_value=cfg[target] if target else None,
        calibrate=cfg.calibrate,
    )


def leakage(run_dir: Path | None) -> str:
    """The training run's statement on near-duplicates across splits, from its metrics.json (untrusted)."""
    from densenet_se.report_html import leakage_statement

    return leakage_statement(run_metrics(run_dir))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` on `cfg.split`; write eval.json, predictions.csv, figures and report.html."""
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
    split_info = read_split_file(split_path)
    class_names = [str(c) for c in hp["class_names"]]
    if split_info.get("class_names") not in (None, class_names):
        raise UserError(
            f"{split_path} lists classes {split_info['class_names']} but the checkpoint predicts {class_names}; "
            "give the split.json of the run that wrote this checkpoint."
        )
    settings = settings_from(cfg, class_names)
    data = data_settings(cfg, hp, split_info, run_dir)
    out_dir = Path(cfg.output_dir)
    check_outputs(
        out_dir,
        data.root,
        {
            "the checkpoint ckpt_path": Path(cfg.ckpt_path).expanduser(),
            "the split file": split_path,
            **{f"the training run's {name}": run_dir and run_dir / name for name in RUN_REPORTS},
        },
    )
    entries = split_entries(split_info, cfg.split, split_path)
    images, labels, missing, paths = load_split_images(data, entries, cfg.on_missing, cfg.split)

    device = pick_device(cfg.device)
    module = build_classifier(ckpt, source=f"checkpoint {cfg.ckpt_path}").to(device)
    eval_hp = {**hp, "image_size": data.image_size}

    def outputs_of(split: str, images: torch.Tensor, labels: torch.Tensor, paths: list[str]) -> Outputs:
        logits = view_logits(module, images, eval_hp, data.batch_size, device, settings.tta)
        return Outputs(split, logits, labels, paths)

    outputs = outputs_of(cfg.split, images, labels, paths)
    val = None
    if (settings.calibrate == "temperature" or settings.target) and split_info.get("val"):
        if cfg.split == "test":
            val_entries = split_entries(split_info, "val", split_path)
            v_images, v_labels, _, v_paths = load_split_images(data, val_entries, cfg.on_missing, "val")
            val = outputs_of("val", v_images, v_labels, v_paths)
        else:  # val itself, or its rows inside split=all
            keep = {rel for rel, _ in split_info["val"]}
            rows = [i for i, rel in enumerate(paths) if rel in keep]
            val = Outputs("val", outputs.logits[:, rows], labels[rows], [paths[i] for i in rows])
    result = assess(outputs, settings, val)
    metrics = result.metrics
    metrics.update(
        ckpt_path=str(Path(cfg.ckpt_path).expanduser().resolve()),
        epoch=ckpt.get("epoch"),
        split_file=str(split_path.resolve()),
        data_root=str(data.root),
        image_size=data.image_size,
        missing=[list(m) for m in missing],
        leakage=leakage(run_dir),
    )

    written = write_outputs(out_dir, result, module, images, eval_hp, device, cfg.top_losses, len(missing))
    # Training's logged accuracy is for argmax on the images as they are: comparable only then.
    comparable = (
        cfg.split == "val" and settings.threshold is None and not settings.target and cfg.tta == "none"
    )
    logged = logged_val_acc(run_dir, ckpt) if comparable else None
    print_logged(log, format_report(metrics, logged))
    print_logged(log, f"{', '.join(written)} written to {out_dir}")
    return metrics
