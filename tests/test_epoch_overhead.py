"""Per-epoch work that does not scale with the images: cached images are batched by index, not item by item."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from densenet_se.data import ImageFolderDataModule
from densenet_se.data.loaders import CachedImages, DeviceBatches
from helpers.images import make_image_folder


@pytest.fixture
def datamodule(tmp_path):
    def build(**kwargs) -> ImageFolderDataModule:
        root = make_image_folder(tmp_path / "images", {"a": 11, "b": 11}, size=32)
        args = dict(root=str(root), image_size=32, batch_size=5, cache_dir=str(tmp_path / "cache"))
        dm = ImageFolderDataModule(**(args | kwargs))
        dm.setup("fit")
        return dm

    return build


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_images_are_indexed_a_batch_at_a_time(datamodule, monkeypatch, cache):
    dm = datamodule(cache=cache)
    items = []
    monkeypatch.setattr(CachedImages, "__getitem__", lambda self, i: items.append(i))
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches)
    batches = list(loader)
    assert items == []  # no per-image Python call
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    train = dm._indices["train"]
    assert [len(y) for _, y in batches] == [5, 5, 5, 3]  # 18 training images (80 % of 22)
    # Every training image exactly once, with its own label, in a shuffled order.
    expected = dm._images[train].flatten(1).tolist()
    assert sorted(images.flatten(1).tolist()) == sorted(expected)
    got = {tuple(x.flatten().tolist()): int(y) for x, y in zip(images, labels, strict=True)}
    assert all(got[tuple(dm._images[i].flatten().tolist())] == int(dm._labels[i]) for i in train)
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    assert torch.equal(val, dm._images[dm._indices["val"]])  # validation in its own order


def test_pinned_memory_keeps_the_data_loader(datamodule):
    # pin_memory asks for DataLoader's page-locked copies (fast host-to-GPU transfers): kept as asked.
    assert isinstance(datamodule(pin_memory=True).train_dataloader(), DataLoader)
