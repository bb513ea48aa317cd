"""``kompot-dask``: the command line for cluster jobs.

Subcommands: ``ingest``, ``plan``, ``de``, ``runs``, ``cleanup``, ``verify``, ``demo``. Cluster:
``--scheduler tcp://HOST:PORT`` (or dask's ``scheduler-address`` setting, e.g.
``DASK_SCHEDULER_ADDRESS``; or ``--scheduler-file``),
with ``--tls-ca-file/--tls-cert/--tls-key`` for TLS; without one, an embedded LocalCluster
shaped by ``--n-workers/--threads-per-worker/--memory-limit``.

Exit codes: 0 ok, 2 bad input, 3 infeasible plan, 1 anything else (``verify``: 1 when the
store is damaged, after the report and a one-line summary on stderr). Errors are one line on
stderr; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INFEASIBLE = 0, 1, 2, 3

logger = logging.getLogger("kompot_dask")


class CLIError(Exception):
    """Bad command-line input (exit code 2)."""


# --------------------------------------------------------------------------------------
# Parser


def _cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="scheduler address, e.g. tcp://10.0.0.5:8786 or tls://... "
                        "(default: dask config scheduler-address, e.g. $DASK_SCHEDULER_ADDRESS, "
                        "else an embedded LocalCluster)")
    g.add_argument("--scheduler-file", default=None, help="scheduler file written by `dask scheduler --scheduler-file`")
    g.add_argument("--tls-ca-file", default=None, help="CA certificate for TLS to the scheduler")
    g.add_argument("--tls-cert", default=None, help="client certificate (PEM) for TLS")
    g.add_argument("--tls-key", default=None, help="client private key (PEM) for TLS")
    g.add_argument("--wait-for-workers", type=int, default=None, metavar="N",
                   help="wait until N workers have joined the scheduler (batch jobs whose workers queue)")
    g.add_argument("--wait-timeout", type=float, default=1800, help="seconds to wait for them (default 1800)")
    g.add_argument("--n-workers", type=int, default=None, help="embedded LocalCluster: worker processes")
    g.add_argument("--threads-per-worker", type=int, default=None, help="embedded LocalCluster: threads per worker")
    g.add_argument("--memory-limit", default=None, help="embedded LocalCluster: memory limit per worker, e.g. 8GiB")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="zarr AnnData store (path or file:// URL)")
    p.add_argument("--config", default=None, help="YAML file with de() arguments; command-line flags override it")
    p.add_argument("--groupby", default=None, help="obs column with the condition labels")
    p.add_argument("--condition1", default=None)
    p.add_argument("--condition2", default=None)
    p.add_argument("--layer", default=None, help="expression layer (default: X)")
    p.add_argument("--obsm-key", default=None, help="cell-state embedding in obsm (default: DM_EigenVectors)")
    p.add_argument("--genes", nargs="+", default=None, help="test only these genes")
    p.add_argument("--sample-col", default=None, metavar="COLUMN",
                   help="obs column naming each cell's sample (donor): kompot's sample variance")
    p.add_argument("--null-genes", type=int, default=None, help="FDRSettings.null_genes (0 disables the FDR)")
    p.add_argument("--fdr-mode", default=None, choices=("raw", "variance_stratified", "calibrated"),
                   help="FDRSettings.mode: which null is_de comes from (default raw: kompot's; docs/fdr.md)")
    p.add_argument("--n-landmarks", type=int, default=None, help="GPSettings.n_landmarks")
    p.add_argument("--result-key", default=None, help="StorageSettings.result_key")
    p.add_argument("--overwrite", action="store_true", help="overwrite earlier results without warning")
    p.add_argument("--results-store", default=None, metavar="PATH",
                   help="write results and run history to this zarr store; STORE is only read (StorageSettings.results_store)")
    p.add_argument("--no-layers", action="store_true", help="do not write imputed / fold-change layers")
    p.add_argument("--cell-chunk", type=int, default=None)
    p.add_argument("--gene-block", type=int, default=None)
    _cluster_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kompot-dask", description="Kompot-style differential expression on Dask, over zarr AnnData stores.")
    parser.add_argument("--verbose", "-v", action="store_true", help="tracebacks and debug logs")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # --json and --verbose also after the subcommand (`kompot-dask plan STORE --json`); SUPPRESS
    # keeps a flag given before the subcommand from being reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[common], **k)  # type: ignore[method-assign]

    p = sub.add_parser("ingest", help="convert .h5ad / zarr AnnData into a gene-block-tiled zarr store")
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--chunks", default="4096,256", help="CELLS,GENES tile shape of dense matrices (default 4096,256)")
    p.add_argument("--dense", action="store_true",
                   help="write sparse matrices as dense tiles too (default: they stay sparse, CSR or CSC)")
    p.add_argument("--layers", nargs="*", default=None, help="layers to convert (default: all)")
    p.add_argument("--no-x", action="store_true", help="do not write X")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("plan", help="what a de run needs on this cluster (exit 3 if infeasible)")
    _run_options(p)
    p = sub.add_parser("de", help="run differential expression and write results into the store")
    _run_options(p)
    p.add_argument("--dry-run", action="store_true", help="plan only (like `plan`)")

    p = sub.add_parser("runs", help="list the runs recorded in a store, or show one")
    p.add_argument("store")
    p.add_argument("run_id", nargs="?", type=int, default=None)
    p.add_argument("--compare-with", type=int, default=None, help="compare RUN_ID with this run")

    p = sub.add_parser("cleanup", help="remove runs' layers from the store (frees disk)")
    p.add_argument("store")
    p.add_argument("--run-ids", type=int, nargs="+", default=None, help="runs to clean (default: all)")
    p.add_argument("--keep-layers", action="store_true")
    p.add_argument("--remove-obs", action="store_true", help="also remove per-cell fields")
    p.add_argument("--remove-var", action="store_true", help="also remove per-gene statistics")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed")
    p.add_argument("--staged", action="store_true",
                   help="remove the work interrupted runs kept for a resume (alone: only that)")

    p = sub.add_parser("verify", help="check the store's chunk files and run history (exit 1 if damaged)")
    p.add_argument("store")
    p.add_argument("--record", action="store_true",
                   help="record chunk manifests for expression elements that lack one (takes their chunks as correct)")

    p = sub.add_parser("demo", help="build a synthetic atlas store and run de on it")
    p.add_argument("--out", default="demo_data/atlas.zarr")
    p.add_argument("--n-obs", type=int, default=50_000)
    p.add_argument("--n-vars", type=int, default=2_000)
    p.add_argument("--n-landmarks", type=int, default=2_000)
    return parser


# --------------------------------------------------------------------------------------
# Helpers


def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    if not os.path.exists(path):
        raise CLIError(f"--config {path}: file not found")
    with open(path, encoding="utf-8") as fh:
        try:
            cfg = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise CLIError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise CLIError(f"--config {path}: expected a mapping of de() arguments, got {type(cfg).__name__}")
    allowed = {"groupby", "condition1", "condition2", "layer", "obsm_key", "genes", "sample_col",
               "gp", "fdr", "filter", "storage", "output", "compute"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise CLIError(f"--config {path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return cfg


def _settings_from(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """de() keyword arguments from the config file, then the flags on top."""
    import kompot_dask as kd

    def section(name: str) -> dict[str, Any]:
        value = cfg.get(name) or {}
        if not isinstance(value, dict):
            raise CLIError(f"--config: {name!r} must be a mapping of {name} settings, got {value!r}")
        return dict(value)

    gp, fdr, filt, storage, compute = (section(n) for n in ("gp", "fdr", "filter", "storage", "compute"))
    output = section("output")
    if args.n_landmarks is not None:
        gp["n_landmarks"] = args.n_landmarks
    if args.null_genes is not None:
        fdr["null_genes"] = args.null_genes
    if args.fdr_mode is not None:
        fdr["mode"] = args.fdr_mode
    if args.result_key is not None:
        storage["result_key"] = args.result_key
    if args.overwrite:
        storage["overwrite"] = True
    if args.results_store is not None:
        storage["results_store"] = args.results_store
    if args.no_layers:
        storage["store_layers"] = False
    for flag in ("cell_chunk", "gene_block", "n_workers", "threads_per_worker", "memory_limit"):
        if getattr(args, flag) is not None:
            compute[flag] = getattr(args, flag)
    output.setdefault("progress", not args.json)  # a bar on a terminal, periodic log lines elsewhere
    output["return_full_results"] = True
    try:
        built = dict(gp=kd.GPSettings(**gp), fdr=kd.FDRSettings(**fdr), filter=kd.FilterSettings(**filt),
                     storage=kd.StorageSettings(**storage), output=kd.OutputSettings(**output),
                     compute=kd.ComputeSettings(**compute))
    except TypeError as exc:  # unknown settings field in the config
        raise CLIError(f"--config: {exc}") from None
    kwargs: dict[str, Any] = {}
    for key in ("groupby", "condition1", "condition2", "layer", "obsm_key", "genes", "sample_col"):
        flag = getattr(args, key)
        value = flag if flag is not None else cfg.get(key)
        if value is not None:
            kwargs[key] = value
    for key in ("groupby", "condition1", "condition2"):
        if key not in kwargs:
            raise CLIError(f"--{key} is required (or set {key}: in --config)")
    return kwargs | built


@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    """The scheduler named on the command line (or in dask's config); None → embedded."""
    import dask.config

    address = args.scheduler
    if address is None and args.scheduler_file is None:
        # dask's `scheduler-address` setting, filled from $DASK_SCHEDULER_ADDRESS or a dask
        # YAML file: the lookup distributed.Client(address=None) makes itself. Read here
        # too because without it the CLI starts an embedded cluster instead of a Client.
        address = dask.config.get("scheduler-address", None)
    tls = [args.tls_ca_file, args.tls_cert, args.tls_key]
    if any(tls) and not all(tls):
        raise CLIError("--tls-ca-file, --tls-cert and --tls-key go together; pass all three")
    if address is None and args.scheduler_file is None:
        if args.wait_for_workers:
            raise CLIError("--wait-for-workers needs --scheduler or --scheduler-file")
        if any(tls):
            raise CLIError("TLS options need --scheduler tls://HOST:PORT (the embedded cluster runs on 127.0.0.1)")
        yield None
        return
    if address is not None and args.scheduler_file is not None:
        raise CLIError("pass either --scheduler or --scheduler-file, not both")
    for path in filter(None, tls + [args.scheduler_file]):
        if not os.path.exists(path):
            raise CLIError(f"file not found: {path}")
    from distributed import Client
    from distributed.security import Security

    from ._engine.cluster import cluster_workers

    security = None
    if all(tls):
        security = Security(tls_ca_file=args.tls_ca_file, tls_client_cert=args.tls_cert,
                            tls_client_key=args.tls_key, require_encryption=True)
    elif address is not None and address.startswith("tls://"):
        raise CLIError(f"--scheduler {address} is a TLS address; pass --tls-ca-file, --tls-cert and --tls-key")
    kwargs = {"scheduler_file": args.scheduler_file} if args.scheduler_file else {"address": address}
    try:
        client = Client(**kwargs, security=security, timeout="30s", set_as_default=False)
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Dask scheduler at {address or args.scheduler_file}: {exc}") from None
    with client:
        if args.wait_for_workers:
            logger.info("Waiting for %d workers (up to %.0f s)...", args.wait_for_workers, args.wait_timeout)
            try:
                client.wait_for_workers(args.wait_for_workers, timeout=args.wait_timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"only {len(cluster_workers(client))} of {args.wait_for_workers} workers "
                    f"joined {client.scheduler.address} within {args.wait_timeout:.0f} s (--wait-timeout)"
                ) from None
        logger.info("Connected to %s (%d workers); dashboard: %s", client.scheduler.address,
                    len(cluster_workers(client)), client.dashboard_link)
        yield client


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(payload, default=str))
    else:
        print(text)


