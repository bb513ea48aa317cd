"""Run records: output field names, the JSON run history in ``uns``, environment capture."""

from __future__ import annotations

import getpass
import importlib.metadata
import json
import os
import platform
import socket
from datetime import datetime
from typing import Any

HISTORY_KEY = "kompot_de"
"""``uns`` key holding the DE run history, whatever the result_key (as in kompot)."""

_PACKAGES = (
    "kompot_dask", "anndata", "dask", "distributed", "zarr", "jax", "jaxlib",
    "numpy", "scipy", "pandas", "pynndescent",
)


def sanitize_name(name: Any) -> str:
    """Condition name as it appears in field names (" ", "-", ".", "/" → "_")."""
    out = str(name)
    for ch in (" ", "-", ".", "/"):
        out = out.replace(ch, "_")
    return out


def output_field_names(result_key: str, condition1: Any, condition2: Any) -> dict[str, str]:
    """Every field a DE run may write, keyed by role."""
    c1, c2 = sanitize_name(condition1), sanitize_name(condition2)
    pair = f"{result_key}_{c1}_to_{c2}"
    return {
        "mahalanobis": f"{pair}_mahalanobis",
        "mean_lfc": f"{pair}_mean_lfc",
        "local_fdr": f"{pair}_mahalanobis_local_fdr",
        "is_de": f"{pair}_is_de",
        "std1": f"{result_key}_{c1}_std",
        "std2": f"{result_key}_{c2}_std",
        "imputed1": f"{result_key}_{c1}_imputed",
        "imputed2": f"{result_key}_{c2}_imputed",
        "fold_change": f"{pair}_fold_change",
    }


FIELD_LOCATIONS = {
    "mahalanobis": "var", "mean_lfc": "var", "local_fdr": "var", "is_de": "var",
    "std1": "obs", "std2": "obs",
    "imputed1": "layers", "imputed2": "layers", "fold_change": "layers",
}


def field_descriptions(condition1: Any, condition2: Any, threshold: float) -> dict[str, tuple[str, str]]:
    """(type, description) of each role, for the run record's field mapping."""
    return {
        "mahalanobis": ("mahalanobis", "Mahalanobis distances"),
        "mean_lfc": ("mean_log_fold_change", "Mean log fold change values"),
        "local_fdr": ("mahalanobis_local_fdr", "Local FDR values using empirical null estimation similar to R's fdrtool"),
        "is_de": ("is_de", f"Boolean indicator of differential expression at local FDR < {threshold}"),
        "std1": ("std", f"Posterior standard deviation of imputed expression for {condition1} (same for all genes)"),
        "std2": ("std", f"Posterior standard deviation of imputed expression for {condition2} (same for all genes)"),
        "imputed1": ("imputed", f"Imputed expression for {condition1}"),
        "imputed2": ("imputed", f"Imputed expression for {condition2}"),
        "fold_change": ("fold_change", "Log fold change for each cell and gene"),
    }


def environment_info() -> dict[str, Any]:
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return {
        "timestamp": datetime.now().isoformat(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "username": user,
        "pid": os.getpid(),
        "package_versions": versions,
    }


def load_history(uns_entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The run history list from a decoded ``uns["kompot_de"]`` dict."""
    history = uns_entry.get("run_history", [])
    if isinstance(history, str):
        history = json.loads(history)
    return list(history)


def load_field_tracking(uns_entry: dict[str, Any]) -> dict[str, dict[str, int]]:
    fields = uns_entry.get("anndata_fields", {})
    if isinstance(fields, str):
        fields = json.loads(fields)
    return dict(fields)


def to_json(value: Any) -> str:
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return f"<array shape={value.shape}>"
    return str(value)
