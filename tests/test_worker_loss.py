"""Processes killed for real (SIGKILL): a Dask worker in the middle of a run, and the
client process itself during the landmark step.

A killed worker of the embedded cluster is restarted by its nanny; the run re-runs what
was lost and its results equal those of an uninterrupted run. Where it cannot go on, it
fails with ``engine.WorkerLostError``. A killed client leaves no process behind: not the
k-means helper, not the multiprocessing resource tracker, not the cluster's worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import anndata as ad
import dask
import numpy as np
import psutil
import pytest
from conftest import SMALL

import kompot_dask as kd
from kompot_dask._engine import graph as engine
from kompot_dask.testing import write_synthetic_store

KW = dict(
    groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
    gp=kd.GPSettings(n_landmarks=100, ls=50.0), fdr=kd.FDRSettings(null_genes=20),
    output=kd.OutputSettings(progress=False),
    storage=kd.StorageSettings(layer_dtype="float64", overwrite=True),
    # Three gene blocks; no client given, so each run starts its own embedded cluster.
    compute=kd.ComputeSettings(memory_limit="2GiB", gene_block=32),
)

# Loaded by every worker process of the embedded cluster (restarted ones too) through
# distributed.worker.preload: while the file "armed" exists, a gene-block task announces
# its worker's pid and waits, so the test kills a worker that surely runs a block task.
PRELOAD = '''
import os
import time

import kompot_dask._engine.graph as eng

SIGNALS = {signals!r}


def dask_setup(worker):
    inner = eng._real_block_task

    def held_block_task(ctx, block, *args, **kwargs):
        armed = os.path.join(SIGNALS, "armed")
        if os.path.exists(armed):
            open(os.path.join(SIGNALS, f"running-{{os.getpid()}}"), "w").close()
            while os.path.exists(armed):
                time.sleep(0.05)
        return inner(ctx, block, *args, **kwargs)

    eng._real_block_task = held_block_task
'''


def _results(path) -> dict[str, np.ndarray]:
    a = ad.read_zarr(path)
    out = {c: a.var[c].to_numpy(dtype=float) for c in a.var.columns if c.startswith("kompot")}
    out.update({c: a.obs[c].to_numpy(dtype=float) for c in a.obs.columns if c.startswith("kompot")})
    out.update({k: np.asarray(a.layers[k], dtype=float) for k in a.layers if k.startswith("kompot")})
    return out


class _WorkerKiller(threading.Thread):
    """Waits until a held block task announces its worker, SIGKILLs that process, then
    disarms the hold so that the restarted worker runs every task at full speed."""

    def __init__(self, signals: str, timeout: float = 120.0):
        super().__init__(daemon=True, name="worker-killer")
        self.signals = signals
        self.timeout = timeout
        self.killed_pid: int | None = None
        self.killed_at: float | None = None
        open(os.path.join(signals, "armed"), "w").close()

    def run(self):
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                running = [f for f in os.listdir(self.signals) if f.startswith("running-")]
                if running:
                    self.killed_pid = int(running[0].split("-", 1)[1])
                    os.kill(self.killed_pid, signal.SIGKILL)
                    self.killed_at = time.monotonic()
                    time.sleep(0.5)  # the signal is surely delivered before the hold ends
                    return
                time.sleep(0.05)
        finally:
            os.remove(os.path.join(self.signals, "armed"))


def _preload_config(tmp_path) -> tuple[str, dict]:
    signals = tmp_path / "signals"
    signals.mkdir()
    preload = tmp_path / "hold_block_preload.py"
    preload.write_text(PRELOAD.format(signals=os.fspath(signals)))
    return os.fspath(signals), {"distributed.worker.preload": [os.fspath(preload)]}


@pytest.fixture
def two_stores(tmp_path):
    path = write_synthetic_store(tmp_path / "killed.zarr", SMALL, cell_chunk=256, gene_chunk=32)
    copy = tmp_path / "clean.zarr"
    shutil.copytree(path, copy)
    return path, os.fspath(copy)


def test_de__worker_killed_mid_run_is_survived(tmp_path, two_stores):
    """SIGKILL of the embedded cluster's only worker while it runs a gene-block task: the
    nanny restarts it, the lost inputs and intermediates are computed again, and the
    results equal an uninterrupted run's to the last bit."""
    killed_path, clean_path = two_stores
    signals, config = _preload_config(tmp_path)
    killer = _WorkerKiller(signals)
    t0 = time.monotonic()
    with dask.config.set(config):
        killer.start()
        kd.de(killed_path, **KW)
    t_killed = time.monotonic() - t0
    killer.join()
    assert killer.killed_pid is not None, "no block task ran while the hold was armed"
    assert not psutil.pid_exists(killer.killed_pid) or psutil.Process(killer.killed_pid).status() == "zombie"

    t0 = time.monotonic()
    kd.de(clean_path, **KW)
    t_clean = time.monotonic() - t0
    print(f"run with a killed worker {t_killed:.1f} s, uninterrupted {t_clean:.1f} s")

    got, expected = _results(killed_path), _results(clean_path)
    assert got.keys() == expected.keys() and len(got) >= 6
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_de__worker_killed_without_retries_left_fails_clearly(tmp_path, small_store):
    """With no failure allowed (distributed.scheduler.allowed-failures=0) the killed
    worker's tasks are given up: WorkerLostError names the worker, says that nothing was
    written and that rerunning is safe."""
    signals, config = _preload_config(tmp_path)
    killer = _WorkerKiller(signals)
    with dask.config.set({**config, "distributed.scheduler.allowed-failures": 0}):
        killer.start()
        with pytest.raises(engine.WorkerLostError) as excinfo:
            kd.de(small_store, **KW)
    killer.join()
    message = str(excinfo.value)
    print(message)
    assert "A Dask worker died" in message
    assert "tcp://127.0.0.1:" in message  # which worker
    assert "No results were written" in message and "rerunning the same call is safe" in message
    assert not any(c.startswith("kompot") for c in ad.read_zarr(small_store).var.columns)


