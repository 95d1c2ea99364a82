"""Atomic writes: a reader never sees half a file, failed writes leave nothing behind."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from densenet_se.io import atomic_torch_save, atomic_write_bytes, atomic_write_text


def _writer(path: str, fill: int, times: int) -> None:
    for _ in range(times):
        atomic_write_bytes(path, bytes([fill]) * 200_000)


def test_concurrent_writers_never_interleave(tmp_path):
    path = tmp_path / "shared.bin"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_writer, args=(str(path), fill, 30)) for fill in (1, 2)]
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):
        if path.exists():
            data = path.read_bytes()
            assert len(data) == 200_000 and len(set(data)) == 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert set(path.read_bytes()) <= {1, 2}
    assert os.listdir(tmp_path) == ["shared.bin"]  # no temp files left


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b.txt", "old")
    assert oct(path.stat().st_mode & 0o777) == "0o644"

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": Boom()}, path)
    assert path.read_text() == "old" and os.listdir(path.parent) == ["b.txt"]


def test_torch_save_loads_with_weights_only(tmp_path):
    path = atomic_torch_save({"w": torch.arange(3), "names": ["a", "b"]}, tmp_path / "s.pt")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["names"] == ["a", "b"]


def test_undecodable_names_survive_as_bytes(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")  # a latin-1 file name on a UTF-8 system
    path = atomic_write_text(tmp_path / "list.txt", name + "\n", errors="surrogateescape")
    assert path.read_bytes() == b"caf\xe9.jpg\n"
