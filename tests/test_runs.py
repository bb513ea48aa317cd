"""Run history on one store: several comparisons, RunInfo, compare_with, call_args, cleanup.

Walks the seed tutorial's "Multiple Comparisons" section on a synthetic store with
Age ∈ {Young, Mid, Old}: run 0 is Young → Old with 4,000 null genes, run 1 Young → Mid
with the defaults, so run 1 overwrites run 0's Young layer and Young std.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import tree_digest

import kompot_dask as kd
from kompot_dask._io import commit
from kompot_dask._io.lease import StoreLockedError, store_lock
from kompot_dask._io.store import StoreHandle, directory_nbytes
from kompot_dask._runs.cleanup import cleanup
from kompot_dask._runs.history import RunNotFoundError, get_run_fields
from kompot_dask._runs.record import record_params, to_json
from kompot_dask._runs.runinfo import RunInfo
from kompot_dask.testing import SyntheticSpec, assert_de_results_close, write_synthetic_store

SPEC = SyntheticSpec(n_obs=1200, n_vars=80, n_dims=6, seed=5, conditions=("Young", "Mid", "Old"))
COMMON = dict(groupby="Age", layer="logged_counts", obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=100),
              output=kd.OutputSettings(progress=False))

RUN0 = {
    "layers": ["kompot_de_Old_imputed", "kompot_de_Young_imputed", "kompot_de_Young_to_Old_fold_change"],
    "obs": ["kompot_de_Old_std", "kompot_de_Young_std"],
    "var": ["kompot_de_Young_to_Old_is_de", "kompot_de_Young_to_Old_mahalanobis",
            "kompot_de_Young_to_Old_mahalanobis_local_fdr", "kompot_de_Young_to_Old_mean_lfc"],
}
OVERWRITTEN_BY_RUN_1 = {"kompot_de_Young_imputed", "kompot_de_Young_std"}
RUN0_OWN_LAYERS = ["kompot_de_Old_imputed", "kompot_de_Young_to_Old_fold_change"]


def _run0_results(path) -> dict[str, np.ndarray]:
    """Every field of run 0, read back from the store."""
    a = ad.read_zarr(path)
    out = {f"var/{c}": a.var[c].to_numpy(dtype=float) for c in RUN0["var"]}
    out.update({f"obs/{c}": a.obs[c].to_numpy(dtype=float) for c in RUN0["obs"]})
    out.update({f"layers/{k}": np.asarray(a.layers[k], dtype=float) for k in RUN0["layers"]})
    return out


@pytest.fixture(scope="module")
def history(tmp_path_factory, client):
    """The store after run 0 (Young → Old, 4,000 nulls) and run 1 (Young → Mid, defaults),
    with run 0's results as they were before run 1 overwrote some of them."""
    path = write_synthetic_store(tmp_path_factory.mktemp("runs") / "age.zarr", SPEC, cell_chunk=256, gene_chunk=32)
    kd.de(path, condition1="Young", condition2="Old", fdr=kd.FDRSettings(null_genes=4000), client=client, **COMMON)
    run0 = _run0_results(path)
    kd.de(path, condition1="Young", condition2="Mid", client=client, **COMMON)
    return path, run0


@pytest.fixture
def store_copy(history, tmp_path):
    """A copy of the two-run store, for tests that change it."""
    path = str(tmp_path / "copy.zarr")
    shutil.copytree(history[0], path)
    return path


def _statuses(info: RunInfo) -> dict[str, str]:
    return {f.name: f.status for f in info.fields}


# ---------------------------------------------------------------------------
# RunInfo
# ---------------------------------------------------------------------------


def test_runinfo__field_table_shows_what_run_1_overwrote(history):
    info = RunInfo(history[0], run_id=0)
    statuses = _statuses(info)
    assert set(statuses) == {n for names in RUN0.values() for n in names}
    for name, status in statuses.items():
        assert status == ("Overwritten by Run 1" if name in OVERWRITTEN_BY_RUN_1 else "Present"), name
    assert info.overwritten_fields == dict.fromkeys(OVERWRITTEN_BY_RUN_1, 1)
    assert info.missing_fields == []
    summary = info.summary()
    assert summary["conditions"] == "Young to Old" and summary["Fields Created"] == 9
    assert summary["obsm_key"] == "X_pca" and summary["layer"] == "logged_counts"
    assert summary["uses_sample_variance"] is False


