"""Settings dataclasses for :func:`kompot_dask.de`.

The first five mirror kompot 0.8.0's settings objects, with the same field names and
defaults; :class:`ComputeSettings` is ours and controls chunking, workers and dtype.
Every class validates itself on construction and names the offending field.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

logger = logging.getLogger("kompot_dask")

__all__ = [
    "GPSettings",
    "FDRSettings",
    "FilterSettings",
    "StorageSettings",
    "OutputSettings",
    "ComputeSettings",
    "SettingsError",
]


class SettingsError(ValueError):
    """A settings field holds a value that cannot be used."""


def _fail(cls: str, name: str, value: Any, expected: str) -> SettingsError:
    return SettingsError(f"{cls}.{name}={value!r} is invalid: expected {expected}.")


def _positive_number(cls: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise _fail(cls, name, value, "a positive number")
    if not np.isfinite(value) or value <= 0:
        raise _fail(cls, name, value, "a positive, finite number")


def _is_default(value: Any, default: Any) -> bool:
    if value is None or default is None:
        return value is default
    if isinstance(value, np.ndarray):
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 - an object that does not compare is not the default
        return False


def _short(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"<array shape={value.shape}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _positive_int(cls: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise _fail(cls, name, value, "an integer")
    if value < 0 or (value == 0 and not allow_zero):
        raise _fail(cls, name, value, "a non-negative integer" if allow_zero else "a positive integer")


class _Settings:
    """Shared helpers: a plain-JSON view of the fields for run records, and kompot 0.8.0's
    fields that are accepted under their own names but not acted on.

    ``_REFUSED`` maps such a field to the reason a value other than kompot's default is
    refused (with a :class:`SettingsError` naming the field); ``_IGNORED`` to the reason a
    value is accepted without effect (logged once at INFO).
    """

    _REFUSED: ClassVar[dict[str, str]] = {}
    _IGNORED: ClassVar[dict[str, str]] = {}

    def _check_kompot_fields(self) -> None:
        cls = type(self).__name__
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self._REFUSED and not _is_default(value, f.default):
                raise SettingsError(f"{cls}.{f.name}={_short(value)} is not supported by kompot_dask: "
                                    f"{self._REFUSED[f.name]}. Leave it at its default ({f.default!r}).")
            if f.name in self._IGNORED and not _is_default(value, f.default):
                logger.info("%s.%s=%s has no effect in kompot_dask: %s", cls, f.name, _short(value),
                            self._IGNORED[f.name])

    @classmethod
    def kompot_only_fields(cls) -> dict[str, str]:
        """kompot's fields this class accepts without acting on them, with the reason."""
        return {**{k: f"refused: {v}" for k, v in cls._REFUSED.items()},
                **{k: f"accepted, no effect: {v}" for k, v in cls._IGNORED.items()}}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = f"<array shape={value.shape}>"
            elif isinstance(value, np.generic):
                value = value.item()
            out[f.name] = value
        return out


def _null_expression(value: Any, null_mahalanobis: Any) -> tuple[Any, Any]:
    """FDRSettings.null_expression checked: two 2-D numeric arrays (numpy, or lazy dask
    arrays kept lazy) with the same number of columns; a 1-D array becomes one column."""
    c = "FDRSettings"
    if null_mahalanobis is not None:
        raise _fail(c, "null_expression", _short(value), "None when null_mahalanobis is given (kompot: the two "
                    "are mutually exclusive; pass one)")
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise _fail(c, "null_expression", _short(value), "a pair (expr1, expr2): condition 1's cells × k null "
                    "columns and condition 2's cells × k")
    parts = []
    for i, part in enumerate(value, start=1):
        if not hasattr(part, "shape") or not hasattr(part, "dtype"):
            part = np.asarray(part)
        if len(part.shape) == 1:
            part = part[:, None]
        if len(part.shape) != 2 or not np.issubdtype(np.dtype(part.dtype), np.number):
            raise _fail(c, "null_expression", _short(value),
                        f"numeric cells × columns arrays (expr{i} is {len(part.shape)}-D of {part.dtype})")
        parts.append(part)
    if parts[0].shape[1] != parts[1].shape[1] or parts[0].shape[1] < 1:
        raise _fail(c, "null_expression", _short(value), f"the same number (≥ 1) of columns in both arrays "
                    f"(expr1 has {parts[0].shape[1]}, expr2 {parts[1].shape[1]})")
    return parts[0], parts[1]


