"""The field registry: every output field a DE run writes, in one table.

Each :class:`FieldSpec` gives a field's role (``mahalanobis``, ``imputed1``, ...), where it
lives (``var``, ``obs``, ``layers``), the type label the run record gives it, and the
templates of its name and description. :func:`output_field_names`,
:data:`FIELD_LOCATIONS`, :func:`field_mapping` (the record's types and descriptions) and
:data:`KNOWN_FIELD_TYPES` are views of that table.

The table also holds the types that kompot writes but kompot_dask does not (no role, no
templates), so that cleanup accepts kompot's run histories too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FieldSpec", "FIELDS", "ROLES", "FIELD_LOCATIONS", "GROUP_ROLES", "KNOWN_FIELD_TYPES", "sanitize_name",
    "output_field_names", "field_mapping", "spec_of",
]


@dataclass(frozen=True)
class FieldSpec:
    """One kind of output field.

    Name templates know ``{result_key}``, ``{c1}``, ``{c2}`` (condition labels as written
    in names, see :func:`sanitize_name`), ``{pair}`` (``{result_key}_{c1}_to_{c2}``) and
    ``{sfx}`` (kompot's ``_sample_var`` with sample variance, else empty).
    Description templates know ``{condition1}``, ``{condition2}`` and ``{threshold}``.
    """

    type: str
    """Type label in the run record's ``field_mapping`` (what ``cleanup``'s keep lists name)."""
    role: str | None = None
    """Role in a kompot_dask run; ``None`` for types only kompot writes."""
    location: str | None = None
    name: str = ""
    description: str = ""

    def field_name(self, result_key: str, condition1: Any, condition2: Any, sample_suffix: str = "") -> str:
        c1, c2 = sanitize_name(condition1), sanitize_name(condition2)
        return self.name.format(result_key=result_key, c1=c1, c2=c2, pair=f"{result_key}_{c1}_to_{c2}",
                                sfx=sample_suffix)

    def describe(self, condition1: Any, condition2: Any, threshold: float) -> str:
        return self.description.format(condition1=condition1, condition2=condition2, threshold=threshold)


_STD = "Posterior standard deviation of imputed expression for {condition} (same for all genes)"

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("mahalanobis", "mahalanobis", "var", "{pair}_mahalanobis{sfx}", "Mahalanobis distances"),
    FieldSpec("mean_log_fold_change", "mean_lfc", "var", "{pair}_mean_lfc", "Mean log fold change values"),
    FieldSpec("mahalanobis_local_fdr", "local_fdr", "var", "{pair}_mahalanobis_local_fdr{sfx}",
              "Local FDR values using empirical null estimation similar to R's fdrtool"),
    FieldSpec("is_de", "is_de", "var", "{pair}_is_de{sfx}",
              "Boolean indicator of differential expression at local FDR < {threshold}"),
    FieldSpec("std", "std1", "obs", "{result_key}_{c1}_std", _STD.replace("{condition}", "{condition1}")),
    FieldSpec("std", "std2", "obs", "{result_key}_{c2}_std", _STD.replace("{condition}", "{condition2}")),
    FieldSpec("imputed", "imputed1", "layers", "{result_key}_{c1}_imputed", "Imputed expression for {condition1}"),
    FieldSpec("imputed", "imputed2", "layers", "{result_key}_{c2}_imputed", "Imputed expression for {condition2}"),
    FieldSpec("fold_change", "fold_change", "layers", "{pair}_fold_change", "Log fold change for each cell and gene"),
    # sample_col: the std per cell and gene, with the sample variance (instead of obs std1/std2)
    FieldSpec("std_with_sample_var", "sample_std1", "layers", "{result_key}_{c1}_std",
              "Posterior standard deviation of imputed expression for {condition1} (with sample variance)"),
    FieldSpec("std_with_sample_var", "sample_std2", "layers", "{result_key}_{c2}_std",
              "Posterior standard deviation of imputed expression for {condition2} (with sample variance)"),
    # StorageSettings(store_additional_stats=True)
    FieldSpec("ptp", "neg_log10_ptp", "var", "{pair}_neg_log10_ptp{sfx}",
              "-log10 of the chi-squared tail probability of the squared Mahalanobis distance "
              "(degrees of freedom: the embedding's dimensions), computed in log space"),
    FieldSpec("mahalanobis_pvalue", "pvalue", "var", "{pair}_mahalanobis_pvalue{sfx}",
              "Empirical p-values: the share of null genes at least as far"),
    FieldSpec("mahalanobis_tail_fdr", "tail_fdr", "var", "{pair}_mahalanobis_tail_fdr{sfx}",
              "Tail FDR: null over mixture survival of the monotone densities, fdrtool-style"),
    FieldSpec("fold_change_zscores", "fold_change_zscores", "layers", "{pair}_fold_change_zscores{sfx}",
              "Log fold change over its posterior standard deviation, for each cell and gene"),
    # FDRSettings(mode="variance_stratified"): beside the raw columns, which stay as they are
    FieldSpec("mahalanobis_residual_z", "residual_z", "var", "{pair}_mahalanobis_residual_z{sfx}",
              "Standardised residual of log(1 + Mahalanobis²) against the null genes' trend in log mean and "
              "log variance (variance-stratified FDR)"),
    FieldSpec("mahalanobis_residual_local_fdr", "residual_local_fdr", "var",
              "{pair}_mahalanobis_residual_local_fdr{sfx}",
              "Local FDR of the positive residual z against the null genes' (variance-stratified FDR; is_de "
              "comes from it)"),
    FieldSpec("mahalanobis_residual_tail_fdr", "residual_tail_fdr", "var",
              "{pair}_mahalanobis_residual_tail_fdr{sfx}",
              "Tail FDR of the positive residual z against the null genes' (variance-stratified FDR)"),
    # FDRSettings(mode="calibrated"): the permuted labels' distances, the score, its FDR
    FieldSpec("mahalanobis_permuted", "permuted_mahalanobis", "var", "{pair}_mahalanobis_permuted{sfx}",
              "Mahalanobis distance with the condition labels permuted within cell-state neighbourhoods, or with "
              "sample_col whole samples' labels between the conditions (calibrated FDR; over several permutations, "
              "the one at their mean log(1 + D²))"),
    FieldSpec("mahalanobis_calibrated_score", "calibrated_score", "var", "{pair}_mahalanobis_calibrated_score{sfx}",
              "log(1 + Mahalanobis²) minus the same with permuted labels (calibrated FDR)"),
    FieldSpec("mahalanobis_calibrated_local_fdr", "calibrated_local_fdr", "var",
              "{pair}_mahalanobis_calibrated_local_fdr{sfx}",
              "Local FDR of the positive calibrated score against its mirrored negative side (calibrated FDR; "
              "is_de comes from it)"),
    FieldSpec("mahalanobis_calibrated_tail_fdr", "calibrated_tail_fdr", "var",
              "{pair}_mahalanobis_calibrated_tail_fdr{sfx}",
              "Tail FDR of the positive calibrated score against its mirrored negative side (calibrated FDR)"),
    # FilterSettings(groups=...): genes × subsets DataFrames in varm, one column per subset
    FieldSpec("mean_log_fold_change", "group_mean_lfc", "varm", "{pair}_mean_lfc_groups",
              "Mean log fold change values for all subsets"),
    FieldSpec("mahalanobis", "group_mahalanobis", "varm", "{pair}_mahalanobis{sfx}_groups",
              "Mahalanobis distances for all subsets"),
    FieldSpec("local_fdr", "group_local_fdr", "varm", "{pair}_mahalanobis_local_fdr{sfx}_groups",
              "Local FDR values for all subsets"),
    FieldSpec("is_de", "group_is_de", "varm", "{pair}_is_de{sfx}_groups",
              "Differential expression significance for all subsets"),
    FieldSpec("ptp", "group_neg_log10_ptp", "varm", "{pair}_neg_log10_ptp{sfx}_groups",
              "Negative log10 posterior tail probability (-log10 PTP) for all subsets"),
    # StorageSettings(store_posterior_covariance=True): cells × cells, zero outside the filter
    FieldSpec("posterior_covariance", "posterior_covariance", "obsp", "{pair}_posterior_covariance",
              "Posterior covariance of the fold change between cells (Σ₁ + Σ₂ at the predicted cells)"),
    # written by kompot only; known so that its run histories can be cleaned too
    FieldSpec("smoothed"),
    FieldSpec("neg_log10_ptp"),
)
"""Every output field type, kompot_dask's (with a role) first."""