def test_runinfo__text_and_html_reports(history):
    info = RunInfo(history[0], run_id=0)
    text = str(info)
    assert text.startswith("Run 0 (DE Analysis)")
    for section in ("Run Summary", "All Parameters", "Environment", "Time", "Fields Created by This Run"):
        assert section in text
    timings = info.timings()
    assert float(timings["wall: engine: all tasks"].split()[0]) > 0
    assert timings["tasks: posterior std"].endswith("thread-s")
    params = info.parameters()
    assert params["gp.n_landmarks"] == 100 and params["fdr.null_genes"] == 4000
    assert params["compute.dtype"] == "float64" and params["storage.result_key"] == "kompot_de"
    # every field of every Settings section is listed
    for section, cls in (("gp", kd.GPSettings), ("fdr", kd.FDRSettings), ("filter", kd.FilterSettings),
                         ("storage", kd.StorageSettings), ("output", kd.OutputSettings),
                         ("compute", kd.ComputeSettings)):
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}" in text
    env = info.environment_rows()
    for pkg in ("dask", "distributed", "zarr", "jax", "anndata", "numpy"):
        assert env[f"package_versions.{pkg}"], pkg
    assert env["hostname"] and env["platform"] and env["python_version"]
    assert "kompot_de_Young_imputed" in text and "Overwritten by Run 1" in text
    page = info._repr_html_()
    assert page.count("<table>") == 5 and "Overwritten by Run 1" in page and "fdr.null_genes" in page
    assert repr(info) == text


def test_runinfo__negative_ids_count_from_the_latest(history):
    assert RunInfo(history[0]).run_id == 1
    assert RunInfo(history[0], -1).params["condition2"] == "Mid"
    assert RunInfo(history[0], -2).run_id == 0
    assert _statuses(RunInfo(history[0], 1)) == dict.fromkeys(_statuses(RunInfo(history[0], 1)), "Present")


def test_runinfo__compare_with(history):
    cmp = RunInfo(history[0], run_id=0, analysis_type="de").compare_with(1)
    assert cmp.run_ids == (0, 1)
    assert cmp.key_differences == {"condition2": ("Old", "Mid")}
    assert cmp.parameter_differences == {"condition2": ("Old", "Mid"), "fdr.null_genes": (4000, 2000)}
    assert cmp.n_same == len(RunInfo(history[0], 0).parameters()) - 2
    text = str(cmp)
    assert "condition2: Old → Mid" in text and "fdr.null_genes: 4000 → 2000" in text
    assert cmp.difference_lines() == ["condition2: Old → Mid", "fdr.null_genes: 4000 → 2000"]
    fields = {d.name: d for d in cmp.field_differences}
    assert fields["kompot_de_Young_imputed"].status == "Shared"
    assert fields["kompot_de_Young_imputed"].last_writer == 1
    assert fields["kompot_de_Old_imputed"].status == "Only in Run 0"
    assert fields["kompot_de_Mid_std"].status == "Only in Run 1"
    assert len(fields) == 16
    assert json.loads(json.dumps(cmp.to_dict()))["key_differences"] == {"condition2": ["Old", "Mid"]}
    assert "<table>" in cmp._repr_html_()
    # negative ids on both sides
    assert RunInfo(history[0], -1).compare_with(-2).key_differences == {"condition2": ("Mid", "Old")}


# ---------------------------------------------------------------------------
# call_args reproduces the run
# ---------------------------------------------------------------------------


def test_call_args__rerun_reproduces_run_0(history, store_copy, client):
    path, run0 = history
    kwargs = RunInfo(store_copy, 0).call_args()
    assert set(kwargs) == {"groupby", "condition1", "condition2", "layer", "obsm_key", "genes", "sample_col",
                           "gp", "fdr", "filter", "storage", "output", "compute"}
    assert kwargs["sample_col"] is None
    assert (kwargs["condition1"], kwargs["condition2"]) == ("Young", "Old")
    assert isinstance(kwargs["gp"], kd.GPSettings) and kwargs["gp"].n_landmarks == 100
    assert isinstance(kwargs["fdr"], kd.FDRSettings) and kwargs["fdr"].null_genes == 4000
    assert isinstance(kwargs["compute"], kd.ComputeSettings)
    kwargs["storage"].overwrite = True
    assert RunInfo(store_copy, 0).call_args()["storage"].overwrite is None  # fresh objects each call
    kd.de(store_copy, client=client, **kwargs)

    assert_de_results_close(_run0_results(store_copy), run0, columns=list(run0), rtol=0, atol=1e-12)
    rerun = RunInfo(store_copy, -1)
    assert rerun.run_id == 2
    assert rerun.compare_with(0).parameter_differences == {"storage.overwrite": (True, None)}
    assert set(RunInfo(store_copy, 0).overwritten_fields.values()) == {2}


