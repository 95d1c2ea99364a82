"""The export task: a checkpoint as ONNX (dynamic batch) or as the network's plain state dict, plus a JSON sidecar.

Both take NORMALISED float32 images [N, 3, S, S] (RGB, resized to S x S, then (x/255 - mean)/std with the
sidecar's mean and std), exactly what the model saw in training; decoding and resizing stay with the caller.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from densenet_se import backbones
from densenet_se.calibration import load_calibration
from densenet_se.checkpoint import build_classifier, load_checkpoint
from densenet_se.config import ExportConfig  # noqa: F401  (schemas, registered in config)
from densenet_se.console import print_logged
from densenet_se.errors import UserError
from densenet_se.io import atomic_torch_save, atomic_write_bytes, atomic_write_text
from densenet_se.module import unwrap
from densenet_se.paths import check_output

log = logging.getLogger("densenet_se")

FORMATS = {"onnx": ".onnx", "state_dict": ".pt"}
EXPORTERS = ("dynamo", "legacy")


class ExportedModel(nn.Module):
    """The network with both outputs people want: logits and softmax probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(images)
        return logits, logits.softmax(dim=1)


def inference_network(ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's network, fp32, contiguous, eval mode, without gradient checkpointing."""
    net = unwrap(build_classifier(ckpt)).float().to(memory_format=torch.contiguous_format)
    for layer in net.modules():
        if hasattr(layer, "memory_efficient"):
            layer.memory_efficient = (
                False  # checkpointing is a training-time memory trade; it cannot be exported
            )
    return net.eval()


def sidecar(
    ckpt: dict[str, Any], fmt: str, ckpt_path: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a consumer needs besides the weights: classes, preprocessing, arch and layout, input and output names."""
    hp = ckpt["hyper_parameters"]
    backbone = backbones.get(hp["model"]["arch"])
    info = {
        "format": fmt,
        "class_names": list(hp["class_names"]),
        "num_classes": int(hp["num_classes"]),
        "image_size": int(hp["image_size"]),
        "mean": list(hp["mean"]),
        "std": list(hp["std"]),
        "input": "float32 [N, 3, image_size, image_size]: RGB resized to image_size, then (x / 255 - mean) / std",
        "arch": backbone.arch,
        "model": {k: hp["model"][k] for k in backbone.layout_keys if k in hp["model"]},
        "source_checkpoint": str(Path(ckpt_path).expanduser().resolve()),
        "epoch": ckpt.get("epoch"),
    }
    info.update(extra or {})
    return info


def export_state_dict(net: nn.Module, path: Path) -> Path:
    """The network's weights under its own (torchvision) key names: `model.pretrained=<path>` and
    torch.load(weights_only=True) read it."""
    state = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}
    return atomic_torch_save(state, path)


def export_onnx(
    net: nn.Module, path: Path, image_size: int, exporter: str = "dynamo", opset: int | None = None
) -> Path:
    """ONNX graph with input `images` [batch, 3, S, S] (batch dynamic) and outputs `logits`, `probabilities`."""
    model = ExportedModel(net).eval()
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2: a batch of 1 could get specialised
    kwargs: dict[str, Any] = {"input_names": ["images"], "output_names": ["logits", "probabilities"]}
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if exporter == "dynamo":
            # Its graph passes log every step at INFO; the run's log keeps our own lines readable.
            for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
                logging.getLogger(name).setLevel(logging.WARNING)
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=True,
                dynamic_shapes={"images": {0: batch}},
                external_data=False,  # one self-contained file (the weights are small)
                verbose=False,
                **kwargs,
            )
        else:
            with warnings.catch_warnings():
                # The user chose the TorchScript exporter; its deprecation notices are not news to them.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    dynamic_axes={
                        "images": {0: "batch"},
                        "logits": {0: "batch"},
                        "probabilities": {0: "batch"},
                    },
                    **kwargs,
                )
        atomic_write_bytes(path, tmp.read_bytes())
    except Exception as err:
        raise UserError(
            f"ONNX export with exporter={exporter} failed ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); try exporter="
            f"{'legacy' if exporter == 'dynamo' else 'dynamo'} or format=state_dict."
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_onnx(net: nn.Module, path: Path, image_size: int, batch_sizes: tuple[int, ...] = (1, 3)) -> float:
    """Largest |onnxruntime - PyTorch| over logits and probabilities for random inputs of each batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = ExportedModel(net).eval()
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for n in batch_sizes:
        x = torch.randn(n, 3, image_size, image_size, generator=generator)
        with torch.inference_mode():
            expected = model(x)
        got = session.run(["logits", "probabilities"], {"images": x.numpy()})
        for e, g in zip(expected, got, strict=True):
            worst = max(worst, float((e - torch.from_numpy(g)).abs().max()))
    return worst


def run(cfg: DictConfig) -> dict[str, Any]:
    """Export `cfg.ckpt_path` as `cfg.format`; returns {"output", "sidecar", ...}."""
    if not cfg.ckpt_path:
        raise UserError(
            "ckpt_path is required: python export.py ckpt_path=<run dir>/checkpoints/best.ckpt format=onnx"
        )
    if cfg.format not in FORMATS:
        raise UserError(f"format={cfg.format!r} is not allowed; choose one of: {', '.join(FORMATS)}.")
    if cfg.exporter not in EXPORTERS:
        raise UserError(f"exporter={cfg.exporter!r} is not allowed; choose one of: {', '.join(EXPORTERS)}.")
    ckpt = load_checkpoint(cfg.ckpt_path)
    hp = ckpt["hyper_parameters"]
    calibration = None
    if cfg.calibration:  # checked before the (slow) export, and carried into the sidecar
        loaded = load_calibration(cfg.calibration, [str(c) for c in hp["class_names"]])
        calibration = {
            "method": "temperature",
            "temperature": loaded["temperature"],
            "apply": "probabilities = softmax(logits / temperature); the `probabilities` output is uncalibrated",
            "fitted_with_tta": loaded["tta"],
            "source": str(Path(cfg.calibration).expanduser().resolve()),
        }
    net = inference_network(ckpt)
    output = (
        Path(cfg.output).expanduser() if cfg.output else Path(cfg.output_dir) / f"model{FORMATS[cfg.format]}"
    )
    side = output.with_suffix(".json")
    if side == output:
        raise UserError(f"output={output} must not end in .json: that name is kept for the sidecar file.")
    protected = {"the checkpoint ckpt_path": Path(cfg.ckpt_path).expanduser()}
    check_output("output", output, protected)
    check_output("output", output, protected, writes=side)
    extra: dict[str, Any] = {"calibration": calibration}
    if cfg.format == "state_dict":
        export_state_dict(net, output)
        extra["load_with"] = backbones.get(hp["model"]["arch"]).rebuild
    else:
        export_onnx(net, output, hp["image_size"], cfg.exporter, cfg.opset)
        extra.update(inputs=["images"], outputs=["logits", "probabilities"], dynamic_axes={"images": [0]})
        try:
            diff = check_onnx(net, output, hp["image_size"]) if cfg.check else None
        except ImportError:
            log.warning(
                "onnxruntime is not installed (pip install 'densenet-se[export]'): export not checked"
            )
            diff = None
        if diff is not None:
            extra["max_abs_diff_vs_pytorch"] = diff
            log.info("onnxruntime matches PyTorch to %.2e (batch sizes 1 and 3)", diff)
            if diff > 1e-3:
                raise UserError(
                    f"the exported {output} differs from PyTorch by {diff:.2e}; try exporter="
                    f"{'legacy' if cfg.exporter == 'dynamo' else 'dynamo'}."
                )
    atomic_write_text(side, json.dumps(sidecar(ckpt, cfg.format, cfg.ckpt_path, extra), indent=2) + "\n")
    print_logged(log, f"exported {cfg.ckpt_path} as {cfg.format} to {output} (sidecar {side})")
    return {"output": output, "sidecar": side, **extra}
