"""The backbone seam: model.arch picks a registered backbone; torchvision's models as paper baselines through
train, eval, predict (Grad-CAM), export and resume; and a third arch added with one file plus one YAML (the worked
example of docs/ARCHITECTURE.md, run end to end)."""

from __future__ import annotations

import csv
import json
import urllib.error
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

import densenet_se.evaluate as evaluate
import densenet_se.export as export
import densenet_se.predict as predict
from densenet_se import backbones
from densenet_se.backbones import torchvision as tv_arch
from densenet_se.checkpoint import build_classifier, load_checkpoint
from densenet_se.config import closest_key, compose_train_config, validate
from densenet_se.data.images import load_image, normalize
from densenet_se.errors import UserError
from densenet_se.explain import GradCAM
from densenet_se.finetune import set_backbone_frozen
from densenet_se.models.common import build_on_meta
from densenet_se.module import Classifier
from densenet_se.resume import prepare_resume
from helpers.config import CONF, TINY, TINY_TV, compose_cfg, task_cfg
from helpers.crafted import TINY_TORCHVISION, checkpoint_run, resumable_run, tiny_checkpoint
from helpers.docs import installed_example
from helpers.images import make_image_folder, split_files
from helpers.runs import tiny_run

BASELINES = ("resnet50", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_small")


def test_the_registry_holds_each_arch_with_its_file():
    table = backbones.registry()
    assert list(table) == ["densenet_se", "torchvision"]
    for backbone in table.values():
        assert (CONF / "model" / f"{backbone.config}.yaml").is_file()
        assert set(backbone.layout_keys) <= set(backbone.own_keys())
    assert table["torchvision"].own_keys() == ("name",)
    for preset in ("resnet50", "efficientnet_b0", "convnext_tiny"):  # paper baselines: model=<name>
        assert OmegaConf.load(CONF / "model" / f"{preset}.yaml").name == preset


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "regnet_x_400mf"])
def test_the_size_check_counts_what_torchvision_builds(name):
    # RegNets compute their widths with small tensors: a plain meta-device build cannot make them.
    meta = build_on_meta(lambda: torchvision.models.get_model(name, weights=None, num_classes=3))
    real = torchvision.models.get_model(name, weights=None, num_classes=3)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())
    assert {k: v.shape for k, v in meta.state_dict().items()} == {
        k: v.shape for k, v in real.state_dict().items()
    }
    assert tv_arch.head_name(real) in {"fc", "classifier.1", "classifier.3"}
    assert real.get_submodule(tv_arch.head_name(real)).weight.shape[0] == 3


def _cam_map_shape(name: str, image_size: int) -> tuple[int, ...]:
    net = build_on_meta(lambda: tv_arch.network(name, 3))
    seen = []
    layer = net.get_submodule(tv_arch.cam_layer({"name": name}))
    layer.register_forward_hook(lambda module, inputs, output: seen.append(tuple(output.shape)))
    with torch.no_grad():
        net(torch.empty(1, 3, image_size, image_size, device="meta"))
    return seen[-1]


@pytest.mark.parametrize("name", BASELINES)
def test_the_grad_cam_layer_of_each_baseline_is_its_last_feature_map(name):
    shape = _cam_map_shape(name, 224)
    assert len(shape) == 4 and shape[0] == 1 and shape[2:] == (7, 7), shape  # [N, C, 224/32, 224/32]
    assert tv_arch.cam_layer({"name": "vit_b_16"}) is None  # tokens, not a map: no Grad-CAM


@pytest.mark.slow
def test_every_torchvision_model_but_vits_has_a_grad_cam_map():
    for name in tv_arch.names():
        if name.startswith("vit"):
            continue
        shape = _cam_map_shape(name, 299 if name == "inception_v3" else 224)
        assert len(shape) == 4 and min(shape[2:]) > 1 and shape[1] > 3, (name, shape)


