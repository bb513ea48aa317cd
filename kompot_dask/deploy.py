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

from ._engine.cluster import worker_environment

logger = logging.getLogger("kompot_dask")


def load_jobqueue_config(path: str) -> None:
    """Merge a dask-jobqueue YAML file into dask's config, as if it sat in ``~/.config/dask``.

    dask-jobqueue reads ``jobqueue.slurm.*`` from dask's config each time it builds a worker
    job (on every ``scale``, not only in the constructor), so the file is merged into the
    process-wide config rather than set for one ``with`` block. Environment variables
    (``DASK_JOBQUEUE__SLURM__...``) keep priority over the file, as in dask's own loading.
    """
    import dask.config
    import dask_jobqueue  # noqa: F401  (registers jobqueue's defaults before the file is merged)

    if not os.path.isfile(path):  # dask.config.collect skips missing paths silently
        raise FileNotFoundError(f"jobqueue config not found: {path}")
    cfg = dask.config.collect(paths=[path])
    if not isinstance(dask.config.get("jobqueue.slurm", None, config=cfg), dict):
        raise ValueError(f"{path}: expected a 'jobqueue: slurm:' section (dask-jobqueue's format)")
    dask.config.update(dask.config.config, cfg)


def slurm_cluster(config: str | None = None, **overrides: Any):
    """A ``SLURMCluster`` whose workers run kompot_dask's tasks well.

    ``config`` is a dask-jobqueue YAML file, merged into dask's config (see
    :func:`load_jobqueue_config`); without one, the ``jobqueue.slurm`` settings dask already
    has apply. Keyword arguments override them, as they do for ``SLURMCluster``. The worker
    environment (single-threaded BLAS/XLA per Dask thread, CPU JAX, numba cache) is
    exported in the job script's prologue, after the user's own prologue lines.
    """
    import dask.config
    from dask_jobqueue import SLURMCluster
    from distributed.deploy.utils import nprocesses_nthreads

    if config:
        load_jobqueue_config(config)
    section = f"jobqueue.{overrides.get('config_name') or SLURMCluster.job_cls.config_name}"

    def setting(key: str) -> Any:
        # SLURMCluster's own precedence: a keyword argument, else the config value
        value = overrides.get(key.replace("-", "_"))
        return value if value is not None else dask.config.get(f"{section}.{key}", None)

    cores = int(setting("cores") or 1)
    processes = setting("processes")
    if processes is None:  # dask-jobqueue splits the cores the same way
        processes, _ = nprocesses_nthreads(cores)
    threads = max(1, cores // int(processes))
    prologue = list(setting("job-script-prologue") or [])
    prologue += [f"export {k}='{v}'" for k, v in worker_environment(threads).items()]
    return SLURMCluster(**{**overrides, "job_script_prologue": prologue})


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