def test_call_args__settings_are_editable(history):
    kwargs = RunInfo(history[0], 0).call_args()
    kwargs["fdr"].threshold = 0.01
    kwargs["condition2"] = "Mid"
    kwargs["gp"].n_landmarks = 50
    again = RunInfo(history[0], 0).call_args()
    assert (again["fdr"].threshold, again["condition2"], again["gp"].n_landmarks) == (0.05, "Old", 100)


_NON_DEFAULT = {
    kd.GPSettings: dict(sigma=0.5, ls=3.0, ls_factor=5.0, n_landmarks=7, landmarks=np.arange(15.0).reshape(5, 3),
                        batch_size=0, eps=1e-6, jit_compile=True, random_state=None, neighbors="pynndescent",
                        neighbor_sample=None, landmark_sample=None, use_empirical_variance=True),
    kd.FDRSettings: dict(null_genes=123, null_seed=7, threshold=0.01, mode="variance_stratified",
                         null_trend_features=("log_var",), null_trend_model="poly2", null_neighbourhood_cells=50,
                         null_permutations=3),
    kd.FilterSettings: dict(cell_filter={"Age": ["Young", "Old"]}, min_cells=5, check_representation=True,
                           groups="cell_type", min_percentage=10.0),
    kd.StorageSettings: dict(result_key="rk2", overwrite=True, store_landmarks=True, store_layers=False,
                             layer_dtype="float64", store_arrays_on_disk=True, disk_storage_dir="/scratch",
                             max_memory_ratio=0.5, results_store="/scratch/results.zarr", store_additional_stats=True,
                             store_posterior_covariance=True),
    kd.OutputSettings: dict(return_full_results=True, progress=False, copy=True, inplace=False,
                            return_null_data=True, compute_mahalanobis=False, allow_single_condition_variance=True),
    kd.ComputeSettings: dict(cell_chunk=64, gene_block=16, null_gene_block=32, n_workers=3, threads_per_worker=2,
                             memory_limit="2GiB", dtype="float32", max_task_bytes=10**8, processes=True),
}
# kompot's fields that kompot_dask refuses at anything but their default
_CANNOT_DIFFER = {(cls, name) for cls in (kd.GPSettings, kd.FDRSettings, kd.FilterSettings, kd.StorageSettings,
                                          kd.OutputSettings) for name in cls._REFUSED}
# given null distances are recorded by their count, not rebuilt (tests/test_parity.py checks
# that call_args() leaves them out)
_CANNOT_DIFFER |= {(kd.FDRSettings, "null_mahalanobis"), (kd.FDRSettings, "combine_with_internal"),
                   (kd.FDRSettings, "null_expression")}


def _settings_record(settings: dict, *, landmark_source: str = "user") -> dict:
    params = record_params("Age", "Young", "Old", "X_pca", "logged_counts", ["g1", "g2"], **settings)
    return {"run_id": 0, "timestamp": "2026-01-01T00:00:00", "result_key": settings["storage"].result_key,
            "params": params, "field_mapping": {}, "fields_written": [],
            "model": {"n_landmarks": 5, "landmark_source": landmark_source}}


def _adata_with_history(records: list[dict], extra_uns: dict | None = None) -> ad.AnnData:
    adata = ad.AnnData(obs=pd.DataFrame(index=["c0", "c1"]), var=pd.DataFrame(index=["g1", "g2"]))
    adata.uns["kompot_de"] = {"run_history": to_json(records), "anndata_fields": to_json({})}
    adata.uns.update(extra_uns or {})
    return adata