def test_grad_cam_of_a_resnet_is_its_class_activation_map():
    torch.manual_seed(0)
    module = Classifier(3, image_size=96, model=TINY_TORCHVISION).eval()
    x = torch.randn(2, 3, 96, 96)
    cam = GradCAM(module)
    probs, maps = cam(x, target=torch.tensor([0, 2]))
    cam.close()
    net, kept = module.model, {}
    hook = net.layer4.register_forward_hook(lambda m, i, output: kept.update(a=output))
    with torch.no_grad():
        logits = net(x)
    hook.remove()
    assert torch.allclose(probs, logits.softmax(dim=1), atol=1e-6)
    for i, c in enumerate([0, 2]):  # the fc layer is linear on the mean of layer4: CAM of Zhou et al.
        raw = torch.relu(torch.einsum("k,khw->hw", net.fc.weight[c], kept["a"][i]))
        assert maps[i].shape == (3, 3)
        assert torch.allclose(maps[i], raw / raw.max().clamp_min(1e-12), atol=1e-5)


def test_an_arch_without_a_feature_map_has_no_grad_cam_and_reports_show_the_images(monkeypatch):
    from densenet_se.explain import gradcam_overlays

    module = Classifier(2, image_size=32, model=TINY_TORCHVISION).eval()
    monkeypatch.setattr(tv_arch, "CAM_LAYERS", ())  # as for a ViT: no layer is named
    assert module.cam_layer() is None
    with pytest.raises(UserError) as err:
        GradCAM(module)
    assert str(err.value) == (
        "Grad-CAM needs a convolutional feature map and model.arch=torchvision (resnet18) has none; "
        "drop gradcam=true."
    )
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    hp = {"mean": [0.5] * 3, "std": [0.25] * 3}
    pictures = gradcam_overlays(module, images, torch.tensor([0, 1]), hp, torch.device("cpu"))
    assert [p.tobytes() for p in pictures] == [img.permute(1, 2, 0).numpy().tobytes() for img in images]


@pytest.mark.slow
def test_a_pretrained_file_fills_the_backbone_and_the_head_starts_new(tmp_path):
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()  # stands in for ImageNet's weights
    path = tmp_path / "resnet18.pt"
    torch.save(imagenet, path)
    module = Classifier(3, image_size=32, model={**TINY_TORCHVISION, "pretrained": str(path)})
    state = module.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in imagenet.items() if not k.startswith("fc."))
    assert state["fc.weight"].shape == (3, 512) and module.hparams.model["pretrained"] == str(path)
    report = module.model.pretrained_report
    assert (
        report.new == report.skipped == ("fc.weight", "fc.bias") and len(report.loaded) == len(imagenet) - 2
    )
    # A run's own checkpoint is a state dict too (keys under "model."): everything loads, the head included.
    tiny_checkpoint(tmp_path / "run.ckpt", TINY_TORCHVISION)
    again = Classifier(3, image_size=32, model={**TINY_TORCHVISION, "pretrained": str(tmp_path / "run.ckpt")})
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[f"model.{k}"]) for k, v in again.model.state_dict().items())
    assert again.model.pretrained_report.new == ()


def test_imagenet_weights_come_from_torchvisions_url_or_one_sentence_says_where_to_put_them(monkeypatch):
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    settings = {**TINY_TORCHVISION, "pretrained": "imagenet"}

    def offline(url, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError) as err:
        Classifier(3, image_size=32, model=settings)
    assert str(err.value).startswith(
        f"pretrained='imagenet' could not fetch {weights.url} (URLError: <urlopen error no network>); on a "
        "machine without internet put resnet18-f37072fd.pth in "
    ) and str(err.value).endswith("or set pretrained to the path of a state-dict file, or to null")
    torch.manual_seed(2)
    fake = torchvision.models.resnet18().state_dict()
    asked = []
    monkeypatch.setattr(
        torch.hub, "load_state_dict_from_url", lambda url, **kw: asked.append((url, kw)) or fake
    )
    module = Classifier(3, image_size=32, model=settings)
    assert asked == [
        (weights.url, {"map_location": "cpu", "progress": False, "check_hash": True, "weights_only": True})
    ]
    assert torch.equal(module.model.conv1.weight, fake["conv1.weight"])
    assert module.model.pretrained_report.source == "torchvision's ResNet18_Weights.IMAGENET1K_V1"


