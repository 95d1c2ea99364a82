"""The synthetic demo set: deterministic, balanced, generated atomically, mean colour uninformative."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from PIL import Image

import densenet_se.data.demo as demo
from densenet_se.data import ImageFolderDataModule, ensure_demo_dataset, make_demo_dataset
from densenet_se.errors import UserError

SMALL = dict(images_per_class=6, image_size=40)


def _contents(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_classes_balanced(tmp_path):
    a = _contents(make_demo_dataset(tmp_path / "a", seed=3, **SMALL))
    b = _contents(make_demo_dataset(tmp_path / "b", seed=3, **SMALL))
    assert a == b
    c = _contents(make_demo_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a.keys() == c.keys() and a["Monkeypox/monkeypox_0000.jpg"] != c["Monkeypox/monkeypox_0000.jpg"]
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert (
        sum(k.startswith("Monkeypox/") for k in jpgs) == 6 and sum(k.startswith("Others/") for k in jpgs) == 6
    )
    with Image.open(tmp_path / "a" / "Others" / "others_0005.jpg") as im:
        assert im.size == (40, 40) and im.mode == "RGB" and im.format == "JPEG"
    marker = json.loads(a[demo.MARKER])
    assert marker["seed"] == 3 and marker["images_per_class"] == 6 and "SYNTHETIC" in marker["note"]


def test_image_i_does_not_depend_on_the_set_size(tmp_path):
    small = make_demo_dataset(tmp_path / "small", images_per_class=2, image_size=40)
    big = make_demo_dataset(tmp_path / "big", images_per_class=4, image_size=40)
    name = "Others/others_0001.jpg"
    assert (small / name).read_bytes() == (big / name).read_bytes()


def test_mean_colour_does_not_tell_the_classes_apart():
    # Skin tone, lighting and colour cast are drawn alike for both classes (and each image is rescaled to
    # the mean colour of its lesion-free skin), so a logistic regression on mean RGB is near chance.
    features, labels = [], []
    for label in (0, 1):
        for i in range(100):
            picture = demo.render_image(label, np.random.default_rng([0, label, i]), 32)
            features.append(np.asarray(picture, np.float64).reshape(-1, 3).mean(0) / 255)
            labels.append(label)
    x, y = np.array(features), np.array(labels)
    order = np.random.default_rng(1).permutation(len(y))
    x, y = x[order], y[order]
    accuracies = []
    for fold in range(5):
        test = np.arange(len(y)) % 5 == fold
        mean, std = x[~test].mean(0), x[~test].std(0)
        xt, xv = (x[~test] - mean) / std, (x[test] - mean) / std
        w, b = np.zeros(3), 0.0
        for _ in range(2000):
            grad = 1 / (1 + np.exp(-(xt @ w + b))) - y[~test]
            w, b = w - 0.5 * xt.T @ grad / len(grad), b - 0.5 * grad.mean()
        accuracies.append((((xv @ w + b) > 0) == y[test]).mean())
    assert np.mean(accuracies) < 0.65, accuracies


def test_ensure_generates_once_then_reuses(tmp_path, monkeypatch):
    root = tmp_path / "data" / "demo"
    assert ensure_demo_dataset(root, **SMALL) == root
    first = _contents(root)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(demo, "make_demo_dataset", fail)
    assert ensure_demo_dataset(root, **SMALL) == root
    assert _contents(root) == first
    assert [p.name for p in root.parent.iterdir()] == ["demo"]  # no temp folders left behind


def test_changed_parameters_regenerate(tmp_path):
    root = tmp_path / "demo"
    ensure_demo_dataset(root, **SMALL)
    ensure_demo_dataset(root, images_per_class=3, image_size=40)
    assert len(list((root / "Others").glob("*.jpg"))) == 3
    assert json.loads((root / demo.MARKER).read_text())["images_per_class"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_interrupted_generation_leaves_no_half_set(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    calls = []
    original = demo.render_image

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(demo, "render_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset(root, **SMALL)
    assert not root.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(demo, "render_image", original)
    ensure_demo_dataset(root, **SMALL)
    assert len(list(root.rglob("*.jpg"))) == 12


def test_an_existing_user_folder_is_not_overwritten(tmp_path):
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "a.jpg").write_bytes(b"mine")
    with pytest.raises(UserError, match=r"data\.root=.*photos exists but is not the generated demo"):
        ensure_demo_dataset(root, **SMALL)
    assert (root / "cats" / "a.jpg").read_bytes() == b"mine"


def test_datamodule_demo_generates_a_missing_root(tmp_path, monkeypatch):
    small = functools.partial(demo.ensure_demo_dataset, images_per_class=5, image_size=40)
    monkeypatch.setattr(demo, "ensure_demo_dataset", small)
    root = tmp_path / "data" / "demo"
    dm = ImageFolderDataModule(
        root=str(root), image_size=32, batch_size=4, demo=True, cache_dir=str(tmp_path / "c")
    )
    dm.prepare_data()
    dm.setup()
    assert dm.class_names == ["Monkeypox", "Others"] and len(dm.files) == 10
    assert dm.split["counts"] == {"train": [4, 4], "val": [1, 1], "test": [0, 0]}
