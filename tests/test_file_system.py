"""When the file system fights back: full and read-only disks, paths that are folders or lie
under files, two writers of one output, a resume without its config, and failed runs. Each
ends in one ``cxr: error:`` line, exit 2, and leaves nothing behind."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import cxr.cli.train_classifier as train_classifier_cli
from builders import one_error_line
from classifiers.trainer import MODEL_FAMILY as CLASSIFIER_FAMILY
from cxr.cli.common import worker_count
from cxr.cli.main import build_parser, main
from cxr.data import io as cxr_io
from cxr.data.cache import ImageCache
from cxr.data.io import atomic_write_text, claim_output, lock_path
from cxr.data.preprocess import Preprocess
from cxr.engine.checkpoint import latest
from cyclegan_helpers import nlm_site

GAN_FAST = ["data.size=32", "data.decode_workers=1", "model.ngf=4", "model.ndf=4", "model.d_layers=2",
            "train.batch_size=2", "train.log_every=1", "train.image_every=0", "train.ckpt_every=2", "device=cpu",
            "train.steps=2"]


def _everything(folder: Path) -> list[str]:
    """Every path under ``folder``, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@contextmanager
def _tmpfs(folder: Path, options: str):
    """A small tmpfs mounted at ``folder`` (root only); skips the test where mounting is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode(errors='replace').strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def trees(tmp_path, monkeypatch) -> tuple[Path, Path]:
    monkeypatch.chdir(tmp_path)
    return nlm_site(tmp_path / "m", "montgomery", 6, sizes=[(160, 140)]), nlm_site(tmp_path / "s", "shenzhen", 8)


# -- one flag, one meaning -------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, name: str = "cxr"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_workers_flag_takes_zero_and_refuses_negatives():
    found = {}
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if "--workers" in action.option_strings:
                found[name] = action
    assert set(found) >= {"cxr datasets cache", "cxr phantom", "cxr harmonize", "cxr translate", "cxr predict",
                          "cxr demo"}
    for name, action in found.items():
        assert action.type is worker_count, name
        assert action.default in (None, 0), name
        assert "0: in this process" in action.help, name
    assert worker_count("0") == 0 and worker_count("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 0"):
        worker_count("-1")


def test_workers_zero_runs_in_this_process(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    site = nlm_site(tmp_path / "d", "montgomery", 4)
    assert main(["datasets", "cache", str(site), "--cache-dir", "c", "--size", "16", "--workers", "0"]) == 0
    assert "4 built" in capsys.readouterr().out
    assert main(["phantom", "--preset", "nlm", "--size", "48", "--n", "4", "--workers", "0", "--out", "ph"]) == 0
    assert len(list((tmp_path / "ph").rglob("*.png"))) >= 4
    with pytest.raises(SystemExit) as ex:
        main(["predict", "--checkpoint", "x", "--in", "y", "--out", "p.csv", "--workers", "-2"])
    assert ex.value.code == 2
    assert "--workers: must be >= 0 (0: work in this process), got -2" in capsys.readouterr().err


# -- permissions -----------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_preview_is_written_with_the_usual_permissions(trees, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["datasets", "preview", str(trees[0]), "--out", "p.png", "--n", "2", "--size", "32"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o644


# -- full and read-only disks ----------------------------------------------------------------


def _full_disk_commands(m: Path, s: Path, out: Path) -> dict[str, list[str]]:
    return {
        "phantom": ["phantom", "--preset", "nlm", "--size", "128", "--n", "10", "--workers", "0",
                    "--out", str(out / "ph")],
        "harmonize": ["harmonize", "--reference", str(s), "--in", str(m), "--out", str(out / "h")],
        "cache": ["datasets", "cache", str(m), "--cache-dir", str(out / "c"), "--size", "128", "--workers", "0"],
        "preview": ["datasets", "preview", str(m), "--out", str(out / "p.png"), "--size", "400"],
    }


@pytest.mark.parametrize("command", ["phantom", "harmonize", "cache", "preview"])
def test_a_full_disk_is_one_line_and_leaves_nothing(trees, tmp_path, capsys, command):
    with _tmpfs(tmp_path / "full", "size=48k") as full:
        argv = _full_disk_commands(*trees, full)[command]
        before = _everything(full)
        assert main(argv) == 2
        err = one_error_line(capsys)
        assert err.endswith(": No space left on device") and str(full) in err and ".tmp" not in err
        left = _everything(full)
        if command == "cache":  # entries finished before the disk filled stay, complete; nothing partial
            assert not [p for p in left if p.endswith((".tmp", ".lock"))], left
            for entry in (full / p for p in left if p.endswith(".npy")):
                assert np.load(entry).shape == (128, 128)
        else:
            assert left == before


@pytest.mark.parametrize("command", ["phantom", "harmonize", "cache", "preview"])
def test_a_read_only_disk_is_one_line(trees, tmp_path, capsys, command):
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        argv = _full_disk_commands(*trees, ro)[command]
        assert main(argv) == 2
        assert one_error_line(capsys).endswith(": Read-only file system")
        assert _everything(ro) == []


def test_a_write_error_without_a_file_name_names_the_file(trees, tmp_path, capsys, monkeypatch):
    """Where no tmpfs can be mounted: a writer whose ``write`` fails as a full disk does."""

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_fdopen = os.fdopen
    monkeypatch.setattr(cxr_io.os, "fdopen", lambda fd, *a, **k: FullFile(real_fdopen(fd, *a, **k)))
    assert main(["datasets", "preview", str(trees[0]), "--out", "p.png", "--n", "2", "--size", "32"]) == 2
    assert one_error_line(capsys) == "cxr: error: p.png: No space left on device"
    assert not list(tmp_path.glob("*p.png*"))


@pytest.mark.parametrize("argv, where, reason", [
    (["datasets", "preview", "{m}", "--out", "{tmp}"], "{tmp}", "--out is a folder"),
    (["predict", "--checkpoint", "x", "--in", "{m}", "--out", "{tmp}"], "{tmp}", "--out is a folder"),
    (["predict", "--checkpoint", "x", "--in", "{m}", "--out", "{file}/p.csv"], "{file}", "not a folder"),
    (["datasets", "cache", "{m}", "--cache-dir", "{file}/c"], "{file}/c", "Not a directory"),
    (["datasets", "cache", "{m}", "--cache-dir", "{file}"], "{file}", "--cache-dir exists and is not a folder"),
    (["harmonize", "--reference", "{s}", "--in", "{m}", "--out", "{file}/h"], "{file}/h", "Not a directory"),
    (["phantom", "--preset", "nlm", "--size", "48", "--n", "4", "--out", "{file}/ph"], "{file}", "Not a directory"),
    (["train-gan", "cyclegan", "--run-dir", "{file}/run", "data.a={m}", "data.b={s}", *GAN_FAST], "{file}",
     "Not a directory"),
    (["train-gan", "cyclegan", "--run-dir", "{file}", "data.a={m}", "data.b={s}", *GAN_FAST], "{file}",
     "--run-dir exists and is not a folder"),
])
def test_paths_that_are_folders_or_under_files(trees, tmp_path, capsys, argv, where, reason):
    (tmp_path / "file").write_text("a regular file\n")
    fill = {"m": str(trees[0]), "s": str(trees[1]), "tmp": str(tmp_path), "file": str(tmp_path / "file")}
    before = _everything(tmp_path)
    assert main([a.format(**fill) for a in argv]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"cxr: error: {where.format(**fill)}") and reason in err, err
    assert _everything(tmp_path) == before


# -- two writers of one output ---------------------------------------------------------------

HOLD = """
import sys, time
from cxr.data.io import claim_output
with claim_output(sys.argv[1]):
    print("claimed", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def other_writer(tmp_path):
    """A second process holding the claim of an output path (a writer in the middle of its run)."""
    procs = []

    def start(out: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "claimed"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_second_writer_is_refused_while_the_first_runs(trees, tmp_path, capsys, other_writer, overwrite):
    out = tmp_path / "h"
    holder = other_writer(out)
    extra = ["--overwrite"] if overwrite else []
    argv = ["harmonize", "--reference", str(trees[1]), "--in", str(trees[0]), "--out", str(out), *extra]
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert f"cxr: error: {out}: process {holder.pid} on " in err and "is writing it" in err
    assert not out.exists()
    ph = ["phantom", "--preset", "nlm", "--size", "48", "--n", "4", "--workers", "0", "--out", str(out), *extra]
    assert main(ph) == 2
    assert f"process {holder.pid} on " in one_error_line(capsys)
    # The holder dies without cleaning up (kill -9): its claim is stale and the next writer takes it.
    holder.kill()
    holder.wait()
    assert lock_path(out).exists()
    assert main(argv) == 0
    assert out.is_dir() and not lock_path(out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cache_and_build_nine_have_one_writer_too(trees, tmp_path, capsys, other_writer):
    nine = tmp_path / "nine"
    holder = other_writer(nine)
    assert main(["datasets", "build-nine", "--nih", "x", "--covid", "x", "--pneumonia", "x", "--tb", "x",
                 "--out", str(nine)]) == 2
    assert one_error_line(capsys).startswith(f"cxr: error: {nine}: process {holder.pid} on ")
    store = ImageCache(tmp_path / "c", Preprocess(size=16)).dir
    holder = other_writer(store)
    assert main(["datasets", "cache", str(trees[0]), "--cache-dir", str(tmp_path / "c"), "--size", "16",
                 "--workers", "0"]) == 2
    assert one_error_line(capsys).startswith(f"cxr: error: {store}: process {holder.pid} on ")
    assert not list(store.rglob("*.npy"))


def test_two_writers_in_one_process_and_a_torn_claim(tmp_path):
    out = tmp_path / "o"
    with claim_output(out) as lock:
        assert lock.read_text().split()[1] == str(os.getpid())
        with pytest.raises(Exception, match=f"process {os.getpid()} on .* is writing it"):
            with claim_output(out):
                pass
        assert lock.exists()  # the refused writer left the first one's claim alone
    assert not lock.exists()
    lock.write_text("")  # a claim torn by a crash names no process: refused, with the path to remove
    with pytest.raises(Exception, match="another process is writing it"):
        with claim_output(out):
            pass


def test_claim_folders_made_for_a_failed_writer_are_removed(tmp_path):
    with pytest.raises(RuntimeError):
        with claim_output(tmp_path / "a" / "b" / "out"):
            raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_of_a_multi_process_phantom_is_quiet_and_clean(tmp_path):
    out = tmp_path / "ph"
    # 2,000 images: still rendering a second after the temporary tree appears (200 could finish
    # by then, and a signal during the interpreter's exit ends it with -2 instead of 130)
    p = subprocess.Popen([sys.executable, "-m", "cxr.cli.main", "phantom", "--preset", "nlm", "--size", "96",
                          "--n", "2000", "--workers", "2", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".ph.*.tmp")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the workers are rendering
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == "cxr: interrupted"
    assert list(tmp_path.iterdir()) == []


# -- resume and run folders ------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def gan_run(trees, tmp_path) -> Path:
    run = tmp_path / "run"
    assert main(["train-gan", "cyclegan", "--run-dir", str(run), f"data.a={trees[0]}", f"data.b={trees[1]}",
                 f"data.cache_dir={tmp_path / 'cache'}", *GAN_FAST]) == 0
    assert latest(run) is not None
    return run


def test_checkpoint_files_follow_the_umask(gan_run):
    expected = 0o666 & ~cxr_io.current_umask()
    files = [p for p in latest(gan_run).iterdir() if p.is_file()]
    assert {p.suffix for p in files} >= {".safetensors", ".pt"}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: expected for p in files}


def test_a_resume_checks_everything_before_writing(gan_run, capsys):
    capsys.readouterr()
    # config.yaml missing: refused (no fall-back to the default config), nothing written
    (gan_run / "config.yaml").unlink()
    before = _snapshot(gan_run)
    assert main(["train-gan", "cyclegan", "--run-dir", str(gan_run), "--resume"]) == 2
    assert one_error_line(capsys) == (f"cxr: error: {gan_run / 'config.yaml'}: missing; "
                                      "cannot resume without the run's config")
    assert _snapshot(gan_run) == before
    # A config whose networks do not fit the checkpoint: refused after the check, before any write.
    saved = gan_run.parent / "saved.yaml"
    assert main(["train-gan", "cyclegan", "--dry-run", "--config", "cyclegan_tiny", *GAN_FAST,
                 "model.ngf=8"]) == 0
    saved.write_text(capsys.readouterr().out)
    assert main(["train-gan", "cyclegan", "--run-dir", str(gan_run), "--resume", "--config", str(saved),
                 "train.steps=4"]) == 2
    capsys.readouterr()
    assert _snapshot(gan_run) == before and not (gan_run / "run-1.json").exists()


def test_resuming_a_run_of_another_family_names_it(gan_run, capsys):
    assert train_classifier_cli.FAMILY == CLASSIFIER_FAMILY
    capsys.readouterr()
    before = _snapshot(gan_run)
    assert main(["train-classifier", "--run-dir", str(gan_run), "--resume"]) == 2
    assert one_error_line(capsys) == (f"cxr: error: {gan_run}: --resume: this is a cyclegan run, not a "
                                      "classifier one; resume it with the cyclegan trainer")
    (gan_run / "run.json").unlink()  # the checkpoint says it too
    assert main(["train-classifier", "--run-dir", str(gan_run), "--resume"]) == 2
    assert "this is a cyclegan run" in one_error_line(capsys)
    before.pop("run.json")
    assert _snapshot(gan_run) == before


def test_failed_runs_leave_no_folder(trees, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["train-gan", "cyclegan", f"data.b={trees[1]}", *GAN_FAST]
    assert main([*base, f"data.a={empty}"]) == 2  # an empty tree: fails inside the run
    one_error_line(capsys)
    assert list((tmp_path / "runs").iterdir()) == []
    if not torch.cuda.is_available():
        assert main([*base, f"data.a={trees[0]}", "device=cuda"]) == 2
        assert one_error_line(capsys) == "cxr: error: config key 'device': device cuda: no CUDA GPU is available"
        assert list((tmp_path / "runs").iterdir()) == []
    # a --run-dir that existed before is kept, even empty
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main([*base, f"data.a={empty}", "--run-dir", str(mine)]) == 2
    one_error_line(capsys)
    assert mine.is_dir()
    # --task nine on a TB tree: names the tree and an image, and leaves nothing
    assert main(["train-classifier", "--task", "nine", f"data.train={trees[0]}", "data.size=32", "device=cpu",
                 "data.decode_workers=1", "train.epochs=1"]) == 2
    err = one_error_line(capsys)
    assert f"({trees[0]})" in err and "MCUCXR_" in err and "needs one of" in err
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_full_disk_during_training_is_one_line_and_leaves_no_run(trees, tmp_path, capsys):
    with _tmpfs(tmp_path / "full", "size=150k") as full:
        run = full / "run"
        assert main(["train-gan", "cyclegan", "--run-dir", str(run), f"data.a={trees[0]}", f"data.b={trees[1]}",
                     f"data.cache_dir={tmp_path / 'cache'}", *GAN_FAST]) == 2
        assert one_error_line(capsys) == f"cxr: error: {run / 'checkpoints' / 'step-00000002'}: No space left on device"
        assert _everything(full) == []


def test_a_truncated_image_under_split_all_leaves_no_run(trees, tmp_path, capsys):
    bad = next((trees[0] / "CXR_png").glob("*.png"))
    bad.write_bytes(bad.read_bytes()[:60])
    assert main(["train-gan", "cyclegan", f"data.a={trees[0]}", f"data.b={trees[1]}", "data.split=all",
                 *GAN_FAST]) == 2
    assert bad.name in one_error_line(capsys)
    assert list((tmp_path / "runs").iterdir()) == []


def test_negative_checkpoint_interval_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train-gan", "cyclegan", "--dry-run", "train.ckpt_every=0"]) == 0
    capsys.readouterr()
    assert main(["train-gan", "cyclegan", "--dry-run", "train.ckpt_every=-1"]) == 2
    assert "train.ckpt_every must be >= 0 (0: no periodic checkpoints), got -1" in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_translate_device_cuda_without_a_gpu(tmp_path, capsys):
    assert main(["translate", "--checkpoint", "x", "--direction", "a2b", "--in", "y", "--out", str(tmp_path / "o"),
                 "--device", "cuda"]) == 2
    assert one_error_line(capsys) == "cxr: error: --device cuda: no CUDA GPU is available"


def test_skip_bad_report_path_is_in_the_help_and_printed(trees, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["datasets", "cache", "--help"])
    assert "<cache-dir>/<settings hash>/" in " ".join(capsys.readouterr().out.split())
    bad = trees[0] / "CXR_png" / "MCUCXR_9999_1.png"
    bad.write_bytes(b"not a png")
    assert main(["datasets", "cache", str(trees[0]), "--cache-dir", "c", "--size", "16", "--workers", "0",
                 "--skip-bad"]) == 0
    out = capsys.readouterr().out
    report = out.strip().splitlines()[-1].split("report: ")[1]
    assert Path(report).parent.parent == Path("c") and Path(report).is_file()