@dataclass
class GPSettings(_Settings):
    """Gaussian-process settings (kompot's ``GPSettings``).

    Attributes
    ----------
    sigma
        Noise standard deviation of the expression model.
    ls
        Shared Matern length scale; ``None`` estimates it from condition-1 nearest neighbours.
    ls_factor
        Multiplier of the automatic length scale.
    n_landmarks
        Number of landmarks; all cells are used when the two conditions have fewer.
    landmarks
        Explicit landmark coordinates (m × d); overrides ``n_landmarks``.
    use_empirical_variance
        kompot's empirical variance: a second GP per condition, fitted to the cells'
        leave-one-out corrected squared residuals, gives each gene its own observation
        variance. It enters the Mahalanobis distance as a diagonal term (kompot's "factor
        trick" approximation), the fold-change z-scores, and the obs std (of the first
        tested gene, as kompot stores it). Each gene block reads its tiles twice.
    batch_size
        Kept for compatibility with kompot (cells per prediction batch there); the Dask
        engine's chunking is set by :class:`ComputeSettings` instead.
    eps
        Ridge added to the Mahalanobis covariance and to the posterior variance.
    jit_compile
        Kept for compatibility; kompot_dask always compiles its kernels.
    random_state
        Seed of the k-means landmark search and of the samples below. kompot 0.8.0
        defaults to ``None`` (not reproducible); kompot_dask defaults to 0 so that runs
        are deterministic.
    neighbors
        How the length scale's nearest neighbours are found. ``"exact"`` (default):
        blocked matrix products, no compiled code, the true nearest neighbours.
        ``"pynndescent"``: kompot 0.8.0's approximate search, bit for bit (it compiles
        ~20 s of numba code in every fresh process and misses the nearest cell for some).
    neighbor_sample
        With ``neighbors="exact"``, the nearest neighbours of a seeded sample of this many
        condition-1 cells (against all of them) estimate the length scale: cost linear in
        the cells. ``None``: every cell.
    landmark_sample
        k-means clusters a seeded sample of this many pooled cells when there are more
        (at least ``n_landmarks``); ``None``: every cell, as kompot 0.8.0.

    The defaults of the last three are kompot_dask's fast path; :meth:`kompot` returns the
    settings that reproduce kompot 0.8.0 exactly. docs/performance.md measures how far the
    two are apart.
    """

    sigma: float = 1.0
    ls: float | None = None
    ls_factor: float = 10.0
    n_landmarks: int = 5000
    landmarks: np.ndarray | None = None
    use_empirical_variance: bool = False
    batch_size: int = 100
    eps: float = 1e-8
    jit_compile: bool = False
    random_state: int | None = 0
    neighbors: str = "exact"
    neighbor_sample: int | None = 20_000
    landmark_sample: int | None = 100_000

    _IGNORED: ClassVar[dict[str, str]] = {
        "batch_size": "the Dask engine's chunking is set by ComputeSettings",
        "jit_compile": "kompot_dask always compiles its kernels",
    }

    @classmethod
    def kompot(cls, **kwargs: Any) -> GPSettings:
        """Settings that reproduce kompot 0.8.0 to the last bit: pynndescent's nearest
        neighbours over every condition-1 cell and k-means over every pooled cell (other
        fields as given)."""
        parity = {"neighbors": "pynndescent", "neighbor_sample": None, "landmark_sample": None}
        return cls(**{**parity, **kwargs})

    def __post_init__(self) -> None:
        c = "GPSettings"
        _positive_number(c, "sigma", self.sigma)
        if self.ls is not None:
            _positive_number(c, "ls", self.ls)
        _positive_number(c, "ls_factor", self.ls_factor)
        _positive_int(c, "n_landmarks", self.n_landmarks)
        if self.landmarks is not None:
            arr = np.asarray(self.landmarks)
            if arr.ndim != 2 or arr.shape[0] < 1 or not np.issubdtype(arr.dtype, np.number):
                raise _fail(c, "landmarks", f"<array shape={arr.shape}>", "a numeric 2-D array (m × d)")
            if not np.all(np.isfinite(arr)):
                raise _fail(c, "landmarks", "<array with NaN/inf>", "finite coordinates")
            self.landmarks = arr.astype(np.float64)
        self._check_kompot_fields()
        _positive_int(c, "batch_size", self.batch_size, allow_zero=True)
        _positive_number(c, "eps", self.eps)
        if self.random_state is not None:
            _positive_int(c, "random_state", self.random_state, allow_zero=True)
        if self.neighbors not in ("exact", "pynndescent"):
            raise _fail(c, "neighbors", self.neighbors, '"exact" or "pynndescent"')
        if self.neighbor_sample is not None:
            _positive_int(c, "neighbor_sample", self.neighbor_sample)
            if self.neighbor_sample < 2:
                raise _fail(c, "neighbor_sample", self.neighbor_sample, "at least 2 cells, or None for all")
        if self.landmark_sample is not None:
            _positive_int(c, "landmark_sample", self.landmark_sample)


