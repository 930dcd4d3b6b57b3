"""Classifier networks by name: DenseNet-121 (CheXNet), ResNet-18/50, a small CPU CNN, late fusion.

Every image model takes ``(N, 1, H, W)`` images in [0, 1] (bone bright, ``H, W >= 32``) and
returns ``(N, num_outputs)`` logits. Intensity normalisation lives *inside* the model as two
buffers (``input_mean``, ``input_std``), so it is saved and restored with the weights: loading
ImageNet or torchxrayvision weights (:mod:`classifiers.pretrained`) changes them to what those
weights were trained with, and a reloaded checkpoint keeps them. Each model also exposes
``forward_features(x) -> (N, num_features)`` (globally pooled features), which is what the
late-fusion model builds on, so any backbone can be fused with the patient metadata.

Names (:data:`MODELS`): ``small_cnn``, ``densenet121``, ``resnet18``, ``resnet50``,
``fusion`` (an image backbone + metadata MLP) and ``metadata_mlp`` (a tabular model on
age/sex/view/follow-up, no image; see :mod:`classifiers.metadata`). Models that read metadata
have ``uses_metadata = True`` and are called ``model(x, meta)`` (``fusion``) or ``model(meta)``
(``metadata_mlp``, which also has ``uses_image = False``).

:func:`model_args` gives the JSON-plain keyword arguments that :func:`rebuild` turns back into
the same architecture, which is what a checkpoint stores beside its safetensors weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from classifiers.metadata import META_FEATURES, MetadataMLP, MetaStats
from classifiers.pretrained import load_pretrained
from classifiers.small_cnn import SmallCNN, SmallCNNConfig
from cxr.errors import ConfigError

MIN_SIZE = 32  # the deepest backbones halve the image five times

# The default normalisation of a network trained from scratch: [0, 1] → about [-2, 2].
SCRATCH_MEAN, SCRATCH_STD = 0.5, 0.25


# ----------------------------------------------------------------------------------------------
# Image models


class ImageClassifier(nn.Module):
    """Shared input contract of the image models: checks, normalisation buffers, head.

    Subclasses set ``num_features`` and implement :meth:`_features` (normalised input → pooled
    features) and :meth:`_head` (features → logits). ``num_outputs=0`` builds the network without a head (``forward`` returns the features):
    what the fusion model embeds, so no parameter goes unused in training.
    """

    uses_metadata = False
    uses_image = True
    in_chans = 1
    input_range = (0.0, 1.0)
    num_features: int

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.tensor(float(mean)))
        self.register_buffer("input_std", torch.tensor(float(std)))

    def set_normalization(self, mean: float, std: float) -> None:
        """Make the network see ``(x - mean) / std``: what pretrained weights were fitted to."""
        self.input_mean.fill_(float(mean))
        self.input_std.fill_(float(std))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem when ``x`` breaks the input contract."""
        if x.ndim != 4 or x.shape[1] != self.in_chans or min(x.shape[2:]) < MIN_SIZE:
            raise ValueError(f"{type(self).__name__}: expected input of shape (N, 1, H, W) with "
                             f"H, W >= {MIN_SIZE}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{type(self).__name__}: expected a floating-point input in [0, 1], "
                             f"got {x.dtype}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` in [0, 1] → ``(N, num_features)`` pooled features."""
        self.check_input(x)
        return self._features((x - self.input_mean) / self.input_std)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _head(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.forward_features(x))

    def image_backbone(self) -> ImageClassifier:
        """The network pretrained weights load into (:func:`classifiers.pretrained.load_pretrained`)."""
        return self


class SmallCNNClassifier(ImageClassifier):
    """:class:`~classifiers.small_cnn.SmallCNN`'s layers at any input size >= 32.

    SmallCNN itself insists on 128² (the phantom-fitness contract); here the same stages run on
    any size, since global average pooling removes the dependence. Its state dict lives under
    ``net.``, so weights of a bare SmallCNN load with :func:`classifiers.pretrained.load_pretrained`.
    """

    def __init__(self, num_outputs: int, width: int = 8, dropout: float = 0.2) -> None:
        # SmallCNN centres [0, 1] on zero with unit half-range: mean 0.5, std 0.5.
        super().__init__(mean=0.5, std=0.5)
        self.net = SmallCNN(SmallCNNConfig(num_classes=max(num_outputs, 1), width=width,
                                           dropout=dropout))
        self.num_features = self.net.head.in_features
        if num_outputs == 0:
            self.net.head = nn.Identity()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x).mean(dim=(2, 3))

    def _head(self, f: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.net.dropout(f))


