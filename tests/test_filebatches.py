"""Prediction's decoding pipeline: worker processes decode whole batches, in order, ahead of the model."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densenet_se.data import filebatches
from densenet_se.data.filebatches import decoded_batches
from densenet_se.data.images import decode_image
from densenet_se.errors import UserError

S = 32


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    """Seven JPEGs of various sizes, with a broken one third and a missing one sixth."""
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 40), (52, 37), None, (33, 45), (64, 64), "missing", (48, 30)]):
        path = tmp_path / f"img_{i}.jpg"
        if size is None:
            path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        elif size != "missing":
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_come_in_order_with_the_training_pixels_and_the_reasons(files, workers):
    batches = list(decoded_batches(files, S, 10**7, batch_size=3, num_workers=workers))
    assert [len(b.paths) + len(b.skipped) for b in batches] == [3, 3, 1]
    assert [p.name for b in batches for p in b.paths] == [f"img_{i}.jpg" for i in (0, 1, 3, 4, 6)]
    skipped = [(p.name, reason) for b in batches for p, reason in b.skipped]
    assert [name for name, _ in skipped] == ["img_2.jpg", "img_5.jpg"]
    assert skipped[1][1].startswith("unreadable: ") and "No such file" in skipped[1][1]
    for batch in batches:
        expected = torch.stack([decode_image(p, S, 10**7) for p in batch.paths])
        assert batch.images.dtype == torch.uint8 and torch.equal(batch.images, expected)


def test_a_batch_of_unreadable_files_has_no_images(files):
    (batch,) = decoded_batches([files[2], files[5]], S, 10**7, batch_size=4, num_workers=0)
    assert batch.paths == [] and batch.images is None and len(batch.skipped) == 2


def _logging_decode(log: Path):
    def decode(path, image_size, max_pixels):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {Path(path).name}\n")
        return decode_image(path, image_size, max_pixels)

    return decode


def test_worker_processes_decode_the_next_batches_while_this_one_is_used(files, tmp_path, monkeypatch):
    log = tmp_path / "decoded.log"
    monkeypatch.setattr(filebatches, "decode_image", _logging_decode(log))  # the forked workers inherit it
    good = [p for i, p in enumerate(files) if i not in (2, 5)]
    stream = decoded_batches(good * 2, S, 10**7, batch_size=2, num_workers=2)
    first = next(stream)
    assert [p.name for p in first.paths] == ["img_0.jpg", "img_1.jpg"]
    deadline = time.monotonic() + 30

    def decoded() -> list[list[str]]:
        return [line.split() for line in log.read_text().splitlines()]

    # The consumer holds batch 1; the workers go on with batches 2-5 (each worker two ahead). Which worker
    # starts first is up to the OS: on a busy machine one can decode 6 images before the other starts.
    while time.monotonic() < deadline and (len(decoded()) < 6 or len({pid for pid, _ in decoded()}) < 2):
        time.sleep(0.02)
    lines = decoded()
    assert len(lines) >= 6, lines
    assert {pid for pid, _ in lines} - {str(os.getpid())} == {pid for pid, _ in lines}  # not this process
    assert len({pid for pid, _ in lines}) == 2
    rest = list(stream)
    assert sum(len(b.paths) for b in rest) == 8 and not any(b.skipped for b in rest)


def test_bad_settings_are_one_sentence(files):
    with pytest.raises(UserError, match=r"num_workers=-1 must be 0 \(decode in this process\) or more"):
        next(decoded_batches(files, S, 10**7, batch_size=2, num_workers=-1))
    with pytest.raises(UserError, match=r"batch_size=0 must be at least 1"):
        next(decoded_batches(files, S, 10**7, batch_size=0))
