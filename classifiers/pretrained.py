"""Pretrained weights from local files only: torchvision weight files and torchxrayvision's cache.

Nothing is ever downloaded. ``spec`` is either

- a path to a torchvision-style state dict (``.pth``/``.pt``/``.bin`` read with
  ``torch.load(weights_only=True)``, or ``.safetensors``), e.g. ImageNet ``resnet18-f37072fd.pth``
  that you fetched yourself. A 3-channel first convolution is summed over its channels into
  the 1-channel one (a gray image repeated on R, G, B gives the same response) and the model's
  normalisation becomes the channel-averaged ImageNet mean/std; or
- ``"xrv:<name>"`` with a torchxrayvision model name (``xrv:densenet121-res224-all``,
  ``xrv:resnet50-res512-all``, ...), read from torchxrayvision's own cache folder
  (``~/.torchxrayvision/models_data/<file of that release>``) only when it is already there.
  Those networks see images scaled to [-1024, 1024], so the model's normalisation becomes
  ``mean 0.5, std 1/2048``.

The classification head is skipped when its shape differs (another label set): the model keeps
its freshly initialised head. Any other difference (a missing or unexpected key, a shape
mismatch) means the file holds another architecture: one :class:`~cxr.errors.CxrError` line
naming the file and the first mismatching key.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from cxr.errors import CxrError

XRV_PREFIX = "xrv:"
# ImageNet statistics averaged over R, G, B: what summed first-conv weights expect of gray input.
IMAGENET_GRAY_MEAN = (0.485 + 0.456 + 0.406) / 3
IMAGENET_GRAY_STD = (0.229 + 0.224 + 0.225) / 3
XRV_MEAN, XRV_STD = 0.5, 1.0 / 2048.0  # [0, 1] → [-1024, 1024]
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Old torchvision DenseNet files spell "denselayer1.norm1" as "denselayer1.norm.1".
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var)$")


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did: from where, how many tensors, what it adapted/skipped."""

    source: str
    loaded: int
    adapted: tuple[str, ...]  # first conv summed from 3 channels
    skipped: tuple[str, ...]  # head tensors of another shape, kept as initialised


def _target(model: nn.Module) -> nn.Module:
    """The image network inside ``model`` whose ``net`` the weight file describes: what its
    ``image_backbone()`` returns (every model of :mod:`classifiers.models` with an image
    network has that method; this module never imports that one, which builds on it)."""
    backbone = getattr(model, "image_backbone", None)
    if not callable(backbone):
        raise CxrError(f"{type(model).__name__} has no image backbone to load pretrained weights into")
    return backbone()


def _first_conv_key(model: nn.Module) -> str:
    return f"{getattr(model, 'first_conv', 'features.0.0')}.weight"