@pytest.mark.slow
def test_weights_of_another_model_are_one_sentence(tmp_path):
    deeper, other = tmp_path / "resnet34.pt", tmp_path / "mobilenet.pt"
    torch.save(torchvision.models.resnet34().state_dict(), deeper)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), other)
    with pytest.raises(ValueError) as err:
        Classifier(3, image_size=32, model={**TINY_TORCHVISION, "pretrained": str(deeper)})
    assert str(err.value) == (
        f"pretrained {deeper} does not fit torchvision's resnet18: layer1.2.conv1.weight is in the file but not "
        "in the model; point pretrained at weights of resnet18 or set it to null"
    )
    with pytest.raises(
        ValueError, match=r"holds no weights of torchvision's resnet18 \(no key conv1.weight\)"
    ):
        Classifier(3, image_size=32, model={**TINY_TORCHVISION, "pretrained": str(other)})


def test_fine_tuning_trains_torchvisions_head_at_lr_and_freezes_the_rest():
    model = {"arch": "torchvision", "name": "mobilenet_v3_small"}
    module = Classifier(3, image_size=32, lr=0.01, backbone_lr_mult=0.1, model=model)
    assert module.head == ("classifier.3",)  # the last Linear; classifier.0 is pretrained backbone
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert sorted(names[id(p)] for p in groups["head"]["params"]) == [
        "classifier.3.bias",
        "classifier.3.weight",
    ]
    assert groups["head"]["lr"] == 0.01 and groups["backbone"]["lr"] == pytest.approx(0.001)
    set_backbone_frozen(module.model, module.head, True)
    assert [n for n, p in module.model.named_parameters() if p.requires_grad] == [
        "classifier.3.weight",
        "classifier.3.bias",
    ]


@pytest.mark.slow
def test_model_torchvision_composes_validates_and_refuses_in_one_sentence(tmp_path):
    cfg = compose_cfg(tmp_path, ["model=resnet50"])
    validate(cfg)
    assert OmegaConf.to_container(cfg.model) == {
        "arch": "torchvision",
        "pretrained": None,
        "channels_last": False,
        "compile": False,
        "name": "resnet50",
    }
    with pytest.raises(UserError) as from_config:
        validate(compose_cfg(tmp_path, ["model=torchvision", "model.name=resnet5"]))
    with pytest.raises(ValueError) as from_owner:  # the code using the value refuses it in the same words
        Classifier(2, model={"arch": "torchvision", "name": "resnet5"})
    assert str(from_config.value) == f"model.{from_owner.value}"
    assert str(from_config.value).startswith(
        "model.name='resnet5' is out of range; it must be the name of a torchvision classification model, such as "
    )
    with pytest.raises(UserError) as alone:  # the keys come with the arch's file
        validate(compose_cfg(tmp_path, ["model.arch=torchvision"]))
    assert str(alone.value) == (
        "model.growth_rate is not a setting of model.arch=torchvision; choose an arch with its file in "
        "conf/model/ (model=densenet121_se, model=torchvision) rather than setting model.arch alone."
    )
    with pytest.raises(
        UserError, match=r"^model.arch='vgg' is not allowed; choose one of: densenet_se, torchvision\.$"
    ):
        validate(compose_cfg(tmp_path, ["model=torchvision", "model.arch=vgg"]))
    assert closest_key("model.nme") == "model.name" and closest_key("model.growth_rat") == "model.growth_rate"


@pytest.mark.slow
def test_a_key_of_another_arch_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    from helpers.runs import run_cli

    args = ["model=torchvision", "model.growth_rate=4", f"hydra.run.dir={tmp_path}"]
    assert run_cli("train", args, monkeypatch) == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.growth_rate is not a setting of model.arch=torchvision; it is a setting of "
        "model.arch=densenet_se, chosen with its file (model=densenet121_se)"
    )


# ------------------------------------------------------------ eval, predict and export on a torchvision model
TV_SETTINGS = {"arch": "torchvision", "name": "mobilenet_v3_small"}  # TINY_TV's model


