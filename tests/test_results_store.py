"""Read-only inputs: ``kd.de(input, ..., output="results.zarr")`` leaves the input
byte-identical and writes results and run history to a separate store, which every reader
(anndata, RunInfo, kd.results, plots, cleanup, the CLI) then uses alone."""

from __future__ import annotations

import os
import stat

import anndata as ad
import matplotlib
import numpy as np
import pytest
import zarr
from conftest import tree_digest

import kompot_dask as kd
from kompot_dask import cli
from kompot_dask._io.store import StoreError
from kompot_dask.testing import SyntheticSpec, assert_de_results_close, make_synthetic_adata

matplotlib.use("Agg")

SPEC = SyntheticSpec(n_obs=900, n_vars=60, n_dims=6, seed=5)
PAIR = "kompot_de_Young_to_Old"
KW = dict(groupby="Age", condition1="Young", condition2="Old", layer="logged_counts", obsm_key="X_pca",
          gp=kd.GPSettings(n_landmarks=120, ls=40.0), fdr=kd.FDRSettings(null_genes=60),
          output=kd.OutputSettings(progress=False))


def _input(tmp_path, name="input.zarr", zarr_format=2, sparse=False) -> str:
    adata = make_synthetic_adata(SPEC, sparse=sparse)
    adata.uns["Age_colors"] = np.array(["#1f77b4", "#ff7f0e"])
    path = str(tmp_path / name)
    with ad.settings.override(zarr_write_format=zarr_format):
        adata.write_zarr(path)
    return path


