"""kompot_dask: Kompot-style differential expression on Dask, out of core over zarr AnnData stores."""

from __future__ import annotations

import logging as _logging
import sys as _sys

from . import plot
from ._api import de, plan
from ._engine.cluster import UnguardedScriptError, pin_workers
from ._engine.graph import NonFiniteExpressionError, WorkerLostError
from ._io.commit import CommitError
from ._io.ingest import ingest
from ._io.lease import StoreLockedError
from ._io.manifest import StoreIntegrityError, VerifyReport
from ._io.store import StoreDiskFullError, StoreError
from ._planner import InfeasiblePlanError, ResourcePlan
from ._runs.cleanup import cleanup
from ._runs.fdr_tools import extract_null_distribution, recompute_fdr
from ._runs.history import RunNotFoundError, get_run_fields
from ._runs.results import results
from ._runs.runinfo import RunInfo
from ._runs.verify import verify
from ._settings import (
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
    "ingest",
    "verify",
    "VerifyReport",
    "StoreError",
    "StoreLockedError",
    "StoreDiskFullError",
    "StoreIntegrityError",
    "CommitError",
    "NonFiniteExpressionError",
    "WorkerLostError",
    "UnguardedScriptError",
    "RunNotFoundError",
    "RunInfo",
    "cleanup",
    "extract_null_distribution",
    "recompute_fdr",
    "pin_workers",
    "get_run_fields",
    "results",
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


class _FallbackHandler(_logging.Handler):
    """kompot's timestamped lines on stderr, written only when no other handler would show them.

    Importing a library must not double an application's log lines: once the application
    configures logging (``logging.basicConfig`` before or after importing kompot_dask, or a
    handler of its own on the "kompot_dask" logger), its handlers show kompot's records and
    this one stays silent. A plain script or notebook that configures nothing still sees
    kompot's INFO progress lines, which Python's last-resort handler (WARNING and up, no
    timestamp) would drop. Deciding per record rather than once at import keeps both
    import orders right.
    """

    def emit(self, record: _logging.LogRecord) -> None:
        if self._shown_elsewhere(record):
            return
        try:
            # sys.stderr looked up per record: notebooks and test runners replace it after import
            _sys.stderr.write(self.format(record) + "\n")
            _sys.stderr.flush()
        except Exception:
            self.handleError(record)

    def _shown_elsewhere(self, record: _logging.LogRecord) -> bool:
        # the same walk Logger.callHandlers makes: up the hierarchy until propagate stops it
        logger: _logging.Logger | None = _logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return True
            if not logger.propagate:
                return False
            logger = logger.parent
        return False


def _configure_logging() -> None:
    logger = _logging.getLogger("kompot_dask")
    if any(isinstance(h, _FallbackHandler) for h in logger.handlers):
        return  # re-import (importlib.reload): one handler is enough
    handler = _FallbackHandler()
    handler.setFormatter(_logging.Formatter("[%(asctime)s] [%(levelname)-8s] %(message)s"))
    logger.addHandler(handler)
    # INFO: de()/plan() report progress by default; quieter with
    # logging.getLogger("kompot_dask").setLevel(logging.WARNING)
    logger.setLevel(_logging.INFO)


_configure_logging()