@pytest.fixture(scope="module")
def tv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-class MobileNetV3-Small checkpoint (not trained) with its split.json and images: what eval reads."""
    return checkpoint_run(tmp_path_factory.mktemp("tv"), {"a": 3, "b": 3, "c": 3}, TV_SETTINGS)


@pytest.mark.slow
def test_eval_on_a_torchvision_checkpoint(tv_checkpoint, tmp_path):
    ckpt = tv_checkpoint["ckpt"]
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["model"] == {
        "arch": "torchvision",
        "pretrained": None,
        "channels_last": False,
        "compile": False,
        "name": "mobilenet_v3_small",
    }
    result = evaluate.run(task_cfg("eval", [f"ckpt_path={ckpt}", "top_losses=2"], output_dir=str(tmp_path)))
    # The reference: the rebuilt network's probabilities for each image, and the accuracy counted with numpy.
    module = build_classifier(load_checkpoint(ckpt))
    split = json.loads(tv_checkpoint["split"].read_text())
    images = torch.stack([load_image(Path(split["root"]) / rel, 32) for rel, _ in split["val"]])
    with torch.inference_mode():
        expected = module(normalize(images)).softmax(dim=1).numpy()
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    got = np.array([[float(rows[rel][c]) for c in ("a", "b", "c")] for rel, _ in split["val"]])
    assert np.allclose(got, expected, atol=1e-5)
    labels = np.array([label for _, label in split["val"]])
    predicted = np.array([["a", "b", "c"].index(rows[rel]["predicted"]) for rel, _ in split["val"]])
    assert result["n"] == 9 and result["acc"] == pytest.approx(float(np.mean(predicted == labels)))
    # The report's highest-loss images carry Grad-CAM overlays of the torchvision model's feature map.
    assert (tmp_path / "report.html").is_file() and (tmp_path / "top_losses.png").is_file()


@pytest.mark.slow
def test_predict_with_grad_cam_on_a_torchvision_checkpoint(tv_checkpoint, tmp_path):
    ckpt, inbox = tv_checkpoint["ckpt"], tv_checkpoint["images"] / "a"
    out = tmp_path / "p.csv"
    result = predict.run(
        task_cfg("predict", [f"ckpt_path={ckpt}", f"input={inbox}", f"output={out}", "gradcam=true"])
    )
    assert len(result["rows"]) == 3 and len(list((tmp_path / "gradcam").glob("*.png"))) == 3
    module = build_classifier(load_checkpoint(ckpt))
    first = sorted(inbox.iterdir())[0]
    with torch.inference_mode():
        expected = module(normalize(load_image(first, 32)[None])).softmax(dim=1)[0].tolist()
    row = next(r for r in result["rows"] if Path(r["path"]).name == first.name)
    assert row["probs"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_export_a_torchvision_model_as_onnx_and_as_torchvisions_state_dict(tv_checkpoint, tmp_path):
    ckpt = tv_checkpoint["ckpt"]
    module = build_classifier(load_checkpoint(ckpt))
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = module(x)
    export.run(task_cfg("export", [f"ckpt_path={ckpt}", "exporter=legacy"], output_dir=str(tmp_path)))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, _ = session.run(["logits", "probabilities"], {"images": x.numpy()})
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4)
    out = tmp_path / "weights.pt"
    export.run(
        task_cfg(
            "export", [f"ckpt_path={ckpt}", "format=state_dict", f"output={out}"], output_dir=str(tmp_path)
        )
    )
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["arch"] == "torchvision" and side["model"] == {"name": "mobilenet_v3_small"}
    assert side["load_with"].startswith(
        "torchvision.models.get_model(model['name'], num_classes=num_classes)"
    )
    # What the sidecar says: torchvision's own model, its own keys, loaded with weights_only=True.
    net = torchvision.models.get_model(side["model"]["name"], num_classes=side["num_classes"]).eval()
    net.load_state_dict(torch.load(out, weights_only=True))
    with torch.inference_mode():
        assert torch.allclose(net(x), expected, atol=1e-6)


@pytest.mark.slow
def test_training_a_torchvision_model_stores_one_settings_dict_that_eval_reproduces(
    tmp_path_factory, tmp_path
):
    run_dir = tiny_run(tmp_path_factory, "torchvision")
    hparams = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["model"]["arch"] == "torchvision" and hparams["model"]["name"] == "mobilenet_v3_small"
    assert not {"name", "growth_rate", "arch"} & set(hparams)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    result = evaluate.run(task_cfg("eval", [f"ckpt_path={ckpt}"], output_dir=str(tmp_path)))
    assert result["acc"] == metrics["best_val_acc"]  # exactly: the same images, batches and metric
    assert result["n"] == len(split_files(run_dir / "split.json", "val"))


@pytest.mark.slow
def test_resume_checks_the_arch_and_its_layout(tmp_path):
    run_dir = resumable_run(tmp_path / "tv", settings=TV_SETTINGS, tiny=TINY_TV)
    session = prepare_resume(compose_cfg(tmp_path / "tv", [*TINY_TV, f"resume={run_dir}"]))
    assert session.cfg.model.name == "mobilenet_v3_small" and session.epoch == 5
    other = compose_cfg(tmp_path / "tv", [*TINY_TV, "model.name=resnet18", f"resume={run_dir}"])
    with pytest.raises(
        UserError,
        match=r"^model.name=resnet18 does not match the checkpoint .*last.ckpt \(mobilenet_v3_small\); resume with the run's own config\.$",
    ):
        prepare_resume(other)
    densenet = compose_cfg(tmp_path / "tv", [*TINY, f"resume={run_dir}"])
    with pytest.raises(
        UserError, match=r"^model.arch=densenet_se does not match the checkpoint .*\(torchvision\)"
    ):
        prepare_resume(densenet)


# ------------------------------------------------------------------ a third arch: one file plus one YAML
@pytest.fixture
def simple_cnn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The documented simple_cnn arch installed: its file in the backbones package, its YAML in a copy of conf/."""
    yield from installed_example(tmp_path, monkeypatch, backbones, "simple_cnn", "model/simple_cnn")