# --------------------------------------------------------------------------------------
# Commands


def _cmd_ingest(args: argparse.Namespace) -> int:
    from ._io.ingest import ingest

    try:
        cells, genes = (int(x) for x in args.chunks.split(","))
        if cells <= 0 or genes <= 0:
            raise ValueError
    except ValueError:
        raise CLIError(f"--chunks {args.chunks!r}: expected two positive integers CELLS,GENES, e.g. 4096,256") from None
    if not os.path.exists(args.src.removeprefix("file://")):
        raise CLIError(f"source {args.src} does not exist")
    path = ingest(args.src, args.dest, layers=args.layers, include_x=not args.no_x, cell_chunk=cells,
                  gene_chunk=genes, overwrite=args.overwrite, keep_sparse=not args.dense, progress=not args.json)
    _emit(args, {"store": path, "chunks": [cells, genes]}, f"Wrote {path} (tiles {cells} × {genes})")
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    import kompot_dask as kd

    kwargs = _settings_from(args, _load_config(args.config))
    with _client(args) as client:
        plan = kd.plan(args.store, **kwargs, client=client)
    _emit(args, plan.to_dict(), str(plan))
    return EXIT_INFEASIBLE if plan.status == "INFEASIBLE" else EXIT_OK


def _cmd_de(args: argparse.Namespace) -> int:
    import kompot_dask as kd

    if args.dry_run:
        return _cmd_plan(args)
    kwargs = _settings_from(args, _load_config(args.config))
    with _client(args) as client:
        result = kd.de(args.store, **kwargs, client=client)
    s = result["fdr_summary"] or {}
    table = result["table"]
    payload = {
        "store": args.store, "run_id": result["run_id"], "field_names": result["field_names"],
        "n_genes": int(len(table)), "n_de": int(table["is_de"].sum()) if "is_de" in table else None,
        "ls": result["ls"], "fdr_summary": s, "fdr_mode": kwargs["fdr"].mode if s else None,
        "top_genes": table.sort_values("mahalanobis", ascending=False).head(10).index.tolist(),
    }
    top = table.sort_values("mahalanobis", ascending=False).head(10)
    text = (f"run_id={result['run_id']}: {payload['n_de']}/{payload['n_genes']} genes DE\n"
            + top.to_string(max_cols=6) + f"\nResults written to {args.store}")
    _emit(args, payload, text)
    return EXIT_OK


