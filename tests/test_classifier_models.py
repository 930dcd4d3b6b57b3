"""Classifier networks: shapes, gradients, rebuild from model_args, local pretrained weights."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from classifiers.metadata import META_FEATURES
from classifiers.models import IMAGE_MODELS, MODELS, build_classifier, model_args, rebuild
from classifiers.pretrained import (
    IMAGENET_GRAY_MEAN,
    IMAGENET_GRAY_STD,
    XRV_MEAN,
    XRV_STD,
    load_pretrained,
    xrv_weights_path,
)
from cxr.engine.checkpoint import CheckpointManager, load_module, read_model_args
from cxr.errors import ConfigError, CxrError

N_OUT = 14


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))


def _meta(n: int = 2) -> torch.Tensor:
    return torch.randn(n, len(META_FEATURES), generator=torch.Generator().manual_seed(1))


def _call(model: torch.nn.Module, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    if not model.uses_image:
        return model(meta)
    return model(x, meta) if model.uses_metadata else model(x)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_model_shapes_and_gradients(name):
    torch.manual_seed(0)
    model = build_classifier(name, N_OUT)
    x = _images()
    out = model(x)
    assert out.shape == (2, N_OUT) and torch.isfinite(out).all()
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features)
    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad[:3]}"
    assert model.uses_metadata is False
    # normalisation travels with the weights
    assert {"input_mean", "input_std"} <= set(model.state_dict())


def test_non_square_and_minimum_size():
    model = build_classifier("resnet18", 3).eval()
    assert model(torch.rand(1, 1, 32, 48)).shape == (1, 3)
    with pytest.raises(ValueError, match="H, W >= 32"):
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.rand(1, 3, 64, 64))


def test_fusion_forward_with_metadata_and_gradients():
    torch.manual_seed(0)
    model = build_classifier("fusion", N_OUT, backbone="small_cnn", meta_features=len(META_FEATURES))
    assert model.uses_metadata and model.uses_image
    x, meta = _images(), _meta()
    out = model(x, meta)
    assert out.shape == (2, N_OUT)
    assert model.forward_features(x, meta).shape == (2, model.num_features)
    assert model.num_features == model.image.num_features + model.meta.num_features
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # no unused (headless) branch
    # the metadata matters: changing it changes the output
    model.eval()
    assert not torch.allclose(model(x, meta), model(x, meta + 1.0))


def test_metadata_mlp_is_tabular():
    model = build_classifier("metadata_mlp", N_OUT, hidden=(16,))
    assert model.uses_metadata and not model.uses_image
    assert model(_meta(5)).shape == (5, N_OUT)
    assert model.forward_features(_meta(5)).shape == (5, 16) and model.num_features == 16
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        model(torch.zeros(5, 3))


@pytest.mark.parametrize("name", MODELS)
def test_model_args_rebuild_same_architecture(name):
    kwargs = {"backbone": "resnet18"} if name == "fusion" else {}
    model = build_classifier(name, 5, **kwargs).eval()
    args = json.loads(json.dumps(model_args(model)))  # JSON-plain
    assert args["name"] == name and args["num_outputs"] == 5
    again = rebuild(args).eval()
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    again.load_state_dict(a)
    x, meta = _images(1), _meta(1)
    assert torch.equal(_call(model, x, meta), _call(again, x, meta))


def test_checkpoint_round_trip_in_fresh_model(tmp_path):
    model = build_classifier("small_cnn", 3, width=4)
    model.set_normalization(0.4, 0.3)  # a pretrained normalisation must survive the round trip
    CheckpointManager(tmp_path).save(1, {"model": model}, model_args={"model": model_args(model)})
    fresh = rebuild(read_model_args(tmp_path, "model"))
    assert fresh.net.config.width == 4
    load_module(tmp_path, "model", fresh)
    assert float(fresh.input_mean) == pytest.approx(0.4) and float(fresh.input_std) == pytest.approx(0.3)
    x = _images(1)
    assert torch.equal(model.eval()(x), fresh.eval()(x))


def test_unknown_model_and_argument_are_config_errors():
    with pytest.raises(ConfigError, match="unknown model 'vgg16'.*densenet121.*resnet50"):
        build_classifier("vgg16", 2)
    with pytest.raises(ConfigError, match="unknown argument 'widht'.*width"):
        build_classifier("small_cnn", 2, widht=4)
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_classifier("fusion", 2, backbone="vgg")
    with pytest.raises(ConfigError, match="num_outputs"):
        build_classifier("resnet18", 0)


# ----------------------------------------------------------------------------------------------
# pretrained weights from local files


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision resnet18 state dict (3-channel conv, 1000-class head), as a .pth file."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    return path, state


def test_pretrained_torchvision_file_sums_channels(resnet18_file):
    path, state = resnet18_file
    model = build_classifier("resnet18", 3)
    before = model.net.layer1[0].conv1.weight.clone()
    head_before = model.net.fc.weight.clone()
    report = load_pretrained(model, str(path))
    assert torch.allclose(model.net.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.net.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert not torch.equal(model.net.layer1[0].conv1.weight, before)
    assert torch.equal(model.net.fc.weight, head_before)  # 1000-class head skipped
    assert report.adapted == ("conv1.weight",) and set(report.skipped) == {"fc.weight", "fc.bias"}
    assert float(model.input_mean) == pytest.approx(IMAGENET_GRAY_MEAN)
    assert float(model.input_std) == pytest.approx(IMAGENET_GRAY_STD)


def test_pretrained_safetensors_and_same_head_loads_head(tmp_path):
    src = torchvision.models.resnet18(weights=None, num_classes=3)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = build_classifier("resnet18", 3, pretrained=str(path))  # via the factory
    assert torch.equal(model.net.fc.weight, src.fc.weight)


def test_pretrained_fusion_loads_into_backbone(resnet18_file):
    path, state = resnet18_file
    model = build_classifier("fusion", 2, backbone="resnet18", pretrained=str(path))
    assert torch.equal(model.image.net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    with pytest.raises(ConfigError, match="no image backbone"):
        build_classifier("metadata_mlp", 2, pretrained=str(path))


def test_pretrained_wrong_architecture_names_file_and_key(resnet18_file, tmp_path):
    path, state = resnet18_file
    with pytest.raises(CxrError) as err:
        load_pretrained(build_classifier("resnet50", 2), str(path))
    msg = str(err.value)
    assert str(path) in msg and "another architecture" in msg and "'layer1.0." in msg
    assert "\n" not in msg
    bad = dict(state)
    bad["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CxrError, match=r"bad.pt: .*'layer2.0.conv1.weight' has shape \(128, 64, 5, 5\)"):
        load_pretrained(build_classifier("resnet18", 2), str(tmp_path / "bad.pt"))


def test_pretrained_unreadable_files_are_one_line(tmp_path):
    model = build_classifier("resnet18", 2)
    torch.save(torchvision.models.resnet18(weights=None), tmp_path / "whole_model.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    cases = {"whole_model.pth": "not a plain state dict", "junk.pth": "not a PyTorch weights file",
             "absent.pth": "no such weights file"}
    for name, problem in cases.items():
        with pytest.raises(CxrError) as err:
            load_pretrained(model, str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value) and problem in str(err.value)
        assert "\n" not in str(err.value)


def test_xrv_weights_missing_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CxrError) as err:
        build_classifier("densenet121", 14, pretrained="xrv:densenet121-res224-all")
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / ".torchxrayvision" / "models_data")) and "not in its cache" in msg
    assert "\n" not in msg
    with pytest.raises(CxrError, match="unknown torchxrayvision model.*densenet121-res224-nih"):
        build_classifier("densenet121", 14, pretrained="xrv:densenet999")
    with pytest.raises(CxrError, match="densenet121 weights, but the model is resnet18"):
        build_classifier("resnet18", 14, pretrained="xrv:densenet121-res224-nih")


def test_xrv_weights_read_from_cache(tmp_path, monkeypatch):
    """A file in torchxrayvision's cache (written here as its releases are: a pickled model)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    from classifiers.pretrained import _import_xrv

    xrv = _import_xrv()
    torch.manual_seed(5)
    src = xrv.models.DenseNet()
    path = xrv_weights_path("densenet121-res224-nih")
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        torch.save(src, f, pickle_module=pickle)
    model = build_classifier("densenet121", 14, pretrained="xrv:densenet121-res224-nih")
    assert torch.equal(model.net.features.conv0.weight, src.features.conv0.weight)
    assert torch.equal(model.net.features.denseblock4.denselayer16.conv2.weight,
                       src.features.denseblock4.denselayer16.conv2.weight)
    assert float(model.input_std) == pytest.approx(XRV_STD) and float(model.input_mean) == XRV_MEAN


def test_classifier_config_takes_the_shared_compile_modes():
    from classifiers.config import ClassifierConfig
    from cxr.engine.config import load_config

    cfg = load_config(ClassifierConfig, None, ["train.compile=true", "train.compile_mode=reduce-overhead"])
    assert cfg.train.compile and cfg.train.compile_mode == "reduce-overhead"
    assert load_config(ClassifierConfig).train.compile_mode == "default"
    with pytest.raises(ConfigError, match="train.compile_mode.*expected one of 'default', 'reduce-overhead'"):
        load_config(ClassifierConfig, None, ["train.compile_mode=graphs"])
