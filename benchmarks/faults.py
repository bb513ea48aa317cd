"""Fault injection: what a zarr store goes through when a kompot_dask run is killed, loses a
worker, runs out of disk, reads a damaged chunk or meets a second writer.

Every fault is injected for real (SIGKILL of the client at chosen moments, SIGKILL of a Dask
worker process, a small tmpfs that fills up, deleted and truncated chunk files, a second
``kd.de`` on the same store), each on a fresh copy of a store written by anndata itself
(~110 user obs columns of every kind plus the synthetic data of
``kompot_dask.testing.make_synthetic_adata``). After each fault the store is read back with
``anndata.read_zarr`` *before* any kompot_dask call (the user columns must equal the
original), then again once a kompot_dask opener has completed any interrupted commit.
Results are compared to an uninterrupted run on a copy, to the last bit.

Prints a table (fault → outcome → data lost → results identical to a clean run → wall
time), also as Markdown for the README. Exit status 1 when a fault shows a problem.

    .venv/bin/python benchmarks/faults.py --quick          # ~5 min on 2 cores
    .venv/bin/python benchmarks/faults.py                  # larger stores
    .venv/bin/python benchmarks/faults.py --quick --only 3 6 --keep

Fault 6 (full disk) mounts small tmpfs file systems and needs root (``mount -t tmpfs``);
without it the row says "skipped (no tmpfs)".
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import psutil

N_USER_COLUMNS = 110
GROUPBY, COND1, COND2 = "Age", "Young", "Old"
LAYER, OBSM = "logged_counts", "X_pca"
MARK_ENV = "KOMPOT_FAULTS_MARK"


@dataclass(frozen=True)
class Sizes:
    n_obs: int
    n_vars: int
    n_dims: int
    n_landmarks: int
    ls: float
    null_genes: int
    gene_block: int
    cell_chunk: int
    lm_n_obs: int  # fault 1: a store whose k-means lasts several seconds
    lm_n_landmarks: int
    f2_n_vars: int  # fault 2: a wider store, so that the gene blocks are most of the work

    def settings(self, **over: Any) -> dict[str, Any]:
        s = {"n_landmarks": self.n_landmarks, "ls": self.ls, "null_genes": self.null_genes,
             "gene_block": self.gene_block, "null_gene_block": self.gene_block,
             "cell_chunk": self.cell_chunk, "memory_limit": "4GiB"}
        s.update(over)
        return s


QUICK = Sizes(n_obs=3000, n_vars=200, n_dims=10, n_landmarks=200, ls=8.0, null_genes=100, gene_block=20,
              cell_chunk=1500, lm_n_obs=10_000, lm_n_landmarks=2000, f2_n_vars=600)
FULL = Sizes(n_obs=8000, n_vars=400, n_dims=10, n_landmarks=400, ls=8.0, null_genes=200, gene_block=40,
             cell_chunk=4000, lm_n_obs=20_000, lm_n_landmarks=2000, f2_n_vars=2000)


# --------------------------------------------------------------------------------------
# Scripts run in their own processes


DRIVER = r'''
"""One kd.de call in its own process, with an optional fault hook (SIGKILL of itself)."""
import json, os, signal, sys, threading, time, traceback


def engine_module():
    """The module holding the block task and the landmark helpers (moved between versions)."""
    import importlib
    for name in ("kompot_dask._engine.graph", "kompot_dask.engine"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "_real_block_task"):
            return mod
    raise ImportError("no kompot_dask module defines _real_block_task")


def die(what):
    print("KILL", what, flush=True)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    cfg = json.loads(sys.argv[1])
    store = cfg["store"]
    import anndata
    import dask
    import kompot_dask as kd
    from kompot_dask._io import commit
    eng = engine_module()
    from kompot_dask._io.store import Store

    moves = [0]
    inner_move = commit._do_move

    def counted_move(*a, **k):
        out = inner_move(*a, **k)
        moves[0] += 1
        if kind == "move" and moves[0] == int(arg):
            die(kill)
        return out

    commit._do_move = counted_move

    def after(fn, n, only_after_moves=False, group=None):
        calls = [0]

        def wrapped(*a, **k):
            out = fn(*a, **k)
            if only_after_moves and not moves[0]:
                return out
            if group is not None and (len(a) < 2 or a[1] != group):
                return out
            calls[0] += 1
            if calls[0] == n:
                die(kill)
            return out
        return wrapped

    kill = cfg.get("kill") or ""
    kind, _, arg = kill.partition(":")
    if kind == "stage":          # while the obs/var/uns elements are staged
        anndata.io.write_elem = after(anndata.io.write_elem, int(arg))
    elif kind == "journal":      # right after the commit point
        commit.begin = after(commit.begin, 1)
    elif kind == "attrs":        # after the new column-order of obs, written once the elements moved
        commit._write_group_attrs = after(commit._write_group_attrs, 1, only_after_moves=True, group="obs")
    elif kind == "consolidate":  # after the consolidated metadata is rewritten
        commit.write_consolidated = after(commit.write_consolidated, 1, only_after_moves=True)
    elif kind == "blocks":       # once this many gene-block tasks have finished
        n = int(arg)

        staging_of = cfg["settings"].get("results_store") or store  # where the run stages its work

        def watch():
            while True:
                for st in commit.list_staging(staging_of) if os.path.isdir(staging_of) else []:
                    markers = st.sub("markers")
                    done = len([f for f in (os.listdir(markers) if os.path.isdir(markers) else [])
                                if f.startswith("real-") and f.endswith(".npz")])
                    if done >= n:
                        die(f"{kill} {done}")
                time.sleep(0.01)
        threading.Thread(target=watch, daemon=True).start()

    inner_prepare = eng._prepare_in_subprocesses

    def announced(*a, **k):
        import psutil  # the processes before the landmark helpers start
        kids = [str(p.pid) for p in psutil.Process().children(recursive=True)]
        print("LANDMARKS", ",".join(kids) or "-", flush=True)
        out = inner_prepare(*a, **k)
        print("LANDMARKS-DONE", flush=True)
        return out

    eng._prepare_in_subprocesses = announced

    if cfg.get("usage"):  # bytes used on the store's file system at the commit
        def used():
            st = os.statvfs(store)
            return (st.f_blocks - st.f_bfree) * st.f_frsize

        inner_commit, inner_begin = Store.commit, commit.begin

        def commit_usage(self, *a, **k):
            print("USAGE staged", used(), flush=True)
            return inner_commit(self, *a, **k)

        def begin_usage(*a, **k):
            print("USAGE elements", used(), flush=True)
            return inner_begin(*a, **k)
        Store.commit, commit.begin = commit_usage, begin_usage

    if cfg.get("preload"):
        dask.config.set({"distributed.worker.preload": [cfg["preload"]]})
    s = cfg["settings"]
    kwargs = dict(
        layer="LAYER", obsm_key="OBSM",
        # kompot's exact path runs k-means in helper processes (fault 1 kills the client there)
        gp=(kd.GPSettings.kompot if s.get("kompot_path") else kd.GPSettings)(n_landmarks=s["n_landmarks"], ls=s["ls"]),
        fdr=kd.FDRSettings(null_genes=s["null_genes"]),
        compute=kd.ComputeSettings(gene_block=s["gene_block"], null_gene_block=s["null_gene_block"],
                                   cell_chunk=s["cell_chunk"], memory_limit=s["memory_limit"]),
        storage=kd.StorageSettings(overwrite=True, results_store=s.get("results_store")),
        output=kd.OutputSettings(progress=False),
    )
    print("START", os.getpid(), flush=True)
    t0 = time.perf_counter()
    try:
        kd.de(store, "GROUPBY", "COND1", "COND2", **kwargs)
    except BaseException as exc:
        frames = [f.name for f in traceback.extract_tb(exc.__traceback__)]
        traceback.print_exc()
        print("ERROR " + json.dumps({"type": type(exc).__name__, "message": str(exc), "frames": frames,
                                     "errno": getattr(exc, "errno", None),
                                     "wall": time.perf_counter() - t0}), flush=True)
        sys.exit(3)
    print("WALL", time.perf_counter() - t0, flush=True)
    print("FINISHED", flush=True)


if __name__ == "__main__":
    main()
'''.replace("GROUPBY", GROUPBY).replace("COND1", COND1).replace("COND2", COND2) \
   .replace('"LAYER"', repr(LAYER)).replace('"OBSM"', repr(OBSM))

# Worker preloads (distributed.worker.preload), loaded by every worker process of the
# embedded cluster, restarted ones too.
PRELOAD_SLOW = '''
import time

def engine_module():
    import kompot_dask._engine.graph as mod
    return mod


def dask_setup(worker):
    eng = engine_module()
    inner = eng._real_block_task

    def slow_block_task(*args, **kwargs):
        time.sleep({delay})
        return inner(*args, **kwargs)

    eng._real_block_task = slow_block_task
'''

PRELOAD_HOLD = '''
import os
import time

SIGNALS = {signals!r}

def engine_module():
    import kompot_dask._engine.graph as mod
    return mod


def dask_setup(worker):
    eng = engine_module()
    inner = eng._real_block_task

    def held_block_task(*args, **kwargs):
        armed = os.path.join(SIGNALS, "armed")
        if os.path.exists(armed):
            open(os.path.join(SIGNALS, f"running-{{os.getpid()}}"), "w").close()
            while os.path.exists(armed):
                time.sleep(0.05)
        return inner(*args, **kwargs)

    eng._real_block_task = held_block_task
'''

READER = r'''
"""Loop ad.read_zarr + kd.RunInfo until the stop file exists; count reads and anomalies."""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
os.nice(10)  # the writer keeps the CPU; the readers still read throughout
import anndata as ad, numpy as np, pandas as pd
import kompot_dask as kd

store, stop_file, expected_path = sys.argv[1:4]
expected = pd.read_pickle(expected_path)
user = list(expected.columns)
reads = anomalies = runinfo_reads = 0
notes = []
while not os.path.exists(stop_file):
    try:
        a = ad.read_zarr(store)
        if not a.obs[user].equals(expected):
            anomalies += 1; notes.append("user obs columns changed")
        for c in a.obs.columns:
            if c.endswith("_std") and np.isnan(a.obs[c].to_numpy(dtype=float)).all():
                anomalies += 1; notes.append(f"{c} all NaN")
        if "kompot_de" in a.uns:
            info = kd.RunInfo(store, -1)
            info.to_text()
            missing = info.missing_fields
            if missing:
                anomalies += 1; notes.append(f"run {info.run_id}: fields missing {missing}")
            runinfo_reads += 1
        reads += 1
    except Exception as exc:
        anomalies += 1; notes.append(f"{type(exc).__name__}: {exc}"[:300])
print("READER " + json.dumps({"reads": reads, "runinfo_reads": runinfo_reads, "anomalies": anomalies,
                              "notes": sorted(set(notes))[:5]}), flush=True)
'''


# --------------------------------------------------------------------------------------
# Results table


@dataclass
class Row:
    num: str
    fault: str
    outcome: str = ""
    data_lost: str = "none"
    identical: str = "n.a."
    wall: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.data_lost == "none" and self.identical != "no"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def print_tables(rows: list[Row], header: str) -> None:
    cols = ["#", "fault", "outcome", "data lost", "identical to clean", "wall"]
    data = [[r.num, r.fault, r.outcome + ("" if r.ok else "  PROBLEM: " + "; ".join(r.problems)), r.data_lost,
             r.identical, f"{r.wall:.1f} s"] for r in rows]
    print()
    print(header)
    widths = [max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(cols)]
    widths[2] = min(widths[2], 110)
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    print(line)
    print("-" * len(line))
    for d in data:
        print("  ".join(v.ljust(w) for v, w in zip(d, widths, strict=True)))
    print()
    print("Markdown:")
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(["---"] * len(cols)) + "|")
    for d in data:
        print("| " + " | ".join(_cell(v) for v in d) + " |")
    print()


# --------------------------------------------------------------------------------------
# Processes


def _marked(mark: str) -> list[psutil.Process]:
    """Live processes started (directly or not) by the driver that carries ``mark``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARK_ENV) == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _describe(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return f"{proc.pid} (gone)"
    for key, name in (("resource_tracker", "resource tracker"), ("spawn_main", "spawned child"),
                      ("driver.py", "client")):
        if key in cmd:
            return f"{proc.pid} {name}"
    return f"{proc.pid} {cmd[:60]}"


class Driver:
    """``kd.de`` in a child process (``DRIVER``); its output is collected line by line."""

    _seq = 0

    def __init__(self, bench: Bench, store: str, *, kill: str | None = None, settings: dict | None = None,
                 preload: str | None = None, usage: bool = False, name: str = "run"):
        self.mark = uuid.uuid4().hex
        Driver._seq += 1
        os.makedirs(os.path.join(bench.work, "logs"), exist_ok=True)
        self.log_path = os.path.join(bench.work, "logs", f"{Driver._seq:02d}-{name}.log")
        cfg = {"store": store, "kill": kill, "settings": settings or bench.sizes.settings(),
               "preload": preload, "usage": usage}
        env = dict(os.environ, **{MARK_ENV: self.mark})
        env.setdefault("PYTHONWARNINGS", "ignore")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, bench.driver_path, json.dumps(cfg)], cwd=bench.work, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self.lines.append("<EOF>")
            self._cond.notify_all()

    def wait_line(self, prefix: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                if "<EOF>" in self.lines or time.monotonic() > deadline:
                    return None
                self._cond.wait(0.1)

    def has(self, prefix: str) -> bool:
        with self._cond:
            return any(line.startswith(prefix) for line in self.lines)

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.wait(30)
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def value(self, prefix: str) -> str | None:
        line = self.wait_line(prefix, 0)
        return None if line is None else line[len(prefix):].strip()

    @property
    def wall(self) -> float | None:
        v = self.value("WALL")
        return None if v is None else float(v)

    @property
    def error(self) -> dict | None:
        v = self.value("ERROR")
        return None if v is None else json.loads(v)

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.lines[-n:])

    def leftovers(self, grace: float = 15.0) -> tuple[list[str], float]:
        """Processes of this driver still alive ``grace`` s after it ended, and how long the
        others took to go."""
        t0 = time.monotonic()
        while time.monotonic() < t0 + grace:
            if not _marked(self.mark):
                return [], time.monotonic() - t0
            time.sleep(0.1)
        left = _marked(self.mark)
        return [_describe(p) for p in left], time.monotonic() - t0

    def reap(self) -> None:
        for p in _marked(self.mark):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