@dataclass
class FDRSettings(_Settings):
    """Null-gene FDR settings (kompot's ``FDRSettings``).

    Attributes
    ----------
    null_genes
        ``"auto"`` (2000), an integer (0 disables FDR), or ``None`` (disables FDR).
    null_seed
        Seed of the null-gene draw and permutations (numpy ``RandomState`` semantics).
    threshold
        Local-FDR threshold for ``is_de`` (strictly less than).
    null_mahalanobis
        Null Mahalanobis distances of your own (e.g. :func:`kompot_dask.extract_null_distribution`
        of a control comparison): the FDR tests the real genes against them instead of
        against the null genes, which are then not drawn (kompot's behaviour).
    combine_with_internal
        With ``null_mahalanobis``: test against the null genes' distances and these together.
    null_expression
        Null expression of your own, ``(expr1, expr2)``: condition 1's cells × k columns
        and condition 2's cells × the same k (rows in the store's order of each
        condition's cells, after the cell filter; a 1-D array is one column). Each column
        is fitted and scored like a null gene, and the FDR tests against the null genes
        and these together (kompot's behaviour). numpy arrays travel with the null-gene
        tasks, each carrying its block's columns (so all of them pass through the
        scheduler); a dask array (e.g. ``dask.array.from_zarr``) travels as its graph and
        is read by each null-gene task itself, so it never has to fit in memory: use one
        for large null expression. Not with ``null_mahalanobis``.
    mode
        Which null calibration ``is_de`` comes from. ``"raw"`` (the default): kompot 0.8.0's
        local FDR of the distances against the null genes'. ``"variance_stratified"``
        (upstream kompot's opt-in after 0.8.0): ``log(1 + D²)`` of the null genes is
        regressed on per-gene expression features (``null_trend_features``, with
        ``null_trend_model``), every gene's distance becomes the standardised residual
        ``z`` against that trend, and the local FDR of ``max(0, z)`` gives ``is_de``. The raw
        columns stay as they are; ``*_mahalanobis_residual_z`` and
        ``*_mahalanobis_residual_local_fdr`` are written beside them. ``"calibrated"``
        (kompot_dask's own): the condition labels are permuted within neighbourhoods of the
        cell-state space (each keeps its share of each condition, so density differences
        stay), both conditions are fitted again under those labels in the same pass, and
        each gene's ``log(1 + D²)`` minus its own under the permuted labels is tested
        against the mirror image of its negative side; ``*_mahalanobis_permuted``,
        ``*_mahalanobis_calibrated_score`` and ``*_mahalanobis_calibrated_local_fdr`` are
        written, and the raw columns stay (with null genes). With ``sample_col`` whole samples
        (donors) are relabelled between the conditions instead, keeping each condition's
        sample count, and the sample variance enters every distance. See ``docs/fdr.md``.
    null_trend_features
        With ``mode="variance_stratified"``: the per-gene features of the trend, over both
        conditions' cells: ``"log_mean"`` (``log(1 + mean)``) and/or ``"log_var"``
        (``log(1 + variance)``).
    null_trend_model
        With ``mode="variance_stratified"``: ``"poly3"`` (a cubic in each feature, no cross
        terms: 7 terms with both features), ``"poly2"`` or ``"linear"``.
    null_neighbourhood_cells
        With ``mode="calibrated"``: mean cells per neighbourhood within which the labels are
        permuted (the neighbourhoods are the cells nearest to a seeded subset of the
        landmarks; ``null_seed`` seeds it).
    null_permutations
        With ``mode="calibrated"``: independent permutations (with ``sample_col``, distinct
        relabellings of the samples; refused when fewer exist), each fitted and scored (2:
        measured to rank genes better than kompot's raw distance where 1 did not; each more
        costs one fit and one scoring of every gene, and three m × m matrices per worker).
    """

    null_genes: int | str | None = "auto"
    null_seed: int = 42
    threshold: float = 0.05
    null_mahalanobis: np.ndarray | None = None
    null_expression: Any = None
    combine_with_internal: bool = False
    mode: str = "raw"
    null_trend_features: tuple[str, ...] = ("log_mean", "log_var")
    null_trend_model: str = "poly3"
    null_neighbourhood_cells: int = 30
    null_permutations: int = 2

    MODES: ClassVar[tuple[str, ...]] = ("raw", "variance_stratified", "calibrated")
    TREND_FEATURES: ClassVar[tuple[str, ...]] = ("log_mean", "log_var")
    TREND_MODELS: ClassVar[dict[str, int]] = {"linear": 1, "poly2": 2, "poly3": 3}

    def __post_init__(self) -> None:
        c = "FDRSettings"
        self._check_kompot_fields()
        if self.null_expression is not None:
            self.null_expression = _null_expression(self.null_expression, self.null_mahalanobis)
        if isinstance(self.null_genes, str):
            if self.null_genes != "auto":
                raise _fail(c, "null_genes", self.null_genes, '"auto", None or a non-negative integer')
        elif self.null_genes is not None:
            _positive_int(c, "null_genes", self.null_genes, allow_zero=True)
        _positive_int(c, "null_seed", self.null_seed, allow_zero=True)
        if not isinstance(self.threshold, int | float) or not 0 < self.threshold < 1:
            raise _fail(c, "threshold", self.threshold, "a number strictly between 0 and 1")
        if self.null_mahalanobis is not None:
            try:
                null = np.asarray(self.null_mahalanobis, dtype=np.float64).ravel()
            except (TypeError, ValueError):
                null = np.array([np.nan])
            if null.size < 2 or not np.all(np.isfinite(null)) or np.any(null < 0):
                raise _fail(c, "null_mahalanobis", f"<{null.size} value(s)>",
                            "at least 2 finite, non-negative distances (e.g. "
                            "kompot_dask.extract_null_distribution(data, run_id=<a control run>))")
            self.null_mahalanobis = null
        if self.combine_with_internal not in (True, False):
            raise _fail(c, "combine_with_internal", self.combine_with_internal, "True or False")
        if self.combine_with_internal and self.null_mahalanobis is None:
            raise _fail(c, "combine_with_internal", True, "False unless null_mahalanobis is given (it combines "
                        "those distances with the null genes')")
        if self.mode not in self.MODES:
            raise _fail(c, "mode", self.mode, " or ".join(repr(m) for m in self.MODES))
        features = self.null_trend_features
        if isinstance(features, str):
            features = (features,)
        try:
            features = tuple(features)
        except TypeError:
            features = (features,)
        if (not features or len(set(features)) != len(features)
                or any(f not in self.TREND_FEATURES for f in features)):
            raise _fail(c, "null_trend_features", self.null_trend_features,
                        f"one or both of {self.TREND_FEATURES}, each once")
        self.null_trend_features = features
        if self.null_trend_model not in self.TREND_MODELS:
            raise _fail(c, "null_trend_model", self.null_trend_model, " or ".join(map(repr, self.TREND_MODELS)))
        _positive_int(c, "null_neighbourhood_cells", self.null_neighbourhood_cells)
        _positive_int(c, "null_permutations", self.null_permutations)
        if self.null_permutations > 8:
            raise _fail(c, "null_permutations", self.null_permutations, "at most 8 (each is one more fit, three more "
                        "m × m matrices per worker and one more scoring of every gene)")
        if self.mode == "variance_stratified" and self.null_mahalanobis is not None:
            raise _fail(c, "mode", self.mode, "'raw' with null_mahalanobis: given null distances come without the "
                        "per-gene expression features the variance trend is fitted on")
        if self.mode == "calibrated" and self.null_mahalanobis is not None:
            raise _fail(c, "mode", self.mode, "'raw' with null_mahalanobis: the calibrated mode makes its own null "
                        "from permuted labels")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # given null expression is recorded by its column count (like null_mahalanobis)
        out["null_expression"] = None if self.null_expression is None else int(self.null_expression[0].shape[1])
        return out

    def resolved_null_genes(self, sample_variance: bool = False) -> int:
        """Number of null genes actually drawn ("auto" → 2000, or 0 with sample variance
        as in kompot; None → 0)."""
        if self.null_genes == "auto":
            return 0 if sample_variance else 2000
        return int(self.null_genes or 0)


