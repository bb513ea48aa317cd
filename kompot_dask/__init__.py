"""kompot_dask: Kompot-style differential expression on Dask, out of core over zarr AnnData stores."""

from __future__ import annotations

import logging as _logging

from . import plot
from ._io.ingest import ingest
from ._io.lease import StoreLockedError
from .analysis import de, plan
from .cleanup import cleanup
from .cluster import pin_workers
from .planner import InfeasiblePlanError, ResourcePlan
from .runinfo import RunInfo
from .runs import get_run_fields
from .settings import (
    ComputeSettings,
    FDRSettings,
    FilterSettings,
    GPSettings,
    OutputSettings,
    SettingsError,
    StorageSettings,
)

__version__ = "0.1.0"

__all__ = [
    "de",
    "plan",
    "ResourcePlan",
    "InfeasiblePlanError",
    "StoreLockedError",
    "ingest",
    "RunInfo",
    "cleanup",
    "pin_workers",
    "get_run_fields",
    "plot",
    "GPSettings",
    "FDRSettings",
    "FilterSettings",
    "StorageSettings",
    "OutputSettings",
    "ComputeSettings",
    "SettingsError",
    "__version__",
]


def _configure_logging() -> None:
    logger = _logging.getLogger("kompot_dask")
    if logger.handlers:
        return
    handler = _logging.StreamHandler()
    handler.setFormatter(_logging.Formatter("[%(asctime)s] [%(levelname)-8s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(_logging.INFO)


_configure_logging()