# --------------------------------------------------------------------------------------
# Stores and checks


def write_atlas(path: str, n_obs: int, n_vars: int, n_dims: int, seed: int):
    """A store written by anndata itself: the synthetic data plus 110 user obs columns."""
    import anndata as ad

    from kompot_dask.testing import SyntheticSpec, make_synthetic_adata, make_user_obs

    adata = make_synthetic_adata(SyntheticSpec(n_obs=n_obs, n_vars=n_vars, n_dims=n_dims, seed=seed))
    extra = make_user_obs(adata.n_obs, N_USER_COLUMNS)
    extra.index = adata.obs.index
    adata.obs = pd.concat([adata.obs, extra], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(path)
    return ad.read_zarr(path)


def _visible_files(path: str) -> list[str]:
    """Files anndata and zarr see (kompot_dask's hidden .kompot directory and lease excluded)."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") or f in (".zattrs", ".zgroup", ".zarray", ".zmetadata"):
                out.append(os.path.relpath(os.path.join(root, f), path))
    return sorted(out)


def tree_digest(path: str) -> dict[str, str]:
    digest = {}
    for rel in _visible_files(path):
        with open(os.path.join(path, rel), "rb") as fh:
            digest[rel] = hashlib.sha1(fh.read()).hexdigest()
    return digest


def kompot_fields(adata) -> dict[str, np.ndarray]:
    out = {f"var/{c}": adata.var[c].to_numpy() for c in adata.var.columns if c.startswith("kompot")}
    out.update({f"obs/{c}": adata.obs[c].to_numpy() for c in adata.obs.columns if c.startswith("kompot")})
    out.update({f"layers/{k}": np.asarray(adata.layers[k]) for k in adata.layers if k.startswith("kompot")})
    return out


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return bool(np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True))
    return bool(np.array_equal(a, b))


def differing(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> list[str]:
    """Fields of ``want`` that ``got`` lacks or holds with other values (to the last bit)."""
    return [k for k in want if k not in got or not same_array(got[k], want[k])]


def classify(got: dict[str, np.ndarray], old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> str:
    """'old', 'new' or 'mix (...)' for the run fields a reader sees."""
    states = {}
    for k in new:
        if k not in got:
            states[k] = "absent"
        elif same_array(got[k], new[k]) and not (k in old and same_array(got[k], old[k])):
            states[k] = "new"
        elif k in old and same_array(got[k], old[k]) and not same_array(got[k], new[k]):
            states[k] = "old"
        elif same_array(got[k], new[k]):
            states[k] = "either"
        else:
            states[k] = "other"
    kinds = {v for v in states.values() if v != "either"}
    if kinds <= {"old"}:
        return "old"
    if kinds == {"new"}:
        return "new"
    n_new = sum(v == "new" for v in states.values())
    return f"mix ({n_new} new, {sum(v == 'old' for v in states.values())} old, " \
           f"{sum(v in ('absent', 'other') for v in states.values())} absent/other)"


# --------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="kd_faults_"))
        os.makedirs(self.work, exist_ok=True)
        self.driver_path = os.path.join(self.work, "driver.py")
        with open(self.driver_path, "w") as fh:
            fh.write(DRIVER)
        self.mounts: list[str] = []
        self.ref: dict[str, np.ndarray] = {}
        self.old: dict[str, np.ndarray] = {}
        self.t_clean = float("nan")
        self.originals: dict[str, dict[str, Any]] = {}

    # ---- helpers -----------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)

    def copy(self, src: str, name: str, parent: str | None = None) -> str:
        dst = os.path.join(parent or self.work, name)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        return dst

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t_start:7.1f} s] {msg}", flush=True)

    def remember(self, src: str, adata) -> None:
        """What anndata read from a freshly written store: every check compares with it."""
        self.originals[os.path.basename(src)] = {
            "obs": adata.obs[self.user_cols].copy(), "layer": np.asarray(adata.layers[LAYER]).copy(),
            "obsm": np.asarray(adata.obsm[OBSM]).copy(), "var_names": list(adata.var_names)}

    def check_user_data(self, path: str, row: Row, when: str, src: str | None = None):
        """anndata's own view: user obs columns, the expression layer and the embedding as
        written. Appends to ``row.data_lost``; returns the AnnData."""
        import anndata as ad

        orig = self.originals[os.path.basename(src or self.original)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                adata = ad.read_zarr(path)
            except Exception as exc:
                self._lost(row, f"{when}: anndata cannot read the store ({type(exc).__name__}: {exc})"[:300])
                return None
        try:
            pd.testing.assert_frame_equal(adata.obs[self.user_cols], orig["obs"])
        except (AssertionError, KeyError) as exc:
            self._lost(row, f"{when}: user obs columns differ ({str(exc).splitlines()[0][:120]})")
        if LAYER not in adata.layers or not np.array_equal(np.asarray(adata.layers[LAYER]), orig["layer"]):
            self._lost(row, f"{when}: layers/{LAYER} differs")
        if OBSM not in adata.obsm or not np.array_equal(np.asarray(adata.obsm[OBSM]), orig["obsm"]):
            self._lost(row, f"{when}: obsm/{OBSM} differs")
        if list(adata.var_names) != orig["var_names"]:
            self._lost(row, f"{when}: var_names differ")
        staging = [k for k in adata.layers if "staging" in k or k.startswith(".")]
        if staging:
            self._lost(row, f"{when}: staging visible as layers {staging}")
        return adata

    @staticmethod
    def _lost(row: Row, what: str) -> None:
        row.data_lost = what if row.data_lost == "none" else f"{row.data_lost}; {what}"

    def opener(self, path: str) -> None:
        """A kompot_dask opener (the `kompot-dask verify` reader): completes a pending journal."""
        import kompot_dask as kd

        verify = getattr(kd, "verify", None)
        if verify is None:
            from kompot_dask._io.manifest import verify
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verify(path)

    def run_count(self, path: str) -> int:
        import kompot_dask as kd

        try:
            return kd.RunInfo(path, -1).run_id + 1
        except Exception:
            return 0

    def leftover_check(self, drv: Driver, row: Row) -> float:
        left, took = drv.leftovers()
        if left:
            row.problems.append(f"processes left after the kill: {left}")
            drv.reap()
        return took

    def lease_check(self, path: str, row: Row) -> str:
        from kompot_dask._io.lease import LOCK_NAME, lock_holder

        holder = lock_holder(path)
        if holder is not None:
            row.problems.append(f"lease still held by {holder}")
        lock = os.path.join(path, LOCK_NAME)
        return "lease file left (holder dead)" if os.path.exists(lock) else "no lease file"

    # ---- setup -------------------------------------------------------------------------

    def setup(self) -> None:
        s = self.sizes
        self.t_start = time.monotonic()
        self.log(f"work directory {self.work}")
        self.original = self.path("original.zarr")
        adata = write_atlas(self.original, s.n_obs, s.n_vars, s.n_dims, seed=7)
        self.user_cols = list(adata.obs.columns)
        self.remember(self.original, adata)
        self.orig_obs = self.originals["original.zarr"]["obs"]
        self.expected_pickle = self.path("obs.pkl")
        self.orig_obs.to_pickle(self.expected_pickle)
        self.log(f"store written by anndata: {s.n_obs:,} cells × {s.n_vars} genes, "
                 f"{len(self.user_cols)} obs columns ({N_USER_COLUMNS} user columns)")

    def reference(self) -> None:
        """The clean run every result is compared with, and an earlier run (other length
        scale, so its values differ everywhere) that the overwriting runs replace."""
        ref = self.copy(self.original, "reference.zarr")
        drv = Driver(self, ref, name="reference")
        if drv.wait() != 0:
            raise RuntimeError(f"the clean reference run failed:\n{drv.tail()}")
        self.t_clean = drv.wall or float("nan")
        self.ref = self._fields(ref)
        self.log(f"clean reference run: kd.de {self.t_clean:.1f} s, {len(self.ref)} result fields")
        self.old_store = self.copy(self.original, "old_run.zarr")
        drv = Driver(self, self.old_store, settings=self.sizes.settings(ls=self.sizes.ls * 2), name="earlier-run")
        if drv.wait() != 0:
            raise RuntimeError(f"the earlier run failed:\n{drv.tail()}")
        self.old = self._fields(self.old_store)
        same = [k for k in self.ref if same_array(self.ref[k], self.old.get(k, np.array([])))]
        self.log(f"earlier run (ls × 2) for the overwrite faults; fields equal to the clean run's: {same or 'none'}")

    def _fields(self, path: str) -> dict[str, np.ndarray]:
        import anndata as ad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return kompot_fields(ad.read_zarr(path))

    def identical(self, path: str, row: Row, ref: dict[str, np.ndarray] | None = None) -> None:
        diff = differing(self._fields(path), self.ref if ref is None else ref)
        row.identical = "yes" if not diff else "no"
        if diff:
            row.problems.append(f"differs from the clean run in {diff}")

    def nothing_visible(self, adata, row: Row) -> None:
        if adata is not None and kompot_fields(adata):
            row.problems.append(f"run fields visible to anndata: {sorted(kompot_fields(adata))}")
        if adata is not None and "kompot_de" in adata.uns:
            row.problems.append("run record visible to anndata")

    # ---- 1. client killed during the landmark step -------------------------------------

    def fault_landmarks(self) -> list[Row]:
        row = Row("1", "client SIGKILL during the landmark step (k-means)")
        s = self.sizes
        lm_src = self.path("landmarks_src.zarr")
        if not os.path.exists(lm_src):
            write_atlas(lm_src, s.lm_n_obs, 20, s.n_dims, seed=8)
        path = self.copy(lm_src, "f1.zarr")
        before = tree_digest(path)
        import anndata as ad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm_obs = ad.read_zarr(path).obs.copy()
        drv = Driver(self, path, settings=s.settings(n_landmarks=s.lm_n_landmarks, kompot_path=True),
                     name="1-landmarks")
        line = drv.wait_line("LANDMARKS", 180)
        if line is None:
            row.problems.append("the landmark step never started")
            drv.kill()
            drv.wait()
            row.outcome = drv.tail(5)
            return [row]
        t_lm = time.monotonic()
        client = psutil.Process(drv.proc.pid)
        known = {int(p) for p in line.split()[1].split(",") if p.isdigit()}
        helpers: set[int] = set()
        while time.monotonic() < t_lm + self.args.landmark_kill_s and not drv.has("LANDMARKS-DONE"):
            try:
                helpers |= {p.pid for p in client.children(recursive=True) if p.pid not in known}
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        helpers = {h for h in helpers if psutil.pid_exists(h)}
        done_first = drv.has("LANDMARKS-DONE")
        alive = [_describe(p) for p in _marked(drv.mark)]
        drv.kill()
        drv.wait()
        if done_first:
            row.problems.append("k-means finished before the kill (raise --landmark-kill-s or lm sizes)")
        if not helpers:
            row.problems.append("no k-means helper process was running at the kill")
        took = self.leftover_check(drv, row)
        # anndata first, before any kompot_dask call
        a = ad.read_zarr(path)
        try:
            pd.testing.assert_frame_equal(a.obs, lm_obs)
        except AssertionError:
            self._lost(row, "obs columns differ")
        self.nothing_visible(a, row)
        if tree_digest(path) != before:
            row.problems.append("store files changed")
        self.opener(path)
        if tree_digest(path) != before:
            row.problems.append("store files changed after the opener")
        lease = self.lease_check(path, row)
        from kompot_dask._io import commit

        kept = commit.staged_bytes(path)
        row.outcome = (f"killed {self.args.landmark_kill_s:.1f} s into the landmark step "
                       f"({s.lm_n_landmarks} k-means landmarks of {s.lm_n_obs:,} cells): {len(alive)} processes "
                       f"alive (client, {len(helpers)} k-means helper(s), cluster worker, resource tracker), all "
                       f"gone {took:.1f} s after the kill; "
                       f"store files unchanged ({kept / 2**10:.0f} KiB hidden staging); {lease}")
        return [row]

    # ---- 2. client killed at ~80 % of the gene blocks, rerun resumes -------------------

    def fault_blocks(self) -> list[Row]:
        from kompot_dask._io import commit

        row = Row("2", "client SIGKILL at ~80 % of the gene-block tasks; rerun resumes")
        s = self.sizes
        # A wider store than the others, so that the gene blocks are most of a run's work.
        src = self.path("blocks_src.zarr")
        self.remember(src, write_atlas(src, s.n_obs, s.f2_n_vars, s.n_dims, seed=7))
        gene_block = s.f2_n_vars // 10
        settings = s.settings(gene_block=gene_block, null_gene_block=gene_block)
        n_blocks = math.ceil(s.f2_n_vars / gene_block)
        clean = self.copy(src, "f2_clean.zarr")
        drv = Driver(self, clean, settings=settings, name="2-clean")
        if drv.wait() != 0:
            row.problems.append(f"clean run failed: {drv.tail(8)}")
            return [row]
        t_clean, ref = drv.wall or float("nan"), self._fields(clean)
        path = self.copy(src, "f2.zarr")
        n_kill = math.ceil(0.8 * n_blocks)
        preload = self.path("preload_slow.py")
        with open(preload, "w") as fh:
            fh.write(PRELOAD_SLOW.format(delay=self.args.block_delay_s))
        drv = Driver(self, path, kill=f"blocks:{n_kill}", preload=preload, settings=settings, name="2-blocks-killed")
        rc = drv.wait()
        killed = drv.value("KILL")
        if rc != -signal.SIGKILL or not killed:
            row.problems.append(f"not killed (rc {rc}): {drv.tail(5)}")
            return [row]
        done = int(killed.split()[-1])
        self.leftover_check(drv, row)
        a = self.check_user_data(path, row, "after the kill", src)
        self.nothing_visible(a, row)
        staged = commit.staged_bytes(path)
        rerun = Driver(self, path, settings=settings, name="2-rerun")
        if rerun.wait() != 0:
            row.problems.append(f"rerun failed: {rerun.tail(8)}")
            return [row]
        t_rerun = rerun.wall or float("nan")
        self.check_user_data(path, row, "after the rerun", src)
        resumed = self.check_resumed(path, row, ref)
        row.outcome = (f"{s.f2_n_vars} genes: killed at {done}/{n_blocks} gene blocks; nothing visible to anndata "
                       f"({staged / 2**20:.1f} MiB hidden staging kept); rerun reused "
                       f"{resumed.get('tasks_reused', 0)} finished tasks (ran {resumed.get('tasks_run', '?')}): kd.de "
                       f"{t_rerun:.1f} s vs {t_clean:.1f} s clean ({100 * (1 - t_rerun / t_clean):.0f} % saved)")
        return [row]

    def check_resumed(self, path: str, row: Row, ref: dict[str, np.ndarray]) -> dict:
        """After a rerun of a killed run: it reused finished tasks, its results equal the
        clean run's, and no staging is left in ``path``. Returns the run's ``resumed``."""
        import kompot_dask as kd
        from kompot_dask._io import commit

        resumed = kd.RunInfo(path, -1).record.get("resumed") or {}
        if not resumed.get("tasks_reused"):
            row.problems.append("the rerun did not reuse any task")
        self.identical(path, row, ref)
        if commit.list_staging(path):
            row.problems.append(f"staging left in {os.path.basename(path)} after the rerun")
        return resumed

    # ---- 9. a read-only input and a results store: client killed, rerun ---------------

    def fault_results_store(self) -> list[Row]:
        from kompot_dask._io import commit

        row = Row("9", "read-only input, results store: client SIGKILL at ~80 % of the gene blocks; rerun")
        s = self.sizes
        src = self.path("blocks_src.zarr")
        if not os.path.exists(src):
            self.remember(src, write_atlas(src, s.n_obs, s.f2_n_vars, s.n_dims, seed=7))
        gene_block = s.f2_n_vars // 10
        settings = s.settings(gene_block=gene_block, null_gene_block=gene_block)
        n_blocks = math.ceil(s.f2_n_vars / gene_block)
        clean = self.copy(src, "f9_clean.zarr")  # the same run, in place
        drv = Driver(self, clean, settings=settings, name="9-clean")
        if drv.wait() != 0:
            row.problems.append(f"clean run failed: {drv.tail(8)}")
            return [row]
        ref = self._fields(clean)
        inp = self.copy(src, "f9_input.zarr")
        subprocess.run(["chmod", "-R", "a-w", inp], check=True)
        before = tree_digest(inp)
        results = self.path("f9_results.zarr")
        settings = dict(settings, results_store=results)
        preload = self.path("preload_slow9.py")
        with open(preload, "w") as fh:
            fh.write(PRELOAD_SLOW.format(delay=self.args.block_delay_s))
        drv = Driver(self, inp, kill=f"blocks:{math.ceil(0.8 * n_blocks)}", preload=preload, settings=settings,
                     name="9-killed")
        rc = drv.wait()
        killed = drv.value("KILL")
        if rc != -signal.SIGKILL or not killed:
            row.problems.append(f"not killed (rc {rc}): {drv.tail(5)}")
            subprocess.run(["chmod", "-R", "u+w", inp], check=False)
            return [row]
        self.leftover_check(drv, row)
        if tree_digest(inp) != before:
            self._lost(row, "the read-only input changed at the kill")
        import anndata as ad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.nothing_visible(ad.read_zarr(results), row)
        staged = commit.staged_bytes(results)
        rerun = Driver(self, inp, settings=settings, name="9-rerun")
        if rerun.wait() != 0:
            row.problems.append(f"rerun failed: {rerun.tail(8)}")
            subprocess.run(["chmod", "-R", "u+w", inp], check=False)
            return [row]
        if tree_digest(inp) != before:
            self._lost(row, "the read-only input changed in the rerun")
        subprocess.run(["chmod", "-R", "u+w", inp], check=False)
        resumed = self.check_resumed(results, row, ref)
        row.outcome = (f"input chmod a-w, byte-identical throughout; killed at {killed.split()[-1]}/{n_blocks} gene "
                       f"blocks: nothing visible in the results store ({staged / 2**20:.1f} MiB staging kept there); "
                       f"rerun reused {resumed.get('tasks_reused', 0)} tasks")
        return [row] + [self._results_store_commit_kill(f"9{'bc'[i]}", point, label, inp, settings, ref)
                        for i, (point, label) in enumerate((("journal", "right after the journal"),
                                                            ("move:1", "after the 1st rename")))]

    def _results_store_commit_kill(self, num: str, point: str, label: str, inp: str, settings: dict,
                                   ref: dict[str, np.ndarray]) -> Row:
        """Client SIGKILLed inside the commit of a first run into a new results store: the
        input stays byte-identical; anndata reads the results store at once; the next
        opener completes the run (the journal was written before both points)."""
        import anndata as ad

        import kompot_dask as kd

        row = Row(num, f"read-only input, new results store: client SIGKILL inside the commit, {label}")
        results = self.path(f"f{num}_results.zarr")
        subprocess.run(["chmod", "-R", "a-w", inp], check=True)
        before = tree_digest(inp)
        try:
            drv = Driver(self, inp, kill=point, settings=dict(settings, results_store=results), name=f"{num}-commit")
            rc = drv.wait()
            if rc != -signal.SIGKILL or not drv.has(f"KILL {point}"):
                row.problems.append(f"not killed at {point} (rc {rc}): {drv.tail(5)}")
                return row
            self.leftover_check(drv, row)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    seen = sorted(kompot_fields(ad.read_zarr(results)))
                except Exception as exc:
                    self._lost(row, f"anndata cannot read the results store before recovery: {exc}")
                    seen = []
            n_runs = self.run_count(results)  # the opener completes the journaled change
            if n_runs != 1:
                row.problems.append(f"{n_runs} runs recorded after the opener, expected 1")
            self.identical(results, row, ref)
            if tree_digest(inp) != before:
                self._lost(row, "the read-only input changed")
            if kd.RunInfo(results).missing_fields:
                row.problems.append("the run record names missing fields")
        finally:
            subprocess.run(["chmod", "-R", "u+w", inp], check=False)
        row.outcome = (f"input byte-identical; anndata read the results store before recovery ({len(seen)} result "
                       f"fields visible); after the opener: {n_runs} run(s) recorded")
        return row

    # ---- 3. client killed inside the commit of an overwriting run ----------------------

    KILL_POINTS = [
        ("stage:3", "while staging obs/var/uns (3rd element)"),
        ("journal", "right after the journal"),
        ("move:1", "after the 1st rename"),
        ("move:6", "after the 6th rename"),
        ("attrs", "after obs column-order"),
        ("consolidate", "after the consolidated metadata"),
    ]

    def _overlapped(self, jobs: list[tuple[Row, Callable[[], Driver], Callable[[Driver], None]]]) -> None:
        """Run the drivers of ``jobs`` up to ``--jobs`` at a time (their start-up phases overlap);
        each is checked once it has ended, while the next one runs."""
        queue = list(jobs)
        running: list[tuple[Row, Driver, Callable[[Driver], None], float]] = []
        while queue or running:
            while queue and len(running) < max(1, self.args.jobs):
                row, start, check = queue.pop(0)
                t0 = time.monotonic()
                try:
                    running.append((row, start(), check, t0))
                except Exception as exc:
                    row.problems.append(f"benchmark error: {type(exc).__name__}: {exc}"[:300])
                    row.wall = time.monotonic() - t0
            if not running:
                continue
            row, drv, check, t0 = running.pop(0)
            try:
                drv.wait()
                check(drv)
            except Exception as exc:
                row.problems.append(f"benchmark error: {type(exc).__name__}: {exc}"[:300])
                traceback.print_exc()
            finally:
                row.wall = time.monotonic() - t0
                self.log(f"  {row.num}: {row.outcome or row.problems}")

    def fault_commit(self) -> list[Row]:
        rows, jobs = [], []
        for i, (point, label) in enumerate(self.KILL_POINTS):
            row = Row(f"3{'abcdef'[i]}", f"client SIGKILL inside the commit of an overwriting run: {label}")
            rows.append(row)
            path = self.path(f"f3_{i}.zarr")

            def start(path=path, point=point) -> Driver:
                return Driver(self, self.copy(self.old_store, os.path.basename(path)), kill=point,
                              name=f"3-{point.replace(':', '')}")

            jobs.append((row, start, lambda drv, row=row, path=path, point=point: self._check_commit_kill(
                row, drv, path, point)))
        self._overlapped(jobs)
        return rows

    def _check_commit_kill(self, row: Row, drv: Driver, path: str, point: str) -> None:
        import kompot_dask as kd
        from kompot_dask._io import commit

        rc = drv.wait()
        if rc != -signal.SIGKILL or not drv.has(f"KILL {point}"):
            row.problems.append(f"not killed at {point} (rc {rc}): {drv.tail(5)}")
            return
        self.leftover_check(drv, row)
        journal = os.path.exists(os.path.join(path, commit.JOURNAL))
        a = self.check_user_data(path, row, "before recovery")
        seen = classify(kompot_fields(a), self.old, self.ref) if a is not None else "unreadable"
        # the next kompot_dask opener completes (or forgets) the change
        info = kd.RunInfo(path, -1)
        n_runs = info.run_id + 1
        a = self.check_user_data(path, row, "after recovery")
        state = classify(kompot_fields(a), self.old, self.ref) if a is not None else "unreadable"
        if os.path.exists(os.path.join(path, commit.JOURNAL)):
            row.problems.append("journal still pending after the opener")
        expected = "new" if journal else "old"
        if state != expected:
            row.problems.append(f"after recovery the fields are {state}, expected {expected}")
            if state.startswith("mix"):
                self._lost(row, f"mixed state after recovery: {state}")
        if n_runs != (2 if state == "new" else 1):
            row.problems.append(f"{n_runs} runs recorded with {state} fields")
        missing = info.missing_fields
        if missing:
            row.problems.append(f"the run record names missing fields {missing}")
        if state == "new":
            self.identical(path, row)
        else:
            row.identical = "n.a."
            diff = differing(kompot_fields(a), self.old) if a is not None else ["all"]
            if diff:
                self._lost(row, f"old run's fields changed: {diff}")
        row.outcome = (f"journal {'written' if journal else 'not written'}; anndata before recovery sees "
                       f"{seen}; after the opener: {state} state, {n_runs} run(s) recorded")

    # ---- 4. readers beside a writer ------------------------------------------------------

    def fault_readers(self) -> list[Row]:
        row = Row("4", "2 reader processes (ad.read_zarr + kd.RunInfo) while a writer overwrites a run twice")
        path = self.copy(self.old_store, "f4.zarr")
        stop = self.path("f4.stop")
        if os.path.exists(stop):
            os.remove(stop)
        reader_path = self.path("reader.py")
        with open(reader_path, "w") as fh:
            fh.write(READER)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        readers = [subprocess.Popen([sys.executable, reader_path, path, stop, self.expected_pickle], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        walls = []
        try:
            time.sleep(2)
            for _ in range(2):
                drv = Driver(self, path, name="4-writer")
                if drv.wait() != 0:
                    row.problems.append(f"writer failed: {drv.tail(8)}")
                    break
                walls.append(drv.wall or float("nan"))
        finally:
            open(stop, "w").close()
        results = []
        for r in readers:
            out, err = r.communicate(timeout=300)
            line = next((ln for ln in out.splitlines() if ln.startswith("READER ")), None)
            if line is None:
                row.problems.append(f"a reader crashed: {err[-300:]}")
                continue
            results.append(json.loads(line[len("READER "):]))
        reads = sum(r["reads"] for r in results)
        anomalies = sum(r["anomalies"] for r in results)
        notes = sorted({n for r in results for n in r["notes"]})
        if anomalies:
            row.problems.append(f"{anomalies} anomalies: {notes}")
        if reads < 4:
            row.problems.append("the readers hardly got to read")
        self.check_user_data(path, row, "after the runs")
        self.identical(path, row)
        n_runs = self.run_count(path)
        row.outcome = (f"{reads} reads ({sum(r['runinfo_reads'] for r in results)} with RunInfo), "
                       f"{anomalies} anomalies; writer kd.de {' + '.join(f'{w:.1f}' for w in walls)} s; "
                       f"{n_runs} runs recorded")
        return [row]

    # ---- 5. a worker killed mid-run ------------------------------------------------------

    def fault_worker(self) -> list[Row]:
        row = Row("5", "a Dask worker process SIGKILLed mid-run (default embedded cluster)")
        path = self.copy(self.original, "f5.zarr")
        signals = self.path("f5_signals")
        shutil.rmtree(signals, ignore_errors=True)
        os.makedirs(signals)
        armed = os.path.join(signals, "armed")
        open(armed, "w").close()
        preload = self.path("preload_hold.py")
        with open(preload, "w") as fh:
            fh.write(PRELOAD_HOLD.format(signals=signals))
        drv = Driver(self, path, preload=preload, name="5-worker")
        killed_pid, is_child = None, False
        deadline = time.monotonic() + 180
        try:
            while time.monotonic() < deadline and drv.proc.poll() is None:
                running = [f for f in os.listdir(signals) if f.startswith("running-")]
                if running:
                    killed_pid = int(running[0].split("-", 1)[1])
                    is_child = killed_pid in {p.pid for p in psutil.Process(drv.proc.pid).children(recursive=True)}
                    os.kill(killed_pid, signal.SIGKILL)
                    time.sleep(0.5)
                    break
                time.sleep(0.05)
        finally:
            os.remove(armed)
        rc = drv.wait()
        if killed_pid is None:
            row.problems.append("no block task ran while the hold was armed")
        elif not is_child:
            row.problems.append(f"pid {killed_pid} was not a process of the run")
        if rc != 0:
            row.problems.append(f"run failed (rc {rc}): {drv.tail(8)}")
            row.outcome = "run failed"
            return [row]
        self.check_user_data(path, row, "after the run")
        self.identical(path, row)
        row.outcome = (f"worker pid {killed_pid} killed while it ran a gene block; the nanny restarted it and "
                       f"the run completed: kd.de {drv.wall:.1f} s vs {self.t_clean:.1f} s clean")
        return [row]

    # ---- 6. disk full ------------------------------------------------------------------

    def _mount(self, name: str, size: int) -> str | None:
        d = self.path(name)
        os.makedirs(d, exist_ok=True)
        rc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], capture_output=True)
        if rc.returncode != 0:
            return None
        self.mounts.append(d)
        return d

    def _resize(self, d: str, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", d], check=True, capture_output=True)

    def _umount(self, d: str) -> None:
        subprocess.run(["umount", d], capture_output=True)
        if d in self.mounts:
            self.mounts.remove(d)

    @staticmethod
    def _used(d: str) -> int:
        st = os.statvfs(d)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _failed_run_checks(self, drv: Driver, path: str, before: dict[str, str], row: Row, where: str,
                           may_succeed: bool = False) -> str:
        """A run that failed on a full disk: a clear error, the store unchanged, no lease."""
        from kompot_dask._io import commit

        rc = drv.wait()
        err = drv.error
        if rc == 0 and may_succeed:
            return "the run fit and succeeded"
        if rc == 0 or err is None:
            row.problems.append(f"{where}: the run did not fail (rc {rc}): {drv.tail(6)}")
            return "did not fail"
        msg = err["message"]
        frames = set(err["frames"])
        if err["type"] == "InfeasiblePlanError":
            phase = "the planner, before any write"
            clear = "disk" in msg
        else:
            clear = err.get("errno") == errno.ENOSPC or "No space left" in msg
            if {"begin", "change_journal", "commit_journal", "_stage_elements"} & frames:
                phase = "the commit (before the journal)"
            elif {"store_lock", "acquire", "open_run_staging", "save_run_state"} & frames:
                phase = "the start (lease/staging)"
            elif "_save_fit_task" in frames:
                phase = "the fit saved for a resume (staging)"
            elif {"write_tile", "write_marker"} & frames:
                phase = "the layer writes"
            elif "run_engine" in frames:
                phase = "the block tasks"
            else:
                phase = "?"
        if not clear:
            row.problems.append(f"{where}: unclear error {err['type']}: {msg[:200]}")
        a = self.check_user_data(path, row, where)
        self.nothing_visible(a, row)
        if tree_digest(path) != before:
            row.problems.append(f"{where}: store files changed")
        if os.path.exists(os.path.join(path, commit.JOURNAL)):
            row.problems.append(f"{where}: a journal was left")
        lease = self.lease_check(path, row)
        first = next((ln.strip() for ln in msg.splitlines() if "disk" in ln or "space" in ln), msg.splitlines()[0]
                     if msg else "")
        self.log(f"    {err['type']} frames: {err['frames'][-6:]}")
        return f"{err['type']} in {phase} (\"{first[:100]}\"); store unchanged; {lease}"

    def fault_disk_full(self) -> list[Row]:
        plan = [(Row("6a", "tmpfs smaller than the run's outputs"), self._disk_small),
                (Row("6b", "tmpfs sized just above the planner's disk estimate: fills during the run; "
                           "enlarged, rerun"), self._disk_estimate),
                (Row("6c", "tmpfs sized so the staged layers fit but the commit does not; enlarged, rerun"),
                 self._disk_commit),
                (Row("6d", "run started on an already full disk; space freed, rerun at once"), self._disk_full_start)]
        if not self.args.quick:
            plan.append((Row("6e", "disk filled by another writer once the layers are being written; freed, rerun"),
                         self._disk_filled))
        rows = [r for r, _ in plan]
        probe = self._mount("f6_probe", 1 << 20)
        if probe is None:
            for r in rows:
                r.outcome = "skipped (no tmpfs)"
            return rows
        self._umount(probe)
        s = self.sizes
        raw_layers = 3 * s.n_obs * s.n_vars * 4
        big = 8 * (raw_layers + (64 << 20))
        self.usage: dict[str, int] = {}
        self.plan_need: int | None = None
        for row, fn in plan:
            t0 = time.monotonic()
            d = self._mount(f"f6{row.num[-1]}", big)
            try:
                path = self.copy(self.original, "store.zarr", d)
                fn(row, d, path, big, raw_layers)
            except Exception as exc:
                row.problems.append(f"benchmark error: {type(exc).__name__}: {exc}"[:300])
                traceback.print_exc()
            finally:
                self._umount(d)
                row.wall = time.monotonic() - t0
                self.log(f"  {row.num}: {row.outcome or row.problems}")
        return rows

    def _rerun(self, row: Row, path: str, *, usage: bool = False) -> str:
        """Rerun the same call once space is back: it must succeed with the clean results."""
        import kompot_dask as kd

        rerun = Driver(self, path, usage=usage, name="6-rerun")
        if rerun.wait() != 0:
            row.problems.append(f"rerun failed: {rerun.tail(8)}")
            return "rerun FAILED"
        if usage:
            self.usage = {ln.split()[1]: int(ln.split()[2]) for ln in rerun.lines if ln.startswith("USAGE")}
        self.check_user_data(path, row, "after the rerun")
        self.identical(path, row)
        resumed = kd.RunInfo(path, -1).record.get("resumed") or {}
        reused = f", reused {resumed['tasks_reused']} tasks" if resumed.get("tasks_reused") else ""
        return f"rerun OK (kd.de {rerun.wall:.1f} s{reused})"

    def _disk_small(self, row: Row, d: str, path: str, big: int, raw_layers: int) -> None:
        from kompot_dask._io import commit

        before = tree_digest(path)
        size = self._used(d) + int(0.3 * raw_layers)
        self._resize(d, size)
        drv = Driver(self, path, name="6a-small")
        what = self._failed_run_checks(drv, path, before, row, "after the failure")
        found = re.search(r"outputs need ([\d.]+) ([kMGT]?i?B)", (drv.error or {}).get("message", ""))
        if found:
            units = {"B": 1, "kiB": 2**10, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
            self.plan_need = int(float(found.group(1)) * units.get(found.group(2), 1))
        kept = commit.staged_bytes(path)
        row.outcome = f"tmpfs {size / 2**20:.1f} MiB: {what}; {kept / 2**20:.1f} MiB staging kept"

    def _disk_estimate(self, row: Row, d: str, path: str, big: int, raw_layers: int) -> None:
        from kompot_dask._io import commit

        before = tree_digest(path)
        u0 = self._used(d)
        need = self.plan_need or int(1.01 * raw_layers)
        free = int(need * 1.02) + (64 << 10)
        self._resize(d, u0 + free)
        drv = Driver(self, path, usage=True, name="6b-estimate")
        what = self._failed_run_checks(drv, path, before, row, "after the failure", may_succeed=True)
        kept = commit.staged_bytes(path)
        self._resize(d, big)
        if drv.proc.returncode == 0:
            self.usage = {ln.split()[1]: int(ln.split()[2]) for ln in drv.lines if ln.startswith("USAGE")}
            again = "no rerun needed"
        else:
            again = self._rerun(row, path, usage=True)
        took = ""
        if "staged" in self.usage:
            took = (f" (planner's estimate {need / 2**20:.2f} MiB; at its commit the rerun's staging held "
                    f"{(self.usage['staged'] - u0) / 2**20:.2f} MiB, before the commit's own reserve)")
        row.outcome = (f"{free / 2**20:.2f} MiB free{took}: {what}; {kept / 2**20:.1f} MiB staging kept; "
                       f"enlarged, {again}")

    def _disk_filled(self, row: Row, d: str, path: str, big: int, raw_layers: int) -> None:
        from kompot_dask._io import commit

        before = tree_digest(path)
        drv = Driver(self, path, name="6e-filled")
        filled: list[str] = []
        staging_root = os.path.join(path, commit.STAGING_DIR)

        def fill_when_layers_start():
            while drv.proc.poll() is None:
                for root, _dirs, files in os.walk(staging_root):
                    if os.sep + "layers" + os.sep in root + os.sep and any(not f.startswith(".") and f[0].isdigit()
                                                                           for f in files):
                        filled.append(self._fill(d))
                        return
                time.sleep(0.01)

        filler = threading.Thread(target=fill_when_layers_start, daemon=True)
        filler.start()
        what = self._failed_run_checks(drv, path, before, row, "after the failure")
        filler.join(10)
        if not filled:
            row.problems.append("the disk was never filled (no layer tile seen)")
        kept = commit.staged_bytes(path)
        for f in filled:
            os.remove(f)
        again = self._rerun(row, path)
        row.outcome = (f"disk filled once the first layer tile was written: {what}; {kept / 2**20:.1f} MiB "
                       f"staging kept; ballast removed, {again}")

    def _disk_commit(self, row: Row, d: str, path: str, big: int, raw_layers: int) -> None:
        from kompot_dask._io import commit

        if "elements" not in self.usage:
            raise RuntimeError("no disk usage measured (6b must run first)")
        before = tree_digest(path)
        size = self.usage["elements"] + (384 << 10)  # staging and its elements fit; the commit's reserve does not
        self._resize(d, size)
        what = self._failed_run_checks(Driver(self, path, name="6c-commit"), path, before, row, "after the failure")
        kept = commit.staged_bytes(path)
        self._resize(d, big)
        again = self._rerun(row, path)
        row.outcome = f"tmpfs {size / 2**20:.1f} MiB: {what}; {kept / 2**20:.1f} MiB staging kept; enlarged, {again}"

    def _disk_full_start(self, row: Row, d: str, path: str, big: int, raw_layers: int) -> None:
        before = tree_digest(path)
        ballast = self._fill(d)
        what = self._failed_run_checks(Driver(self, path, name="6d-full"), path, before, row, "after the failure")
        os.remove(ballast)  # space back: the next run must not find a lease in its way
        waited = 0.0
        rerun = Driver(self, path, name="6d-rerun")
        rc = rerun.wait()
        while rc != 0 and (rerun.error or {}).get("type") == "StoreLockedError" and waited < 30:
            if not waited:
                row.problems.append(f"the rerun right after was refused: {rerun.error['message'][:200]}")
            time.sleep(2)
            waited += 2
            rerun = Driver(self, path, name="6d-rerun")
            rc = rerun.wait()
        if rc != 0:
            row.problems.append(f"rerun failed: {rerun.tail(8)}")
            again = "rerun FAILED"
        else:
            self.check_user_data(path, row, "after the rerun")
            self.identical(path, row)
            again = f"rerun at once OK (kd.de {rerun.wall:.1f} s)" if not waited else \
                f"rerun OK only {waited:.0f} s later"
        row.outcome = f"{what}; ballast removed, {again}"

    @staticmethod
    def _fill(d: str) -> str:
        """A ballast file that takes every free byte of ``d`` (written until ENOSPC)."""
        ballast = os.path.join(d, f"ballast-{uuid.uuid4().hex[:6]}")
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for chunk in (1 << 20, 1 << 12):
                buf = b"\0" * chunk
                while True:
                    try:
                        if os.write(fd, buf) < chunk:
                            break
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return ballast

    # ---- 7. damaged input chunks ---------------------------------------------------------

    def fault_chunks(self) -> list[Row]:
        rows, jobs = [], []
        for sub, what in (("a", "deleted"), ("b", "truncated")):
            row = Row(f"7{sub}", f"a {what} chunk file of the input layer (manifest recorded)")
            rows.append(row)
            state: dict[str, Any] = {}
            jobs.append((row, lambda sub=sub, what=what, state=state: self._damage_and_run(sub, what, state),
                         lambda drv, row=row, state=state: self._check_damage(row, drv, state)))
        self._overlapped(jobs)
        return rows

    def _damage_and_run(self, sub: str, what: str, state: dict[str, Any]) -> Driver:
        import kompot_dask as kd

        verify = getattr(kd, "verify", None)
        if verify is None:
            from kompot_dask._io.manifest import verify
        path = self.copy(self.original, f"f7{sub}.zarr")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verify(path, record=True)  # a chunk manifest for the anndata-written layer
        elem = os.path.join(path, "layers", LAYER)
        chunks = sorted(f for f in os.listdir(elem) if not f.startswith("."))
        key = chunks[len(chunks) // 2]
        chunk = os.path.join(elem, key)
        if what == "deleted":
            os.remove(chunk)
        else:
            with open(chunk, "rb") as fh:
                data = fh.read()
            with open(chunk, "wb") as fh:
                fh.write(data[: len(data) // 2])
        state.update(path=path, key=key, before=tree_digest(path))
        return Driver(self, path, name=f"7-{what}")

    def _check_damage(self, row: Row, drv: Driver, state: dict[str, Any]) -> None:
        path, key = state["path"], state["key"]
        rc = drv.wait()
        err = drv.error
        if rc == 0 or err is None:
            row.problems.append(f"the run did not fail (rc {rc})")
            return
        msg = err["message"]
        if err["type"] != "StoreIntegrityError":
            row.problems.append(f"error is {err['type']}, not StoreIntegrityError: {msg[:200]}")
        if f"'{key}'" not in msg or LAYER not in msg:
            row.problems.append(f"the error does not name layer {LAYER!r} and chunk {key!r}: {msg[:200]}")
        if tree_digest(path) != state["before"]:
            row.problems.append("the failed run changed the store")
        cli = [os.path.join(os.path.dirname(sys.executable), "kompot-dask"), "verify", path]
        if not os.path.exists(cli[0]):
            cli = [sys.executable, "-m", "kompot_dask.cli", "verify", path]
        out = subprocess.run(cli, capture_output=True, text=True, timeout=300)
        listed = key in out.stdout and out.returncode == 1
        if not listed:
            row.problems.append(f"`kompot-dask verify` (rc {out.returncode}) does not list {key}: {out.stdout[-300:]}")
        detail = re.sub(r"^store '[^']*': ", "", msg)
        detail = re.sub(r" \(element '[^']*'\)", "", detail).split(". ")[0].split(" (")[0]
        row.outcome = (f"{err['type']}: \"{detail[:120]}\"; store unchanged; `kompot-dask verify` exit "
                       f"{out.returncode}, lists chunk {key}" + ("" if listed else " NOT"))
        self.check_user_data_obs_only(path, row)

    def check_user_data_obs_only(self, path: str, row: Row) -> None:
        """obs as anndata reads it (the whole store cannot be read: its layer is damaged on purpose)."""
        import anndata as ad
        import zarr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs = ad.io.read_elem(zarr.open_group(path, mode="r")["obs"])
        try:
            pd.testing.assert_frame_equal(obs[self.user_cols], self.orig_obs)
        except (AssertionError, KeyError):
            self._lost(row, "user obs columns differ")

    # ---- 8. a second writer --------------------------------------------------------------

    def fault_second_writer(self) -> list[Row]:
        from kompot_dask._io.lease import lock_holder

        row = Row("8", "a second writer process (kd.de on the same store) while a run is going")
        path = self.copy(self.original, "f8.zarr")
        preload = self.path("preload_slow8.py")  # the first run lasts long enough for the second to meet it
        with open(preload, "w") as fh:
            fh.write(PRELOAD_SLOW.format(delay=1.0))
        first = Driver(self, path, preload=preload, name="8-first")
        deadline = time.monotonic() + 120
        held = False
        while time.monotonic() < deadline and first.proc.poll() is None:
            holder = lock_holder(path)
            if holder and holder.get("pid") == first.proc.pid:
                held = True
                break
            time.sleep(0.05)
        if not held:
            row.problems.append(f"the first run never held the lease: {first.tail(5)}")
        second = Driver(self, path, name="8-second")
        rc2 = second.wait(300)
        err = second.error or {}
        still_running = first.proc.poll() is None
        if rc2 == 0 or err.get("type") != "StoreLockedError":
            row.problems.append(f"the second writer was not refused (rc {rc2}): {second.tail(5)}")
            verdict = f"not refused (rc {rc2})"
        else:
            verdict = (f"StoreLockedError after {err['wall']:.2f} s in kd.de "
                       f"(\"{re.sub(r'the store [^ ]+ ', 'the store ', err['message'])[:110]}…\")")
        if not still_running:
            row.problems.append("the first run had ended before the second writer was refused")
        rc = first.wait()
        if rc != 0:
            row.problems.append(f"first run failed: {first.tail(8)}")
        else:
            self.check_user_data(path, row, "after the run")
            self.identical(path, row)
        row.outcome = (f"second writer: {verdict}; first run completed (rc {rc}), "
                       f"{self.run_count(path)} run recorded")
        return [row]

    # ---- all ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        for d in list(self.mounts):
            self._umount(d)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)


FAULTS: dict[str, tuple[str, Callable[[Bench], list[Row]]]] = {
    "1": ("landmarks", Bench.fault_landmarks),
    "2": ("blocks", Bench.fault_blocks),
    "3": ("commit", Bench.fault_commit),
    "4": ("readers", Bench.fault_readers),
    "5": ("worker", Bench.fault_worker),
    "6": ("disk full", Bench.fault_disk_full),
    "7": ("chunks", Bench.fault_chunks),
    "8": ("second writer", Bench.fault_second_writer),
    "9": ("results store", Bench.fault_results_store),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small stores (~5 min on 2 cores)")
    p.add_argument("--only", nargs="+", choices=sorted(FAULTS), help="run only these faults")
    p.add_argument("--workdir", default=None, help="where the store copies go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (store copies, driver logs)")
    p.add_argument("--jobs", type=int, default=1,
                   help="faults 3 and 7: drivers run at once (their start-up phases overlap)")
    p.add_argument("--landmark-kill-s", type=float, default=4.0,
                   help="fault 1: seconds after the landmark step starts to kill the client")
    p.add_argument("--block-delay-s", type=float, default=0.25,
                   help="fault 2: extra seconds per gene-block task, so the kill lands part-way")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("kompot_dask").setLevel(logging.WARNING)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")

    bench = Bench(args)
    rows: list[Row] = []
    t_all = time.monotonic()
    try:
        bench.setup()
        bench.reference()
        for key in args.only or sorted(FAULTS):
            name, fn = FAULTS[key]
            bench.log(f"fault {key}: {name}")
            t0 = time.monotonic()
            try:
                got = fn(bench)
            except Exception as exc:
                got = [Row(key, name, problems=[f"benchmark error: {type(exc).__name__}: {exc}"[:400]])]
                traceback.print_exc()
            for r in got:
                if not r.wall:
                    r.wall = time.monotonic() - t0
                rows.append(r)
                bench.log(f"  {r.num}: {r.outcome} | data lost: {r.data_lost} | identical: {r.identical}"
                          + ("" if r.ok else f" | PROBLEMS: {r.problems}"))
    finally:
        bench.cleanup()
    total = time.monotonic() - t_all
    s = bench.sizes
    header = (f"kompot_dask fault injection ({'--quick' if args.quick else 'full'}): store of {s.n_obs:,} cells × "
              f"{s.n_vars} genes with {N_USER_COLUMNS} user obs columns, written by anndata; "
              f"{s.n_landmarks} landmarks, {s.null_genes} null genes, gene blocks of {s.gene_block}; clean kd.de "
              f"{bench.t_clean:.1f} s; total wall time {total:.0f} s on {os.cpu_count()} cores")
    print_tables(rows, header)
    bad = [r.num for r in rows if not r.ok]
    print(f"{len(rows)} checks, {len(bad)} with problems{': ' + ', '.join(bad) if bad else ''}; "
          f"total wall time {total:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
