"""ImageFolderDataModule: split files, bad files, caches, loaders, device path, errors, read-only data."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import densenet_se.data.images as images_lib
import densenet_se.data.loaders as loaders_lib
from densenet_se.data import ImageFolderDataModule
from densenet_se.data.images import normalize
from densenet_se.data.loaders import DeviceBatches
from densenet_se.errors import UserError
from densenet_se.names import parse_file_list
from helpers.images import make_tree, noise_image, write_bad_files, write_image

S = 32


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "data", {"Monkeypox": 10, "Others": 12}, size=40)


def _dm(root, tmp_path, **kwargs) -> ImageFolderDataModule:
    args = dict(root=str(root), image_size=S, batch_size=4, cache_dir=str(tmp_path / "cache"))
    args.update(kwargs)
    return ImageFolderDataModule(**args)


def _batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*list(loader), strict=True)
    return torch.cat(images), torch.cat(labels)


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts every image decode, wherever the data code calls it from."""
    calls = []
    original = images_lib.decode_image

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(images_lib, "decode_image", counting)
    monkeypatch.setattr(loaders_lib, "decode_image", counting)
    return calls


def test_setup_writes_split_json_and_sets_attributes(tree, tmp_path):
    out = tmp_path / "run"
    dm = _dm(tree, tmp_path, output_dir=str(out), val_fraction=0.2, split_seed=5)
    dm.setup("fit")
    assert dm.class_names == ["Monkeypox", "Others"] and dm.num_classes == 2 and dm.has_test is False
    saved = json.loads((out / "split.json").read_text())
    assert saved == json.loads(json.dumps(dm.split))
    assert saved["class_names"] == ["Monkeypox", "Others"]
    assert saved["seed"] == 5 and saved["val_fraction"] == 0.2 and saved["test_fraction"] == 0.0
    assert saved["counts"] == {"train": [8, 10], "val": [2, 2], "test": [0, 0]}
    assert ["Monkeypox/img_000.png", 0] in saved["train"] + saved["val"]
    assert len(saved["train"]) + len(saved["val"]) == 22 and saved["test"] == []
    assert not (out / "bad_files.txt").exists()
    # Same inputs, same split, whatever the training seed.
    torch.manual_seed(123)
    again = _dm(tree, tmp_path, val_fraction=0.2, split_seed=5)
    again.setup()
    assert again.split["val"] == saved["val"]


def test_only_global_rank_zero_writes_files(tree, tmp_path, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    write_bad_files(tree / "Others" / "junk")
    out = tmp_path / "run"
    dm = _dm(tree, tmp_path, output_dir=str(out), cache="disk")
    dm.trainer = SimpleNamespace(is_global_zero=False, training=False)
    dm.setup()
    assert len(dm.bad_files) == 5 and dm.split["train"]
    assert not out.exists() and not (tmp_path / "cache").exists()
    # Before a Trainer is attached (the training app sets up first), the launcher's rank decides.
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    early = _dm(tree, tmp_path, output_dir=str(out), cache="disk")
    early.prepare_data()
    early.setup()
    assert early.split == dm.split and not out.exists() and not (tmp_path / "cache").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    _dm(tree, tmp_path, output_dir=str(out), cache="disk").setup()
    assert (out / "split.json").is_file() and (out / "bad_files.txt").is_file()


def test_setup_is_idempotent(tree, tmp_path, count_decodes):
    dm = _dm(tree, tmp_path)
    dm.setup("fit")
    n = len(count_decodes)
    assert n == 22
    dm.setup("validate")
    dm.setup("test")
    assert len(count_decodes) == n


def test_test_split(tree, tmp_path):
    dm = _dm(tree, tmp_path, test_fraction=0.2)
    dm.setup()
    assert dm.has_test and dm.split["counts"]["test"] == [2, 2]
    images, labels = _batches(dm.test_dataloader())
    assert images.shape == (4, 3, S, S) and labels.tolist() == [0, 0, 1, 1]
    no_test = _dm(tree, tmp_path)
    no_test.setup()
    with pytest.raises(UserError, match="data.test_fraction"):
        no_test.test_dataloader()


def test_bad_files_are_skipped_listed_and_warned_once(tree, tmp_path, caplog):
    expected = write_bad_files(tree / "Others" / "junk")
    out = tmp_path / "run"
    dm = _dm(tree, tmp_path, output_dir=str(out))
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        dm.setup()
    warnings = [r for r in caplog.records if r.name == "densenet_se.data"]
    assert len(warnings) == 1 and "skipped 5 of 27" in warnings[0].getMessage()
    assert "bad_files.txt" in warnings[0].getMessage()
    lines = (out / "bad_files.txt").read_text().splitlines()
    assert len(lines) == 5 and len(dm.bad_files) == 5
    reasons = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in lines}
    for name, word in expected.items():
        assert word in reasons[name]
    listed = [p for name in ("train", "val", "test") for p, _ in dm.split[name]]
    assert len(listed) == 22 and not any("junk" in p for p in listed)