@dataclass
class FilterSettings(_Settings):
    """Cell filtering and per-group results (kompot's ``FilterSettings``).

    Attributes
    ----------
    cell_filter
        Cells to keep: an obs boolean column name, a ``{column: value(s)}`` dict, or a
        boolean array over all cells. ``None`` keeps every cell.
    min_cells
        Minimum cells per condition after filtering (at least 2); with ``groups``, also the
        minimum per condition in each subset for the representation check.
    groups
        Subsets of cells to report separately (varm ``..._groups`` tables, one column per
        subset): an obs column name (one subset per label), a dict of named
        ``{column: value(s)}`` filters, a list of such filters, a categorical or boolean
        Series, or boolean masks. Each subset's mean log fold change, Mahalanobis distance
        and (with null genes) local FDR come from the run's own two models.
    min_percentage
        With ``groups``: a condition holding less than this percentage of a subset's cells
        is underrepresented there.
    check_representation
        With ``groups`` and no ``cell_filter``: ``None`` warns about underrepresented
        (subset, condition) pairs, ``True`` leaves their cells out of the run, ``False``
        does not check.
    """

    cell_filter: Any = None
    min_cells: int = 2
    groups: Any = None
    min_percentage: float | None = None
    check_representation: bool | None = None

    def __post_init__(self) -> None:
        self._check_kompot_fields()
        _positive_int("FilterSettings", "min_cells", self.min_cells)
        if self.min_cells < 2:
            raise _fail("FilterSettings", "min_cells", self.min_cells, "an integer ≥ 2")
        cf = self.cell_filter
        if cf is not None and not isinstance(cf, str | dict | np.ndarray | list | tuple):
            raise _fail("FilterSettings", "cell_filter", type(cf).__name__, "an obs column name, a dict or a boolean array")
        mp = self.min_percentage
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int | float) or not 0 <= mp <= 100):
            raise _fail("FilterSettings", "min_percentage", mp, "a percentage between 0 and 100, or None")
        if self.check_representation not in (None, True, False):
            raise _fail("FilterSettings", "check_representation", self.check_representation, "None, True or False")
        if self.check_representation is True and self.groups is None:
            raise _fail("FilterSettings", "check_representation", True,
                        "False or None without groups (the check is per subset: pass groups=...)")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(self.cell_filter, list | tuple):
            out["cell_filter"] = f"<array len={len(self.cell_filter)}>"
        out["groups"] = _groups_summary(self.groups)
        return out


