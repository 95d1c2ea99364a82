"""Changed pictures are noticed by content, not by name, size or mtime: resume refuses them, the disk cache
verifies each shard and rebuilds a damaged or foreign entry, and a run never depends on the cache file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densenet_se.data import ImageFolderDataModule, diskcache
from densenet_se.data.cache import decode_files_with_digests, save_check_index
from densenet_se.data.images import decode_image
from densenet_se.errors import UserError
from densenet_se.train import run
from helpers.config import ROOT, TINY, compose_cfg
from helpers.images import make_tree, noise_image, write_image
from helpers.runs import subprocess_env

S = 32


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "data", {"Monkeypox": 10, "Others": 12}, size=40)


def _dm(root: Path, tmp_path: Path, **kwargs) -> ImageFolderDataModule:
    args = dict(root=str(root), image_size=S, batch_size=4, cache_dir=str(tmp_path / "cache"), cache="disk")
    args.update(kwargs)
    dm = ImageFolderDataModule(**args)
    dm.setup()
    return dm


def _cache_file(tmp_path: Path) -> Path:
    (path,) = (tmp_path / "cache" / "images").glob("*.u8")
    return path


def _rewrite_keeping_size_and_mtime(path: Path, seed: int) -> None:
    """Other pixels in the same number of bytes, with the old mtime put back (what a careful forger does)."""
    before = path.stat()
    write_image(path, noise_image(seed))
    assert path.stat().st_size == before.st_size  # 40x40 noise PNGs all compress to the same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _expected(root: Path, dm: ImageFolderDataModule) -> torch.Tensor:
    return torch.stack([decode_image(root / rel, S) for rel in dm.files])


# ------------------------------------------------------------------------------------------------ resume
def _trained(tmp_path: Path, images: Path, *extra: str):
    cfg = compose_cfg(
        tmp_path, [*TINY, "trainer.max_epochs=1", f"data.root={images}", "print_config=false", *extra]
    )
    run(cfg)
    return tmp_path / "run"


def test_split_json_records_each_images_sha256_digest(tree, tmp_path):
    dm = _dm(tree, tmp_path, output_dir=str(tmp_path / "run"), cache="memory")
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert saved["digest"] == "sha256-128" and len(saved["digests"]) == 22
    for rel in dm.files:
        assert saved["digests"][rel] == hashlib.sha256((tree / rel).read_bytes()).hexdigest()[:32]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["every image", "one image, size and mtime kept"])
def test_resume_refuses_other_pixels_under_the_same_names(tmp_path, how):
    images = make_tree(tmp_path / "images", {"Monkeypox": 12, "Others": 12}, size=40)
    run_dir = _trained(tmp_path, images)
    files = sorted(images.rglob("*.png"))
    if how == "every image":  # each file gets another file's pixels
        contents = [p.read_bytes() for p in files]
        for path, data in zip(files, contents[1:] + contents[:1], strict=True):
            path.write_bytes(data)
    else:
        _rewrite_keeping_size_and_mtime(files[3], seed=4242)
    with pytest.raises(UserError) as err:
        run(compose_cfg(tmp_path, [*TINY, f"data.root={images}", "print_config=false", f"resume={run_dir}"]))
    message = str(err.value)
    count = 24 if how == "every image" else 1
    assert f"{count} image(s) changed since" in message and str(run_dir / "split.json") in message
    if count == 1:  # the sentence names the file
        assert f"({files[3].relative_to(images).as_posix()};" in message
    assert "\n" not in message and message.endswith("or start a new run instead of resume=.")


@pytest.mark.slow
def test_resume_of_an_older_run_without_digests_warns_and_continues(tmp_path, caplog):
    images = make_tree(tmp_path / "images", {"Monkeypox": 12, "Others": 12}, size=40)
    run_dir = _trained(tmp_path, images)
    split = json.loads((run_dir / "split.json").read_text())
    del split["digests"]
    (run_dir / "split.json").write_text(json.dumps(split))
    cfg = compose_cfg(tmp_path, [*TINY, f"data.root={images}", "print_config=false", f"resume={run_dir}"])
    with caplog.at_level(logging.WARNING, logger="densenet_se"):
        run(cfg)
    assert "records no image digests (an older run)" in caplog.text
    split["digests"] = ["not", "a", "mapping"]
    (run_dir / "split.json").write_text(json.dumps(split))
    with pytest.raises(
        UserError, match=r"split\.json is damaged \(its digests are not a \{path: digest\} mapping\)"
    ):
        run(compose_cfg(tmp_path, [*TINY, f"data.root={images}", "print_config=false", f"resume={run_dir}"]))


# ------------------------------------------------------------------------------------------------ disk cache
def test_a_picture_rewritten_with_size_and_mtime_kept_is_decoded_again(tree, tmp_path):
    _dm(tree, tmp_path)
    _rewrite_keeping_size_and_mtime(tree / "Others" / "img_004.png", seed=777)
    dm = _dm(tree, tmp_path)
    assert torch.equal(dm._images, _expected(tree, dm))  # the new pixels, not the cached old ones


def test_bytes_overwritten_inside_the_cache_are_caught_and_rebuilt(tree, tmp_path, caplog):
    first = _dm(tree, tmp_path)
    path = _cache_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5000:-4000] = b"\xff" * 1000  # white pixels in the last image rows
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        dm = _dm(tree, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"ignoring image cache {path}: shard 1 of 1 (images 1-22) fails its checksum (the file was changed); "
        "decoding the images again"
    ]
    assert torch.equal(dm._images, first._images) and torch.equal(dm._images, _expected(tree, dm))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        _dm(tree, tmp_path)  # the rebuilt entry was written back and now verifies
    assert not caplog.records


def test_every_shard_is_checked(tree, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(diskcache, "SHARD_BYTES", 5 * 3 * S * S)  # 5 images per shard: 5 shards for 22
    _dm(tree, tmp_path)
    path = _cache_file(tmp_path)
    data = bytearray(path.read_bytes())
    offset = len(data) - 22 * 3 * S * S + 12 * 3 * S * S  # inside image 13: the third shard
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        _dm(tree, tmp_path)
    assert "shard 3 of 5 (images 11-15) fails its checksum" in caplog.text


def test_an_entry_of_another_image_size_under_this_name_is_rebuilt(tree, tmp_path, caplog):
    _dm(tree, tmp_path, image_size=64)
    (big,) = (tmp_path / "cache" / "images").glob("64px-*.u8")
    _dm(tree, tmp_path)
    small = _cache_file_of(tmp_path, S)
    big.replace(small)  # the 64 px entry now sits where the 32 px one belongs
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        dm = _dm(tree, tmp_path)
    assert "ignoring image cache" in caplog.text and dm._images.shape[1:] == (3, S, S)
    assert torch.equal(dm._images, _expected(tree, dm))


def _cache_file_of(tmp_path: Path, size: int) -> Path:
    (path,) = (tmp_path / "cache" / "images").glob(f"{size}px-*.u8")
    return path


def test_a_well_formed_entry_listing_unknown_files_is_rebuilt_not_a_key_error(tree, tmp_path, caplog):
    dm = _dm(tree, tmp_path)
    path = _cache_file(tmp_path)
    key = path.name.split("-", 1)[1].removesuffix(".u8")
    files = list(dm.files)
    files[0] = "Monkeypox/not_in_the_folder.png"
    diskcache.save(path, key, files, [], dm._images)  # consistent checksums, foreign file list
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        again = _dm(tree, tmp_path)
    assert "its file list is not the folder's" in caplog.text and again.files == dm.files


@pytest.mark.parametrize(
    "damage",
    ["truncate", "header", "magic", "huge header", "nested header"],
)
def test_damaged_cache_files_are_rebuilt_with_one_warning(tree, tmp_path, caplog, damage):
    _dm(tree, tmp_path)
    path = _cache_file(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "header":
        at = data.index(b"img_005")
        data[at : at + 7] = b"img_099"
    elif damage == "magic":
        data[:8] = b"PK\x03\x04xxxx"
    elif damage == "huge header":  # a header length that would allocate terabytes
        n = len(diskcache.MAGIC)
        data[n : n + 8] = (1 << 40).to_bytes(8, "little")
    else:  # a header with a valid checksum that no JSON parser can descend
        header = b"[" * 20_000 + b"]" * 20_000
        data = bytearray(
            diskcache.MAGIC + len(header).to_bytes(8, "little") + diskcache._header_digest(header) + header
        )
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        dm = _dm(tree, tmp_path)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert "ignoring image cache" in caplog.text and torch.equal(dm._images, _expected(tree, dm))


_TRUNCATE_DURING_RUN = """
import sys, torch
from pathlib import Path
from densenet_se.data import ImageFolderDataModule
root, cache = Path(sys.argv[1]), Path(sys.argv[2])
def dm():
    d = ImageFolderDataModule(root=str(root), image_size=32, batch_size=4, cache="disk", cache_dir=str(cache))
    d.setup()
    return d
