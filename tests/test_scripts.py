"""Plain scripts, as batch users write them: no ``if __name__ == "__main__":`` block.

Worker processes are spawned, and a spawned process imports the main script again: every
unguarded statement, a top-level ``kd.de(...)`` included, would run once more in each. An
unguarded script therefore computes in its own process (threads), and one that asks for
worker processes is refused before anything is read or written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import tree_digest

import kompot_dask as kd
from kompot_dask._engine import cluster
from kompot_dask.testing import SyntheticSpec, write_synthetic_store

SPEC = SyntheticSpec(n_obs=600, n_vars=30, n_dims=5, seed=11)


def _run_script(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "analysis.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)


def test_unguarded_script__a_run_too_large_for_threads_by_default_still_runs_once_in_this_process(tmp_path):
    store = write_synthetic_store(tmp_path / "s.zarr", SPEC, cell_chunk=128, gene_chunk=16)
    out = _run_script(tmp_path, f"""
        import logging
        import kompot_dask as kd
        from kompot_dask._engine import cluster

        logging.basicConfig(level=logging.INFO)
        with open("ran.txt", "a") as fh:  # a side effect of the script's top level
            fh.write("once\\n")
        cluster.IN_PROCESS_MAX_ELEMENTS = 0  # as if the store were an atlas: worker processes by default
        kd.de({store!r}, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
              obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=50), output=kd.OutputSettings(progress=False))
        print("RUN_ID", kd.RunInfo({store!r}, -1).run_id)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ran.txt").read_text() == "once\n"
    assert "RUN_ID 0" in out.stdout
    assert "has no `if __name__" in out.stderr and "in this process" in out.stderr


def test_unguarded_script__asking_for_worker_processes_is_refused_before_anything_is_touched(tmp_path):
    store = write_synthetic_store(tmp_path / "s.zarr", SPEC, cell_chunk=128, gene_chunk=16)
    before = tree_digest(store)
    out = _run_script(tmp_path, f"""
        import kompot_dask as kd

        kd.de({store!r}, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
              obsm_key="X_pca", compute=kd.ComputeSettings(n_workers=2), output=kd.OutputSettings(progress=False))
    """)
    assert out.returncode != 0
    assert "UnguardedScriptError" in out.stderr and 'if __name__ == "__main__":' in out.stderr
    assert "Nothing was read or written" in out.stderr
    assert tree_digest(store) == before


def test_guarded_script__worker_processes_as_asked(tmp_path):
    store = write_synthetic_store(tmp_path / "s.zarr", SPEC, cell_chunk=128, gene_chunk=16)
    out = _run_script(tmp_path, f"""
        import kompot_dask as kd

        with open("ran.txt", "a") as fh:  # unguarded: runs again in each spawned worker, harmlessly
            fh.write("top\\n")

        if __name__ == "__main__":
            kd.de({store!r}, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
                  obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=50), compute=kd.ComputeSettings(processes=True),
                  output=kd.OutputSettings(progress=False))
            print("RUN_ID", kd.RunInfo({store!r}, -1).run_id)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RUN_ID 0" in out.stdout
    assert (tmp_path / "ran.txt").read_text().count("top") >= 2  # the worker process re-imported the script


def test_check_process_context__refuses_inside_a_spawned_import(monkeypatch):
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__name__", "__mp_main__")
    with pytest.raises(kd.UnguardedScriptError, match="re-imported the main script"):
        cluster.check_process_context("kompot_dask.de", None, kd.ComputeSettings())


def test_unguarded_script__detection(tmp_path, monkeypatch):
    import types

    fake = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", fake)
    assert cluster.unguarded_script() is None  # interactive: nothing to re-import
    for body, unguarded in (("import kompot_dask\nx = 1\n", True),
                            ("if __name__ == '__main__':\n    pass\n", False),
                            ("if '__main__' == __name__:\n    pass\n", False),
                            ("def f():\n    if __name__ == '__main__':\n        pass\n", True)):
        path = tmp_path / "s.py"
        path.write_text(body)
        fake.__file__ = str(path)
        assert (cluster.unguarded_script() == str(path)) is unguarded, body