def _head_prefix(model: nn.Module) -> str:
    return f"{getattr(model, 'head_name', 'head')}."


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a local file; every failure is one line naming the file."""
    if not path.is_file():
        raise CxrError(f"{path}: no such weights file (pretrained weights are read from local files only)")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CxrError(f"{path}: unreadable safetensors file ({e})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "unsupported global" in str(e).lower():  # a class to unpickle: a whole model
                raise CxrError(f"{path}: not a plain state dict (a pickled model object? save "
                               "model.state_dict() instead; only weights are loaded, never code)") from None
            raise CxrError(f"{path}: not a PyTorch weights file (unreadable as a state dict)") from None
        except Exception as e:  # torch.load fails on a foreign file with any exception type
            raise CxrError(f"{path}: unreadable weights file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CxrError(f"{path}: does not hold a state dict of tensors")
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")  # saved from a DataParallel/DDP wrapper
        m = _OLD_DENSENET_KEY.match(k)
        out[f"{m.group(1)}{m.group(2)}.{m.group(3)}" if m else k] = v
    return out


def _import_xrv():
    """torchxrayvision, imported without letting its import-time warning filter leak out."""
    try:
        with warnings.catch_warnings():  # torchxrayvision.models calls filterwarnings("ignore")
            import torchxrayvision
    except ImportError:
        raise CxrError("xrv: weights need the torchxrayvision package, which is not installed") from None
    return torchxrayvision


def xrv_weights_path(name: str) -> Path:
    """Where torchxrayvision keeps the weights of model ``name`` (whether or not it is there)."""
    xrv = _import_xrv()
    urls = xrv.models.model_urls
    if name not in urls or not name.startswith(("densenet121", "resnet50")):
        known = sorted(k for k in urls if k.startswith(("densenet121", "resnet50")))
        raise CxrError(f"xrv:{name}: unknown torchxrayvision model (known: {', '.join(known)})")
    url = urls[name]["weights_url"]
    return Path(os.path.expanduser(os.path.join(xrv.utils.get_cache_dir(), os.path.basename(url))))


def read_xrv_state_dict(name: str, arch: str) -> dict[str, torch.Tensor]:
    """The state dict of torchxrayvision model ``name`` from its cache, in torchvision key names."""
    path = xrv_weights_path(name)
    family = "densenet121" if name.startswith("densenet") else "resnet50"
    if family != arch:
        raise CxrError(f"xrv:{name}: these are {family} weights, but the model is {arch}")
    if not path.is_file():
        raise CxrError(f"{path}: torchxrayvision weights 'xrv:{name}' are not in its cache (nothing is "
                       "downloaded here; copy the file there yourself)")
    xrv = _import_xrv()
    try:
        # torchxrayvision's own loader: its DenseNet files are whole pickled models, which only
        # it knows how to read; the file is already local, so this does not download.
        with warnings.catch_warnings():
            net = xrv.models.get_model(name)
    except Exception as e:  # its loader raises bare Exceptions of every kind
        raise CxrError(f"{path}: torchxrayvision could not read it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    state = net.state_dict()
    state.pop("op_threshs", None)  # its calibration buffer, not a weight
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_pretrained(model: nn.Module, spec: str) -> LoadReport:
    """Load local pretrained weights ``spec`` into ``model``'s image network (see module doc)."""
    target = _target(model)
    if spec.startswith(XRV_PREFIX):
        arch = getattr(target, "arch", "small_cnn")
        state = read_xrv_state_dict(spec[len(XRV_PREFIX):], arch)
        where, norm = spec, (XRV_MEAN, XRV_STD)
    else:
        path = Path(spec).expanduser()
        state = read_state_dict(path)
        where, norm = str(path), None

    net = target.net
    expected = net.state_dict()
    conv_key, head = _first_conv_key(target), _head_prefix(target)
    adapted: list[str] = []
    skipped: list[str] = []
    if conv_key in state and conv_key in expected:
        w = state[conv_key]
        if w.ndim == 4 and w.shape[1] == 3 and expected[conv_key].shape[1] == 1:
            state[conv_key] = w.sum(dim=1, keepdim=True)
            adapted.append(conv_key)
            if norm is None:
                norm = (IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD)

    missing = [k for k in expected if k not in state and not k.startswith(head)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected and not k.startswith(head)]
    for k in [k for k in state if k not in expected]:  # a head the model does not have
        skipped.append(k)
        del state[k]
    if missing or unexpected:
        key, what = (missing[0], "missing") if missing else (unexpected[0], "unexpected")
        more = len(missing) + len(unexpected) - 1
        raise CxrError(f"{where}: weights of another architecture for {model_name(model)}: "
                       f"{what} key '{key}'" + (f" (+{more} more differences)" if more else ""))
    merged = dict(expected)
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            if k.startswith(head):
                skipped.append(k)
                continue
            raise CxrError(f"{where}: weights of another architecture for {model_name(model)}: "
                           f"'{k}' has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}")
        merged[k] = v.to(expected[k].dtype)
    net.load_state_dict(merged, strict=True)
    if norm is not None:
        target.set_normalization(*norm)
    return LoadReport(where, len(state) - len(skipped), tuple(adapted), tuple(skipped))


def model_name(model: nn.Module) -> str:
    return getattr(model, "model_name", type(model).__name__)