def _groups_summary(groups: Any) -> Any:
    """``groups`` as the run record keeps it: names and filters as given, arrays by shape."""
    if groups is None or isinstance(groups, str):
        return groups
    if isinstance(groups, np.ndarray):
        return f"<array shape={groups.shape}>"
    if hasattr(groups, "dtype") and hasattr(groups, "__len__"):  # a pandas Series
        return f"<{type(groups).__name__} len={len(groups)}>"
    if isinstance(groups, dict):
        return {str(k): _groups_summary(v) if not isinstance(v, str | bool | int | float) else v
                for k, v in groups.items()}
    if isinstance(groups, list | tuple):
        if all(isinstance(g, str | bool | int | float) for g in groups):
            return list(groups) if len(groups) <= 20 else f"<list len={len(groups)}>"
        return [_groups_summary(g) for g in groups]
    return f"<{type(groups).__name__}>"


_FORBIDDEN_KEY_PARTS = ("/", "\\", "..")


@dataclass
class StorageSettings(_Settings):
    """Where and what to store (kompot's ``StorageSettings`` plus ``store_layers``).

    Attributes
    ----------
    result_key
        Prefix of every field name; ``None`` means ``"kompot_de"``.
    overwrite
        ``None`` warns when fields of an earlier run are overwritten, ``False`` raises,
        ``True`` is silent.
    store_landmarks
        Also store the landmark coordinates in ``uns[result_key]["landmarks"]``.
    store_layers
        Write the imputed and fold-change layers (cells × genes). ``False`` skips them and
        writes only the per-gene and per-cell statistics.
    layer_dtype
        Storage type of those layers: ``"float32"`` (half the disk; rounding ≤ 6e-8
        relative) or ``"float64"``.
    store_additional_stats
        Also write kompot's additional statistics: var ``{pair}_neg_log10_ptp`` (−log10 of
        the chi-squared tail probability of D², with the embedding's dimensions as degrees
        of freedom), ``{pair}_mahalanobis_pvalue`` and ``{pair}_mahalanobis_tail_fdr`` (with
        null genes), and the layer ``{pair}_fold_change_zscores`` (the fold change over
        sqrt(var₁ + var₂ + eps) per cell; with ``store_layers``).
    results_store
        Path of a separate zarr store for the results and the run history (also
        ``de(..., output="results.zarr")``): the input store is only read, so it may be
        read-only or shared. Created on first use with the input's cell and gene names;
        later runs on the same input add to it. ``None`` writes into the input store.
    store_posterior_covariance
        Also write kompot's ``obsp`` matrix ``{pair}_posterior_covariance``: Σ₁ + Σ₂ between
        every two predicted cells (cells × cells, zero outside the cell filter). Its size
        grows with the square of the cells: the plan refuses it above the cell count that
        one worker can hold, and names that count.
    """

    result_key: str | None = None
    overwrite: bool | None = None
    store_landmarks: bool = False
    store_layers: bool = True
    layer_dtype: str = "float32"
    results_store: str | None = None
    store_posterior_covariance: bool = False
    store_additional_stats: bool = False
    store_arrays_on_disk: bool | None = None
    disk_storage_dir: str | None = None
    max_memory_ratio: float = 0.8

    _REFUSED: ClassVar[dict[str, str]] = {}
    _IGNORED: ClassVar[dict[str, str]] = {
        "store_arrays_on_disk": "every cells × genes array is streamed to the store in tiles anyway",
        "disk_storage_dir": "intermediate work is staged inside the store (see docs/store_safety.md)",
        "max_memory_ratio": "memory is planned against the workers' limits (kd.plan)",
    }

    def __post_init__(self) -> None:
        self._check_kompot_fields()
        if self.result_key is None:
            self.result_key = "kompot_de"
        rk = self.result_key
        if (not isinstance(rk, str) or not rk or any(p in rk for p in _FORBIDDEN_KEY_PARTS)
                or rk.startswith((".", "__"))):
            raise _fail(
                "StorageSettings", "result_key", rk,
                "a non-empty name without '/', '\\\\' or '..', not starting with '.' or '__' "
                "(it becomes part of zarr paths, where such names are hidden or reserved)",
            )
        if self.overwrite not in (None, True, False):
            raise _fail("StorageSettings", "overwrite", self.overwrite, "None, True or False")
        if self.layer_dtype not in ("float32", "float64"):
            raise _fail("StorageSettings", "layer_dtype", self.layer_dtype, '"float32" or "float64"')
        if self.results_store is not None:
            if not isinstance(self.results_store, str | os.PathLike) or not os.fspath(self.results_store):
                raise _fail("StorageSettings", "results_store", self.results_store,
                            "None, or the path of a zarr store for the results (e.g. 'results.zarr')")
            self.results_store = os.fspath(self.results_store)


