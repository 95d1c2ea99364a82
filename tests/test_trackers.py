"""logger=mlflow|wandb|many: real runs written by the trackers' own libraries and read back through them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from densenet_se.errors import UserError
from densenet_se.train import run
from helpers.config import TINY, compose_cfg
from helpers.images import make_image_folder


@pytest.fixture
def images(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images", {"a": 12, "b": 12})


@pytest.mark.slow
def test_mlflow_file_store_holds_the_runs_metrics_and_settings(tmp_path, images, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    overrides = [*TINY, f"data.root={images}", "logger=mlflow", "augment=light", "experiment_name=tiny"]
    run(compose_cfg(tmp_path, [*overrides, "print_config=false"]))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    client = MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert found.info.status == "FINISHED" and found.data.tags["run_dir"] == str(tmp_path / "run")
    history = client.get_metric_history(found.info.run_id, "val/acc")
    assert [m.value for m in history] == pytest.approx([e["val_acc"] for e in metrics["epochs"]])
    params = found.data.params
    assert params["lr"] == "0.01" and params["augment/policy"] == "light" and params["augment/hflip"] == "0.5"


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file: LevelDB's log format (32 KiB blocks of records with a 7-byte
    header: CRC32C, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after W&B's 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, parts = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        parts = (b"" if kind in (1, 2) else parts) + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


@pytest.mark.slow
def test_wandb_runs_offline_into_the_run_directory(tmp_path, images, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [*TINY, f"data.root={images}", "logger=wandb", "callbacks=ema", "print_config=false"]
    run(compose_cfg(tmp_path, overrides))
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")  # offline: nothing was sent anywhere
    (run_file,) = offline.glob("run-*.wandb")
    records = wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header" and "exit" in kinds  # the run was finished
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.HasField("history")
    ]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["val/acc"] for h in history if "val/acc" in h] == pytest.approx(
        [e["val_acc"] for e in metrics["epochs"]]
    )
    config = {i.key: i.value_json for r in records if r.HasField("config") for i in r.config.update}
    assert json.loads(config["ema"]) == {"decay": 0.999, "warmup": True} and json.loads(config["lr"]) == 0.01


def test_many_combines_every_tracker_and_a_missing_package_is_one_sentence(tmp_path, monkeypatch):
    cfg = compose_cfg(tmp_path, ["logger=many"])
    assert set(cfg.logger) == {"tensorboard", "csv", "mlflow", "wandb"}
    import importlib.util

    from densenet_se import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(UserError) as err:
        trackers.mlflow_logger(run_dir=str(tmp_path))
    assert str(err.value) == (
        "logger=mlflow needs the mlflow package: pip install 'densenet-se[mlflow]' "
        "(or pick another logger, e.g. logger=tensorboard)."
    )