dm()
d = dm()  # loaded from the cache file
(path,) = (cache / "images").glob("*")
path.write_bytes(b"")  # truncated by another process while this run trains
total = sum(int(images.sum()) for images, _ in d.train_dataloader())
print("ok", total > 0)
"""


@pytest.mark.slow
def test_truncating_the_cache_file_during_a_run_cannot_kill_it(tree, tmp_path):
    # In a subprocess: with a memory-mapped cache this was a SIGBUS, which would take pytest down with it.
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_DURING_RUN, str(tree), str(tmp_path / "cache")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok True", (proc.returncode, proc.stderr[-2000:])


# ------------------------------------------------------------------------------------------------ no cache
def test_a_file_changed_during_an_uncached_run_is_an_error_not_silently_used(tree, tmp_path):
    dm = _dm(tree, tmp_path, cache="none")
    rel = dm.files[dm._indices["val"][0]]
    _rewrite_keeping_size_and_mtime(tree / rel, seed=31337)
    with pytest.raises(UserError, match=r"changed or became unreadable during training: its content differs"):
        list(dm.val_dataloader())


def test_a_changed_file_is_checked_again_and_a_damaged_check_index_is_ignored(tree, tmp_path):
    _dm(tree, tmp_path, cache="none")
    (tree / "Others" / "img_002.png").write_bytes(b"not a png any more")
    assert [Path(p).name for p, _ in _dm(tree, tmp_path, cache="none").bad_files] == ["img_002.png"]
    save_check_index(tmp_path / "cache", tree, 89_478_485, {"Others/img_003.png": "junk", "x": [1, 2, 3]})
    assert [Path(p).name for p, _ in _dm(tree, tmp_path, cache="none").bad_files] == ["img_002.png"]


def test_a_file_that_changes_while_it_is_read_is_an_error(tree, tmp_path):
    files = ["Monkeypox/img_000.png", "Others/img_000.png"]
    with pytest.raises(UserError, match=r"Others/img_000\.png changed while it was being read"):
        decode_files_with_digests(tree, files, S, 89_478_485, expected=["", "0" * 32])


def test_prepare_data_and_setup_read_an_existing_entry_once(tree, tmp_path, monkeypatch):
    _dm(tree, tmp_path)
    loads = []
    real_load = diskcache.load
    monkeypatch.setattr(diskcache, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    dm = ImageFolderDataModule(root=str(tree), image_size=S, cache="disk", cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()  # the entry exists: nothing to fill, so nothing read (300 MB at 224 px)
    dm.setup()
    assert loads == [_cache_file(tmp_path)] and torch.equal(dm._images, _expected(tree, dm))