def test_undecodable_file_names_are_handled(tree, tmp_path):
    bad = os.fsdecode(bytes(tree / "Others") + b"/caf\xe9.jpg")
    Path(bad).write_bytes(b"")
    write_image(Path(os.fsdecode(bytes(tree / "Monkeypox") + b"/ni\xf1o.png")), noise_image(7))
    out = tmp_path / "run"
    dm = _dm(tree, tmp_path, output_dir=str(out))
    dm.setup()
    # Listed escaped (valid UTF-8, one line), and parse_file_list gives back the exact name.
    assert (out / "bad_files.txt").read_bytes().startswith(bytes(tree / "Others") + b"/caf\\xe9.jpg\tempty")
    assert parse_file_list((out / "bad_files.txt").read_text(encoding="utf-8"))[0][0] == bad
    assert len(dm.files) == 23 and json.loads((out / "split.json").read_text())["counts"]["train"] == [9, 10]


def test_bad_files_can_be_an_error(tree, tmp_path):
    write_bad_files(tree / "Others")
    with pytest.raises(UserError, match=r"5 unreadable image files .*empty\.jpg.*data\.on_bad_file=skip"):
        _dm(tree, tmp_path, on_bad_file="error").setup()


def test_class_with_only_bad_files_is_dropped(tmp_path, caplog):
    root = make_tree(tmp_path / "data", {"a": 4, "c": 4}, size=40)
    write_bad_files(root / "b")
    dm = _dm(root, tmp_path)
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        dm.setup()
    assert dm.class_names == ["a", "c"]
    assert {label for _, label in dm.split["train"]} == {0, 1}
    assert "none of its images can be read" in caplog.text


@pytest.mark.parametrize("cache", ["none", "disk", "device"])
def test_cached_batches_equal_uncached(tree, tmp_path, cache):
    reference = _dm(tree, tmp_path, cache="memory")
    reference.setup()
    other = _dm(tree, tmp_path, cache=cache)
    other.setup()
    ref_images, ref_labels = _batches(reference.val_dataloader())
    images, labels = _batches(other.val_dataloader())
    assert torch.equal(labels, ref_labels)
    assert (images.int() - ref_images.int()).abs().max() <= 1  # within 1/255
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_device_cache_on_cpu(tree, tmp_path):
    dm = _dm(tree, tmp_path, cache="device", batch_size=5)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches) and len(loader) == 4  # 18 train images
    images, labels = _batches(loader)
    assert images.shape == (18, 3, S, S) and images.dtype == torch.uint8
    seen = sorted(map(tuple, images.flatten(1)[:, :16].tolist()))
    expected = sorted(map(tuple, dm._images[dm._indices["train"]].flatten(1)[:, :16].tolist()))
    assert seen == expected  # every training image exactly once per epoch
    first_epoch = images
    assert not torch.equal(_batches(loader)[0], first_epoch)  # reshuffled next epoch