def test_to_settings__every_settings_field_round_trips():
    settings = {name: cls(**_NON_DEFAULT[cls]) for name, cls in
                (("gp", kd.GPSettings), ("fdr", kd.FDRSettings), ("filter", kd.FilterSettings),
                 ("storage", kd.StorageSettings), ("output", kd.OutputSettings), ("compute", kd.ComputeSettings))}
    for obj in settings.values():  # the test covers every field: a new one must be added here
        default = type(obj)()
        for f in dataclasses.fields(obj):
            if (type(obj), f.name) not in _CANNOT_DIFFER:
                assert not np.array_equal(getattr(obj, f.name), getattr(default, f.name)) or \
                    getattr(default, f.name) is None and getattr(obj, f.name) is not None, f.name
    landmarks = settings["gp"].landmarks
    adata = _adata_with_history([_settings_record(settings)], {"rk2": {"landmarks": landmarks}})
    rebuilt = RunInfo(adata, 0).to_settings()
    assert set(rebuilt) == set(settings)
    for name, obj in settings.items():
        for f in dataclasses.fields(obj):
            got, want = getattr(rebuilt[name], f.name), getattr(obj, f.name)
            if isinstance(want, np.ndarray):
                np.testing.assert_array_equal(got, want)
            else:
                assert got == want and type(got) is type(want), f"{name}.{f.name}: {got!r} != {want!r}"
    kwargs = RunInfo(adata, 0).call_args()
    assert kwargs["genes"] == ["g1", "g2"] and kwargs["layer"] == "logged_counts"


def test_to_settings__auto_null_genes_are_stored_resolved():
    settings = {"gp": kd.GPSettings(), "fdr": kd.FDRSettings(), "filter": kd.FilterSettings(),
                "storage": kd.StorageSettings(), "output": kd.OutputSettings(), "compute": kd.ComputeSettings()}
    rebuilt = RunInfo(_adata_with_history([_settings_record(settings)]), 0).to_settings()
    assert rebuilt["fdr"].null_genes == 2000
    assert rebuilt["gp"].landmarks is None and rebuilt["storage"].result_key == "kompot_de"


def _gp_landmark_settings(store_landmarks: bool) -> dict:
    return {"gp": kd.GPSettings(landmarks=np.ones((5, 2))), "fdr": kd.FDRSettings(), "filter": kd.FilterSettings(),
            "storage": kd.StorageSettings(store_landmarks=store_landmarks), "output": kd.OutputSettings(),
            "compute": kd.ComputeSettings()}


def test_to_settings__user_landmarks_not_stored_warn(caplog):
    adata = _adata_with_history([_settings_record(_gp_landmark_settings(False))])
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        gp = RunInfo(adata, 0).to_settings()["gp"]
    assert gp.landmarks is None
    assert any("cannot be reproduced" in r.getMessage() and "store_landmarks=False" in r.getMessage()
               for r in caplog.records)


