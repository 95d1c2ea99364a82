"""What the loaders iterate: items of a decoded uint8 tensor, files decoded per access, or device batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from densenet_se.data.digests import digest_bytes
from densenet_se.data.images import BadImageError, decode_image, read_image_file
from densenet_se.errors import UserError
from densenet_se.names import display_name


class CachedImages(Dataset):
    """Items of a decoded uint8 tensor: (image [3,S,S], label) for the given global indices."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]) -> None:
        self.images, self.labels, self.indices = images, labels, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        return self.images[j], self.labels[j]


class FileImages(Dataset):
    """Items decoded from disk on every access (cache="none", the notebook's way).

    `digests`: each file's content digest when the run started; a file whose bytes differ now is an error,
    so an image rewritten during training is never used silently.
    """

    def __init__(
        self,
        root: Path,
        files: list[str],
        labels: torch.Tensor,
        indices: Sequence[int],
        image_size: int,
        max_pixels: int,
        digests: Sequence[str] | None = None,
    ) -> None:
        self.root, self.files, self.labels, self.indices = root, files, labels, list(indices)
        self.image_size, self.max_pixels = image_size, max_pixels
        self.digests = list(digests) if digests is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        path = self.root / self.files[j]
        try:
            data = read_image_file(path, self.max_pixels)
            if self.digests is not None and digest_bytes(data) != self.digests[j]:
                raise BadImageError("its content differs from when the run started")
            image = decode_image(path, self.image_size, self.max_pixels, data=data)
        except (BadImageError, OSError) as err:
            raise UserError(
                f"image file {display_name(str(path))} changed or became unreadable during training: {err}; "
                "restore it, or start a new run."
            ) from None
        return image, self.labels[j]


class DeviceBatches:
    """Batches indexed straight out of a tensor that already lives on the device: no workers, no copies.

    Lightning accepts any iterable with a length as a dataloader. Shuffling uses its own generator seeded
    from torch's global RNG when built (so `seed_everything` fixes it) plus the epoch number, which keeps
    the order identical across DDP ranks; each rank takes every world_size-th item, padded like
    DistributedSampler so all ranks see the same number of batches.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: Sequence[int],
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if shuffle else 0
        self.epoch = 0

    def _per_rank(self) -> int:
        return -(-len(self.indices) // self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = order[torch.randperm(len(order), generator=generator)]
        self.epoch += 1
        if self.world_size > 1:
            total = self._per_rank() * self.world_size
            order = torch.cat([order, order[: total - len(order)]])[self.rank :: self.world_size]
        order = order.to(self.images.device, non_blocking=True)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)
