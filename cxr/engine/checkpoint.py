"""Checkpoints that are state only, written atomically, and loaded without unpickling code.

Layout of one checkpoint (``run_dir/checkpoints/step-00000100/``)::

    G_A.safetensors, D_A.safetensors, ...   one per module: its state_dict, plus metadata
                                            ``model_args`` (JSON) to rebuild it and
                                            ``format_version``
    state.pt                                optimizers, schedulers, scaler, step, extra and
                                            every RNG state; plain containers and tensors
                                            only, read with ``torch.load(weights_only=True)``
    COMPLETE                                JSON (step, metric, modules), written last

A checkpoint is written into ``checkpoints/.tmp-step-...`` and renamed into place, so a kill
at any moment leaves either no new folder or a complete one; :func:`latest` also ignores a
step folder without ``COMPLETE``. The manager keeps the last ``keep_last`` step folders and a
copy of the best one by metric in ``checkpoints/best``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cxr.data.io import current_umask, naming
from cxr.engine.distributed import unwrap_model
from cxr.engine.seed import rng_state, set_rng_state
from cxr.errors import CxrError

FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
STATE_FILE = "state.pt"
COMPLETE = "COMPLETE"
BEST = "best"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(CxrError):
    """A checkpoint that cannot be used here: missing, corrupt, or of another model/shape."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# --------------------------------------------------------------------------------------------
# Finding checkpoints


