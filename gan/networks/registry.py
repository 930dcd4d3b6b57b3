"""The registry the network modules add themselves to (:func:`register_generator`,
:func:`register_discriminator`); :mod:`gan.networks` builds networks from it by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

KINDS = ("generator", "discriminator")


@dataclass(frozen=True)
class Entry:
    """One registered network: how to build it from keyword arguments."""

    kind: str
    name: str
    config_cls: type
    build: Callable[..., nn.Module]  # (config) -> module
    defaults: dict[str, Any]  # config fields this name fixes (e.g. n_blocks=9)
    sized: Callable[[int], dict[str, Any]] | None  # image_size -> config fields (e.g. U-Net depth)


_REGISTRY: dict[tuple[str, str], Entry] = {}


def _register(kind: str, name: str, config_cls: type, defaults: dict[str, Any] | None,
              sized: Callable[[int], dict[str, Any]] | None) -> Callable:
    def wrap(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if (kind, name) in _REGISTRY:
            raise ValueError(f"{kind} {name!r} registered twice")
        _REGISTRY[(kind, name)] = Entry(kind, name, config_cls, cls, dict(defaults or {}), sized)
        return cls

    return wrap


def register_generator(name: str, config: type, defaults: dict[str, Any] | None = None,
                       sized: Callable[[int], dict[str, Any]] | None = None) -> Callable:
    """Class decorator: ``@register_generator("resnet9", ResnetGeneratorConfig, {"n_blocks": 9})``.

    ``sized(image_size)`` may derive config fields from the training resolution (used only when
    the caller passes ``image_size`` and does not set those fields itself).
    """
    return _register("generator", name, config, defaults, sized)


def register_discriminator(name: str, config: type, defaults: dict[str, Any] | None = None,
                           sized: Callable[[int], dict[str, Any]] | None = None) -> Callable:
    """Class decorator, as :func:`register_generator`, for discriminators."""
    return _register("discriminator", name, config, defaults, sized)
