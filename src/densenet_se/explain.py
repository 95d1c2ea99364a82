"""Grad-CAM heat maps: where in an image the predicted class's evidence lies.

The hooked layer is the network's last feature map, the one the classifier pools, as the arch's registry entry
names it (densenet_se.backbones: `cam_layer`). For DenseNetSE it is `se`, the final features after ReLU and the
head's squeeze-excitation (an `nn.Identity` when se_placement="none", whose hook sees the same tensor); for a
torchvision ResNet `layer4`. Where the classifier is linear on the spatial mean of that map (both of these),
Grad-CAM equals the class activation map of Zhou et al. (2016): sum_k w[c, k] * A_k, kept positive and scaled
to 0..1. An arch without such a map (a ViT) has no Grad-CAM: predict refuses gradcam=true, reports show the
images without heat maps.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from densenet_se.data.images import MAX_IMAGE_PIXELS, to_rgb
from densenet_se.errors import UserError
from densenet_se.io import atomic_write_bytes

log = logging.getLogger("densenet_se")

# Weight of the heat map in the overlay (the photo keeps the rest).
ALPHA = 0.45


class GradCAM:
    """Grad-CAM through a forward hook on the last feature layer of a Classifier; call it on normalised images."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        layer = module.cam_layer()
        if layer is None:
            raise UserError(
                f"Grad-CAM needs a convolutional feature map and {describe(module)} has none; drop gradcam=true."
            )
        self.layer = layer
        self._activations: torch.Tensor | None = None
        self._handle = self.layer.register_forward_hook(self._keep)

    def _keep(self, layer: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._activations = output

    def __call__(
        self, images: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities [N, C], heat maps [N, h, w] in 0..1) for `target` classes (default: the predicted)."""
        with torch.enable_grad():
            logits = self.module(images.detach()).float()
            activations = self._activations
            if activations is None or not activations.requires_grad:
                raise RuntimeError("Grad-CAM needs gradients: call it outside torch.inference_mode()")
            if target is None:
                target = logits.argmax(dim=1)
            # Samples do not interact in eval mode, so one backward of the summed scores gives each its own.
            score = logits.gather(1, target.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, activations)
        self._activations = None
        weights = grads.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activations.detach().float()).sum(dim=1))
        cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        return logits.detach().softmax(dim=1), cam.cpu()

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()


def describe(module: nn.Module) -> str:
    """The classifier's network in words: "model.arch=torchvision (vit_b_16)"."""
    model = module.hparams["model"]
    named = f" ({model['name']})" if "name" in model else ""
    return f"model.arch={model['arch']}{named}"


def display_image(path: str | os.PathLike[str], max_image_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The photo as a person sees it: EXIF-oriented RGB at its own size (the model saw it squashed square)."""
    with Image.open(path) as im:
        if im.size[0] * im.size[1] > max_image_pixels:
            raise ValueError(f"{path} has more than {max_image_pixels} pixels")
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb(im).copy()


def _jet() -> bytes:
    import matplotlib

    lut = matplotlib.colormaps["jet"](np.arange(256))[:, :3]
    return (lut * 255).round().astype(np.uint8).tobytes()


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = ALPHA) -> Image.Image:
    """`heat` (0..1, any size) stretched onto `image`, coloured with the jet map and blended in."""
    small = Image.fromarray(np.clip(heat.numpy() * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    # Resize the one-channel map and colour it afterwards: memory stays at 3 bytes a pixel for big photos.
    big = small.resize(image.size, Image.Resampling.BILINEAR)
    big.putpalette(_jet())
    return Image.blend(image, big.convert("RGB"), alpha)


def overlay_path(path: Path, out_dir: Path, base: Path | None) -> Path:
    """out_dir/<path relative to the input folder>.png (the original suffix kept, so a.jpg and a.png differ)."""
    rel = path.relative_to(base) if base is not None else Path(path.name)
    return out_dir / rel.parent / f"{rel.name}.png"


def save_overlay(path: Path, heat: torch.Tensor, out: Path, max_image_pixels: int = MAX_IMAGE_PIXELS) -> Path:
    """Write the Grad-CAM overlay of image `path` to `out` as PNG (atomically)."""
    buffer = io.BytesIO()
    overlay(display_image(path, max_image_pixels), heat).save(buffer, format="PNG")
    return atomic_write_bytes(out, buffer.getvalue())


def gradcam_overlays(
    module: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    hparams: dict[str, Any],
    device: torch.device,
) -> list[Image.Image]:
    """Grad-CAM overlays for `targets` on uint8 images [k,3,S,S], drawn on the images the model saw (the images
    alone for an arch without Grad-CAM)."""
    from densenet_se.inference import to_model_input

    pictures = [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images]
    if module.cam_layer() is None:
        log.info(
            "no Grad-CAM for %s (no convolutional feature map): the images are shown alone", describe(module)
        )
        return pictures
    cam = GradCAM(module)
    try:
        x = to_model_input(images.to(device), hparams["mean"], hparams["std"])
        _, maps = cam(x, target=targets.to(device))
    finally:
        cam.close()
    return [overlay(picture, heat) for picture, heat in zip(pictures, maps, strict=True)]
