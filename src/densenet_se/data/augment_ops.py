"""Image operations on whole float batches in 0..1 [N,3,H,W], each image with its own parameter (a tensor [N]).

torchvision.transforms.v2.functional takes one parameter per call, so a batch would get one draw; these are the
same operations with a parameter per image, so a policy costs a fixed number of kernels per batch, whatever its
size. Each one matches v2's operation on one image (tests/test_augment.py compares them image by image).
Geometry uses v2's conventions: pixel coordinates centred on the image, x right, y down, and an inverse matrix
[N,2,3] that maps each output pixel to the point it samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


def per_image(values: torch.Tensor) -> torch.Tensor:
    """[N] -> [N,1,1,1], to broadcast one value per image over [N,C,H,W]."""
    return values.view(-1, 1, 1, 1)


def reads_are_free(device: torch.device) -> bool:
    """Whether the draws may be read on the host: on the CPU they are there already; on a GPU it would wait."""
    return device.type == "cpu"


def select(
    chosen: torch.Tensor,
    op: Callable[..., torch.Tensor],
    images: torch.Tensor,
    into: torch.Tensor,
    *params: torch.Tensor,
) -> torch.Tensor:
    """`into`, with op(images, *params) in the images where `chosen` [N] is true (params: tensors [N]).

    On the CPU the op runs on those images only, so the work is what the images drew, and `into` is written
    in place (pass a tensor of your own). On a GPU it runs on the whole batch and each image keeps its own
    result: more arithmetic, but a fixed number of kernels and no read of the draws, so the device queue
    never waits for the host.
    """
    if reads_are_free(images.device):
        index = chosen.nonzero().squeeze(1)
        if index.numel() == 0:
            return into
        return into.index_copy_(0, index, op(images[index], *(p[index] for p in params)))
    return torch.where(per_image(chosen), op(images, *params), into)


def inverse_affine(
    angle: torch.Tensor,
    shear_x: torch.Tensor | None = None,
    shear_y: torch.Tensor | None = None,
    translate_x: torch.Tensor | None = None,
    translate_y: torch.Tensor | None = None,
    center_x: torch.Tensor | float = 0.0,
    center_y: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """v2's inverse affine matrices [N,2,3] (angle and shears in degrees, as F.affine takes them, scale 1).

    The formula of torchvision's _get_inverse_affine_matrix with a tensor for each argument; the centre is
    relative to the image centre, as there.
    """
    zero = torch.zeros_like(angle)
    rot = torch.deg2rad(angle)
    sx = torch.deg2rad(shear_x) if shear_x is not None else zero
    sy = torch.deg2rad(shear_y) if shear_y is not None else zero
    tx = translate_x if translate_x is not None else zero
    ty = translate_y if translate_y is not None else zero
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    # det([[a, b], [c, d]]) = 1, so the inverse of the linear part is [[d, -b], [-c, a]].
    m00, m01, m10, m11 = d, -b, -c, a
    ox, oy = center_x + tx, center_y + ty
    m02 = center_x - m00 * ox - m01 * oy
    m12 = center_y - m10 * ox - m11 * oy
    return torch.stack((m00, m01, m02 + zero, m10, m11, m12 + zero), dim=1).view(-1, 2, 3)


def compose(*matrices: torch.Tensor) -> torch.Tensor:
    """The matrix [N,2,3] doing the last one first: compose(A, B) maps p to A(B(p))."""
    bottom = matrices[0].new_tensor([0.0, 0.0, 1.0]).expand(matrices[0].shape[0], 1, 3)
    out = torch.cat((matrices[0], bottom), dim=1)
    for m in matrices[1:]:
        out = out @ torch.cat((m, bottom), dim=1)
    return out[:, :2]


def warp(images: torch.Tensor, inverse: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinear resampling of each image through its inverse matrix [N,2,3] (centred pixel coordinates).

    `padding_mode`: "zeros" (v2's default fill) or "reflection" (mirrored at the border, for corners that
    continue the image).
    """
    n, _, height, width = images.shape
    # F.affine_grid's grid, written as one broadcast sum per axis (on the CPU affine_grid's batched matmul
    # costs as much as the sampling). Rows are divided by half the side: grid_sample's coordinates run from
    # -1 to 1 across the outer pixel edges (align_corners=False).
    x = torch.arange(width, device=images.device, dtype=images.dtype).add_(0.5 - width / 2.0)
    y = torch.arange(height, device=images.device, dtype=images.dtype).add_(0.5 - height / 2.0)
    rows = inverse.to(images.dtype) / inverse.new_tensor([width / 2.0, height / 2.0]).view(1, 2, 1)
    grid = images.new_empty(n, height, width, 2)
    for axis in (0, 1):
        a, b, c = (rows[:, axis, j].view(n, 1, 1) for j in range(3))
        torch.add(c + b * y.view(1, height, 1), a * x.view(1, 1, width), out=grid[..., axis])
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma [N,1,H,W] with v2's weights (the target of saturation and contrast)."""
    return TF.rgb_to_grayscale(images, num_output_channels=1)