def test_to_settings__landmarks_replaced_by_a_later_run_warn(caplog):
    records = [_settings_record(_gp_landmark_settings(True)), _settings_record(_gp_landmark_settings(True))]
    later = np.full((5, 2), 2.0)
    adata = _adata_with_history(records)
    adata.uns["kompot_de"]["landmarks"] = later
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        assert RunInfo(adata, 0).to_settings()["gp"].landmarks is None
    assert any("run 1 has since replaced" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(RunInfo(adata, 1).to_settings()["gp"].landmarks, later)


def test_to_settings__unknown_fields_are_ignored_with_a_warning(caplog):
    settings = {"gp": kd.GPSettings(), "fdr": kd.FDRSettings(), "filter": kd.FilterSettings(),
                "storage": kd.StorageSettings(), "output": kd.OutputSettings(), "compute": kd.ComputeSettings()}
    record = _settings_record(settings)
    record["params"]["gp"]["from_the_future"] = 3
    record["params"]["output"]["from_the_future"] = False
    record["params"]["sample_col"] = None
    record["params"]["filter"]["cell_filter"] = "<array shape=(2,)>"
    info = RunInfo(_adata_with_history([record]), 0)
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        kwargs = info.call_args()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "gp.from_the_future=3" in messages and "output.from_the_future=False" in messages
    assert "boolean array" in messages and kwargs["filter"].cell_filter is None
    assert kwargs["sample_col"] is None and isinstance(kwargs["gp"], kd.GPSettings)


def test_to_settings__kompot_values_kompot_dask_refuses_fall_back_to_the_default(caplog):
    """A kompot-written record may hold values kompot_dask refuses: the rebuilt call keeps
    the rest and says which ones it dropped."""
    settings = {"gp": kd.GPSettings(), "fdr": kd.FDRSettings(), "filter": kd.FilterSettings(),
                "storage": kd.StorageSettings(), "output": kd.OutputSettings(), "compute": kd.ComputeSettings()}
    record = _settings_record(settings)
    record["params"]["fdr"]["null_expression"] = "<tuple len=2>"
    record["params"]["output"]["allow_single_condition_variance"] = True
    record["params"]["sample_col"] = "donor"
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        kwargs = RunInfo(_adata_with_history([record]), 0).call_args()
    messages = " ".join(r.getMessage() for r in caplog.records)
    # given null expression is not in the record: dropped, with a warning that says so
    assert "null expression given in FDRSettings.null_expression ('<tuple len=2>')" in messages
    assert kwargs["fdr"].null_expression is None
    # sample variance is supported (issue 15): kept as recorded
    assert kwargs["sample_col"] == "donor" and kwargs["output"].allow_single_condition_variance is True
    assert "sample_col" not in messages and "allow_single_condition_variance" not in messages


# ---------------------------------------------------------------------------
# Readers: get_run_fields
# ---------------------------------------------------------------------------


def test_get_run_fields__latest_run_by_default(history, caplog):
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        fields = get_run_fields(history[0])
    assert "Found DE run info for run_id=-1" in caplog.text
    assert fields.run_id == 1 and (fields.condition1, fields.condition2) == ("Young", "Mid")
    assert fields["mahalanobis"] == "kompot_de_Young_to_Mid_mahalanobis"
    assert fields["imputed2"] == "kompot_de_Mid_imputed" and fields.locations["imputed2"] == "layers"
    assert fields.layer == "logged_counts" and fields.groupby == "Age"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_get_run_fields__warns_when_another_run_wrote_the_field(history, caplog):
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        fields = get_run_fields(history[0], run_id=0, roles=["mean_lfc", "mahalanobis", "imputed1"])
    assert "Found DE run info for run_id=0" in caplog.text
    assert fields["mean_lfc"] == "kompot_de_Young_to_Old_mean_lfc"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'kompot_de_Young_imputed'" in warnings[0] and "last written by run 1" in warnings[0]
    assert "run 0 was asked for" in warnings[0]
    with pytest.raises(KeyError, match="fold_change_zscores"):
        get_run_fields(history[0], 0, roles=["fold_change_zscores"])


# ---------------------------------------------------------------------------
# cleanup
# ---------------------------------------------------------------------------


def test_cleanup__run_0_frees_its_layers_on_disk(store_copy, caplog):
    own = {name: directory_nbytes(os.path.join(store_copy, "layers", name)) for name in RUN0_OWN_LAYERS}
    assert all(own.values())
    uns_before = StoreHandle(store_copy).read_uns_json("kompot_de")
    var_before = ad.read_zarr(store_copy).var
    before = directory_nbytes(store_copy)
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        summary = cleanup(store_copy, run_ids=0)
    after = directory_nbytes(store_copy)

    assert {r.name for r in summary.removed} == set(RUN0_OWN_LAYERS)
    assert summary.bytes_freed == sum(own.values())
    # the store shrank by the layers' size; the consolidated metadata lost their entries too
    assert 0 <= (before - after) - sum(own.values()) < 16 * 1024
    assert [s.name for s in summary.skipped] == ["kompot_de_Young_imputed"]
    assert "Keeping layers/kompot_de_Young_imputed: last written by run 1" in caplog.text
    assert "Removed layers/kompot_de_Old_imputed of run 0" in caplog.text

    statuses = _statuses(RunInfo(store_copy, 0))
    for name in RUN0_OWN_LAYERS:
        assert statuses[name] == "Removed by cleanup"
    assert statuses["kompot_de_Young_imputed"] == "Overwritten by Run 1"
    assert all(statuses[n] == "Present" for n in RUN0["var"])
    assert _statuses(RunInfo(store_copy, 1)) == dict.fromkeys(_statuses(RunInfo(store_copy, 1)), "Present")

    adata = ad.read_zarr(store_copy)
    assert set(adata.layers) == {"logged_counts", "kompot_de_Young_imputed", "kompot_de_Mid_imputed",
                                 "kompot_de_Young_to_Mid_fold_change"}
    pd.testing.assert_frame_equal(adata.var, var_before)
    uns_after = StoreHandle(store_copy).read_uns_json("kompot_de")
    assert set(uns_after.pop("removed_fields")["layers"]) == set(RUN0_OWN_LAYERS)  # the removal is noted
    uns_before.pop("removed_fields")
    assert uns_after == uns_before  # the runs' history is intact
    assert os.path.exists(os.path.join(store_copy, ".zmetadata"))
    assert not [e for e in os.listdir(store_copy) if e.startswith(".kompot_trash") or e == ".kompot_lock"]
    assert not os.path.exists(os.path.join(store_copy, commit.KOMPOT_DIR, "trash"))


def test_cleanup__default_removes_every_layer_and_keeps_statistics(store_copy):
    summary = cleanup(store_copy)
    assert summary.run_ids == [0, 1]
    assert {r.location for r in summary.removed} == {"layers"} and len(summary.removed) == 5
    assert summary.skipped == []
    adata = ad.read_zarr(store_copy)
    assert list(adata.layers) == ["logged_counts"]
    assert {"kompot_de_Young_std", "kompot_de_Old_std", "kompot_de_Mid_std"} <= set(adata.obs.columns)
    assert len([c for c in adata.var.columns if c.startswith("kompot_de")]) == 8
    assert {f.status for f in RunInfo(store_copy, 1).fields if f.location == "layers"} == {"Removed by cleanup"}


def test_cleanup__keep_lists_and_obs_fields(store_copy):
    summary = cleanup(store_copy, run_ids=[1, -1], keep_layers=["fold_change"], keep_obs_fields=False)
    assert summary.run_ids == [1]
    assert {(r.location, r.name) for r in summary.removed} == {
        ("layers", "kompot_de_Young_imputed"), ("layers", "kompot_de_Mid_imputed"),
        ("obs", "kompot_de_Young_std"), ("obs", "kompot_de_Mid_std"),
    }
    adata = ad.read_zarr(store_copy)
    assert "kompot_de_Young_to_Mid_fold_change" in adata.layers and "kompot_de_Old_imputed" in adata.layers
    assert list(adata.obs.columns) == ["Age", "kompot_de_Old_std"]
    assert _statuses(RunInfo(store_copy, 0))["kompot_de_Young_std"] == "Removed by cleanup"


def test_cleanup__dry_run_changes_nothing(store_copy):
    before = tree_digest(store_copy)
    summary = cleanup(store_copy, run_ids=0, dry_run=True)
    assert summary.dry_run and {r.name for r in summary.removed} == set(RUN0_OWN_LAYERS)
    assert summary.bytes_freed > 0 and "Would remove" in str(summary)
    assert tree_digest(store_copy) == before


def test_cleanup__locked_store_is_refused(store_copy):
    before = tree_digest(store_copy)
    with store_lock(store_copy, "kompot_dask.de"):
        with pytest.raises(StoreLockedError, match=r"kompot_dask\.de.*\.kompot_lock"):
            cleanup(store_copy, run_ids=0)
    assert tree_digest(store_copy) == before


def test_cleanup__interrupted_removal_is_completed_by_the_next_opener(store_copy, monkeypatch, caplog):
    """A crash inside the removal, after its journal was written: the store stays readable
    (every element whole), and the next kompot_dask opener finishes the removal."""
    class Crash(BaseException):
        pass

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(commit, "write_consolidated", crash)
    with pytest.raises(Crash):
        cleanup(store_copy, run_ids=0)
    monkeypatch.undo()
    assert os.path.exists(os.path.join(store_copy, commit.JOURNAL))
    assert not os.path.exists(os.path.join(store_copy, ".zmetadata"))  # readers walk the tree
    adata = ad.read_zarr(store_copy)
    assert not set(RUN0_OWN_LAYERS) & set(adata.layers) and "kompot_de_Mid_imputed" in adata.layers

    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        RunInfo(store_copy, 0)
    assert "Completing an interrupted kompot_dask commit" in caplog.text
    assert not os.path.exists(os.path.join(store_copy, commit.JOURNAL))
    assert not os.path.exists(os.path.join(store_copy, commit.KOMPOT_DIR, "trash"))
    assert os.path.exists(os.path.join(store_copy, ".zmetadata"))
    cleanup(store_copy, run_ids=1, keep_layers=True, keep_obs_fields=["std"], keep_var_fields=["is_de"])
    adata = ad.read_zarr(store_copy)
    assert [c for c in adata.var.columns if "Young_to_Mid" in c] == ["kompot_de_Young_to_Mid_is_de"]


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data", "ignore:zarr v3 autosharding",
                            "ignore:Consolidated metadata is currently not part")
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_store_remove_fields__both_zarr_formats(tmp_path, zarr_format):
    adata = ad.AnnData(
        obs=pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": pd.Categorical(["x", "y", "x"]), "c": [True, False, True]},
                         index=["c0", "c1", "c2"]),
        var=pd.DataFrame({"v": [0.5, 1.5]}, index=["g0", "g1"]),
        layers={"big": np.ones((3, 2)), "keep": np.zeros((3, 2))},
    )
    path = str(tmp_path / "s.zarr")
    with ad.settings.override(zarr_write_format=zarr_format):
        adata.write_zarr(path)
    zarr.consolidate_metadata(path)
    handle = StoreHandle(path)
    assert handle.field_names("obs") == ["a", "b", "c"] and handle.field_names("layers") == ["big", "keep"]
    sizes = handle.remove_fields([("layers", "big"), ("obs", "b"), ("obs", "missing")])
    assert set(sizes) == {("layers", "big"), ("obs", "b")} and all(sizes.values())
    back = ad.read_zarr(path)
    assert list(back.layers) == ["keep"] and list(back.obs.columns) == ["a", "c"]
    np.testing.assert_array_equal(back.obs["a"], [1.0, 2.0, 3.0])
    assert zarr.open_group(path, mode="r").metadata.consolidated_metadata is not None
    assert handle.field_names("obs") == ["a", "c"]