def _cmd_runs(args: argparse.Namespace) -> int:
    from ._runs.history import read_history
    from ._runs.runinfo import RunInfo

    if args.run_id is None:
        hist = read_history(args.store)
        rows = []
        for i in range(len(hist)):
            r = hist.record(i)
            rows.append({"run_id": i if r.run_id is None else r.run_id, "timestamp": r.timestamp,
                         "condition1": r.condition1, "condition2": r.condition2,
                         "result_key": r.result_key, "n_de": r.n_de})
        text = "\n".join(f"{x['run_id']:>3}  {x['timestamp']}  {x['condition1']} → {x['condition2']}  "
                         f"result_key={x['result_key']}  DE={x['n_de']}" for x in rows) or "no runs recorded"
        _emit(args, {"runs": rows}, text)
        return EXIT_OK
    info = RunInfo(args.store, run_id=args.run_id)
    if args.compare_with is not None:
        cmp = info.compare_with(args.compare_with)
        _emit(args, cmp.to_dict(), str(cmp))
        return EXIT_OK
    payload = {"summary": info.summary(), "parameters": info.parameters(),
               "fields": [vars(f) if hasattr(f, "__dict__") else f for f in info.fields]}
    _emit(args, payload, str(info))
    return EXIT_OK


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from ._runs.cleanup import cleanup

    summary = cleanup(args.store, run_ids=args.run_ids, keep_layers=args.keep_layers,
                      keep_obs_fields=not args.remove_obs, keep_var_fields=not args.remove_var,
                      dry_run=args.dry_run, staged=args.staged)
    _emit(args, summary.to_dict(), str(summary))
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from ._runs.verify import verify

    report = verify(args.store, record=args.record)
    _emit(args, report.to_dict(), str(report))
    if report.ok:
        return EXIT_OK
    # The report went to stdout; the verdict also goes to stderr, where job logs look.
    print(f"kompot-dask verify: {report.summary()}", file=sys.stderr)
    return EXIT_ERROR


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import main as demo_main

    demo_main(["--out", args.out, "--n-obs", str(args.n_obs), "--n-vars", str(args.n_vars),
               "--n-landmarks", str(args.n_landmarks)])
    return EXIT_OK


