"""Per-group results (``FilterSettings(groups=...)``): the subsets of cells, as kompot 0.8.0
names them, and the check that both conditions are represented in each.

A subset's statistics come from the run's two fitted models, evaluated over the subset: its
mean log fold change over its cells, and its Mahalanobis distance with the posterior
covariance at its own points — new k-means landmarks of the subset when it has more cells
than the run has landmarks, else its cells (see docs/engine.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger("kompot_dask")

__all__ = ["Subsets", "parse_groups", "underrepresented"]

_FORMS = ("an obs column name; a {name: {column: value(s)}} dict of named filters; a {column: value(s)} dict "
          "over two or more columns (one subset); a {name: boolean mask or cell indices} dict; a list of "
          "{column: value(s)} dicts; a categorical or boolean pandas Series; a boolean array (1-D: one "
          "subset, 2-D: one per row) or an array of labels")


@dataclass(frozen=True)
class Subsets:
    """Named subsets of the store's cells (before the cell filter)."""

    names: tuple[str, ...]
    masks: np.ndarray  # subsets × cells, bool
    description: str  # the form they were given in, for the run record

    def __len__(self) -> int:
        return len(self.names)


def _fail(value: Any, why: str) -> ValueError:
    return ValueError(f"FilterSettings.groups={_short(value)}: {why}. groups may be {_FORMS}.")


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, np.ndarray | pd.Series) else f"<{type(value).__name__} shape={np.shape(value)}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _column(obs: pd.DataFrame, name: Any, groups: Any) -> pd.Series:
    if name not in obs.columns:
        raise _fail(groups, f"obs column {name!r} not found; available: {list(obs.columns)}")
    return obs[name]


def _match(obs: pd.DataFrame, column: str, value: Any, groups: Any, sep: str) -> tuple[np.ndarray, str]:
    """Cells whose ``column`` equals ``value`` (any of a list) and kompot's "column=value" label."""
    col = _column(obs, column, groups)
    if isinstance(value, list | tuple):
        return col.isin(list(value)).to_numpy(), f"{column}={sep.join(str(v) for v in value)}"
    if isinstance(value, str | bool | np.bool_ | int | np.integer):
        return (col == value).to_numpy(), f"{column}={value}"
    raise _fail(groups, f"the value for column {column!r} must be a label or a list of labels, got {type(value).__name__}")


def _filters(obs: pd.DataFrame, spec: Mapping, groups: Any, sep: str) -> tuple[np.ndarray, str]:
    mask = np.ones(len(obs), dtype=bool)
    parts = []
    for column, value in spec.items():
        m, label = _match(obs, column, value, groups, sep)
        mask &= m
        parts.append(label)
    return mask, "_AND_".join(parts)


def _labels(values: pd.Series | np.ndarray, groups: Any, what: str) -> tuple[list[str], list[np.ndarray]]:
    """One subset per label: a categorical's categories in order, other labels as they first appear."""
    s = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = list(s.cat.categories)
    elif s.dtype == bool:
        return ["True"], [s.to_numpy(dtype=bool)]
    elif pd.api.types.is_numeric_dtype(s.dtype):
        raise _fail(groups, f"{what} is numeric; make it categorical (e.g. .astype('category')) or strings")
    else:
        cats = list(pd.unique(s.dropna()))
    return [str(c) for c in cats], [(s == c).to_numpy() for c in cats]