# ---------------------------------------------------------------------------
# In-memory AnnData
# ---------------------------------------------------------------------------


def test_runinfo_and_cleanup__in_memory_anndata(history):
    adata = ad.read_zarr(history[0])
    assert _statuses(RunInfo(adata, 0)) == _statuses(RunInfo(history[0], 0))
    assert RunInfo(adata, 0).compare_with(1).key_differences == {"condition2": ("Old", "Mid")}
    # the history already decoded (dicts and lists instead of JSON strings) reads the same
    decoded = adata.copy()
    decoded.uns["kompot_de"] = {k: json.loads(v) if isinstance(v, str) else v
                                for k, v in adata.uns["kompot_de"].items()}
    assert _statuses(RunInfo(decoded, 0)) == _statuses(RunInfo(history[0], 0))

    summary = cleanup(adata, run_ids=0)
    assert {r.name for r in summary.removed} == set(RUN0_OWN_LAYERS)
    assert summary.bytes_freed == 2 * SPEC.n_obs * SPEC.n_vars * 4  # two float32 layers
    assert not set(RUN0_OWN_LAYERS) & set(adata.layers) and "kompot_de_Young_imputed" in adata.layers
    statuses = _statuses(RunInfo(adata, 0))
    assert [n for n, s in statuses.items() if s == "Removed by cleanup"] == RUN0_OWN_LAYERS
    cleanup(adata, keep_var_fields=False)
    assert not [c for c in adata.var.columns if c.startswith("kompot")]
    assert not [k for k in adata.layers if k.startswith("kompot")]
    assert {"kompot_de_Old_std", "kompot_de_Mid_std"} <= set(adata.obs.columns)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", [2, -3, 10])