_BY_ROLE: dict[str, FieldSpec] = {s.role: s for s in FIELDS if s.role is not None}

ROLES: tuple[str, ...] = tuple(_BY_ROLE)
"""The roles of a kompot_dask DE run's fields, in registry order."""

FIELD_LOCATIONS: Mapping[str, str] = {role: str(s.location) for role, s in _BY_ROLE.items()}
"""Role → location (``var``, ``obs``, ``layers`` or ``varm``)."""

GROUP_ROLES: tuple[str, ...] = tuple(r for r, loc in FIELD_LOCATIONS.items() if loc == "varm")
"""The per-subset roles (``FilterSettings(groups=...)``), genes × subsets in varm."""

KNOWN_FIELD_TYPES: tuple[str, ...] = tuple(dict.fromkeys(s.type for s in FIELDS))
"""Every field type label (kompot_dask's and kompot's), as cleanup's keep lists accept them."""


def spec_of(role: str) -> FieldSpec:
    """The registry entry of ``role``."""
    try:
        return _BY_ROLE[role]
    except KeyError:
        raise KeyError(f"{role!r} is not a field role; roles are {list(ROLES)}") from None


def sanitize_name(name: Any) -> str:
    """Condition name as it appears in field names (" ", "-", ".", "/" → "_")."""
    out = str(name)
    for ch in (" ", "-", ".", "/"):
        out = out.replace(ch, "_")
    return out


