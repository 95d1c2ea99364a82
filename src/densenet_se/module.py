"""The LightningModule: a registered backbone (DenseNetSE by default) + cross-entropy + Adam, with torchmetrics
per stage."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection, MinMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from densenet_se import backbones
from densenet_se.checks import Range, Rule, at_least, check, interval
from densenet_se.errors import UserError
from densenet_se.finetune import param_groups, set_backbone_frozen
from densenet_se.metrics import BEST, MONITOR, best_sign, logged, partial_sample
from densenet_se.soft_targets import soft_cross_entropy, target_share

log = logging.getLogger("densenet_se")

# optim.optimizer -> the optimiser over `params` (parameters or param groups) with the module's hyperparameters.
OPTIMIZERS: dict[str, Callable[[Any, Any], torch.optim.Optimizer]] = {
    "adam": lambda params, hp: torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay),
    "adamw": lambda params, hp: torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay),
    "sgd": lambda params, hp: torch.optim.SGD(
        params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=True
    ),
}
# optim.scheduler -> the per-epoch schedule of `opt` over `max_epochs` (None: a constant rate, after any warm-up).
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, Any, int], Any]] = {
    "none": lambda opt, hp, max_epochs: None,
    "cosine": lambda opt, hp, max_epochs: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(max_epochs - hp.warmup_epochs, 1)
    ),
    "step": lambda opt, hp, max_epochs: torch.optim.lr_scheduler.StepLR(
        opt, step_size=max(max_epochs // 3, 1), gamma=0.1
    ),
    # On the best-epoch metric (val/acc), without warm-up.
    "plateau": lambda opt, hp, max_epochs: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max" if best_sign() > 0 else "min", factor=0.1, patience=3
    ),
}
# Allowed values of the optim.* settings: checked here and by config.validate.
ALLOWED: dict[str, Rule] = {
    "optimizer": tuple(OPTIMIZERS),
    "scheduler": tuple(SCHEDULERS),
    "lr": interval(0, 10, "(]"),
    "weight_decay": Range(lambda v: v >= 0.0, "a number >= 0"),
    "momentum": interval(0, 1, "[)"),
    "warmup_epochs": at_least(0),
    "label_smoothing": interval(0, 1, "[)"),
}


class Classifier(L.LightningModule):
    """The network of `model` (its model.arch, via densenet_se.backbones) trained with cross-entropy; logs
    `<stage>/<metric>` for densenet_se.metrics.METRICS and `val/acc_best`.

    Args:
        model: the model.* settings, one plain dict ({"arch": ..., <that arch's keys>}; missing keys take the
            arch's defaults, no arch means densenet_se); stored as it is in the checkpoint's hyper_parameters.
        flat_model: the same settings given one by one (`growth_rate=12`), merged into `model`.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        image_size: int = 224,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        model: Mapping[str, Any] | None = None,
        # optimisation
        optimizer: str = "adam",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str = "none",
        warmup_epochs: int = 0,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        freeze_epochs: int = 0,
        backbone_lr_mult: float = 1.0,
        **flat_model: Any,
    ) -> None:
        super().__init__()
        if flat_model:  # settings passed one by one, as code written before model.arch does (growth_rate=...)
            model = {**(model or {}), **flat_model}
        # Checked (types, ranges, sizes) before anything is allocated: the values may come from someone else's
        # checkpoint. The arch fills in its defaults and gives plain values back.
        settings = backbones.checked(num_classes, image_size, model)
        # Plain values only (lists, not tuples or OmegaConf nodes): checkpoints must load with weights_only=True.
        self.save_hyperparameters(
            {
                "num_classes": int(num_classes),
                "class_names": list(class_names) if class_names else [str(i) for i in range(num_classes)],
                "image_size": int(image_size),
                "mean": [float(m) for m in mean],
                "std": [float(s) for s in std],
                "model": settings,
                "optimizer": optimizer,
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "momentum": float(momentum),
                "scheduler": scheduler,
                "warmup_epochs": int(warmup_epochs),
                "label_smoothing": float(label_smoothing),
                "class_weights": [float(w) for w in class_weights] if class_weights is not None else None,
                "freeze_epochs": int(freeze_epochs),
                "backbone_lr_mult": float(backbone_lr_mult),
            }
        )
        hp = self.hparams
        check({k: hp[k] for k in ALLOWED}, ALLOWED, "optim.")
        if hp.class_weights is not None and len(hp.class_weights) != num_classes:
            raise UserError(
                f"optim.class_weights has {len(hp.class_weights)} values but the data has {num_classes} classes "
                f"({', '.join(hp.class_names)}); give one weight per class or 'balanced'."
            )
        backbone = backbones.get(settings["arch"])
        self.model = backbone.build(num_classes, settings)
        if getattr(self.model, "pretrained_report", None) is not None:
            log.info("model.pretrained: %s", self.model.pretrained_report)
        # The new head's modules: fine-tuning freezes the rest and trains it at optim.lr.
        self.head = backbone.head(self.model)
        if settings["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Kept out of the module tree so the state-dict keys stay `model.*` whether or not compile is on.
        object.__setattr__(self, "_forward", torch.compile(self.model) if settings["compile"] else self.model)
        weights = torch.tensor(hp.class_weights) if hp.class_weights is not None else None
        self.register_buffer("class_weight", weights, persistent=False)
        self.example_input_array = torch.zeros(1, 3, hp.image_size, hp.image_size)

        def metrics(stage: str) -> MetricCollection:
            return MetricCollection({m.name: m.build(num_classes) for m in logged(stage, scored=True)})

        self.train_metrics = metrics("train")
        # train/acc under MixUp/CutMix (soft targets): the mean share of the target on the predicted class.
        self.train_soft_acc = MeanMetric()
        self.val_metrics = metrics("val")
        self.test_metrics = metrics("test")
        self.val_confmat = MulticlassConfusionMatrix(num_classes)
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        # The best validation value of the metric that picks the best epoch (`val/acc_best`).
        self.val_acc_best = MaxMetric() if best_sign() > 0 else MinMetric()
        self._restored_acc_best: float | None = None
        # Filled at each validation epoch end; the run-report callback reads them (rank 0 only writes files).
        self.last_val_confmat: list[list[int]] | None = None
        self.last_test_confmat: list[list[int]] | None = None

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.model["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weight = self.class_weight.to(logits.dtype) if self.class_weight is not None else None
        if y.dim() == 2:  # soft targets from MixUp/CutMix
            return soft_cross_entropy(logits, y, weight, self.hparams.label_smoothing)
        return F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=self.hparams.label_smoothing)

    # ------------------------------------------------------------------------------------------------ steps
    def setup(self, stage: str) -> None:
        # TF32 tensor cores for the float32 matmuls autocast leaves alone (and for whole 32-true runs) on GPUs.
        if self._trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision("high")

    def on_train_start(self) -> None:
        # The sanity check must not leave a best value behind; a resumed run continues from its saved best.
        self.val_acc_best.reset()
        if self._restored_acc_best is not None:
            self.val_acc_best.update(torch.tensor(self._restored_acc_best, device=self.device))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A plain float beside the weights (not a buffer), so older checkpoints still load strictly.
        best = self.val_acc_best.compute() if self.val_acc_best.update_called else None
        checkpoint["val_acc_best"] = float(best) if best is not None else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_acc_best = checkpoint.get("val_acc_best")

    def on_train_epoch_start(self) -> None:
        if self.hparams.freeze_epochs:
            set_backbone_frozen(self.model, self.head, self.current_epoch < self.hparams.freeze_epochs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        if y.dim() == 2:  # MixUp/CutMix soft targets: accuracy is the target's share on the predicted class
            self.train_soft_acc.update(target_share(logits.detach(), y))
            self.log("train/acc", self.train_soft_acc, on_step=False, on_epoch=True, prog_bar=True)
            return loss
        self.train_metrics.update(logits.detach(), y)
        for name, metric in self.train_metrics.items():
            self.log(f"train/{name}", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        probs = logits.float().softmax(dim=1)
        collection = self.val_metrics if stage == "val" else self.test_metrics
        confmat = self.val_confmat if stage == "val" else self.test_confmat
        collection.update(probs, y)
        confmat.update(probs, y)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=y.shape[0],
            sync_dist=True,
        )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_epoch_end(self, stage: str) -> dict[str, torch.Tensor]:
        collection = self.val_metrics if stage == "val" else self.test_metrics
        confmat = self.val_confmat if stage == "val" else self.test_confmat
        # compute() syncs across processes under DDP, so every rank sees whole-set metrics.
        with partial_sample(getattr(self._trainer, "sanity_checking", False)):
            values = collection.compute()
        matrix = confmat.compute()
        collection.reset()
        confmat.reset()
        for name, value in values.items():
            # Already whole-set values on every process; sync_dist only tells Lightning so (no DDP warning).
            self.log(f"{stage}/{name}", value, prog_bar=name == BEST, sync_dist=True)
        as_list = [[int(v) for v in row] for row in matrix.tolist()]
        if stage == "val":
            self.last_val_confmat = as_list
        else:
            self.last_test_confmat = as_list
        return values

    def on_validation_epoch_end(self) -> None:
        values = self._eval_epoch_end("val")
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values[BEST])
            self.log(f"{MONITOR}_best", self.val_acc_best.compute(), prog_bar=False, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities, [N, num_classes]."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).float().softmax(dim=1)

    # ------------------------------------------------------------------------------------------------ optim
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = param_groups(self.model, self.head, hp.lr, hp.backbone_lr_mult)
        opt = OPTIMIZERS[hp.optimizer](params, hp)
        scheduler = self._scheduler(opt)
        if scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": scheduler}

    def _scheduler(self, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        hp = self.hparams
        max_epochs = max(int(self.trainer.max_epochs or 1), 1) if self._trainer is not None else 1
        main = SCHEDULERS[hp.scheduler](opt, hp, max_epochs)
        if isinstance(main, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return {"scheduler": main, "monitor": MONITOR, "interval": "epoch"}
        if hp.warmup_epochs > 0:
            warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=hp.warmup_epochs)
            main = (
                warm
                if main is None
                else torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[hp.warmup_epochs])
            )
        return None if main is None else {"scheduler": main, "interval": "epoch"}

    def cam_layer(self) -> nn.Module | None:
        """The layer Grad-CAM hooks, as the arch's registry entry names it; None for an arch without one."""
        name = backbones.get(self.hparams.model["arch"]).cam_layer(self.hparams.model)
        return None if name is None else self.model.get_submodule(name)


# The name before other archs existed: old imports and calls (settings one by one) keep working.
DenseNetSEClassifier = Classifier


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network inside a classifier (for export and state-dict files)."""
    return module.model if isinstance(module, Classifier) else module
