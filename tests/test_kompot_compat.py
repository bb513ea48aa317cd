"""kompot 0.8.0's arguments: each one supported, mapped, accepted without effect, or refused
by name with a reason; the compatibility table lists them all and is current."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import kompot_dask as kd
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("kompot") is None, reason="kompot (a test extra) is not installed")
def test_compat_table__lists_every_kompot_argument_and_is_current():
    # in a subprocess: importing kompot switches JAX's x64 flag on for the whole process
    out = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "kompot_compat.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    text = open(os.path.join(ROOT, "docs", "kompot_compat.md"), encoding="utf-8").read()
    for name in ("sample_col", "model", "copy", "store_additional_stats", "null_mahalanobis", "return_fig"):
        assert f"| `{name}` |" in text


@pytest.mark.parametrize("value, reason", [
    (("expr1", "expr2"), r"numeric cells × columns arrays \(expr1 is 0-D"),
    ((np.ones((5, 2)),), r"a pair \(expr1, expr2\)"),
    ((np.ones((5, 2)), np.ones((4, 3))), r"the same number \(≥ 1\) of columns in both arrays \(expr1 has 2, expr2 3\)"),
    ((np.ones((5, 2, 2)), np.ones((4, 2))), "expr1 is 3-D"),
])
def test_null_expression__a_bad_value_names_the_field_and_the_fix(value, reason):
    with pytest.raises(kd.SettingsError, match=rf"FDRSettings\.null_expression=.*{reason}"):
        kd.FDRSettings(null_expression=value)
    one = kd.FDRSettings(null_expression=(np.arange(5.0), np.arange(4.0)))  # 1-D: one column each
    assert one.null_expression[0].shape == (5, 1) and one.to_dict()["null_expression"] == 1


def test_kompot_fields__memory_knobs_are_accepted_without_effect(caplog):
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        s = kd.StorageSettings(store_arrays_on_disk=True, max_memory_ratio=0.5)
        kd.GPSettings(batch_size=500, jit_compile=True)
    assert s.store_arrays_on_disk is True
    for field in ("store_arrays_on_disk", "max_memory_ratio", "batch_size", "jit_compile"):
        assert f".{field}=" in caplog.text and "has no effect in kompot_dask" in caplog.text


def test_de__kompot_positional_order_copy_and_inplace_on_an_anndata():
    adata = make_synthetic_adata(SyntheticSpec(n_obs=500, n_vars=25, n_dims=5, seed=4))
    before = set(adata.var.columns)
    kw = dict(gp=kd.GPSettings(n_landmarks=40), compute=kd.ComputeSettings(processes=False))
    # kompot's order: obsm_key before layer
    copy = kd.de(adata, "Age", "Young", "Old", "X_pca", "logged_counts",
                 output=kd.OutputSettings(copy=True, progress=False), **kw)
    assert set(adata.var.columns) == before  # the AnnData passed is unchanged
    assert "kompot_de_Young_to_Old_mahalanobis" in copy.var.columns
    res = kd.de(adata, "Age", "Young", "Old", "X_pca", "logged_counts",
                output=kd.OutputSettings(inplace=False, progress=False), **kw)
    assert set(adata.var.columns) == before
    np.testing.assert_array_equal(res["table"]["mahalanobis"].to_numpy(),
                                  copy.var["kompot_de_Young_to_Old_mahalanobis"].to_numpy())


def test_de__arguments_kompot_has_and_kompot_dask_refuses(tmp_path):
    with pytest.raises(kd.SettingsError, match="model=.* is not supported: prefitted"):
        kd.de(str(tmp_path / "none.zarr"), "Age", "Young", "Old", model=object())
    with pytest.raises(kd.SettingsError, match="OutputSettings.copy=True needs an in-memory AnnData"):
        kd.de(str(tmp_path / "none.zarr"), "Age", "Young", "Old", output=kd.OutputSettings(copy=True))