# torchvision family -> (constructor, first conv attribute path, head attribute path)
_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], str, str]] = {
    "densenet121": (torchvision.models.densenet121, "features.conv0", "classifier"),
    "resnet18": (torchvision.models.resnet18, "conv1", "fc"),
    "resnet50": (torchvision.models.resnet50, "conv1", "fc"),
}


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class TorchvisionClassifier(ImageClassifier):
    """A torchvision DenseNet/ResNet with a 1-channel first convolution and a new head.

    The torchvision network is kept whole under ``net.`` (its own key names), so torchvision
    and torchxrayvision weight files map onto it key for key. DenseNet-121 with one sigmoid
    output per finding is the CheXNet design (Rajpurkar et al., 2017).
    """

    def __init__(self, arch: str, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__(mean=SCRATCH_MEAN, std=SCRATCH_STD)
        make, conv_path, head_path = _TORCHVISION[arch]
        self.arch = arch
        self.first_conv = conv_path
        self.head_name = head_path
        net = make(weights=None)
        old = net.get_submodule(conv_path)
        _set_submodule(net, conv_path, nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride,
                                                 old.padding, bias=old.bias is not None))
        self.num_features = net.get_submodule(head_path).in_features
        head = nn.Linear(self.num_features, num_outputs) if num_outputs > 0 else nn.Identity()
        _set_submodule(net, head_path, head)
        self.net = net
        self.dropout = nn.Dropout(dropout)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        if self.arch.startswith("densenet"):
            f = F.relu(net.features(x))
        else:
            f = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            f = net.layer4(net.layer3(net.layer2(net.layer1(f))))
        return torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)

    def _head(self, f: torch.Tensor) -> torch.Tensor:
        return self.net.get_submodule(self.head_name)(self.dropout(f))


# ----------------------------------------------------------------------------------------------
# Fusion


class FusionClassifier(nn.Module):
    """Late fusion: ``head(dropout([image_features(x), mlp_embedding(meta)]))``.

    Each branch is a whole network without its head, so the fused head sees what each modality
    alone would have classified from; comparing it with the image-only and metadata-only models
    shows what the metadata adds beyond the pixels.
    """

    uses_metadata = True
    uses_image = True

    def __init__(self, image: ImageClassifier, meta: MetadataMLP, num_outputs: int,
                 dropout: float = 0.1, meta_stats: MetaStats | None = None) -> None:
        super().__init__()
        self.image = image
        self.meta = meta
        self.num_features = image.num_features + meta.num_features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_features, num_outputs)
        self.meta_stats = meta_stats

    def forward_features(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.image.forward_features(x), self.meta.forward_features(meta)], dim=1)

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x, meta)))

    def image_backbone(self) -> ImageClassifier:
        """The image branch: where pretrained weights load."""
        return self.image


# ----------------------------------------------------------------------------------------------
# Registry


def _small_cnn(num_outputs: int, width: int = 8, dropout: float = 0.2) -> nn.Module:
    return SmallCNNClassifier(num_outputs, width=width, dropout=dropout)


def _torchvision(arch: str) -> Callable[..., nn.Module]:
    def build(num_outputs: int, dropout: float = 0.0) -> nn.Module:
        return TorchvisionClassifier(arch, num_outputs, dropout=dropout)
    build.__name__ = f"_{arch}"
    return build


def _stats(meta_stats: dict | MetaStats | None) -> MetaStats | None:
    if meta_stats is None or isinstance(meta_stats, MetaStats):
        return meta_stats
    return MetaStats.from_dict(meta_stats)


def _metadata_mlp(num_outputs: int, meta_features: int = 0, hidden: tuple[int, ...] | list[int] = (64, 64),
                  dropout: float = 0.1, meta_stats: dict | None = None) -> nn.Module:
    model = MetadataMLP(meta_features or len(META_FEATURES), num_outputs, hidden=tuple(hidden),
                        dropout=dropout)
    model.meta_stats = _stats(meta_stats)
    return model


