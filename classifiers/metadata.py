"""Patient metadata as network input: age, sex, view position and follow-up number.

Why a metadata model at all: in NIH ChestX-ray14 these four fields alone predict some findings
far above chance (AP films are taken of patients too sick to stand; patients with many
follow-up visits are the chronically ill), so an image classifier's AUROC means little until
it is compared with what the metadata already gives. The feature matrix (:data:`META_FEATURES`):

- ``age``: years, standardised; a missing, non-numeric or implausible age (outside 0–120, the
  2017 CSV has some 400-year-olds) is imputed with the *training* median and counted;
- ``sex_M``, ``sex_F``, ``sex_unknown``: one-hot;
- ``view_PA``, ``view_AP``, ``view_other``: one-hot (lateral or unknown is "other");
- ``follow_up``: ``log1p(follow-up number)`` standardised (its distribution is long-tailed:
  0 … 183 on NIH); a missing one is imputed with the training median and counted.

Statistics are fitted on the training split and applied unchanged to validation and test
(:class:`MetaStats`, stored with the model so prediction standardises identically).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from cxr.data.record import Sample
from cxr.errors import ConfigError

META_FEATURES: tuple[str, ...] = ("age", "sex_M", "sex_F", "sex_unknown", "view_PA", "view_AP",
                                  "view_other", "follow_up")
AGE_RANGE = (0.0, 120.0)  # years; outside is a data-entry error, treated as missing


@dataclass(frozen=True)
class MetaStats:
    """Standardisation fitted on the training records, and how many values were imputed.

    ``n_rows``, ``n_imputed_age`` and ``n_imputed_follow_up`` count the records of the call
    that returned this object (the training split when fitting, e.g. the test split when
    applying); the other fields are always the training statistics.
    """

    age_median: float
    age_mean: float
    age_std: float
    follow_up_median: float  # of log1p(follow-up)
    follow_up_mean: float
    follow_up_std: float
    n_rows: int = 0
    n_imputed_age: int = 0
    n_imputed_follow_up: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaStats:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"meta_stats: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"meta_stats: {e}") from None


def _float_array(values: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _standardise(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return (x - mean) / (std if std > 0 else 1.0)


def metadata_from_columns(age: Sequence[Any], sex: Sequence[Any], view: Sequence[Any],
                          follow_up: Sequence[Any], stats: MetaStats | None = None
                          ) -> tuple[np.ndarray, MetaStats]:
    """The ``(N, len(META_FEATURES))`` float32 matrix from four columns (None/NaN = missing).

    Without ``stats`` the statistics are fitted on these rows (the training split); with them
    they are applied as they are. Pure: nothing is modified in place.
    """
    age_v = _float_array(age)
    with np.errstate(invalid="ignore"):
        age_bad = ~np.isfinite(age_v) | (age_v < AGE_RANGE[0]) | (age_v > AGE_RANGE[1])
    follow_v = _float_array(follow_up)
    with np.errstate(invalid="ignore"):
        follow_bad = ~np.isfinite(follow_v) | (follow_v < 0)
    follow_log = np.log1p(np.where(follow_bad, 0.0, follow_v))
    n = len(age_v)
    if not (len(sex) == len(view) == len(follow_v) == n):
        raise ValueError(f"metadata columns differ in length: age {n}, sex {len(sex)}, "
                         f"view {len(view)}, follow_up {len(follow_v)}")
    if stats is None:
        ages, follows = age_v[~age_bad], follow_log[~follow_bad]
        stats = MetaStats(
            age_median=float(np.median(ages)) if ages.size else 0.0,
            age_mean=float(ages.mean()) if ages.size else 0.0,
            age_std=float(ages.std()) if ages.size else 1.0,
            follow_up_median=float(np.median(follows)) if follows.size else 0.0,
            follow_up_mean=float(follows.mean()) if follows.size else 0.0,
            follow_up_std=float(follows.std()) if follows.size else 1.0,
        )
    stats = dataclasses.replace(stats, n_rows=n, n_imputed_age=int(age_bad.sum()),
                                n_imputed_follow_up=int(follow_bad.sum()))
    out = np.zeros((n, len(META_FEATURES)), dtype=np.float32)
    out[:, 0] = _standardise(np.where(age_bad, stats.age_median, age_v), stats.age_mean, stats.age_std)
    sex_s = [str(s).upper() if s is not None else "" for s in sex]
    view_s = [str(v).upper() if v is not None else "" for v in view]
    out[:, 1] = [s == "M" for s in sex_s]
    out[:, 2] = [s == "F" for s in sex_s]
    out[:, 3] = 1.0 - out[:, 1] - out[:, 2]
    out[:, 4] = [v == "PA" for v in view_s]
    out[:, 5] = [v == "AP" for v in view_s]
    out[:, 6] = 1.0 - out[:, 4] - out[:, 5]
    out[:, 7] = _standardise(np.where(follow_bad, stats.follow_up_median, follow_log),
                             stats.follow_up_mean, stats.follow_up_std)
    return out, stats


def metadata_matrix(records: Sequence[Sample], stats: MetaStats | None = None
                    ) -> tuple[np.ndarray, MetaStats]:
    """:func:`metadata_from_columns` over records' ``age``, ``sex``, ``view``, ``follow_up``."""
    return metadata_from_columns([r.age for r in records], [r.sex for r in records],
                                 [r.view for r in records], [r.follow_up for r in records], stats)


class MetadataMLP(nn.Module):
    """``(N, in_features)`` metadata → ``(N, num_outputs)`` logits through ReLU hidden layers.

    ``num_outputs=0`` leaves out the head: ``forward`` then returns the last hidden layer (the
    embedding the late-fusion model concatenates with image features).
    """

    uses_metadata = True
    uses_image = False

    def __init__(self, in_features: int, num_outputs: int, hidden: tuple[int, ...] = (64, 64),
                 dropout: float = 0.1) -> None:
        super().__init__()
        if in_features < 1 or any(h < 1 for h in hidden) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"metadata MLP: need in_features >= 1, hidden sizes >= 1 and "
                              f"0 <= dropout < 1, got {in_features}, {list(hidden)}, {dropout}")
        self.in_features = in_features
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.num_features = width
        self.head = nn.Linear(width, num_outputs) if num_outputs > 0 else nn.Identity()
        self.meta_stats: MetaStats | None = None

    def forward_features(self, meta: torch.Tensor) -> torch.Tensor:
        if meta.ndim != 2 or meta.shape[1] != self.in_features:
            raise ValueError(f"MetadataMLP: expected metadata of shape (N, {self.in_features}), "
                             f"got {tuple(meta.shape)}")
        return self.body(meta)

    def forward(self, meta: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(meta))
