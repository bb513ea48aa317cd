"""Remote inputs: a store in an S3-compatible object store (a real moto server on
127.0.0.1) is read by the workers directly, never written; the results go to a local
results store and equal an in-place run on a local copy."""

from __future__ import annotations

import logging
import os
import socket

import anndata as ad
import numpy as np
import pytest
from distributed import Client, LocalCluster

import kompot_dask as kd
from kompot_dask._io.store import Store
from kompot_dask.testing import SyntheticSpec, assert_de_results_close, make_synthetic_adata

pytest.importorskip("moto.server", reason="test extra: moto[server]")
s3fs = pytest.importorskip("s3fs", reason="test extra: s3fs")

SPEC = SyntheticSpec(n_obs=800, n_vars=50, n_dims=6, seed=7)
PAIR = "kompot_de_Young_to_Old"
KW = dict(groupby="Age", condition1="Young", condition2="Old", obsm_key="X_pca",
          gp=kd.GPSettings(n_landmarks=100, ls=40.0), fdr=kd.FDRSettings(null_genes=50))
BUCKET = "atlas"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1; this process's AWS settings and fsspec's s3 options
    point at it while the module runs."""
    import fsspec
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(env)
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        server.stop()


@pytest.fixture(scope="module")
def threads_client():
    """An in-process cluster: its workers share this process's S3 settings."""
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cl, \
            Client(cl, set_as_default=False) as c:
        yield c


def _objects(fs) -> dict[str, str]:
    return {p: str(fs.info(p).get("ETag")) for p in fs.find(BUCKET)}


@pytest.mark.parametrize("layer", ["logged_counts", "csr"])
def test_de__s3_input_is_read_by_the_workers_and_never_written(tmp_path, s3, threads_client, layer, caplog):
    import scipy.sparse as sp

    adata = make_synthetic_adata(SPEC)
    adata.layers["csr"] = sp.csr_matrix(adata.layers["logged_counts"])
    local = str(tmp_path / "local.zarr")
    adata.write_zarr(local)
    s3.put(local, f"{BUCKET}/{layer}/input.zarr", recursive=True)
    url = f"s3://{BUCKET}/{layer}/input.zarr"
    before = _objects(s3)

    kw = dict(KW, layer=layer)
    with pytest.raises(PermissionError, match=r"is remote: kompot_dask only reads remote stores.*output='results.zarr'"):
        kd.de(url, client=threads_client, output=kd.OutputSettings(progress=False), **kw)
    results = str(tmp_path / "results.zarr")
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        kd.de(url, client=threads_client, output=results, **kw)
    assert _objects(s3) == before, "the remote input changed"
    # the tiles came from the object store (its chunks cannot be checked against a manifest)
    assert any(f"of the remote store {url}" in r.getMessage() for r in caplog.records)

    kd.de(local, client=threads_client, output=kd.OutputSettings(progress=False), **kw)  # in place, local
    want, got = ad.read_zarr(local), ad.read_zarr(results)
    cols = [c for c in want.var.columns if c.startswith("kompot")]
    assert cols and set(cols) <= set(got.var.columns)
    assert_de_results_close({c: got.var[c].to_numpy(float) for c in cols},
                            {c: want.var[c].to_numpy(float) for c in cols}, columns=cols, atol=1e-10)
    np.testing.assert_allclose(got.layers[f"{PAIR}_fold_change"], want.layers[f"{PAIR}_fold_change"], atol=1e-6)
    # the results store finds its remote input again: run records and the overlay
    assert got.uns["kompot_dask_input"]["path"] == url
    assert kd.RunInfo(results).run_id == 0
    opened = Store(results)
    assert opened.input.remote and opened.input.path == url and layer in opened.layer_keys()