@dataclass
class OutputSettings(_Settings):
    """What :func:`kompot_dask.de` returns (a subset of kompot's ``OutputSettings``).

    Attributes
    ----------
    return_full_results
        Return a dict with the per-gene table and the FDR summary.
    progress
        Show progress: a bar on a terminal or in a notebook, periodic log lines elsewhere.
    copy
        With an in-memory AnnData: write the results into a copy and return it, leaving
        the AnnData passed unchanged (a store is always written in place).
    inplace
        ``False`` with an in-memory AnnData: leave it unchanged and return the full
        results (the dict of ``return_full_results``).
    compute_mahalanobis
        ``False``: compute the imputed and fold-change layers, the mean log fold change and
        the per-cell std only, as kompot does: no Mahalanobis distance, so no null genes and
        no FDR (``FDRSettings.null_genes`` is then ignored).
    allow_single_condition_variance
        With ``sample_col``: a condition with fewer than two samples (of at least two
        cells) uses the other condition's sample variance instead of failing (kompot's).
    return_null_data
        kompot's; see ``docs/kompot_compat.md``.
    """

    return_full_results: bool = False
    progress: bool = True
    copy: bool = False
    inplace: bool = True
    return_null_data: bool = False
    compute_mahalanobis: bool = True
    allow_single_condition_variance: bool = False

    _IGNORED: ClassVar[dict[str, str]] = {
        "return_null_data": "with return_full_results=True the result always holds 'null_mahalanobis'",
    }

    def __post_init__(self) -> None:
        self._check_kompot_fields()


