"""DenseNetSE: shapes, torchvision compatibility, SE wiring, memory_efficient parity, argument errors."""

from __future__ import annotations

import math
import re
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import torchvision
from torchvision.models import densenet121

from densenet_se.models import DenseNetSE, SqueezeExcitation, load_pretrained

TINY = {"growth_rate": 4, "block_config": (2, 2, 2, 2), "num_init_features": 8, "bn_size": 2}
PLACEMENTS = ["none", "head", "blocks"]


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BN buffer values no constructor would produce, so copies are detectable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return model


def _se_keys(model: torch.nn.Module) -> list[str]:
    return [k for k in model.state_dict() if re.match(r"^(se|features\.se\d+)\.", k)]


@pytest.fixture(scope="module")
def tv121_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object]:
    """A torchvision DenseNet-121 (1000 classes, randomized) and its state dict saved to a temp file."""
    torch.manual_seed(0)
    tv = _randomize(densenet121()).eval()
    path = tmp_path_factory.mktemp("weights") / "densenet121.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def _old_format(state_dict: dict) -> dict:
    """Keys as torchvision < 0.3 wrote them ("norm.1", "conv.2"), without torch >= 0.4.1's BN counters."""
    pattern = r"(denselayer\d+\.(?:norm|relu|conv))([12])\."
    return {re.sub(pattern, r"\1.\2.", k): v for k, v in state_dict.items() if "num_batches_tracked" not in k}


# Shapes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("size", [(32, 32), (64, 64), (224, 224), (256, 256), (64, 96)])
def test_output_shape_for_input_sizes(placement: str, size: tuple[int, int]) -> None:
    model = DenseNetSE(3, se_placement=placement, se_reduction=4, **TINY)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    ("layout", "final_channels"),
    [
        ({"growth_rate": 6, "block_config": [3, 2], "num_init_features": 4, "bn_size": 1}, 23),
        ({"growth_rate": 4, "block_config": (1, 2, 3), "compression_rate": 0.3, "num_init_features": 8}, 15),
        ({"growth_rate": 6, "block_config": [3, 2], "num_init_features": 4, "compression_rate": 1.0}, 34),
    ],
)
def test_layouts_give_expected_widths_and_shapes(placement: str, layout: dict, final_channels: int) -> None:
    model = DenseNetSE(5, se_placement=placement, se_reduction=2, **layout)
    assert model.classifier.in_features == final_channels
    assert model(torch.randn(2, 3, 40, 48)).shape == (2, 5)
    assert isinstance(model.layout["block_config"], tuple)


def test_densenet121_layout_output_shape() -> None:
    model = DenseNetSE(2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 80)).shape == (1, 2)


# torchvision compatibility ---------------------------------------------------------------------------------


def test_parameter_count_matches_torchvision_densenet121() -> None:
    ours = DenseNetSE(2, se_placement="none")
    theirs = densenet121(num_classes=2)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_torchvision_state_dict_gives_torchvision_outputs(tv121_file) -> None:
    tv, path = tv121_file
    model = DenseNetSE(1000, se_placement="none", pretrained=path).eval()
    assert model.pretrained_report.new == ()
    assert model.pretrained_report.skipped == ()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("placement", ["head", "blocks"])
def test_loading_1000_class_file_reports_exactly_se_and_classifier(tv121_file, placement: str) -> None:
    tv, path = tv121_file
    model = DenseNetSE(2, se_placement=placement, pretrained=path)
    report = model.pretrained_report
    assert set(report.new) == set(_se_keys(model)) | {"classifier.weight", "classifier.bias"}
    assert set(report.skipped) == {"classifier.weight", "classifier.bias"}
    assert len(report.loaded) == len(tv.state_dict()) - 2
    torch.testing.assert_close(model.features.norm5.running_var, tv.features.norm5.running_var)
    assert "classifier.bias" in str(report)


def test_old_format_keys_load(tmp_path) -> None:
    tv = _randomize(torchvision.models.DenseNet(num_classes=3, **TINY)).eval()
    old = _old_format(tv.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "old.pth")
    model = DenseNetSE(3, se_placement="none", **TINY)
    report = load_pretrained(model, tmp_path / "old.pth")
    assert report.new == () and report.skipped == ()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tv(x), atol=1e-5, rtol=0)


