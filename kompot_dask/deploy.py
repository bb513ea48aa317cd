"""Cluster deployment helpers built on existing Dask tooling (dask-jobqueue for SLURM).

``slurm_cluster`` builds a ``dask_jobqueue.SLURMCluster`` from a jobqueue YAML file (see
``deploy/slurm/jobqueue.yaml``) and adds the worker environment kompot_dask needs (one
BLAS/XLA thread per Dask thread, CPU JAX, a shared numba cache). ``python -m
kompot_dask.deploy slurm ...`` keeps such a cluster up for a driver job and writes a
scheduler file that ``kompot-dask de --scheduler-file`` connects to.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from typing import Any

from .cluster import worker_environment

logger = logging.getLogger("kompot_dask")


def load_jobqueue_config(path: str) -> dict[str, Any]:
    """The ``jobqueue.slurm`` section of a dask-jobqueue YAML file."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh) or {}
    try:
        section = cfg["jobqueue"]["slurm"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: expected a 'jobqueue: slurm:' section (dask-jobqueue's format)") from None
    return {str(k).replace("-", "_"): v for k, v in section.items()}


def slurm_cluster(config: str | None = None, **overrides: Any):
    """A ``SLURMCluster`` whose workers run kompot_dask's tasks well.

    ``config`` is a dask-jobqueue YAML file; keyword arguments override it. The worker
    environment (single-threaded BLAS/XLA per Dask thread, CPU JAX, numba cache) is
    exported in the job script's prologue, after the user's own prologue lines.
    """
    from dask_jobqueue import SLURMCluster

    kwargs = load_jobqueue_config(config) if config else {}
    kwargs.update(overrides)
    cores = int(kwargs.get("cores", 1))
    processes = int(kwargs.get("processes") or 1)
    threads = max(1, cores // processes)
    prologue = list(kwargs.pop("job_script_prologue", None) or [])
    env = worker_environment(threads)
    prologue += [f"export {k}='{v}'" for k, v in env.items()]
    return SLURMCluster(job_script_prologue=prologue, **kwargs)


def _serve_slurm(args: argparse.Namespace) -> int:
    cluster = slurm_cluster(args.config)
    cluster.scale(jobs=args.jobs)
    with open(args.scheduler_file + ".tmp", "w", encoding="utf-8") as fh:
        json.dump({"address": cluster.scheduler_address, "type": "Scheduler"}, fh)
    os.replace(args.scheduler_file + ".tmp", args.scheduler_file)
    logger.info("SLURMCluster up at %s (%d worker jobs requested); dashboard %s",
                cluster.scheduler_address, args.jobs, cluster.dashboard_link)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    cluster.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kompot_dask.deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("slurm", help="keep a SLURMCluster up and write its scheduler file")
    p.add_argument("--config", required=True, help="dask-jobqueue YAML (deploy/slurm/jobqueue.yaml)")
    p.add_argument("--jobs", type=int, default=4, help="worker jobs to submit")
    p.add_argument("--scheduler-file", required=True)
    args = parser.parse_args(argv)
    return _serve_slurm(args)


if __name__ == "__main__":
    raise SystemExit(main())