@dataclass
class ComputeSettings(_Settings):
    """How the work is laid out on the cluster (kompot_dask only).

    Attributes
    ----------
    cell_chunk
        Cells per task tile; ``None`` lets the planner choose.
    gene_block
        Genes per block task; ``None`` lets the planner choose.
    null_gene_block
        Null genes per block task (their columns span all cells of both conditions).
    n_workers, threads_per_worker, memory_limit
        Used only when kompot_dask starts its own LocalCluster. By default that is one
        worker with one thread per core: the m × m factors are then held once per machine
        instead of once per process (measured at m = 5000: 1.67 GiB peak with 1 × 2
        against 2.88 GiB with 2 × 1 on 2 cores, for 15 % more wall time).
    processes
        Whether kompot_dask's own LocalCluster runs its worker in a process of its own.
        ``None`` (default): in this process for small runs (at most
        ``IN_PROCESS_MAX_ELEMENTS`` cells × genes, and no worker count, threads or memory
        limit given: a memory limit is enforced by a worker's nanny process),
        which saves the worker's start and its ~300 MB of imports; in a separate process
        otherwise, where a nanny restarts a worker that dies.
    max_task_bytes
        Upper bound on one task's working set (bytes), on top of the planner's own rule
        (peak × threads ≤ 60 % of the worker memory limit); ``None`` for no extra bound.
    dtype
        Precision of the bulk tile arithmetic (cells × genes projections and predictions):
        ``"float64"`` (parity with kompot) or ``"float32"`` (faster GEMMs). The m × m
        factorisations, solves and Mahalanobis scores are float64 either way. float32
        tiles are not for parity: on the test data Mahalanobis distances moved by 1.3 %
        (median) and up to 7 %, because the ill-conditioned solves amplify the rounding
        of the float32 projections.
    """

    cell_chunk: int | None = None
    gene_block: int | None = None
    null_gene_block: int | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | int | None = None
    dtype: str = "float64"
    max_task_bytes: int | None = field(default=None)
    processes: bool | None = None

    def __post_init__(self) -> None:
        c = "ComputeSettings"
        if self.processes not in (None, True, False):
            raise _fail(c, "processes", self.processes, "None, True or False")
        for name in ("cell_chunk", "gene_block", "null_gene_block", "n_workers", "max_task_bytes"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(c, name, value)
        if self.threads_per_worker is not None:
            _positive_int(c, "threads_per_worker", self.threads_per_worker)
        if self.dtype not in ("float64", "float32"):
            raise _fail(c, "dtype", self.dtype, '"float64" or "float32"')