_BLOCK_STARTED = threading.Event()
_UNPATCHED_BLOCK_TASK = engine._real_block_task


def _slow_block_task(ctx, block, *args, **kwargs):
    _BLOCK_STARTED.set()
    time.sleep(0.5)
    return _UNPATCHED_BLOCK_TASK(ctx, block, *args, **kwargs)


def test_de__cluster_without_workers_fails_clearly(small_store, monkeypatch):
    """An external cluster that loses its only worker (no nanny to restart it) does not
    make the run wait forever: once no worker has been seen for the grace period, the run
    fails with WorkerLostError naming the worker that left."""
    from distributed import Client, LocalCluster

    monkeypatch.setattr(engine, "_NO_WORKER_GRACE_S", 1.0)
    monkeypatch.setattr(engine, "_WORKER_POLL_S", 0.2)
    started = _BLOCK_STARTED
    started.clear()
    # In-process workers unpickle the task function by name from this module.
    monkeypatch.setattr(engine, "_real_block_task", _slow_block_task)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        address = next(iter(client.nthreads()))

        def remove_worker():
            started.wait(120)
            cluster.scale(0)

        remover = threading.Thread(target=remove_worker, daemon=True)
        remover.start()
        with pytest.raises(engine.WorkerLostError, match=r"no worker for 1 s") as excinfo:
            kd.de(small_store, client=client, **{k: v for k, v in KW.items() if k != "compute"},
                  compute=kd.ComputeSettings(gene_block=8))
        remover.join()
    assert address in str(excinfo.value)


# ---------------------------------------------------------------------------
# A killed client leaves nothing behind
# ---------------------------------------------------------------------------

CLIENT_SCRIPT = '''
import os
import sys
import time

import kompot_dask as kd
import kompot_dask._numerics.gp as gp


def slow_compute_landmarks(X, n_landmarks, random_state, sample=None):
    # Runs in the k-means helper process (pickled by name from __main__).
    print(f"KMEANS {{os.getpid()}}", flush=True)
    time.sleep(120)
    raise AssertionError("the client should have been killed by now")


if __name__ == "__main__":
    gp.compute_landmarks = slow_compute_landmarks
    kd.de({path!r}, "Age", "Young", "Old", layer="logged_counts", obsm_key="X_pca",
          gp=kd.GPSettings.kompot(n_landmarks=100, ls=50.0), fdr=kd.FDRSettings(null_genes=0),
          compute=kd.ComputeSettings(memory_limit="2GiB"), output=kd.OutputSettings(progress=False))
    print("DONE", flush=True)
'''


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes started (directly or not) by the script that carries ``marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("KOMPOT_WORKER_LOSS_TEST") == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_de__killed_client_leaves_no_process_behind(tmp_path, small_store):
    """SIGKILL of a client process while k-means runs in its helper (kompot's exact path
    runs it there): the helper, the resource tracker and the embedded cluster's worker all
    exit within seconds, and nothing keeps the client's stdout open."""
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT.format(path=os.fspath(small_store)))
    marker = uuid.uuid4().hex
    env = dict(os.environ, KOMPOT_WORKER_LOSS_TEST=marker)
    proc = subprocess.Popen([sys.executable, os.fspath(script)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    helper_started = threading.Event()
    stdout_closed = threading.Event()

    def read_stdout():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("KMEANS"):
                helper_started.set()
        stdout_closed.set()

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        assert helper_started.wait(180), f"the k-means helper never started; output: {lines}"
        helper_pid = int(lines[-1].split()[1])
        before = {p.pid: " ".join(p.cmdline()) for p in _marked(marker)}
        assert helper_pid in before
        assert any("resource_tracker" in c for c in before.values())
        # the client, its worker and the helper (the length scale is given: one helper)
        assert len([c for c in before.values() if "spawn_main" in c]) >= 2, before

        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()
        while _marked(marker) and time.monotonic() < killed_at + 10:
            time.sleep(0.2)
        print(f"processes of the killed client gone after {time.monotonic() - killed_at:.1f} s")
        left = {p.pid: " ".join(p.cmdline()) for p in _marked(marker)}
        assert left == {}, f"still running 10 s after the client was killed: {left}"
        assert stdout_closed.wait(5), "something still holds the killed client's stdout"
    finally:
        for p in _marked(marker):
            p.kill()
        if proc.poll() is None:
            proc.kill()
