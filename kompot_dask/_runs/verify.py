"""``kompot_dask.verify``: the store's input chunks against their manifests, and its run
history against the fields present."""

from __future__ import annotations

import os

from .._io.manifest import RunProblem, VerifyReport, verify_elements
from .history import history_key, read_history


def verify(store: str | os.PathLike, record: bool = False) -> VerifyReport:
    """Check a store's expression elements against their chunk manifests, and its run
    history against the fields present.

    Parameters
    ----------
    store
        Path (or ``file://`` URL) of a zarr AnnData store.
    record
        Write a manifest for each expression element that lacks a valid one (none, or
        stale because the element was rewritten), taking the store's lease; its chunks are
        taken as correct. Manifests of removed elements are deleted.

    Returns
    -------
    VerifyReport
        ``.ok`` is False when a chunk is missing, truncated or corrupt, or a field that a
        run wrote last is gone without a cleanup; ``str()`` lists each problem.
    """
    report = verify_elements(store, record=record)
    try:
        _check_runs(report)
    except Exception as exc:  # an unreadable history is itself a finding, not a crash
        report.run_problems.append(RunProblem(-1, "uns", history_key("de"), "Unreadable",
                                              f"the run history cannot be read ({type(exc).__name__}: {exc})"))
    return report


def _check_runs(report: VerifyReport) -> None:
    hist = read_history(report.store)
    report.runs_checked = len(hist)
    for rid in range(len(hist)):
        for f in hist.field_status(rid):
            # Only the run that wrote a field last vouches for it; earlier writers'
            # Overwritten states are expected, and cleanup notes what it removed.
            if f.last_writer == rid and not f.present and f.status == "Missing":
                report.run_problems.append(RunProblem(
                    rid, f.location, f.name, f.status,
                    "recorded as written by this run (its last writer) but not in the store, "
                    "and no cleanup removed it: the field was lost or deleted by hand"))