def _ckpt_root(path: str | Path) -> Path:
    path = Path(path)
    return path / CKPT_DIR if (path / CKPT_DIR).is_dir() else path


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a checkpoint folder whose ``COMPLETE`` marker was written."""
    marker = Path(path) / COMPLETE
    try:
        json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (temporary and half-written ignored)."""
    root = _ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (or of its ``checkpoints/`` folder)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_point(run_dir: str | Path, resume: bool) -> tuple[Path | None, int | None]:
    """``(checkpoint, step)`` a ``--resume`` run continues from, or ``(None, None)`` for a new run.

    Asking to resume a folder without a complete checkpoint is a :class:`CheckpointError`.
    """
    if not resume:
        return None, None
    ckpt = latest(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: --resume: no complete checkpoint to continue from")
    return ckpt, read_meta(ckpt)["step"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if path.is_dir() and ((path / STATE_FILE).exists() or (path / COMPLETE).exists()):
        if not is_complete(path):
            raise CheckpointError(f"{path}: checkpoint is incomplete (no {COMPLETE} marker); "
                                  "it was interrupted while being written")
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint found")
    return found


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``COMPLETE`` record of a checkpoint (step, metric, modules, format_version)."""
    path = resolve_checkpoint(path)
    return json.loads((path / COMPLETE).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Writing


def _check_plain(obj: Any, where: str) -> None:
    """Refuse objects ``torch.load(weights_only=True)`` would not read back."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a string or an int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a checkpoint "
                    "(use plain containers, numbers, strings and tensors)")


def _tensors_for_safetensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU state_dict safetensors accepts: contiguous, each tensor owning its storage."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in unwrap_model(module).state_dict().items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict entry {k!r} is not a tensor")
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or t.numel() * t.element_size() != storage.nbytes():
            t = t.clone()  # tied weights or views: safetensors stores each tensor on its own
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_checkpoint(folder: Path, step: int, modules: Mapping[str, nn.Module],
                      state: dict[str, Any], meta: dict[str, Any],
                      model_args: Mapping[str, dict] | None) -> None:
    for name, module in modules.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"module name {name!r} must be a plain file name")
        args = (model_args or {}).get(name, {})
        metadata = {"format_version": str(FORMAT_VERSION), "module": name, "step": str(step),
                    "model_args": json.dumps(args, sort_keys=True)}
        weights = folder / f"{name}.safetensors"
        save_file(_tensors_for_safetensors(module), str(weights), metadata=metadata)
        os.chmod(weights, 0o666 & ~current_umask())  # safetensors writes 0600; the rest follow the umask
    with open(folder / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    with open(folder / COMPLETE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _as_os_error(e: Exception, where: Path) -> Exception:
    """An I/O failure that safetensors (``... (os error 28)``) or torch.save (``PytorchStreamWriter
    failed writing file``) reports as its own error type, as the :class:`OSError` it is, naming
    ``where``; any other error unchanged."""
    text = str(e)
    m = re.search(r"os error (\d+)", text)
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(where))
    if "failed writing file" in text or "unexpected pos" in text:
        return OSError(errno.EIO, f"cannot write the checkpoint (is the disk full?): {text.splitlines()[0]}",
                       str(where))
    return e


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class CheckpointManager:
    """Writes ``run_dir/checkpoints/step-XXXXXXXX`` folders, keeps the last k and the best.

    Call :meth:`save` on the main process only (it does no collective communication).
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CKPT_DIR
        self.keep_last = keep_last
        self.last_saved: Path | None = latest(self.run_dir)

    def latest(self) -> Path | None:
        return latest(self.run_dir)

    @property
    def best_path(self) -> Path:
        return self.root / BEST

    def best_metric(self) -> float | None:
        if not is_complete(self.best_path):
            return None
        return json.loads((self.best_path / COMPLETE).read_text(encoding="utf-8")).get("metric")

    def save(self, step: int, modules: Mapping[str, nn.Module],
             optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
             schedulers: Mapping[str, Any] | None = None, scaler: Any = None,
             extra: dict | None = None, metric: float | None = None, higher_is_better: bool = True,
             model_args: Mapping[str, dict] | None = None,
             rng: dict | list[dict] | None = None) -> Path:
        """Write a complete checkpoint for ``step`` and return its folder.

        ``extra`` holds anything else the loop needs to resume (EMA step, image pool, ADA p):
        plain containers, numbers, strings and tensors. ``rng`` defaults to this process's RNG
        states; pass a list (one per rank) to restore each DDP process its own stream.
        """
        optimizers = optimizers or {}
        schedulers = schedulers or {}
        if not modules:
            raise ValueError("a checkpoint needs at least one module")
        state: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "modules": sorted(modules),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "extra": extra if extra is not None else {},
            "rng": rng if rng is not None else rng_state(),
            "metric": None if metric is None else float(metric),
        }
        _check_plain(state, "checkpoint state")
        meta = {"format_version": FORMAT_VERSION, "step": int(step), "modules": sorted(modules),
                "metric": state["metric"], "higher_is_better": bool(higher_is_better)}

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            try:
                with naming(final):
                    _write_checkpoint(tmp, step, modules, state, meta, model_args)
            except (RuntimeError, SafetensorError) as e:
                raise _as_os_error(e, final) from None
            _swap_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.last_saved = final
        if metric is not None and self._is_better(float(metric), higher_is_better):
            self._copy_to_best(final)
        self._prune()
        return final

    def _is_better(self, metric: float, higher_is_better: bool) -> bool:
        best = self.best_metric()
        if best is None:
            return True
        return metric > best if higher_is_better else metric < best

    def _copy_to_best(self, src: Path) -> None:
        tmp = self.root / f".tmp-{BEST}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(src, tmp)
            _swap_into_place(tmp, self.best_path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` step folders; remove stale temporary folders."""
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                # Our own temporaries are renamed before we get here; these are leftovers of a
                # killed run.
                shutil.rmtree(p, ignore_errors=True)
        if self.keep_last is None or self.keep_last <= 0:
            return
        complete = list_checkpoints(self.run_dir)
        for p in complete[:-self.keep_last]:
            shutil.rmtree(p, ignore_errors=True)

    def load(self, path: str | Path | None = None, **kwargs) -> dict[str, Any]:
        """:func:`load` from ``path`` (default: this run's latest checkpoint)."""
        return load(path if path is not None else self.run_dir, **kwargs)


# --------------------------------------------------------------------------------------------
# Reading


def _safetensors_file(ckpt: Path, name: str) -> Path:
    f = ckpt / f"{name}.safetensors"
    if not f.exists():
        have = sorted(p.stem for p in ckpt.glob("*.safetensors"))
        raise CheckpointError(f"{ckpt}: no weights for module '{name}' "
                              f"(the checkpoint holds: {', '.join(have) or 'none'})")
    return f


def read_model_args(path: str | Path, name: str) -> dict[str, Any]:
    """The ``model_args`` stored with module ``name``: what is needed to rebuild it."""
    ckpt = resolve_checkpoint(path)
    f = _safetensors_file(ckpt, name)
    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: unreadable weights file ({e})") from None
    try:
        return json.loads(meta.get("model_args", "{}"))
    except ValueError:
        raise CheckpointError(f"{f}: model_args metadata is not valid JSON") from None


def check_family(ckpt: str | Path, args: Mapping[str, Any], family: str, what: str) -> None:
    """One line when ``model_args`` were written by another family than ``family`` (a ``what``)."""
    if args.get("family") != family:
        raise CheckpointError(f"{ckpt}: not a {what} checkpoint (family {args.get('family')!r})")


def read_state_dict(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The raw weights of module ``name`` (CPU tensors)."""
    ckpt = resolve_checkpoint(path)
    f = _safetensors_file(ckpt, name)
    try:
        return load_file(str(f), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: unreadable weights file ({e})") from None


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def load_module(path: str | Path, name: str, module: nn.Module) -> None:
    """Load module ``name``'s weights into ``module``, checking every key and shape first."""
    ckpt = resolve_checkpoint(path)
    saved = read_state_dict(ckpt, name)
    target = unwrap_model(module)
    expected = target.state_dict()
    where = f"{ckpt}: module '{name}'"
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key '{missing[0]}'" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected key '{unexpected[0]}'"
                         + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise CheckpointError(f"{where} does not match this model: {'; '.join(parts)} "
                              "(a checkpoint of another model or architecture?)")
    for k, v in expected.items():
        if tuple(saved[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: shape mismatch for '{k}': checkpoint {_shape(saved[k])}, "
                                  f"model {_shape(v)} (different model_args?)")
    target.load_state_dict(saved, strict=True)


def load_state(path: str | Path) -> dict[str, Any]:
    """``state.pt`` of a checkpoint, read with ``weights_only=True`` (no code is unpickled)."""
    ckpt = resolve_checkpoint(path)
    f = ckpt / STATE_FILE
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: {STATE_FILE} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: cannot read training state ({first})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{f}: not a cxr checkpoint state (format_version "
                              f"{state.get('format_version') if isinstance(state, dict) else None!r}, "
                              f"expected {FORMAT_VERSION})")
    return state


def load(path: str | Path, modules: Mapping[str, nn.Module],
         optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
         schedulers: Mapping[str, Any] | None = None, scaler: Any = None,
         restore_rng: bool = True, rank: int = 0) -> dict[str, Any]:
    """Restore modules, optimizers, schedulers, scaler and (optionally) RNG states.

    ``path`` is a checkpoint folder or a run folder (its latest complete checkpoint). Returns
    ``{"step", "extra", "metric", "path"}``. Everything is checked before anything is changed
    where possible; a mismatch is a one-line :class:`CheckpointError`.
    """
    optimizers = optimizers or {}
    schedulers = schedulers or {}
    ckpt = resolve_checkpoint(path)
    state = load_state(ckpt)
    for group, wanted in (("optimizers", optimizers), ("schedulers", schedulers)):
        have = state.get(group, {})
        for name in wanted:
            if name not in have:
                raise CheckpointError(f"{ckpt}: no state for {group[:-1]} '{name}' "
                                      f"(the checkpoint holds: {', '.join(sorted(have)) or 'none'})")
    for name, module in modules.items():
        load_module(ckpt, name, module)
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(state["optimizers"][name])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt}: optimizer '{name}' does not match: {e}") from None
    for name, sched in schedulers.items():
        sched.load_state_dict(state["schedulers"][name])
    if scaler is not None:
        if state.get("scaler") is None:
            raise CheckpointError(f"{ckpt}: no grad-scaler state saved")
        scaler.load_state_dict(state["scaler"])
    if restore_rng and state.get("rng") is not None:
        rng = state["rng"]
        if isinstance(rng, list):
            rng = rng[rank] if rank < len(rng) else rng[0]
        set_rng_state(rng)
    return {"step": int(state["step"]), "extra": state.get("extra", {}), "metric": state.get("metric"),
            "path": ckpt}