_COMMANDS = {"ingest": _cmd_ingest, "plan": _cmd_plan, "de": _cmd_de, "runs": _cmd_runs,
             "cleanup": _cmd_cleanup, "verify": _cmd_verify, "demo": _cmd_demo}


def _exit_code(exc: BaseException) -> int:
    from ._io.store import StoreError
    from ._planner import InfeasiblePlanError
    from ._settings import SettingsError

    if isinstance(exc, InfeasiblePlanError):
        return EXIT_INFEASIBLE
    bad_input = (CLIError, SettingsError, StoreError, KeyError, ValueError, TypeError, FileNotFoundError,
                 FileExistsError, PermissionError, IndexError)
    if isinstance(exc, bad_input) and not isinstance(exc, ConnectionError):
        return EXIT_BAD_INPUT
    return EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    from ._planner import InfeasiblePlanError

    if isinstance(exc, InfeasiblePlanError):
        reasons = "; ".join(f"{e.message} (fix: {e.fixes[0]})" if e.fixes else e.message for e in exc.plan.errors)
        return f"infeasible plan, nothing was computed: {reasons}"
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    msg = " ".join(str(msg).split())
    for python, command in _CLI_HINTS.items():  # name the subcommand, not the Python call
        msg = msg.replace(python, command)
    return msg or type(exc).__name__