SAMPLE_SUFFIX = "_sample_var"
"""kompot's suffix of the per-gene statistics (and z-scores) of a run with sample variance."""


def output_field_names(result_key: str, condition1: Any, condition2: Any,
                       sample_variance: bool = False) -> dict[str, str]:
    """Every field a DE run may write, keyed by role (``sample_variance``: a ``sample_col``
    run's names, with kompot's ``_sample_var`` suffix where kompot puts it)."""
    sfx = SAMPLE_SUFFIX if sample_variance else ""
    return {role: s.field_name(result_key, condition1, condition2, sfx) for role, s in _BY_ROLE.items()}


_MODE_FDR = {"variance_stratified": "residual", "calibrated": "calibrated score's"}


def field_mapping(roles: Iterable[str], names: Mapping[str, str], condition1: Any, condition2: Any,
                  threshold: float, fdr_mode: str = "raw") -> dict[str, dict[str, str]]:
    """The run record's ``field_mapping``: field name → {location, type, description}.

    Parameters
    ----------
    roles
        Roles the run wrote.
    names
        Role → field name (from :func:`output_field_names`).
    condition1, condition2
        Condition labels as given (descriptions name them unsanitised).
    threshold
        Local FDR threshold (named in the ``is_de`` description).
    fdr_mode
        ``FDRSettings.mode``: the ``is_de`` description names the local FDR it comes from.
    """
    out = {}
    for role in roles:
        spec = spec_of(role)
        text = spec.describe(condition1, condition2, threshold)
        if role == "is_de" and fdr_mode != "raw":
            text += f" ({fdr_mode.replace('_', '-')} FDR: the {_MODE_FDR.get(fdr_mode, fdr_mode)} local FDR)"
        out[names[role]] = {"location": str(spec.location), "type": spec.type, "description": text}
    return out