def _mask_of(value: Any, n_obs: int, name: str, groups: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise _fail(groups, f"subset {name!r} must be a 1-D boolean mask or cell indices, got shape {arr.shape}")
    if arr.dtype == bool:
        if len(arr) != n_obs:
            raise _fail(groups, f"subset {name!r} has a mask of {len(arr)} entries for {n_obs} cells")
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        if len(arr) and (arr.min() < 0 or arr.max() >= n_obs):
            raise _fail(groups, f"subset {name!r} holds cell indices outside 0..{n_obs - 1}")
        mask = np.zeros(n_obs, dtype=bool)
        mask[arr] = True
        return mask
    raise _fail(groups, f"subset {name!r} must be boolean or integer, got dtype {arr.dtype}")


def parse_groups(obs: pd.DataFrame, groups: Any) -> Subsets:
    """kompot's subsets and their names for each form ``groups`` may take."""
    n = len(obs)
    names: list[str] = []
    masks: list[np.ndarray] = []
    if isinstance(groups, str):
        names, masks = _labels(_column(obs, groups, groups), groups, f"obs column {groups!r}")
    elif isinstance(groups, pd.Series):
        if len(groups) != n:
            raise _fail(groups, f"the Series has {len(groups)} entries for {n} cells")
        names, masks = _labels(groups.reset_index(drop=True), groups, "the Series")
    elif isinstance(groups, dict):
        if groups and all(isinstance(v, dict) for v in groups.values()):  # named filters
            for name, spec in groups.items():
                mask, _ = _filters(obs, spec, groups, "+")
                names.append(str(name))
                masks.append(mask)
        elif len(groups) > 1 and all(k in obs.columns for k in groups) and not any(
                isinstance(v, np.ndarray | pd.Series) for v in groups.values()):  # one combined subset
            mask, label = _filters(obs, groups, groups, ",")
            names, masks = [label], [mask]
        else:
            for name, value in groups.items():
                if isinstance(value, str | bool | list) and name in obs.columns and (
                        not isinstance(value, list) or all(isinstance(v, str) for v in value)):
                    mask, _ = _match(obs, name, value, groups, "+")
                elif isinstance(value, str | bool):
                    raise _fail(groups, f"{name!r} is not an obs column, so its value {value!r} selects nothing")
                else:
                    mask = _mask_of(value, n, str(name), groups)
                names.append(str(name))
                masks.append(mask)
    elif isinstance(groups, list | tuple) and groups and all(isinstance(g, dict) for g in groups):
        for i, spec in enumerate(groups):
            mask, label = _filters(obs, spec, groups, "+")
            names.append(label or f"filter{i + 1}")
            masks.append(mask)
    elif isinstance(groups, np.ndarray):
        if groups.ndim == 2 and groups.shape[1] == n:
            names = [f"subset{i + 1}" for i in range(groups.shape[0])]
            masks = [np.asarray(row, dtype=bool) for row in groups]
        elif groups.ndim == 1 and len(groups) == n and groups.dtype.kind in "USO":
            labels = np.unique(groups.astype(str))
            names, masks = [str(v) for v in labels], [groups.astype(str) == v for v in labels]
        elif groups.ndim == 1 and groups.dtype == bool:
            names, masks = ["True"], [_mask_of(groups, n, "True", groups)]
        elif groups.ndim == 1 and np.issubdtype(groups.dtype, np.integer):
            names, masks = ["True"], [_mask_of(groups, n, "True", groups)]
        else:
            raise _fail(groups, f"an array of shape {groups.shape} and dtype {groups.dtype} is not a form kompot reads")
    else:
        raise _fail(groups, f"a {type(groups).__name__} is not one of the forms")
    if not names:
        raise _fail(groups, "it defines no subset")
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise _fail(groups, f"subset names repeat ({dup}); each subset needs its own name")
    desc = type(groups).__name__ if not isinstance(groups, str) else f"obs column {groups!r}"
    return Subsets(tuple(names), np.vstack(masks).astype(bool), desc)


def underrepresented(subsets: Subsets, labels: pd.Series, conditions: tuple[Any, Any], min_cells: int,
                     min_percentage: float | None, warn: bool = True) -> dict[str, list[Any]]:
    """The conditions each subset holds too few cells of: fewer than ``min_cells``, or (with
    ``min_percentage``) less than that share of the subset's cells (each logged, as a
    warning with ``warn``)."""
    out: dict[str, list[Any]] = {}
    values = labels.to_numpy()
    for name, mask in zip(subsets.names, subsets.masks, strict=True):
        total = int(mask.sum())
        if not total:
            continue
        low = []
        for cond in conditions:
            count = int((values[mask] == cond).sum())
            if count < min_cells:
                low.append(cond)
                why = f"only {count} cells, below the minimum of {min_cells} cells"
            elif min_percentage is not None and 100.0 * count / total < min_percentage:
                low.append(cond)
                why = f"only {100.0 * count / total:.1f}% of its cells, below the minimum of {min_percentage}%"
            else:
                continue
            logger.log(logging.WARNING if warn else logging.INFO, "Condition %r has %s in group %r", cond, why, name)
        if low:
            out[name] = low
    return out
