"""Generator and discriminator registries: networks are built by name, rebuilt from their config.

Every network class takes one dataclass config (``ResnetGeneratorConfig``, ...) and keeps it as
``.config``. A checkpoint stores :func:`model_args` of each network (registered name + config
as plain JSON) beside its safetensors weights, and :func:`build_from_model_args` rebuilds the
same network from it, so loading never needs pickled code and never depends on a class path
string that a refactor could break::

    G = create_generator("resnet9", image_size=256)          # native 1-channel by default
    D = create_discriminator("patchgan", n_layers=3)
    args = model_args(G)           # {"kind": "generator", "name": "resnet9", "config": {...}}
    G2 = build_from_model_args(args)

Registered: generators ``resnet6``, ``resnet9`` (Johnson et al. 2016, as in CycleGAN) and
``unet256`` (Isola et al. 2017; depth follows the image size); discriminator ``patchgan``
(70×70 PatchGAN with ``n_layers=3``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from cxr.errors import ConfigError

# Importing the network modules runs their @register_generator / @register_discriminator
# decorators (gan.networks.registry): every built-in network is known once this package is.
from gan.networks import patchgan, resnet, unet  # noqa: F401
from gan.networks.registry import _REGISTRY, KINDS, Entry, register_discriminator, register_generator


def names(kind: str) -> list[str]:
    """Sorted registered names of one kind (``"generator"`` or ``"discriminator"``)."""
    return sorted(n for k, n in _REGISTRY if k == kind)


def _entry(kind: str, name: str) -> Entry:
    if (kind, name) not in _REGISTRY:
        raise ConfigError(f"unknown {kind} {name!r} (known: {', '.join(names(kind))})")
    return _REGISTRY[(kind, name)]


def _create(kind: str, name: str, image_size: int | None, overrides: dict[str, Any]) -> nn.Module:
    entry = _entry(kind, name)
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"{kind} {name!r} has no option {unknown[0]!r} (options: {', '.join(sorted(fields))})")
    kwargs = dict(entry.defaults)
    if image_size is not None and entry.sized is not None:
        kwargs.update(entry.sized(image_size))
    kwargs.update(overrides)
    try:
        cfg = entry.config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{kind} {name!r}: {e}") from None
    module = entry.build(cfg)
    module.registered_name = name  # what model_args records
    return module


def create_generator(name: str, image_size: int | None = None, **cfg: Any) -> nn.Module:
    """Build a registered generator; ``cfg`` overrides fields of its config dataclass."""
    return _create("generator", name, image_size, cfg)


def create_discriminator(name: str, image_size: int | None = None, **cfg: Any) -> nn.Module:
    """Build a registered discriminator; ``cfg`` overrides fields of its config dataclass."""
    return _create("discriminator", name, image_size, cfg)


def model_args(module: nn.Module) -> dict[str, Any]:
    """JSON-able description that :func:`build_from_model_args` rebuilds ``module`` from."""
    module = getattr(module, "module", module)  # a DDP / compiled wrapper
    module = getattr(module, "_orig_mod", module)
    name = getattr(module, "registered_name", None)
    if name is None:
        raise ValueError(f"{type(module).__name__} was not built by create_generator/create_discriminator")
    kind = next(k for (k, n), e in _REGISTRY.items() if n == name and isinstance(module, e.build))
    config = dataclasses.asdict(module.config)
    return {"kind": kind, "name": name, "config": {k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in config.items()}}


def build_from_model_args(args: dict[str, Any], where: str = "model_args") -> nn.Module:
    """Rebuild a network from :func:`model_args` output (e.g. read back from a checkpoint)."""
    try:
        kind, name, config = args["kind"], args["name"], dict(args["config"])
    except (KeyError, TypeError):
        raise ConfigError(f"{where}: not a network description (expected kind, name and config)") from None
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown network kind {kind!r} (expected one of {KINDS})")
    entry = _entry(kind, name)
    types = {f.name: f.type for f in dataclasses.fields(entry.config_cls)}
    for key, value in config.items():
        if isinstance(value, list) and "tuple" in str(types.get(key, "")):
            config[key] = tuple(value)
    return _create(kind, name, None, config)


__all__ = [
    "build_from_model_args", "create_discriminator", "create_generator", "model_args", "names",
    "register_discriminator", "register_generator",
]