def test_runinfo__run_id_out_of_range(history, run_id):
    with pytest.raises(RunNotFoundError, match=r"run_id=-?\d+ is out of range.*2 DE run\(s\).*0\.\.1.*-2\.\.-1"):
        RunInfo(history[0], run_id)
    with pytest.raises(IndexError, match=r"0\.\.1"):
        get_run_fields(history[0], run_id)


def test_runinfo__errors_name_the_value_and_the_fix(history, tmp_path):
    with pytest.raises(TypeError, match=r"run_id='0' must be an integer"):
        RunInfo(history[0], "0")
    with pytest.raises(ValueError, match=r"analysis_type='da'.*analysis_type='de'"):
        RunInfo(history[0], 0, analysis_type="da")
    with pytest.raises(TypeError, match=r"got int.*store path"):
        RunInfo(123)
    fresh = write_synthetic_store(tmp_path / "fresh.zarr", SyntheticSpec(n_obs=50, n_vars=5, n_dims=2))
    with pytest.raises(RunNotFoundError, match=r"no DE runs are recorded.*kompot_dask\.de"):
        RunInfo(fresh)
    with pytest.raises(RunNotFoundError, match="no DE runs"):
        cleanup(fresh)
    with pytest.raises(ValueError, match=r"keep_layers=\['imputd'\].*unknown field type.*'imputed'"):
        cleanup(history[0], keep_layers=["imputd"], dry_run=True)
