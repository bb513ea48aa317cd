"""Deployment files agree with the code: the SLURM job script dask-jobqueue builds, the
Kubernetes manifests, the Dockerfile and the CLI."""

from __future__ import annotations

import copy
import os
import re
import tomllib

import pytest
import yaml
from dask.utils import parse_bytes

from kompot_dask import cli
from kompot_dask._engine.cluster import worker_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")


def _k8s_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", q)
    assert m, q
    return int(m.group(1)) * units.get(m.group(2), 1)


def _dockerfile() -> str:
    with open(os.path.join(DEPLOY, "docker", "Dockerfile"), encoding="utf-8") as fh:
        return fh.read()


def _manifests() -> dict[str, dict]:
    out = {}
    for name in ("daskcluster.yaml", "job.yaml", "pvc.yaml"):
        with open(os.path.join(DEPLOY, "kubernetes", name), encoding="utf-8") as fh:
            out[name] = yaml.safe_load(fh)
    return out


@pytest.fixture
def dask_config():
    """dask's global config restored afterwards: slurm_cluster(config=...) merges into it."""
    import dask.config

    pytest.importorskip("dask_jobqueue")  # its defaults registered before the snapshot
    saved = copy.deepcopy(dask.config.config)
    yield dask.config
    dask.config.config.clear()
    dask.config.config.update(saved)


def test_slurm__job_script_from_dask_jobqueue(dask_config):
    from kompot_dask.deploy import slurm_cluster

    with slurm_cluster(os.path.join(DEPLOY, "slurm", "jobqueue.yaml"), account="lab", queue="normal") as cluster:
        script = cluster.job_script()
    with open(os.path.join(DEPLOY, "slurm", "jobqueue.yaml"), encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)["jobqueue"]["slurm"]  # the file's own values, to compare with
    assert dask_config.get("jobqueue.slurm.cores") == cfg["cores"]
    assert f"#SBATCH --cpus-per-task={cfg['cores']}" in script
    mem = re.search(r"#SBATCH --mem=(\d+)G", script)
    assert mem and int(mem.group(1)) == parse_bytes(cfg["memory"]) // 2**30  # SLURM's G is GiB
    assert f"#SBATCH -t {cfg['walltime']}" in script
    assert "#SBATCH -A lab" in script and "#SBATCH -p normal" in script
    worker = next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line)
    assert f"--nthreads {cfg['cores']}" in worker
    assert "--nworkers" not in worker or "--nworkers 1" in worker  # one process per job
    assert re.search(r"--memory-limit \S+", worker)
    assert parse_bytes(re.search(r"--memory-limit (\S+)", worker).group(1)) == pytest.approx(
        parse_bytes(cfg["memory"]), rel=0.01)
    # the worker environment is exported before the worker starts, after the user's prologue
    env = worker_environment(int(cfg["cores"]))
    for key in ("XLA_FLAGS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert f"export {key}='{env[key]}'" in script
    assert script.index("activate") < script.index("export XLA_FLAGS") < script.index("dask_worker")


def test_slurm__environment_overrides_the_file_as_in_dask_config(dask_config, monkeypatch):
    from kompot_dask.deploy import slurm_cluster

    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__WALLTIME", "01:30:00")
    with slurm_cluster(os.path.join(DEPLOY, "slurm", "jobqueue.yaml"), processes=2) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -t 01:30:00" in script
    # 8 cores in 2 processes: 4 threads each, and BLAS/XLA sized to match
    assert "--nworkers 2" in script and "--nthreads 4" in script
    assert f"export OMP_NUM_THREADS='{worker_environment(4)['OMP_NUM_THREADS']}'" in script
    with pytest.raises(FileNotFoundError):
        slurm_cluster(os.path.join(DEPLOY, "slurm", "missing.yaml"))


def test_slurm__sbatch_script_runs_the_cli():
    with open(os.path.join(DEPLOY, "slurm", "kompot_de.sbatch"), encoding="utf-8") as fh:
        text = fh.read()
    assert text.startswith("#!/bin/bash")
    assert re.search(r"^#SBATCH --time=", text, re.M)
    assert "python -m kompot_dask.deploy slurm --config" in text
    calls = [line for line in text.splitlines() if line.startswith("kompot-dask ")]
    assert [c.split()[1] for c in calls] == ["plan", "de"]
    parser = cli.build_parser()
    for call in calls:  # every flag the script passes exists in the CLI (shell variables expanded)
        call = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", call)
        call = call.replace("$STORE", "/shared/atlas.zarr").replace("$SCHED_FILE", "/tmp/s.json")
        call = call.replace("$DEPLOY_DIR", "deploy/slurm")
        args = parser.parse_args([a.strip('"') for a in call.split()[1:] if a != '"$@"'])
        assert args.scheduler_file and args.config
    cfg = cli._load_config(os.path.join(DEPLOY, "slurm", "de.yaml"))  # the CLI accepts it
    assert {"groupby", "condition1", "condition2"} <= set(cfg)


def test_kubernetes__manifests_agree_with_the_image_and_the_cli():
    m = _manifests()
    cluster, job = m["daskcluster.yaml"], m["job.yaml"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1" and cluster["kind"] == "DaskCluster"
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    scheduler = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    driver = job["spec"]["template"]["spec"]["containers"][0]
    # one image everywhere, the one the Dockerfile builds (and the package version)
    ref = re.search(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', _dockerfile()).group(1)
    assert worker["image"] == scheduler["image"] == driver["image"] == ref
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    assert ref.endswith(":" + project["version"])
    # the driver runs the CLI's console script with arguments the CLI accepts
    assert driver["command"] == ["kompot-dask"] and project["scripts"]["kompot-dask"] == "kompot_dask.cli:main"
    args = cli.build_parser().parse_args(driver["args"])
    assert args.command == "de" and args.wait_for_workers == cluster["spec"]["worker"]["replicas"]
    # ... against the scheduler Service the operator creates, on its comm port
    service_port = next(p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"] if p["name"] == "tcp-comm")
    assert args.scheduler == f"tcp://{cluster['metadata']['name']}-scheduler:{service_port}"
    assert any(p["containerPort"] == service_port for p in scheduler["ports"])
    # workers: threads = CPU limit, Dask memory limit = container memory limit
    wargs = worker["args"]
    assert wargs[:2] == ["dask", "worker"]
    nthreads = int(wargs[wargs.index("--nthreads") + 1])
    assert nthreads == int(worker["resources"]["limits"]["cpu"])
    assert parse_bytes(wargs[wargs.index("--memory-limit") + 1]) == _k8s_bytes(worker["resources"]["limits"]["memory"])
    # the store's volume is shared read-write by the workers and the driver
    claim = m["pvc.yaml"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for spec in (cluster["spec"]["worker"]["spec"], job["spec"]["template"]["spec"]):
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert driver["args"][1].startswith(driver["volumeMounts"][0]["mountPath"] + "/")


def test_dockerfile__environment_and_entry_points():
    text = _dockerfile()
    env = worker_environment(1)
    for key in ("XLA_FLAGS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        m = re.search(rf'{key}=("([^"]*)"|(\S+))', text)
        assert m and (m.group(2) if m.group(2) is not None else m.group(3)) == env[key], key
    assert "JAX_PLATFORMS=cpu" in text
    assert re.search(r"pip install[^\n]* \.", text)
    assert re.search(r'CMD \["kompot-dask"', text)