def test_device_batches_shard_like_distributed_sampler():
    images = torch.arange(7).view(7, 1, 1, 1).expand(7, 3, 2, 2).contiguous().to(torch.uint8)
    labels = torch.arange(7)
    ranks = [DeviceBatches(images, labels, range(7), 2, shuffle=False, rank=r, world_size=2) for r in (0, 1)]
    got = [_batches(loader)[1].tolist() for loader in ranks]
    assert got == [[0, 2, 4, 6], [1, 3, 5, 0]] and all(len(loader) == 2 for loader in ranks)


def test_shuffle_follows_the_global_seed(tree, tmp_path):
    dm = _dm(tree, tmp_path)
    dm.setup()
    orders = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        orders.append(_batches(dm.train_dataloader())[0].flatten(1)[:, 0].tolist())
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_no_decoding_in_a_cached_epoch(tree, tmp_path, count_decodes):
    for cache in ("memory", "device"):
        dm = _dm(tree, tmp_path, cache=cache)
        dm.setup()
        before = len(count_decodes)
        _batches(dm.train_dataloader())
        _batches(dm.val_dataloader())
        assert len(count_decodes) == before, cache
    uncached = _dm(tree, tmp_path, cache="none")
    uncached.setup()
    before = len(count_decodes)
    _batches(uncached.val_dataloader())
    assert len(count_decodes) == before + 4  # the counter does see per-access decoding


def test_disk_cache_is_reused_and_keyed_by_file_content(tree, tmp_path, count_decodes):
    _dm(tree, tmp_path, cache="disk").setup()
    assert len(count_decodes) == 22
    files = list((tmp_path / "cache" / "images").glob("*.u8"))
    assert len(files) == 1 and files[0].name.startswith(f"{S}px-")
    second = _dm(tree, tmp_path, cache="disk")
    second.setup()
    assert len(count_decodes) == 22  # loaded, not decoded
    assert _batches(second.val_dataloader())[0].shape == (4, 3, S, S)
    touched = tree / "Others" / "img_000.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    _dm(tree, tmp_path, cache="disk").setup()
    assert len(count_decodes) == 22  # a new mtime, the same bytes: the same entry
    write_image(tree / "Others" / "img_001.png", noise_image(999))
    _dm(tree, tmp_path, cache="disk").setup()
    assert len(count_decodes) == 44  # other bytes mean a new cache entry
    assert len(list((tmp_path / "cache" / "images").glob("*.u8"))) == 2


def test_corrupt_disk_cache_is_rebuilt(tree, tmp_path, caplog):
    _dm(tree, tmp_path, cache="disk").setup()
    (cache_file,) = (tmp_path / "cache" / "images").glob("*.u8")
    cache_file.write_bytes(b"garbage")
    dm = _dm(tree, tmp_path, cache="disk")
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        dm.setup()
    assert "is not an image cache of this version; decoding the images again" in caplog.text
    assert len(dm.files) == 22


def test_uncached_runs_remember_check_results(tree, tmp_path, monkeypatch):
    write_bad_files(tree / "Others" / "junk")
    first = _dm(tree, tmp_path, cache="none")
    first.setup()

    def fail(*args, **kwargs):
        raise AssertionError("checked again")

    monkeypatch.setattr(images_lib, "check_image", fail)
    again = _dm(tree, tmp_path, cache="none")
    again.setup()
    assert again.bad_files == first.bad_files and len(again.bad_files) == 5


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} | {str(root): root.stat().st_mtime_ns}