_CLI_HINTS = {
    "kompot_dask.ingest('data.h5ad', 'data.zarr')": "`kompot-dask ingest data.h5ad data.zarr`",
    "kompot_dask.ingest(src, dest)": "`kompot-dask ingest SRC DEST`",
    "kompot_dask.de(url, ..., output='results.zarr')": "`kompot-dask de URL ... --results-store results.zarr`",
}


def _h5ad_hint(args: argparse.Namespace) -> None:
    """An .h5ad given where a zarr store is needed: the command that converts it."""
    store = getattr(args, "store", None)
    if isinstance(store, str) and store.lower().endswith((".h5ad", ".h5")):
        dest = os.path.splitext(store)[0] + ".zarr"
        raise CLIError(f"{store} is an HDF5 AnnData file; kompot-dask works on zarr stores. Convert it once with "
                       f"`kompot-dask ingest {store} {dest}`, then run `kompot-dask {args.command} {dest} ...`.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    log = logging.getLogger("kompot_dask")
    if args.verbose:
        log.setLevel(logging.DEBUG)
    if args.json:  # logs stay on stderr; keep them to warnings so stdout/stderr stay parseable
        log.setLevel(logging.WARNING)
    try:
        _h5ad_hint(args)
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("kompot-dask: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # one clear line unless --verbose
        if args.verbose:
            traceback.print_exc()
        print(f"kompot-dask {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return _exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
