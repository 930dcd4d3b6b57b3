"""The cross-domain study: train on one site with several seeds, test on held-out images of that
site and on other sites' trees (as is, harmonized, translated), one table of AUROC with CIs.

Used by ``cxr demo`` and ``experiments/classifier_phantom.py``. Every run is an ordinary
``cxr train-classifier`` run folder (config, checkpoints, predictions), so any figure in the
table can be traced to files.

Test trees derived from one source tree (a translated or histogram-matched copy) are scored on
the source tree's patient-level *test* split only, the same patients in every condition: the
generators and harmonizers fit on training splits, so these images were never seen by any of
them, and the conditions differ only in how the images were processed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from classifiers.config import ClassifierConfig
from classifiers.trainer import train
from cxr.configs import resolve_config
from cxr.data.layouts import load_tree
from cxr.data.splits import split_records
from cxr.engine.config import load_config
from cxr.errors import ConfigError
from cxr.metrics.cross_domain import ConditionResult, condition_result, read_predictions

DEFAULT_CONFIG = "classifier_tb"  # a shipped config (cxr.configs)
IN_DOMAIN = "held-out, same site (in-domain)"


@dataclass(frozen=True)
class StudyResult:
    results: list[ConditionResult]  # the in-domain row first, then the test trees in order
    runs: list[Path]
    config: ClassifierConfig  # the first seed's resolved config
    seconds: float


def _test_split_patients(tree: Path, split_seed: int, fractions: Sequence[float]) -> set[str]:
    return {r.patient_id for r in split_records(load_tree(tree).records, fractions, seed=split_seed)["test"]}


def cross_domain_study(train_tree: str | Path, tests: Mapping[str, str | Path], runs_dir: str | Path,
                       seeds: int = 3, seed: int = 0, config: str | Path | None = DEFAULT_CONFIG,
                       overrides: Sequence[str] = (), test_split_of: str | Path | None = None,
                       in_domain_name: str = IN_DOMAIN, n_boot: int = 1000,
                       on_seed: Callable[[Path], None] | None = None,
                       restrict_to_test_split: bool = True) -> StudyResult:
    """Train ``seeds`` TB classifiers on ``train_tree`` and score them on every tree of ``tests``.

    ``test_split_of`` is the tree whose patient-level test split restricts every test tree
    (default: the first test tree, whose copies the others are); ``restrict_to_test_split=False``
    scores whole trees instead (fine when no test tree was seen by a generator or harmonizer).
    A condition left without images is an error, never an empty row.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    t0 = time.perf_counter()
    tests = {name: Path(tree) for name, tree in tests.items()}
    runs: list[Path] = []
    cfg0: ClassifierConfig | None = None
    for k in range(seeds):
        cfg = load_config(ClassifierConfig, resolve_config(config) if config else None, [
            f"data.train={train_tree}", "data.test=[" + ",".join(str(t) for t in tests.values()) + "]",
            f"seed={seed + k}", "eval.n_boot=0", *overrides])
        cfg0 = cfg0 or cfg
        run_dir = Path(runs_dir) / f"classifier-tb-seed{seed + k}"
        train(cfg, run_dir)
        runs.append(run_dir)
        if on_seed:
            on_seed(run_dir)

    patients = None
    if restrict_to_test_split:
        source = Path(test_split_of) if test_split_of else next(iter(tests.values()))
        patients = _test_split_patients(source, cfg0.data.split_seed, cfg0.data.split_fractions)
    results = score_runs(runs, tests, patients, in_domain_name, n_boot, seed)
    return StudyResult(results, runs, cfg0, time.perf_counter() - t0)


def score_runs(runs: Sequence[Path], tests: Mapping[str, str | Path], patients: set[str] | None = None,
               in_domain_name: str = IN_DOMAIN, n_boot: int = 1000, seed: int = 0) -> list[ConditionResult]:
    """The table from finished runs' prediction files: the in-domain row, then one per test tree
    (its images whose patient is in ``patients``, or all of them)."""
    heldout = [read_predictions(Path(r) / "predictions_heldout.csv") for r in runs]
    tested = [read_predictions(Path(r) / "predictions_test.csv") for r in runs]
    conditions: dict[str, tuple[list, list[str]]] = {in_domain_name: (heldout, sorted(heldout[0]))}
    for name, tree in tests.items():
        root = Path(tree).resolve()
        images = sorted(i for i, (pid, _, _) in tested[0].items()
                        if root in Path(i).resolve().parents and (patients is None or pid in patients))
        conditions[name] = (tested, images)
    results = []
    for k, (name, (preds, images)) in enumerate(conditions.items()):
        if not images:
            raise ValueError(f"{name}: no images to score")
        truth = np.array([preds[0][i][2] for i in images])
        probs = np.array([[p[i][1] for i in images] for p in preds])
        # The test trees share patients (copies of one tree): one seed makes their bootstrap
        # paired; the in-domain set's own seed keeps it independent of them.
        results.append(condition_result(name, truth, probs, [preds[0][i][0] for i in images],
                                        n_boot=n_boot, seed=seed + (k > 0)))
    return results
