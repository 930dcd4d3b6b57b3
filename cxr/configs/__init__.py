"""The run configs that ship with the package, found by name: ``--config cyclegan_paired128``.

Every YAML file in this folder is package data, so a name works from any folder and from a
non-editable install; a path to any YAML file works too. :func:`resolve_config` decides:

1. an existing file (``--config my_run.yaml``, ``--config runs/00003-cyclegan/config.yaml``);
2. else the name of a shipped config, with or without ``.yaml`` (``cyclegan_tiny``); the old
   in-repository spelling ``configs/NAME.yaml`` (before the configs moved here) means the same;
3. else a one-line :class:`~cxr.errors.ConfigError` listing the shipped names.

A shipped config's name starts with the trainer it is for (``cyclegan_*``, ``classifier_*``).
"""

from __future__ import annotations

from pathlib import Path

from cxr.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent
SUFFIX = ".yaml"


def config_names(prefix: str = "") -> list[str]:
    """The shipped configs' names (file names without ``.yaml``), sorted; only those starting
    with ``prefix`` when given (``"cyclegan_"``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob(f"*{SUFFIX}") if p.stem.startswith(prefix))


def shipped_config(name: str) -> Path:
    """The file of the shipped config ``name`` (``cyclegan_tiny`` or ``cyclegan_tiny.yaml``)."""
    stem = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name
    path = CONFIG_DIR / f"{stem}{SUFFIX}"
    if not stem or "/" in stem or "\\" in stem or not path.is_file():
        names = ", ".join(config_names())
        raise ConfigError(f"{name}: no such config file, nor a shipped config name (shipped: {names})")
    return path


def resolve_config(value: str | Path) -> Path:
    """The YAML file ``--config value`` means: an existing path, else a shipped config's name."""
    path = Path(value)
    if path.is_file():
        return path
    parts = path.parts
    name = parts[1] if len(parts) == 2 and parts[0] == "configs" else str(value)  # configs' old home
    try:
        return shipped_config(name)
    except ConfigError:
        if path.exists():
            raise ConfigError(f"{path}: a config must be a YAML file, not a folder") from None
        names = ", ".join(config_names())
        raise ConfigError(f"{value}: no such config file, nor a shipped config name (shipped: {names})") from None