def test_lightning_checkpoint_with_model_prefix_loads(tmp_path) -> None:
    source = _randomize(DenseNetSE(3, se_placement="head", **TINY)).eval()
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    state["train_acc.tp"] = torch.zeros(3)
    ckpt = {
        "epoch": 4,
        "state_dict": state,
        "hyper_parameters": {"num_classes": 3, "class_names": ["a", "b", "c"]},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    model = DenseNetSE(3, se_placement="head", pretrained=tmp_path / "last.ckpt", **TINY).eval()
    assert model.pretrained_report.new == () and model.pretrained_report.skipped == ()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


# Squeeze-excitation ----------------------------------------------------------------------------------------


def test_squeeze_excitation_gates_channels() -> None:
    se = SqueezeExcitation(16, 4)
    assert se.fc1.out_channels == 4 and se.fc1.bias is None and se.fc2.bias is None
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        se.fc2.weight.zero_()
    torch.testing.assert_close(se(x), x * 0.5)  # sigmoid(0) everywhere


def test_head_se_output_is_what_gets_pooled() -> None:
    model = DenseNetSE(3, se_placement="head", se_reduction=4, **TINY).eval()
    seen = {}
    model.se.register_forward_hook(lambda m, i, o: seen.update(se_in=i[0].clone(), se_out=o))
    model.classifier.register_forward_pre_hook(lambda m, i: seen.update(pooled=i[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 96))
    assert seen["se_in"].min() >= 0  # SE sees norm5 -> ReLU
    torch.testing.assert_close(seen["pooled"], seen["se_out"].mean((2, 3)))
    assert not torch.allclose(seen["pooled"], seen["se_in"].mean((2, 3)))


@pytest.mark.parametrize("placement", ["head", "blocks"])
def test_se_parameters_get_gradients_and_change_outputs(placement: str) -> None:
    torch.manual_seed(0)
    model = DenseNetSE(3, se_placement=placement, se_reduction=4, **TINY)
    se_params = {n: p for n, p in model.named_parameters() if n.startswith("se.") or ".se" in n}
    assert len(se_params) == (2 if placement == "head" else 10)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    for name, param in se_params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name

    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for param in se_params.values():
            param.mul_(-3.0)
        assert not torch.allclose(model(x), before)


def test_none_placement_has_no_se() -> None:
    model = DenseNetSE(3, se_placement="none", **TINY)
    assert not any(isinstance(m, SqueezeExcitation) for m in model.modules())


# memory_efficient ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["none", "blocks"])
def test_memory_efficient_matches_standard_path(monkeypatch, placement: str) -> None:
    layout = {**TINY, "drop_rate": 0.2}
    torch.manual_seed(0)
    standard = DenseNetSE(3, se_placement=placement, se_reduction=4, **layout)
    efficient = DenseNetSE(3, se_placement=placement, se_reduction=4, memory_efficient=True, **layout)
    efficient.load_state_dict(standard.state_dict())
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k)
    )

    x = torch.randn(4, 3, 32, 32)
    target = torch.tensor([0, 1, 2, 1])
    grads = []
    for model in (standard, efficient):
        inp = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # same dropout masks
        out = model(inp)
        F.cross_entropy(out, target).backward()
        grads.append((out, inp.grad, {n: p.grad for n, p in model.named_parameters()}))

    assert len(calls) == sum(TINY["block_config"])  # one checkpoint per dense layer, efficient model only
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    for name, grad in grads[0][2].items():
        torch.testing.assert_close(grad, grads[1][2][name], msg=name)
    # the recompute in backward must not update BN running statistics a second time
    for (name, a), b in zip(standard.state_dict().items(), efficient.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)

    # nothing to backpropagate into: the standard path runs, no checkpoint
    with torch.no_grad():
        efficient(x)
    efficient.requires_grad_(False)
    efficient(x)
    assert len(calls) == sum(TINY["block_config"])


