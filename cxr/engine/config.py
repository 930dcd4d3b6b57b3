"""Run configs: nested dataclasses filled from a YAML file, then from ``key=value`` overrides.

Why dataclasses: every key has one declared type and default in code, so a typo or a wrong
type is caught before any work starts, and the resolved config can be saved beside the run and
read back identically. Loading order: the dataclass defaults, then the YAML file, then the
command-line overrides (``train.batch_size=4``), each checked against the field's annotation.

Every error is a one-line :class:`~cxr.errors.ConfigError` naming the key (with the closest
valid key for a typo) or the file and line of malformed YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from cxr.data.io import atomic_write_text
from cxr.errors import ConfigError

T = TypeVar("T")

AmpMode = Literal["auto", "bf16", "off"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass(frozen=True)
class StepTrainConfig:
    """The training-loop keys shared by every step-based trainer (GANs embed or extend it)."""

    batch_size: int = 1          # global batch, split evenly over DDP processes
    steps: int = 10_000          # optimizer steps (one batch each)
    log_every: int = 100         # scalars to stats.jsonl / TensorBoard
    image_every: int = 1_000     # image grids to TensorBoard
    ckpt_every: int = 1_000      # checkpoint interval in steps (0: none; negative: refused); a final checkpoint is always written
    keep_last: int = 3           # step checkpoints kept (plus ``best``); <= 0 keeps all
    amp: AmpMode = "auto"        # bf16 autocast on CUDA ("auto"/"bf16"), never on CPU unless "bf16"
    compile: bool = False        # torch.compile the networks
    compile_mode: CompileMode = "default"  # torch.compile's mode; "reduce-overhead": CUDA graphs (launch-bound GPU steps)
    channels_last: bool = True   # NHWC memory format (faster convolutions on recent GPUs)
    deterministic: bool = False  # deterministic kernels (slower; needed for bit-exact resume on GPU)
    num_workers: int = 0         # DataLoader worker processes
    ema: float = 0.0             # decay of an EMA copy of the generators' weights (e.g. 0.999); 0: none

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"train.ema must be in [0, 1) (0 turns it off), got {self.ema}")
        if self.ckpt_every < 0:
            raise ValueError(f"train.ckpt_every must be >= 0 (0: no periodic checkpoints), got {self.ckpt_every}")


@dataclass(frozen=True)
class DataConfig:
    """The data keys every trainer shares: how images become network inputs, which patient-level
    split trains, and where the preprocessed images are cached.

    Each family's ``data`` section extends it with its own keys (which trees, layouts,
    augmentation) and may change a default (``size``) or the sizes it accepts
    (``SIZE_RANGE``, ``SIZE_MULTIPLE``). Every trainer splits a tree the same way
    (:func:`cxr.data.splits.split_records` with ``split_fractions`` and ``split_seed``), so with
    the same keys a generator never sees the images a classifier is tested on.
    """

    SIZE_RANGE: ClassVar[tuple[int, int]] = (16, 1024)  # the sizes this family's networks accept
    SIZE_MULTIPLE: ClassVar[int] = 1

    size: int = 256              # square network input (images are resized, then padded or cropped)
    fit: Literal["pad", "crop"] = "pad"  # how non-square images become square
    split: Literal["train", "all"] = "train"  # "train": the patient-level training split only
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train, val, test by patient
    split_seed: int = 0          # the same for every trainer, so test images stay unseen
    cache_dir: str | None = None  # preprocessed-image cache; None: <run dir>/cache
    decode_workers: int | None = None  # processes decoding images into the cache; None: up to 8
    skip_bad: bool = False       # skip unreadable files (listed in the run log) instead of stopping
    on_device: bool = True       # keep the preprocessed images in GPU memory
    lung_crop: str | None = None  # cut to the lungs' box first: masks, a ManualMask folder or a segmenter run
    lung_crop_margin: float = 0.1  # margin of the lung crop: a fraction of the box's side, on each side

    def __post_init__(self) -> None:
        lo, hi = self.SIZE_RANGE
        if not lo <= self.size <= hi or self.size % self.SIZE_MULTIPLE:
            multiple = f"a multiple of {self.SIZE_MULTIPLE} " if self.SIZE_MULTIPLE > 1 else ""
            raise ValueError(f"data.size must be {multiple}in {lo}..{hi}, got {self.size}")
        if self.lung_crop_margin < 0:
            raise ValueError(f"data.lung_crop_margin must be >= 0, got {self.lung_crop_margin}")
        if min(self.split_fractions) < 0 or abs(sum(self.split_fractions) - 1.0) > 1e-5:
            raise ValueError(f"data.split_fractions must be non-negative and sum to 1, "
                             f"got {list(self.split_fractions)}")


# --------------------------------------------------------------------------------------------
# Public API


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file ``path`` (optional), then overrides.

    Overrides are ``dotted.key=value``; the value is parsed as YAML (``1e-3``, ``true``,
    ``[1, 2]``, ``null``), except for string-typed keys which take the text as written.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path)
    for item in overrides:
        _apply_override(cls, data, item)
    return _build(cls, data, base=None, prefix="", root=cls)


def config_to_dict(cfg: Any) -> Any:
    """A plain, YAML/JSON-safe tree of ``cfg`` (tuples become lists, paths become strings)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def format_config(cfg: Any) -> str:
    """The resolved config as YAML text (what ``--dry-run`` prints and ``config.yaml`` holds)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically; :func:`load_config` reads it back equal."""
    return atomic_write_text(path, format_config(cfg))


