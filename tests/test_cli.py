"""The ``kompot-dask`` command line: every subcommand, exit codes, one-line errors, and
runs against real ``dask scheduler`` / ``dask worker`` processes (plain TCP and TLS)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from kompot_dask import cli
from kompot_dask._engine.cluster import worker_environment
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata, write_synthetic_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """\
groupby: Age
layer: logged_counts
obsm_key: X_pca
gp:
  n_landmarks: 150
  ls: 6.0
fdr:
  null_genes: 200
"""


@pytest.fixture
def store(tmp_path):
    return write_synthetic_store(tmp_path / "cli.zarr", SyntheticSpec(n_obs=1500, n_vars=48, n_dims=8, seed=7),
                                 cell_chunk=512, gene_chunk=16)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "de.yaml"
    path.write_text(CONFIG)
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _var(path) -> dict[str, np.ndarray]:
    import anndata as ad

    var = ad.io.read_elem(zarr.open_group(str(path), mode="r")["var"])
    return {c: var[c].to_numpy() for c in var.columns if c.startswith("kompot_de_")}


# ---- subcommands in process ---------------------------------------------------------------


def test_cli__ingest(tmp_path, capsys):
    adata = make_synthetic_adata(SyntheticSpec(n_obs=300, n_vars=20, n_dims=4, seed=1))
    src = tmp_path / "a.h5ad"
    adata.write_h5ad(src)
    rc, out, _ = run_cli(capsys, "--json", "ingest", src, tmp_path / "a.zarr", "--chunks", "128,8")
    assert rc == 0 and json.loads(out)["chunks"] == [128, 8]
    arr = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["layers"]["logged_counts"]
    assert arr.chunks == (128, 8)
    np.testing.assert_allclose(arr[...], adata.layers["logged_counts"], rtol=1e-6)
    adata.layers["logged_counts"] = sp.csr_matrix(adata.layers["logged_counts"])
    adata.write_h5ad(src)
    rc, _, _ = run_cli(capsys, "--json", "ingest", src, tmp_path / "s.zarr")
    assert rc == 0
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["layers/logged_counts"].attrs["encoding-type"] == "csr_matrix"
    rc, _, _ = run_cli(capsys, "--json", "ingest", src, tmp_path / "d.zarr", "--dense", "--chunks", "128,8")
    assert rc == 0 and zarr.open_group(str(tmp_path / "d.zarr"), mode="r")["layers/logged_counts"].chunks == (128, 8)
    rc, _, err = run_cli(capsys, "ingest", src, tmp_path / "b.zarr", "--chunks", "128")
    assert rc == 2 and err.count("\n") == 1 and "--chunks" in err


def test_cli__plan_de_runs_cleanup(store, config, capsys):
    embedded = ["--n-workers", "1", "--threads-per-worker", "2", "--memory-limit", "3GiB"]
    rc, out, _ = run_cli(capsys, "--json", "plan", store, "--config", config, "--condition1", "Young",
                         "--condition2", "Old", *embedded)
    plan = json.loads(out)
    assert rc == 0 and plan["status"] == "FEASIBLE" and plan["resources"]["n_workers"] == 1
    rc, out, _ = run_cli(capsys, "--json", "de", store, "--config", config, "--condition1", "Young",
                         "--condition2", "Old", *embedded)
    res = json.loads(out)
    assert rc == 0 and res["run_id"] == 0 and res["n_genes"] == 48
    assert res["n_de"] == int(_var(store)["kompot_de_Young_to_Old_is_de"].sum())
    # a second comparison, flags override the config
    rc, out, _ = run_cli(capsys, "--json", "de", store, "--config", config, "--condition1", "Old",
                         "--condition2", "Young", "--null-genes", "0", "--no-layers", "--overwrite", *embedded)
    assert rc == 0 and json.loads(out)["run_id"] == 1
    rc, out, _ = run_cli(capsys, "--json", "runs", store)
    runs = json.loads(out)["runs"]
    assert [(r["run_id"], r["condition1"], r["condition2"]) for r in runs] == [(0, "Young", "Old"), (1, "Old", "Young")]
    rc, out, _ = run_cli(capsys, "runs", store, "0")
    assert rc == 0 and "kompot_de_Young_to_Old_fold_change" in out and "gp.n_landmarks" in out
    rc, out, _ = run_cli(capsys, "runs", store, "0", "--compare-with", "1")
    assert rc == 0 and "condition1" in out
    rc, out, _ = run_cli(capsys, "--json", "cleanup", store, "--run-ids", "0")
    summary = json.loads(out)
    assert rc == 0 and summary["bytes_freed"] > 0
    assert {r["name"] for r in summary["removed"]} == {
        "kompot_de_Young_imputed", "kompot_de_Old_imputed", "kompot_de_Young_to_Old_fold_change"}
    rc, _, err = run_cli(capsys, "runs", store, "7")
    assert rc == 2 and "valid run ids are 0..1" in err and err.count("\n") == 1


def test_cli__infeasible_plan_exits_3(store, config, capsys):
    # 2,000 landmarks need ~160 MB of factors on top of a ~400 MB worker: not in 60 % of 700 MB.
    args = [store, "--config", config, "--condition1", "Young", "--condition2", "Old", "--n-landmarks", "1500",
            "--n-workers", "1", "--memory-limit", "700MB"]
    before = sorted(os.listdir(store))
    rc, out, _ = run_cli(capsys, "plan", *args)
    assert rc == 3 and "INFEASIBLE" in out and "memory_limit ≥" in out
    rc, _, err = run_cli(capsys, "de", *args)
    assert rc == 3 and err.startswith("kompot-dask de: error: infeasible plan") and err.count("\n") == 1
    assert sorted(os.listdir(store)) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["de", "{store}", "--config", "{config}", "--condition1", "Young", "--condition2", "Nope"],
         "condition2='Nope' is not a value"),
        (["de", "{store}", "--config", "{config}", "--groupby", "Tissue", "--condition1", "a", "--condition2", "b"],
         "obs column 'Tissue'"),
        (["de", "{store}", "--condition1", "Young", "--condition2", "Old"], "--groupby is required"),
        (["plan", "{store}", "--config", "{config}", "--condition1", "Young", "--condition2", "Old",
          "--tls-ca-file", "ca.pem"], "go together"),
        (["plan", "{store}", "--config", "{bad_config}", "--condition1", "Young", "--condition2", "Old"],
         "unknown key(s) ['gpu']"),
        (["de", "{missing}", "--config", "{config}", "--condition1", "Young", "--condition2", "Old"],
         "does not exist. Create it with `kompot-dask ingest data.h5ad data.zarr`"),
        (["de", "atlas.h5ad", "--config", "{config}", "--condition1", "Young", "--condition2", "Old"],
         "Convert it once with `kompot-dask ingest atlas.h5ad atlas.zarr`, then run `kompot-dask de atlas.zarr"),
        (["runs", "{store}", "0"], "no DE runs are recorded"),
        (["de", "{store}", "--config", "{config}", "--condition1", "Young", "--condition2", "Old",
          "--n-landmarks", "-3"], "n_landmarks"),
    ],
)
def test_cli__bad_input_exits_2_with_one_line(store, config, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu:\n  n: 1\n")
    fmt = dict(store=store, config=config, bad_config=bad, missing=tmp_path / "missing.zarr")
    rc, out, err = run_cli(capsys, *[a.format(**fmt) for a in argv])
    assert rc == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli__verbose_shows_the_traceback(store, capsys):
    rc, out, _ = run_cli(capsys, "runs", store)
    assert rc == 0 and "no runs recorded" in out
    rc, _, err = run_cli(capsys, "--verbose", "runs", store, "0")
    assert rc == 2 and "Traceback" in err


def test_cli__demo(tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "demo", "--out", tmp_path / "demo.zarr", "--n-obs", "2000", "--n-vars", "40",
                         "--n-landmarks", "100")
    assert rc == 0 and "genes called DE" in out
    assert "kompot_de_Young_to_Old_mahalanobis" in _var(tmp_path / "demo.zarr")


# ---- against real dask scheduler / worker processes ---------------------------------------


def _tls_files(tmp_path) -> dict[str, str]:
    d = tmp_path / "tls"
    d.mkdir()
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=kompot-dask test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "req.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", "req.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "cert.pem", "-days", "1", "-extfile", "ext.cnf")
    return {"ca": str(d / "ca.pem"), "cert": str(d / "cert.pem"), "key": str(d / "key.pem")}


@contextlib.contextmanager
def dask_processes(tmp_path, tls: dict[str, str] | None = None):
    """``dask scheduler`` + two ``dask worker`` processes on 127.0.0.1; yields the address."""
    sched_file = tmp_path / f"scheduler-{time.monotonic_ns()}.json"
    tls_args = ["--tls-ca-file", tls["ca"], "--tls-cert", tls["cert"], "--tls-key", tls["key"]] if tls else []
    env = os.environ | worker_environment(1)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--scheduler-file", str(sched_file), *(["--protocol", "tls"] if tls else []), *tls_args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.2)
        time.sleep(0.3)
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                 "--nworkers", "1", "--memory-limit", "3GiB", "--name", f"w{i}", "--no-dashboard",
                 "--host", "127.0.0.1", *tls_args],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client
        from distributed.security import Security

        sec = Security(tls_ca_file=tls["ca"], tls_client_cert=tls["cert"], tls_client_key=tls["key"],
                       require_encryption=True) if tls else None
        with Client(address, security=sec, timeout="30s", set_as_default=False) as c:
            c.wait_for_workers(2, timeout=90)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _cli_subprocess(*argv, env_extra=None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": ROOT} | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "kompot_dask.cli", *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.slow  # ~50 s: three stores, a process cluster and a dask-scheduler with dask-workers
@pytest.mark.distributed
def test_cli__real_scheduler_and_workers_equal_the_embedded_cluster(tmp_path, config, capsys):
    spec = SyntheticSpec(n_obs=1500, n_vars=48, n_dims=8, seed=7)
    a = write_synthetic_store(tmp_path / "a.zarr", spec, cell_chunk=512, gene_chunk=16)
    b = write_synthetic_store(tmp_path / "b.zarr", spec, cell_chunk=512, gene_chunk=16)
    c = write_synthetic_store(tmp_path / "c.zarr", spec, cell_chunk=512, gene_chunk=16)
    common = ["--config", config, "--condition1", "Young", "--condition2", "Old"]
    rc, _, err = run_cli(capsys, "de", a, *common, "--n-workers", "2", "--threads-per-worker", "1",
                         "--memory-limit", "3GiB")
    assert rc == 0, err
    with dask_processes(tmp_path) as address:
        # the address from the environment, as a job script would set it
        proc = _cli_subprocess("--json", "de", b, *common, env_extra={"DASK_SCHEDULER_ADDRESS": address})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["run_id"] == 0
    tls = _tls_files(tmp_path)
    with dask_processes(tmp_path, tls) as address:
        assert address.startswith("tls://")
        proc = _cli_subprocess("--json", "de", c, *common, "--scheduler", address, "--tls-ca-file", tls["ca"],
                               "--tls-cert", tls["cert"], "--tls-key", tls["key"])
        assert proc.returncode == 0, proc.stderr
        # without certificates the TLS scheduler is refused, in one line
        bad = _cli_subprocess("de", c, *common, "--scheduler", address)
        assert bad.returncode == 2 and "TLS address" in bad.stderr
    va, vb, vc = _var(a), _var(b), _var(c)
    assert set(va) == set(vb) == set(vc) and len(va) == 4
    for name in va:
        np.testing.assert_array_equal(vb[name], va[name], err_msg=name)
        np.testing.assert_array_equal(vc[name], va[name], err_msg=name)
    la = zarr.open_group(str(a), mode="r")["layers"]["kompot_de_Young_to_Old_fold_change"][...]
    lc = zarr.open_group(str(c), mode="r")["layers"]["kompot_de_Young_to_Old_fold_change"][...]
    np.testing.assert_array_equal(lc, la)


def test_cli__object_store_urls_are_read_not_written(config, capsys, monkeypatch):
    """An s3:// input that cannot be opened (no credentials here) says what to check; one
    line, exit 2. (Reading real remote stores: tests/test_remote.py.)"""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    rc, _, err = run_cli(capsys, "de", "s3://bucket/atlas.zarr", "--config", config, "--condition1", "Young",
                         "--condition2", "Old", "--results-store", "r.zarr")
    assert rc == 2 and "the remote store 's3://bucket/atlas.zarr' could not be opened" in err
    assert "credentials" in err and err.count("\n") == 1


def test_cli__global_flags_also_after_the_subcommand():
    """The README writes `kompot-dask plan STORE --config de.yaml --json`."""
    from kompot_dask.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["plan", "s.zarr", "--json"]).json is True
    assert parser.parse_args(["--json", "plan", "s.zarr"]).json is True
    assert parser.parse_args(["plan", "s.zarr"]).json is False
    assert parser.parse_args(["runs", "s.zarr", "0", "--verbose"]).verbose is True


# ---- the README's own commands ------------------------------------------------------------


def _readme_blocks(language: str) -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as fh:
        text = fh.read()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme__every_command_line_runs(store, tmp_path, client, capsys):
    """Each `kompot-dask ...` line of the README, as written, against a small store and
    the session's scheduler (the paths, the address and the scheduler file replaced)."""
    lines = [line.split("#")[0].strip() for block in _readme_blocks("bash") for line in block.splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("kompot-dask ")]
    assert len(commands) >= 3
    config = tmp_path / "de.yaml"
    config.write_text(CONFIG + "condition1: Young\ncondition2: Old\n")
    sched = tmp_path / "sched.json"
    sched.write_text(json.dumps({"address": client.scheduler.address}))
    swap = {"/shared/atlas.zarr": store, "de.yaml": str(config), "sched.json": str(sched)}
    ran = []
    for argv in commands:
        argv = [swap.get(a, client.scheduler.address if a.startswith("tcp://") else a) for a in argv[1:]]
        if argv[0] == "runs":  # the README compares runs 0 and 1: the de line has run once so far
            assert run_cli(capsys, *ran[0])[0] == 0
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 0, (argv, err)
        if "--json" in argv:
            json.loads(out)
        ran.append(argv)
    assert {a[0] for a in ran} >= {"de", "plan", "runs"}