def _read_only(path: str) -> None:
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(root, n)
            os.chmod(p, os.stat(p).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    os.chmod(path, os.stat(path).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _writable(path: str) -> None:
    os.chmod(path, os.stat(path).st_mode | stat.S_IWUSR)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(root, n)
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)


def _fields(path: str) -> dict[str, np.ndarray]:
    a = ad.read_zarr(path)
    out = {c: a.var[c].to_numpy(dtype=float) for c in a.var.columns if c.startswith("kompot")}
    out.update({c: a.obs[c].to_numpy(dtype=float) for c in a.obs.columns if c.startswith("kompot")})
    out.update({k: np.asarray(a.layers[k], dtype=float) for k in a.layers if k.startswith("kompot")})
    return out


@pytest.mark.parametrize(("zarr_format", "sparse"), [(2, False), (3, True)], ids=["v2-dense", "v3-csr"])
def test_de__read_only_input_results_store_equals_in_place(tmp_path, client, zarr_format, sparse):
    src = _input(tmp_path, zarr_format=zarr_format, sparse=sparse)
    copy = _input(tmp_path, "copy.zarr", zarr_format=zarr_format, sparse=sparse)
    kd.de(copy, client=client, **KW)  # the same run, in place
    _read_only(src)
    before = tree_digest(src)
    try:
        with pytest.raises(PermissionError, match="read-only"):
            kd.de(src, client=client, **KW)
        results = str(tmp_path / "results.zarr")
        kd.de(src, client=client, **KW, storage=kd.StorageSettings(results_store=results))
        assert tree_digest(src) == before, "the input store changed"
    finally:
        _writable(src)
    got, want = _fields(results), _fields(copy)
    assert set(got) == set(want) and len(got) == 9
    assert_de_results_close(got, want, columns=list(want), atol=1e-10)
    back = ad.read_zarr(results)
    assert list(back.obs_names) == list(ad.read_zarr(src).obs_names)
    assert back.uns["kompot_dask_input"]["path"] == os.path.abspath(src)
    assert zarr.open_group(results, mode="r").metadata.zarr_format == zarr_format  # the input's format
    info = kd.RunInfo(results)
    assert info.run_id == 0 and info.params["storage"]["results_store"] == results
    assert not info.missing_fields


def test_de__output_path_shorthand_second_run_and_readers(tmp_path, client, capsys):
    src = _input(tmp_path)
    before_runs = tree_digest(src)
    results = str(tmp_path / "results.zarr")
    kd.de(src, output=results, client=client, **{k: v for k, v in KW.items() if k != "output"})
    # a second comparison adds to the same results store
    kd.de(src, client=client, **dict(KW, condition1="Old", condition2="Young",
                                    storage=kd.StorageSettings(results_store=results)))
    assert kd.RunInfo(results).run_id == 1 and kd.RunInfo(results, run_id=0).call_args()["condition1"] == "Young"
    # a run reproduced from the results store alone (its recorded results_store is itself)
    kd.de(results, client=client, **dict(kd.RunInfo(results, run_id=0).call_args(), output=None))
    assert kd.RunInfo(results).run_id == 2 and kd.RunInfo(results).params["storage"]["results_store"] == results
    assert tree_digest(src) == before_runs
    # readers of the results store alone: the overlay finds the input's expression, embedding
    # and colours
    ds = kd.results(results, run_id=0)
    assert ds["mahalanobis"].dims == ("gene",) and ds["fold_change"].dims == ("cell", "gene")
    np.testing.assert_array_equal(ds["mahalanobis"].to_numpy(), ad.read_zarr(results).var[f"{PAIR}_mahalanobis"])
    assert kd.plot.volcano_de(results, run_id=0, return_fig=True, show=False) is not None
    assert kd.plot.plot_gene_expression(results, "gene_3", run_id=0, basis="X_pca", layer="logged_counts",
                                        return_fig=True, show=False) is not None
    assert kd.plot.embedding(results, "X_pca", color="Age", return_fig=True, show=False) is not None
    # cleanup removes the results store's fields, never the input's
    before = tree_digest(src)
    kd.cleanup(results, run_ids=1)  # the run that wrote the Old_to_Young fields
    assert "kompot_de_Old_to_Young_fold_change" not in ad.read_zarr(results).layers
    assert tree_digest(src) == before


def test_de__results_store_refusals(tmp_path, client):
    src = _input(tmp_path)
    other = _input(tmp_path, "other.zarr")
    results = str(tmp_path / "results.zarr")
    kw = {k: v for k, v in KW.items() if k != "output"}
    with pytest.raises(StoreError, match="is the input store itself"):
        kd.de(src, output=src, client=client, **kw)
    with pytest.raises(StoreError, match="is not a kompot_dask results store"):
        kd.de(src, output=other, client=client, **kw)
    kd.de(src, output=results, client=client, **kw)
    with pytest.raises(StoreError, match=r"holds the results of another input, .*input\.zarr"):
        kd.de(other, output=results, client=client, **kw)
    with pytest.raises(kd.SettingsError, match="name two results stores"):
        kd.de(src, output=results, storage=kd.StorageSettings(results_store=str(tmp_path / "x.zarr")),
              client=client, **kw)
    with pytest.raises(kd.SettingsError, match="in-memory AnnData receives its results itself"):
        kd.de(make_synthetic_adata(SPEC), output=str(tmp_path / "y.zarr"), client=client, **kw)
    assert not os.path.exists(tmp_path / "x.zarr") and not os.path.exists(tmp_path / "y.zarr")
    # a failed call, a plan and a dry run leave no results store behind
    fresh = str(tmp_path / "fresh.zarr")
    with pytest.raises(KeyError, match="groupby"):
        kd.de(src, output=fresh, client=client, **dict(kw, groupby="no_such_column"))
    plan = kd.plan(src, output=fresh, client=client, **kw)
    assert plan.feasible and kd.de(src, output=fresh, client=client, dry_run=True, **kw).feasible
    assert not os.path.exists(fresh)


def test_cli__de_with_a_results_store(tmp_path, capsys):
    src = _input(tmp_path)
    results = str(tmp_path / "results.zarr")
    before = tree_digest(src)
    rc = cli.main(["de", src, "--results-store", results, "--groupby", "Age", "--condition1", "Young",
                   "--condition2", "Old", "--layer", "logged_counts", "--obsm-key", "X_pca", "--n-landmarks", "80",
                   "--null-genes", "30", "--n-workers", "1", "--threads-per-worker", "1", "--memory-limit", "2GiB"])
    assert rc == 0
    assert tree_digest(src) == before
    rc = cli.main(["runs", results])
    out = capsys.readouterr().out
    assert rc == 0 and "Young" in out