def _fusion(num_outputs: int, meta_features: int = 0, backbone: str = "small_cnn",
            backbone_args: dict | None = None, meta_hidden: tuple[int, ...] | list[int] = (32, 32),
            dropout: float = 0.1, meta_stats: dict | None = None) -> nn.Module:
    if backbone not in IMAGE_MODELS:
        raise ConfigError(f"fusion: unknown backbone {backbone!r} (choose from: {', '.join(IMAGE_MODELS)})")
    image = _call(backbone, _BUILDERS[backbone], 0, dict(backbone_args or {}))
    meta = MetadataMLP(meta_features or len(META_FEATURES), 0, hidden=tuple(meta_hidden), dropout=dropout)
    return FusionClassifier(image, meta, num_outputs, dropout=dropout, meta_stats=_stats(meta_stats))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": _small_cnn,
    "densenet121": _torchvision("densenet121"),
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "fusion": _fusion,
    "metadata_mlp": _metadata_mlp,
}
MODELS: tuple[str, ...] = tuple(_BUILDERS)
IMAGE_MODELS: tuple[str, ...] = ("small_cnn", "densenet121", "resnet18", "resnet50")
TABULAR_MODELS: tuple[str, ...] = ("metadata_mlp",)


def _call(name: str, builder: Callable[..., nn.Module], num_outputs: int, kwargs: dict) -> nn.Module:
    """Call ``builder`` after checking every keyword, so a typo is a one-line ConfigError."""
    params = inspect.signature(builder).parameters
    for key in kwargs:
        if key == "num_outputs" or key not in params:
            allowed = [p for p in params if p != "num_outputs"]
            raise ConfigError(f"model {name!r}: unknown argument {key!r} "
                              f"(allowed: {', '.join(allowed) or 'none'})")
    if num_outputs < 0:
        raise ConfigError(f"model {name!r}: num_outputs must be >= 1, got {num_outputs}")
    model = builder(num_outputs, **kwargs)
    model.model_name = name
    model.build_kwargs = dict(kwargs)
    model.num_outputs = num_outputs
    return model


def build_classifier(name: str, num_outputs: int, pretrained: str | None = None,
                     meta_features: int = 0, **kwargs: Any) -> nn.Module:
    """The network called ``name`` with ``num_outputs`` logits.

    ``pretrained``: a local weights file or ``"xrv:<torchxrayvision model name>"`` (see
    :func:`classifiers.pretrained.load_pretrained`); for ``fusion`` it goes to the image
    backbone. ``meta_features``: metadata columns of ``fusion``/``metadata_mlp`` (0: all of
    :data:`~classifiers.metadata.META_FEATURES`). Other keywords are the model's own
    (``width``/``dropout`` for ``small_cnn``, ``dropout`` for torchvision backbones, ``backbone``,
    ``backbone_args``, ``meta_hidden`` for ``fusion``, ``hidden`` for ``metadata_mlp``).
    """
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r} (choose from: {', '.join(MODELS)})")
    if num_outputs < 1:
        raise ConfigError(f"model {name!r}: num_outputs must be >= 1, got {num_outputs}")
    if meta_features < 0:
        raise ConfigError(f"model {name!r}: meta_features must be >= 0, got {meta_features}")
    if name in ("fusion", "metadata_mlp"):
        kwargs["meta_features"] = meta_features or len(META_FEATURES)
    model = _call(name, _BUILDERS[name], num_outputs, kwargs)
    if pretrained:
        if name in TABULAR_MODELS:
            raise ConfigError(f"model {name!r} has no image backbone to load pretrained weights into")
        load_pretrained(model, pretrained)
    return model


def model_args(model: nn.Module) -> dict[str, Any]:
    """JSON-plain keyword arguments that :func:`rebuild` turns back into this architecture.

    The current ``meta_stats`` of a metadata model is included, so a reloaded model
    standardises its inputs exactly as in training.
    """
    try:
        args = {"name": model.model_name, "num_outputs": int(model.num_outputs), **model.build_kwargs}
    except AttributeError:
        raise TypeError(f"{type(model).__name__} was not built by build_classifier") from None
    for key, value in list(args.items()):
        if isinstance(value, tuple):
            args[key] = list(value)
    if getattr(model, "uses_metadata", False):
        stats = getattr(model, "meta_stats", None)
        args["meta_stats"] = None if stats is None else stats.to_dict()
    return args


def rebuild(args: dict[str, Any]) -> nn.Module:
    """The architecture :func:`model_args` described (fresh weights: load the checkpoint's next)."""
    if not isinstance(args, dict) or "name" not in args or "num_outputs" not in args:
        raise ConfigError(f"model_args must hold 'name' and 'num_outputs', got {args!r}")
    kwargs = dict(args)
    return build_classifier(kwargs.pop("name"), int(kwargs.pop("num_outputs")), **kwargs)