# Argument errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 2.0}, "num_classes"),
        ({"num_classes": "2"}, "num_classes"),
        ({"growth_rate": 0}, "growth_rate"),
        ({"growth_rate": 4.0}, "growth_rate"),
        ({"growth_rate": True}, "growth_rate"),
        ({"block_config": ()}, "block_config"),
        ({"block_config": []}, "block_config"),
        ({"block_config": [2, 0]}, "block_config"),
        ({"block_config": [2, -1]}, "block_config"),
        ({"block_config": [2, 1.5]}, "block_config"),
        ({"block_config": "22"}, "block_config"),
        ({"block_config": 4}, "block_config"),
        ({"compression_rate": 0}, "compression_rate"),
        ({"compression_rate": 1.5}, "compression_rate"),
        ({"compression_rate": -0.5}, "compression_rate"),
        ({"compression_rate": math.nan}, "compression_rate"),
        ({"compression_rate": "0.5"}, "compression_rate"),
        ({"compression_rate": 0.01}, "compression_rate"),  # 16 channels * 0.01 leaves none
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"se_reduction": 0}, "se_reduction"),
        ({"se_reduction": 2.5}, "se_reduction"),
        ({"se_reduction": 17}, "se_reduction"),  # the final features have 16 channels
        ({"se_placement": "tail"}, "se_placement"),
        ({"se_placement": None}, "se_placement"),
        ({"bn_size": 0}, "bn_size"),
        ({"num_init_features": 0}, "num_init_features"),
        ({"num_init_features": 8.5}, "num_init_features"),
        ({"memory_efficient": "yes"}, "memory_efficient"),
        ({"pretrained": 3}, "pretrained"),
        ({"pretrained": ""}, "pretrained"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, name: str) -> None:
    args = {"num_classes": 2, **TINY, **kwargs}
    with pytest.raises(ValueError, match=name):
        DenseNetSE(**args)


def test_se_reduction_is_checked_against_the_channels_each_se_sees() -> None:
    layout = {"growth_rate": 4, "block_config": [1, 4], "num_init_features": 4}  # block1: 8, final: 20
    assert DenseNetSE(2, se_reduction=10, se_placement="head", **layout).se.fc1.out_channels == 2
    DenseNetSE(2, se_reduction=100, se_placement="none", **layout)  # unused without SE
    with pytest.raises(ValueError, match=r"se_reduction must be between 1 and 8"):
        DenseNetSE(2, se_reduction=10, se_placement="blocks", **layout)
    with pytest.raises(ValueError, match="se_reduction"):
        SqueezeExcitation(8, 9)


# Pretrained errors ----------------------------------------------------------------------------------------


def test_layout_mismatch_names_key_shapes_and_file_layout(tmp_path) -> None:
    torch.save(DenseNetSE(2, **TINY).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="does not match this model's layout") as info:
        DenseNetSE(2, **{**TINY, "growth_rate": 6}, pretrained=tmp_path / "tiny.pth")
    message = str(info.value)
    assert (
        "denselayer1.conv1.weight has shape (8, 8, 1, 1) in the file but (12, 8, 1, 1) in the model"
        in message
    )
    assert "the file looks like growth_rate=4, block_config=[2, 2, 2, 2]" in message
    with pytest.raises(
        ValueError, match=r"features\.transition3\.norm\.weight is in the file but not in the"
    ):
        DenseNetSE(2, **{**TINY, "block_config": [2, 2, 2]}, pretrained=tmp_path / "tiny.pth")
    with pytest.raises(
        ValueError, match=r"features\.transition4\.norm\.weight is in the model but not in the"
    ):
        DenseNetSE(2, **{**TINY, "block_config": [2, 2, 2, 2, 2]}, pretrained=tmp_path / "tiny.pth")


def test_unreadable_pretrained_files_raise_clearly(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"pretrained file .*missing\.pth does not exist"):
        DenseNetSE(2, **TINY, pretrained=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth is not a readable PyTorch state dict"):
        DenseNetSE(2, **TINY, pretrained=str(tmp_path / "junk.pth"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="holds no DenseNet weights"):
        DenseNetSE(2, **TINY, pretrained=tmp_path / "other.pth")


def test_imagenet_without_network_raises_clearly(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(
        ValueError, match=r"pretrained='imagenet' could not fetch .*densenet121-a639ec97\.pth"
    ):
        DenseNetSE(2, pretrained="imagenet")


def test_imagenet_needs_the_121_layout_before_downloading(monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(ValueError, match="needs growth_rate=32"):
        DenseNetSE(2, **TINY, pretrained="imagenet")


def test_imagenet_loads_torchvision_weights_in_old_format(monkeypatch, tv121_file) -> None:
    tv, _ = tv121_file
    old = _old_format(tv.state_dict())
    requests = []

    def fake_download(url, **kwargs):
        requests.append((url, kwargs))
        return old

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = DenseNetSE(2, pretrained="imagenet")
    assert requests[0][0] == torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url
    assert requests[0][1]["weights_only"] is True
    assert set(model.pretrained_report.new) == {
        "se.fc1.weight",
        "se.fc2.weight",
        "classifier.weight",
        "classifier.bias",
    }
    torch.testing.assert_close(
        model.features.denseblock4.denselayer16.conv2.weight,
        tv.features.denseblock4.denselayer16.conv2.weight,
    )
