"""Image files decoded into uint8 batches by worker processes, ahead of the model (for prediction).

Each worker decodes whole batches with the training pipeline's `decode_image` (RGB, EXIF orientation,
resize to S x S), so a file gets exactly the tensor it would have had as a validation image. While the model
runs on one batch, the workers are already decoding the next ones (`prefetch` batches per worker), so
decoding and the model overlap; with `num_workers=0` the files are decoded in this process, batch by batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from densenet_se.data.images import BadImageError, decode_image
from densenet_se.errors import UserError


@dataclass
class DecodedBatch:
    """The files of one batch that decoded (`paths`, `images` uint8 [n,3,S,S] or None) and those that did not."""

    paths: list[Path]
    images: torch.Tensor | None
    skipped: list[tuple[Path, str]]


class _Batches(Dataset):
    """Item k: batch k of the files, decoded; a file that cannot be read becomes its reason."""

    def __init__(self, paths: Sequence[Path], image_size: int, max_pixels: int, batch_size: int) -> None:
        self.paths, self.image_size, self.max_pixels, self.batch_size = (
            list(paths),
            image_size,
            max_pixels,
            batch_size,
        )

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    def __getitem__(self, k: int) -> DecodedBatch:
        good: list[Path] = []
        images: list[torch.Tensor] = []
        skipped: list[tuple[Path, str]] = []
        for path in self.paths[k * self.batch_size : (k + 1) * self.batch_size]:
            try:
                images.append(decode_image(path, self.image_size, self.max_pixels))
                good.append(path)
            except BadImageError as err:  # its message is the bare reason, for the listing
                skipped.append((path, str(err)))
            except OSError as err:  # gone since listing, permission denied
                skipped.append((path, f"unreadable: {err.strerror or err}"))
        return DecodedBatch(good, torch.stack(images) if images else None, skipped)


def _one(batch: list[DecodedBatch]) -> DecodedBatch:
    return batch[0]


def _yield_to_the_model(worker_id: int) -> None:
    # Lower priority: decoding takes the CPU the model leaves idle and never slows the model down, while a
    # model waiting for its next batch frees the CPU for the decoders.
    try:
        os.nice(10)
    except OSError:  # not permitted here: decode at normal priority
        pass


def decoded_batches(
    paths: Sequence[Path],
    image_size: int,
    max_image_pixels: int,
    batch_size: int,
    num_workers: int = 2,
    prefetch: int = 2,
) -> Iterator[DecodedBatch]:
    """The files as decoded batches of up to `batch_size`, in order, decoded by `num_workers` processes."""
    if num_workers < 0:
        raise UserError(f"num_workers={num_workers} must be 0 (decode in this process) or more.")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1.")
    dataset = _Batches(paths, image_size, max_image_pixels, batch_size)
    workers = min(num_workers, len(dataset))
    loader = DataLoader(
        dataset,
        batch_size=1,  # one item is a whole batch, decoded by one worker
        collate_fn=_one,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        worker_init_fn=_yield_to_the_model,
    )
    yield from loader