@pytest.mark.slow
def test_a_third_arch_takes_one_file_and_one_yaml(simple_cnn, tmp_path):
    from densenet_se.train import run

    assert list(backbones.registry()) == ["densenet_se", "simple_cnn", "torchvision"]
    schema = backbones.get("simple_cnn").schema
    node = OmegaConf.load(simple_cnn / "model" / "simple_cnn.yaml")
    assert {k: node[k] for k in node if k != "defaults"} == OmegaConf.to_container(
        OmegaConf.structured(schema)
    )
    images = make_image_folder(tmp_path / "images", {"a": 10, "b": 10}, size=40)
    tiny = [o for o in TINY if not o.startswith("model")]
    overrides = [*tiny, "model=simple_cnn", "model.width=4", "model.stages=2", f"data.root={images}"]
    with pytest.raises(
        UserError, match=r"^model.stages=9 is out of range; it must be an integer in \[1, 8\]\.$"
    ):
        validate(compose_train_config([*overrides, "model.stages=9"], tmp_path / "bad", simple_cnn))
    cfg = compose_train_config([*overrides, "trainer.max_epochs=1"], tmp_path, simple_cnn)
    run(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert load_checkpoint(ckpt)["hyper_parameters"]["model"] == {
        "arch": "simple_cnn",
        "pretrained": None,
        "channels_last": False,
        "compile": False,
        "width": 4,
        "stages": 2,
    }
    result = predict.run(
        task_cfg(
            "predict",
            [f"ckpt_path={ckpt}", f"input={images / 'a'}", f"output={tmp_path / 'p.csv'}", "gradcam=true"],
        )
    )
    assert len(result["rows"]) == 10 and len(list((tmp_path / "gradcam").glob("*.png"))) == 10
    export.run(task_cfg("export", [f"ckpt_path={ckpt}", "exporter=legacy"], output_dir=str(tmp_path / "x")))
    side = json.loads((tmp_path / "x" / "model.json").read_text())
    assert side["arch"] == "simple_cnn" and side["model"] == {"width": 4, "stages": 2}
    # Untrusted settings are sized before anything is built.
    tiny_checkpoint(
        tmp_path / "huge.ckpt", {"arch": "simple_cnn", "width": 4, "stages": 2}, model={"width": 2**40}
    )
    with pytest.raises(UserError, match=r"this simple_cnn has .* parameters, more than the 2e\+08 allowed"):
        load_checkpoint(tmp_path / "huge.ckpt")