def test_read_only_data_folder_is_never_written(tree, tmp_path):
    write_bad_files(tree / "Others" / "junk")
    before = _snapshot(tree)
    paths = sorted(before, key=len, reverse=True)
    for p in paths:
        os.chmod(p, os.stat(p).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        for cache in ("none", "memory", "disk"):
            dm = _dm(tree, tmp_path, cache=cache, output_dir=str(tmp_path / f"run-{cache}"))
            dm.setup()
            _batches(dm.train_dataloader())
            assert (tmp_path / f"run-{cache}" / "split.json").is_file()
    finally:
        for p in paths:
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
    assert _snapshot(tree) == before


def test_on_after_batch_transfer_normalises_and_augments_only_in_training(tree, tmp_path):
    light = {"policy": "light", "crop_scale_min": 0.8, "hflip": 0.5, "rotation": 15.0, "brightness": 0.1}
    dm = _dm(tree, tmp_path, augmentation=light)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    images, labels = dm.on_after_batch_transfer(batch, 0)  # no trainer: not training
    assert images.dtype == torch.float32 and torch.equal(images, normalize(batch[0]))
    assert torch.equal(labels, batch[1])
    dm.trainer = SimpleNamespace(training=True, is_global_zero=True)
    torch.manual_seed(0)
    augmented, _ = dm.on_after_batch_transfer(batch, 0)
    assert augmented.shape == images.shape and augmented.dtype == torch.float32
    assert not torch.allclose(augmented, images)
    low, high = normalize(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2, 1).expand(1, 3, 2, 1))[
        0, :, :, 0
    ].T
    assert (augmented.amin((0, 2, 3)) >= low - 1e-5).all() and (
        augmented.amax((0, 2, 3)) <= high + 1e-5
    ).all()
    dm.trainer = SimpleNamespace(training=False, is_global_zero=True)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], images)
    plain = _dm(tree, tmp_path)  # augment off by default
    plain.setup()
    plain.trainer = SimpleNamespace(training=True, is_global_zero=True)
    assert torch.equal(plain.on_after_batch_transfer(batch, 0)[0], images)


def test_last_training_batch_of_one_is_dropped(tmp_path):
    root = make_tree(tmp_path / "data", {"a": 6, "b": 6}, size=40)  # 10 train images
    dm = _dm(root, tmp_path, batch_size=3)
    dm.setup()
    assert [len(b[1]) for b in dm.train_dataloader()] == [3, 3, 3]
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 2


def test_lightning_fit_with_device_cache(tree, tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
            )
            self.head = torch.nn.Linear(4, 2)
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append((x.dtype, y.dtype))
            return torch.nn.functional.cross_entropy(self.head(self.net(x)), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val/loss", torch.nn.functional.cross_entropy(self.head(self.net(x)), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    light = {"hflip": 0.5, "rotation": 15.0, "brightness": 0.1}
    dm = _dm(tree, tmp_path, cache="device", augmentation=light, output_dir=str(tmp_path / "run"))
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    assert model.seen and all(s == (torch.float32, torch.int64) for s in model.seen)
    assert len(model.seen) == 5 and (tmp_path / "run" / "split.json").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 16}, "data.image_size=16"),
        ({"batch_size": 0}, "data.batch_size=0"),
        ({"cache": "ram"}, "data.cache='ram'"),
        ({"on_bad_file": "warn"}, "data.on_bad_file='warn'"),
        ({"val_fraction": 0.0}, "data.val_fraction=0.0"),
        ({"test_fraction": 1.0}, "data.test_fraction=1.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.test_fraction=0.5 must be below 1"),
        ({"num_workers": -1}, "data.num_workers=-1"),
        ({"max_image_pixels": 0}, "data.max_image_pixels=0"),
    ],
)
def test_bad_values_are_clear_errors(tree, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _dm(tree, tmp_path, **kwargs)


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match=r"data\.root=.*missing does not exist.*experiment=demo"):
        _dm(tmp_path / "missing", tmp_path).setup()
    write_image(tmp_path / "file.png", noise_image(0))
    with pytest.raises(UserError, match=r"file\.png is a file"):
        _dm(tmp_path / "file.png", tmp_path).setup()
    one = make_tree(tmp_path / "one", {"only": 5})
    with pytest.raises(
        UserError,
        match=r"one has 1 class\(es\) with readable images \(only\); at least 2 are needed, one sub-folder per class\.$",
    ):
        _dm(one, tmp_path).setup()
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(UserError, match="has no images in class sub-folders"):
        _dm(tmp_path / "empty", tmp_path).setup()
    write_bad_files(tmp_path / "bad" / "a")
    write_bad_files(tmp_path / "bad" / "b")
    with pytest.raises(UserError, match=r"no readable images \(10 files"):
        _dm(tmp_path / "bad", tmp_path).setup()