def config_keys(cls: type) -> list[str]:
    """Every valid dotted key of ``cls`` (nested sections and their leaves)."""
    keys: list[str] = []
    hints = _hints(cls)
    for f in _init_fields(cls):
        keys.append(f.name)
        sub = _dataclass_type(hints[f.name])
        if sub is not None:
            keys.extend(f"{f.name}.{k}" for k in config_keys(sub))
    return keys


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing file or malformed YAML is one ConfigError line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, not {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------
# Building and checking


def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves string annotations (``from __future__ import annotations``).
    return typing.get_type_hints(cls, include_extras=False)


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass in ``tp`` (``Sub`` or ``Optional[Sub]``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        subs = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(subs) == 1 and dataclasses.is_dataclass(subs[0]):
            return subs[0]
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _retired_keys(cls: type) -> Mapping[str, Any]:
    """A section's removed keys and the value each had when off (``RETIRED_KEYS`` class attribute).

    A removed key set to that value is ignored, so the ``config.yaml`` of a run saved before the
    removal (which lists every key) still loads; set to anything else it is an error.
    """
    return getattr(cls, "RETIRED_KEYS", {})


def _check_retired(key: str, value: Any, off: Any) -> None:
    if value != off:
        raise ConfigError(f"config key '{key}' was removed; only its old default {off!r} is still "
                          f"accepted (so older saved configs load), got {_show(value)}")


def _unknown_key(cls: type, key: str) -> ConfigError:
    valid = config_keys(cls)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:  # a typo in the last part only: compare with the siblings
        head, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == head]
        leaf_close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
        close = [f"{head}.{leaf_close[0]}" if head else leaf_close[0]] if leaf_close else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _apply_override(root: type, data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    parts = key.split(".")
    cls: type = root
    node = data
    for i, part in enumerate(parts):
        fields = {f.name: f for f in _init_fields(cls)}
        if part not in fields and i == len(parts) - 1 and part in _retired_keys(cls):
            node[part] = _parse_override_value(raw, Any)  # checked (and dropped) by _build
            return
        if part not in fields:
            raise _unknown_key(root, key)
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            node[part] = _parse_override_value(raw, tp)
            return
        sub = _dataclass_type(tp)
        if sub is None:
            raise _unknown_key(root, key)
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, cls = child, sub


def _parse_override_value(raw: str, tp: Any) -> Any:
    text = raw.strip()
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    # String-typed keys (paths, names) take the text as written: ``data.a=2024`` stays "2024".
    if _accepts_str(tp) and value is not None and not isinstance(value, (dict, list)):
        return text
    return value


def _accepts_str(tp: Any) -> bool:
    if tp is str or tp is Path:
        return True
    if typing.get_origin(tp) is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    if _is_union(tp):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return False


def _build(cls: type[T], data: Any, base: Any, prefix: str, root: type) -> T:
    """``cls`` from ``data`` over ``base`` (the section's default); ``root`` is for suggestions."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping of keys, "
                          f"got {_show(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in _init_fields(cls)}
    retired = _retired_keys(cls)
    for k in data:
        if k in retired and k not in fields:
            _check_retired(f"{prefix}{k}", data[k], retired[k])
        elif k not in fields:
            raise _unknown_key(root, f"{prefix}{k}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if name in data:
            sub = _dataclass_type(tp)
            if sub is not None and isinstance(data[name], Mapping):
                sub_base = getattr(base, name) if base is not None else _field_default(f)
                kwargs[name] = _build(sub, data[name], sub_base, key + ".", root)
            elif sub is not None and data[name] is not None:
                first = next(iter(_init_fields(sub)), None)
                example = f", e.g. '{key}.{first.name}=...'" if first is not None else ""
                raise ConfigError(f"config key '{key}' is a section, not a value: set its keys{example}")
            else:
                kwargs[name] = _coerce(data[name], tp, key)
        elif base is not None and base is not dataclasses.MISSING:
            kwargs[name] = getattr(base, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a __post_init__ check of the config class
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': {e}") from None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


_YAML_BOOL_WORDS = {True: ("on", "yes", "true", "y"), False: ("off", "no", "false", "n")}


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    try:
        return _convert(value, tp)
    except _Mismatch:
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {_show(value)}") from None


def _convert(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
        if isinstance(value, str):  # an override's text for a non-string choice, e.g. "2"
            for a in args:
                if not isinstance(a, str) and str(a) == value.strip():
                    return a
        if isinstance(value, bool):
            # YAML 1.1 reads off/on/no/yes as booleans: ``amp: off`` must still mean "off".
            for a in args:
                if isinstance(a, str) and a.lower() in _YAML_BOOL_WORDS[value]:
                    return a
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        number = _as_float(value)
        if number is not None and number.is_integer():
            return int(number)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        number = _as_float(value)  # PyYAML reads "1e-3" (no dot) as a string
        if number is not None:
            return number
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_convert(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [_convert(v, item) for v in value]
        return items if origin is list or tp is list else tuple(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt): _convert(v, vt) for k, v in value.items()}
    sub = _dataclass_type(tp)
    if sub is not None:
        if isinstance(value, sub):
            return value
        raise _Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def _as_float(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    if isinstance(value, float):
        return value
    return None
