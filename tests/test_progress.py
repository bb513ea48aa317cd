"""Progress where nobody watches a terminal: periodic log lines with done/total, elapsed time
and time left, in a log file as under SLURM."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

from kompot_dask import _progress
from kompot_dask.testing import SyntheticSpec, write_synthetic_store


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_log_progress__a_line_every_5_percent_or_30_seconds_and_at_the_end(caplog):
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="kompot_dask")
    with _progress.LogProgress(200, "kompot_dask", "task", clock=clock) as bar:
        for _ in range(9):  # 9 of 200: under 5 %, no time passed
            bar.update()
        assert [r.getMessage() for r in caplog.records] == ["kompot_dask: 200 tasks to run"]
        clock.t = 10.0
        bar.update()  # the 10th: 5 %
        clock.t = 41.0
        bar.update()  # 30 s since the last line
        clock.t = 50.0
        for _ in range(189):
            clock.t += 0.5  # 10 tasks, one 5 % step, every 5 s
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[1] == "kompot_dask: 10/200 tasks (5 %), 10.00 s elapsed, about 190.00 s left"
    assert lines[2].startswith("kompot_dask: 11/200 tasks (6 %), 41.00 s elapsed, about ")
    assert lines[-1] == "kompot_dask: 200/200 tasks (100 %), 144.50 s elapsed"
    assert "left" not in lines[-1]
    assert len(lines) == 22  # the header, the 5 % line, the 30 s line, 18 lines 10 tasks apart, the end
    assert sum("200/200" in x for x in lines) == 1


def test_log_progress__a_short_run_is_not_a_line_per_task(caplog):
    """5 % steps that come within 2 s of the last line are folded into later lines: a run
    of a second logs its header and its end."""
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="kompot_dask")
    with _progress.LogProgress(21, "kompot_dask", "task", clock=clock) as bar:
        for _ in range(21):
            clock.t += 0.05
            bar.update()
    assert [r.getMessage() for r in caplog.records] == [
        "kompot_dask: 21 tasks to run", "kompot_dask: 21/21 tasks (100 %), 1.05 s elapsed"]


def test_progress__a_bar_on_a_terminal_lines_elsewhere_nothing_when_off(monkeypatch):
    monkeypatch.setattr(_progress, "interactive", lambda: False)
    assert isinstance(_progress.progress(5, "x", "task"), _progress.LogProgress)
    monkeypatch.setattr(_progress, "interactive", lambda: True)
    bar = _progress.progress(5, "x", "task")
    assert not isinstance(bar, _progress.LogProgress) and not bar.disable
    bar.close()
    off = _progress.progress(5, "x", "task", enabled=False)
    assert off.disable


def test_de_into_a_log_file__progress_lines_not_a_bar(tmp_path):
    store = write_synthetic_store(tmp_path / "s.zarr", SyntheticSpec(n_obs=600, n_vars=40, n_dims=5, seed=2),
                                  cell_chunk=128, gene_chunk=8)
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import kompot_dask as kd

        if __name__ == "__main__":
            kd.de({store!r}, groupby="Age", condition1="Young", condition2="Old", layer="logged_counts",
                  obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=40), compute=kd.ComputeSettings(gene_block=8))
    """))
    log = tmp_path / "job.log"
    with open(log, "w") as fh:  # stderr is a file: no terminal, as in a batch job
        rc = subprocess.run([sys.executable, str(script)], stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=600).returncode
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "\r" not in text
    progress_lines = [x for x in text.splitlines() if "kompot_dask: " in x and " tasks (" in x]
    assert len(progress_lines) >= 2, text  # a few seconds of work: 5 % lines at most every 2 s
    assert "(100 %)" in progress_lines[-1] and "elapsed" in progress_lines[-1]
    assert any("left" in x for x in progress_lines)


def test_de__long_steps_announce_the_plans_estimate(tmp_path, client, caplog, monkeypatch):
    """A run worth timing plans with timed kernels, and each step the plan expects to take
    long is announced with that estimate, in order, before its progress lines. (Both
    thresholds are lowered here: on this small store every step is short.)"""
    import kompot_dask as kd
    from kompot_dask import _api

    path = write_synthetic_store(tmp_path / "s.zarr", SyntheticSpec(n_obs=900, n_vars=30, n_dims=6, seed=4),
                                 cell_chunk=256, gene_chunk=16)
    kw = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
              gp=kd.GPSettings(n_landmarks=80), fdr=kd.FDRSettings(null_genes=40),
              output=kd.OutputSettings(progress=True), client=client)
    calls: list[bool] = []
    real_make_plan = _api._make_plan

    def spy(run, c, *, timed: bool):
        calls.append(timed)
        return real_make_plan(run, c, timed=timed)

    monkeypatch.setattr(_api, "_make_plan", spy)
    caplog.set_level(logging.INFO, logger="kompot_dask")
    kd.de(path, **kw)  # default thresholds: a small run is not timed, nothing announced
    assert calls == [False]
    assert not [r for r in caplog.records if "the plan's estimate" in r.getMessage()]
    caplog.clear()
    calls.clear()
    monkeypatch.setattr(_api, "TIMED_PLAN_FLOPS", 0.0)
    monkeypatch.setattr(_api, "ANNOUNCE_SECONDS", 0.0)
    kd.de(path, **kw, storage=kd.StorageSettings(overwrite=True))
    assert calls == [False, True]
    lines = [r.getMessage() for r in caplog.records]
    steps = ["Choosing the landmarks and the length scale", "Fitting both conditions' models on the workers",
             "Scoring the gene and null-gene blocks", "Computing the FDR and writing the results"]
    at = []
    for step in steps:
        found = [i for i, line in enumerate(lines) if line.startswith(step + ": expected ~")]
        assert len(found) == 1, (step, lines)
        at.append(found[0])
    assert at == sorted(at)
    plan_line = next(line for line in lines if line.startswith("Plan: "))
    assert ", ~" in plan_line  # a timed plan states its wall time
    first_progress = next(i for i, line in enumerate(lines) if "tasks to run" in line)
    assert at[2] < first_progress < at[3]