def test_readme__quick_start_runs_as_a_plain_script(tmp_path):
    """The README's first Python block, as a script with no `__main__` guard, on a small
    h5ad written by anndata (file names and the obsm key as in the README)."""

    adata = make_synthetic_adata(SyntheticSpec(n_obs=600, n_vars=30, n_dims=6, seed=2))
    adata.obsm["X_pca_harmony"] = adata.obsm.pop("X_pca")
    adata.write_h5ad(tmp_path / "atlas.h5ad")
    code = next(b for b in _readme_blocks("python") if "kd.ingest(" in b)
    script = tmp_path / "quick_start.py"
    script.write_text(code + "\nprint(adata.var['kompot_de_Young_to_Old_mahalanobis'].notna().sum())\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "30"


def test_readme__the_python_blocks_run_with_their_ellipses_filled(tmp_path, client):
    """The README's Python blocks after the quick start (plan, several comparisons,
    resume and verify), on a small store with Young/Mid/Old cells: "atlas.zarr" and
    `store` are that store, the embedding is its X_pca, and each `...` is the rest of the
    call (the plan block's calls get the plan's own arguments, so that the plan fits them)."""
    import kompot_dask as kd

    spec = SyntheticSpec(n_obs=700, n_vars=30, n_dims=6, seed=5, conditions=("Young", "Mid", "Old"),
                         samples_per_condition=3, cell_types=("T", "B"))
    store = write_synthetic_store(tmp_path / "atlas.zarr", spec, cell_chunk=256, gene_chunk=16)
    blocks = [b for b in _readme_blocks("python") if "kd.ingest(" not in b]
    assert len(blocks) >= 3
    plan_args = 'groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca"'
    ns = {"kd": kd, "client": client, "store": store}
    for block in blocks:
        code = block.replace('"atlas.zarr"', repr(store)).replace("X_pca_harmony", "X_pca")
        code = code.replace('"/shared/atlas.zarr"', repr(store)).replace('"X_umap"', '"X_pca"').replace('"Cd74"', '"gene_3"')
        code = code.replace('"results.zarr"', repr(str(tmp_path / "results.zarr")))
        code = code.replace('sample_col="donor"', 'sample_col="sample"')
        code = code.replace('kd.de(store, ...)', f"kd.de(store, {plan_args})")
        code = code.replace(f"kd.de({store!r}, ...,", f"kd.de({store!r}, {plan_args},")
        code = code.replace(", ...)", ', layer="logged_counts", obsm_key="X_pca")')
        assert "..." not in "\n".join(line.split("#")[0] for line in code.splitlines()), code
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's own code
    assert isinstance(ns["plan"], kd.ResourcePlan)
    record = kd.RunInfo(store, -1).record
    assert "resumed" in record and record["resumed"] is None  # that run was not interrupted
    # the plan block ran one DE, the comparisons three (Old, Mid, the reproduction), the resume block one,
    # the sample-variance block one, the groups block one, the FDR-mode block three
    assert kd.RunInfo(store, 5).record["uses_sample_variance"]
    assert kd.RunInfo(store, 6).record["subset_names"] == ["T", "B"]
    assert [kd.RunInfo(store, r).run_record.fdr_mode for r in (7, 8, 9)] == ["variance_stratified", "calibrated",
                                                                             "calibrated"]
    assert kd.RunInfo(store, 9).record["uses_sample_variance"]  # whole donors relabelled
    assert kd.RunInfo(store, 9).run_record.fdr_results["null"] == "samples"
    assert kd.RunInfo(store, -1).run_id == 9
    assert kd.RunInfo(str(tmp_path / "results.zarr")).run_id == 0  # the read-only input block's own store