def blend(images: torch.Tensor, target: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2's _blend with a factor per image: factor * image + (1 - factor) * target, clamped to 0..1.

    The target is 0 for brightness, the mean luma for contrast, the luma for saturation, the blurred image
    for sharpness. One lerp and one clamp: two passes over the batch.
    """
    return torch.lerp(target.expand_as(images), images, per_image(factor)).clamp_(0.0, 1.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue turned by `shift` (a share of the colour circle, in [-0.5, 0.5]) per image, through HSV as in v2."""
    r, g, b = images.unbind(dim=1)
    value, _ = images.max(dim=1)
    chroma = value - images.amin(dim=1)
    flat = chroma == 0
    safe = torch.where(flat, torch.ones_like(chroma), chroma)
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0.0)
    # Hue in sixths of the circle: which channel is largest picks the sector (ties give the same hue).
    hue = torch.where(
        value == r,
        ((g - b) / safe).remainder(6.0),
        torch.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = torch.where(flat, 0.0, hue)
    hue = (hue / 6.0 + shift.view(-1, 1, 1)).remainder(1.0) * 6.0
    # HSV to RGB: channel n (R 5, G 3, B 1) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6.
    n = images.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (n + hue[:, None]).remainder(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (value[:, None] * (1.0 - saturation[:, None] * ramp)).clamp_(0.0, 1.0)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """v2's posterize of float images with `bits` (0..8) per image: values floored to 2**bits levels."""
    levels = per_image(torch.exp2(bits.to(images.dtype)))
    return torch.minimum((images * levels).floor_(), levels - 1.0).clamp_(min=0.0).div_(levels)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """v2's solarize with a threshold per image: values at or above it inverted."""
    return torch.where(images >= per_image(threshold), 1.0 - images, images)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """v2's autocontrast: each channel of each image stretched to 0..1 (a flat channel is left as it is)."""
    low = images.amin(dim=(-2, -1), keepdim=True)
    span = images.amax(dim=(-2, -1), keepdim=True) - low
    flat = span == 0
    low, span = torch.where(flat, 0.0, low), torch.where(flat, 1.0, span)
    return ((images - low) / span).clamp_(0.0, 1.0)


def sharpness_target(images: torch.Tensor) -> torch.Tensor:
    """v2's sharpness 'degenerate': the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, border kept.

    As a 3x3 box sum plus 4 x the centre, in shifted slices: on the CPU a depthwise conv2d is 8x slower.
    """
    rows = images[..., :-2, :] + images[..., 1:-1, :] + images[..., 2:, :]
    inner = images[..., 1:-1, 1:-1]
    out = images.clone()
    out[..., 1:-1, 1:-1] = (
        (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(inner, alpha=4.0).div_(13.0)
    )
    return out.clamp_(0.0, 1.0)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """v2's histogram equalisation (per image and channel; v2's kernel is batched already)."""
    return TF.equalize(images)
