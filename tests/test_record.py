"""The run record and the field registry: one schema for what a run writes and what
RunInfo, cleanup, plots and the CLI read.

``tests/data/history_before_run_record.json`` is ``uns["kompot_de"]`` and ``uns["rk2"]`` of a
store written by the code before ``RunRecord`` (run 0: Young → Old with FDR and layers;
run 1: Old → Young, result_key ``rk2``, no FDR, no layers, landmarks stored).
"""

from __future__ import annotations

import json
import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import kompot_dask as kd
from kompot_dask._io.store import StoreHandle
from kompot_dask._report import Report, Section
from kompot_dask._runs import cleanup as cleanup_mod
from kompot_dask._runs import fields
from kompot_dask._runs.history import get_run_fields, read_history
from kompot_dask._runs.record import (
    HISTORY_KEY,
    LayoutInfo,
    ModelInfo,
    PlanSummary,
    ResumeInfo,
    RunRecord,
    build_record,
    encode_entry,
    load_history,
    record_params,
    uns_updates,
)
from kompot_dask._runs.runinfo import RunInfo
from kompot_dask.testing import SyntheticSpec, write_synthetic_store

DATA = os.path.join(os.path.dirname(__file__), "data", "history_before_run_record.json")
OLD_KEYS = [
    "run_id", "timestamp", "function", "analysis_type", "result_key", "lfc_key", "mahalanobis_key",
    "fdr_keys", "fdr_results", "imputed_layer_keys", "std_keys", "field_names", "field_mapping",
    "fields_written", "uses_sample_variance", "params", "model", "layout", "plan", "environment",
    "wall_seconds", "resumed",
]
"""The keys of the record that ``_api`` built inline before RunRecord, in their order."""
NEW_KEYS = OLD_KEYS[:-1] + ["phase_seconds", "task_seconds", "resumed"]
"""Since issue 12 the record also says where the time went."""
NEW_PARAM_KEYS = {
    "gp": {"neighbors", "neighbor_sample", "landmark_sample"}, "compute": {"processes"},
    "fdr": {"null_mahalanobis", "null_expression", "combine_with_internal", "mode", "null_trend_features",
            "null_trend_model", "null_neighbourhood_cells", "null_permutations"},
    "filter": {"groups", "min_percentage", "check_representation"},
    "storage": {"store_posterior_covariance", "store_additional_stats", "store_arrays_on_disk", "disk_storage_dir",
                "max_memory_ratio", "results_store"},
    "output": {"copy", "inplace", "return_null_data", "compute_mahalanobis", "allow_single_condition_variance"},
}
"""Settings fields added since the previous records (the fast path and the in-process
cluster, issue 12; kompot's own fields under their names, issue 13; the FDR mode, issue 16)."""


@pytest.fixture(scope="module")
def old_uns() -> dict:
    with open(DATA, encoding="utf-8") as fh:
        return json.load(fh)


def _settings(**storage) -> dict:
    return {"gp": kd.GPSettings(n_landmarks=50), "fdr": kd.FDRSettings(null_genes=100), "filter": kd.FilterSettings(),
            "storage": kd.StorageSettings(**storage), "output": kd.OutputSettings(), "compute": kd.ComputeSettings()}


def _record(run_id: int = 0, **storage) -> RunRecord:
    names = fields.output_field_names(storage.get("result_key", "kompot_de"), "Young", "Old")
    roles = ["mahalanobis", "mean_lfc", "std1", "std2", "local_fdr", "is_de", "imputed1", "imputed2", "fold_change"]
    written = [f"{fields.FIELD_LOCATIONS[r]}/{names[r]}" for r in roles]
    return build_record(
        run_id, names={r: names[r] for r in roles}, fields_written=written,
        fdr_results={"n_significant": 3, "n_total": 10, "fdr_threshold": 0.05},
        params=record_params("Age", "Young", "Old", "X_pca", None, None, **_settings(**storage)),
        model=ModelInfo(ls=1.5, n_landmarks=50, landmark_source="kmeans", n_cells_condition1=10,
                        n_cells_condition2=12, n_null_genes=100),
        layout=LayoutInfo(cell_chunk=256, gene_block=8, null_gene_block=8, kernel_chunk=2048, n_tasks=9, n_workers=2),
        plan=PlanSummary(status="FEASIBLE", peak_worker_bytes=1, peak_client_bytes=2, wall_seconds=None, n_tasks=9),
        environment={"hostname": "h"}, wall_seconds=1.25, resumed=ResumeInfo(tasks_reused=2, tasks_run=9),
    )


# ---- the field registry ------------------------------------------------------------------


def test_registry__views_are_what_the_parallel_dicts_held():
    assert fields.output_field_names("kompot_de", "Young adult", "Old") == {
        "mahalanobis": "kompot_de_Young_adult_to_Old_mahalanobis",
        "mean_lfc": "kompot_de_Young_adult_to_Old_mean_lfc",
        "local_fdr": "kompot_de_Young_adult_to_Old_mahalanobis_local_fdr",
        "is_de": "kompot_de_Young_adult_to_Old_is_de",
        "std1": "kompot_de_Young_adult_std", "std2": "kompot_de_Old_std",
        "imputed1": "kompot_de_Young_adult_imputed", "imputed2": "kompot_de_Old_imputed",
        "fold_change": "kompot_de_Young_adult_to_Old_fold_change",
        # sample_col: the std per cell and gene, as layers under the obs columns' names
        "sample_std1": "kompot_de_Young_adult_std", "sample_std2": "kompot_de_Old_std",
        # StorageSettings(store_additional_stats=True), named as kompot names them
        "neg_log10_ptp": "kompot_de_Young_adult_to_Old_neg_log10_ptp",
        "pvalue": "kompot_de_Young_adult_to_Old_mahalanobis_pvalue",
        "tail_fdr": "kompot_de_Young_adult_to_Old_mahalanobis_tail_fdr",
        "fold_change_zscores": "kompot_de_Young_adult_to_Old_fold_change_zscores",
        # FilterSettings(groups=...): kompot's varm tables
        "group_mean_lfc": "kompot_de_Young_adult_to_Old_mean_lfc_groups",
        "group_mahalanobis": "kompot_de_Young_adult_to_Old_mahalanobis_groups",
        "group_local_fdr": "kompot_de_Young_adult_to_Old_mahalanobis_local_fdr_groups",
        "group_is_de": "kompot_de_Young_adult_to_Old_is_de_groups",
        "group_neg_log10_ptp": "kompot_de_Young_adult_to_Old_neg_log10_ptp_groups",
        # StorageSettings(store_posterior_covariance=True)
        "posterior_covariance": "kompot_de_Young_adult_to_Old_posterior_covariance",
        # FDRSettings(mode="variance_stratified")
        "residual_z": "kompot_de_Young_adult_to_Old_mahalanobis_residual_z",
        "residual_local_fdr": "kompot_de_Young_adult_to_Old_mahalanobis_residual_local_fdr",
        "residual_tail_fdr": "kompot_de_Young_adult_to_Old_mahalanobis_residual_tail_fdr",
        # FDRSettings(mode="calibrated")
        "permuted_mahalanobis": "kompot_de_Young_adult_to_Old_mahalanobis_permuted",
        "calibrated_score": "kompot_de_Young_adult_to_Old_mahalanobis_calibrated_score",
        "calibrated_local_fdr": "kompot_de_Young_adult_to_Old_mahalanobis_calibrated_local_fdr",
        "calibrated_tail_fdr": "kompot_de_Young_adult_to_Old_mahalanobis_calibrated_tail_fdr",
    }
    assert dict(fields.FIELD_LOCATIONS) == {
        "mahalanobis": "var", "mean_lfc": "var", "local_fdr": "var", "is_de": "var", "std1": "obs",
        "std2": "obs", "imputed1": "layers", "imputed2": "layers", "fold_change": "layers",
        "sample_std1": "layers", "sample_std2": "layers", "neg_log10_ptp": "var", "pvalue": "var", "tail_fdr": "var", "fold_change_zscores": "layers",
        "group_mean_lfc": "varm", "group_mahalanobis": "varm", "group_local_fdr": "varm", "group_is_de": "varm",
        "group_neg_log10_ptp": "varm", "posterior_covariance": "obsp", "residual_z": "var",
        "residual_local_fdr": "var", "residual_tail_fdr": "var", "permuted_mahalanobis": "var",
        "calibrated_score": "var", "calibrated_local_fdr": "var", "calibrated_tail_fdr": "var",
    }
    # with sample_col, kompot's "_sample_var" suffix on the distances, their statistics and z-scores
    sampled = fields.output_field_names("rk", "A", "B", sample_variance=True)
    assert {r: n for r, n in sampled.items() if n.endswith("_sample_var")} == {
        "mahalanobis": "rk_A_to_B_mahalanobis_sample_var", "local_fdr": "rk_A_to_B_mahalanobis_local_fdr_sample_var",
        "is_de": "rk_A_to_B_is_de_sample_var", "neg_log10_ptp": "rk_A_to_B_neg_log10_ptp_sample_var",
        "pvalue": "rk_A_to_B_mahalanobis_pvalue_sample_var", "tail_fdr": "rk_A_to_B_mahalanobis_tail_fdr_sample_var",
        "fold_change_zscores": "rk_A_to_B_fold_change_zscores_sample_var",
        # FDRSettings(mode=...) columns, named like the local FDR (for the FDR with sample_col
        # that issue 16 leaves open)
        "residual_z": "rk_A_to_B_mahalanobis_residual_z_sample_var",
        "residual_local_fdr": "rk_A_to_B_mahalanobis_residual_local_fdr_sample_var",
        "residual_tail_fdr": "rk_A_to_B_mahalanobis_residual_tail_fdr_sample_var",
        "permuted_mahalanobis": "rk_A_to_B_mahalanobis_permuted_sample_var",
        "calibrated_score": "rk_A_to_B_mahalanobis_calibrated_score_sample_var",
        "calibrated_local_fdr": "rk_A_to_B_mahalanobis_calibrated_local_fdr_sample_var",
        "calibrated_tail_fdr": "rk_A_to_B_mahalanobis_calibrated_tail_fdr_sample_var"}
    assert {r: n for r, n in sampled.items() if "_sample_var_" in n} == {
        "group_mahalanobis": "rk_A_to_B_mahalanobis_sample_var_groups",
        "group_local_fdr": "rk_A_to_B_mahalanobis_local_fdr_sample_var_groups",
        "group_is_de": "rk_A_to_B_is_de_sample_var_groups", "group_neg_log10_ptp": "rk_A_to_B_neg_log10_ptp_sample_var_groups"}
    names = fields.output_field_names("rk", "A", "B")
    # a run writes the obs std or the sample-variance std layers (same names), never both
    mapping = fields.field_mapping([r for r in fields.ROLES if not r.startswith("sample_std")], names, "A", "B",
                                   0.01)
    assert mapping["rk_A_to_B_is_de"] == {
        "location": "var", "type": "is_de",
        "description": "Boolean indicator of differential expression at local FDR < 0.01"}
    assert mapping["rk_B_std"]["description"] == (
        "Posterior standard deviation of imputed expression for B (same for all genes)")
    assert mapping["rk_A_to_B_mahalanobis_local_fdr"]["type"] == "mahalanobis_local_fdr"
    assert [m["type"] for m in mapping.values()][:2] == ["mahalanobis", "mean_log_fold_change"]
    assert cleanup_mod.KNOWN_FIELD_TYPES is fields.KNOWN_FIELD_TYPES
    assert set(fields.KNOWN_FIELD_TYPES) == {
        "imputed", "fold_change", "std", "mahalanobis", "mean_log_fold_change", "mahalanobis_local_fdr", "is_de",
        "smoothed", "fold_change_zscores", "std_with_sample_var", "neg_log10_ptp", "mahalanobis_pvalue",
        "mahalanobis_tail_fdr", "posterior_covariance", "ptp", "local_fdr", "mahalanobis_residual_z",
        "mahalanobis_residual_local_fdr", "mahalanobis_residual_tail_fdr", "mahalanobis_permuted",
        "mahalanobis_calibrated_score", "mahalanobis_calibrated_local_fdr", "mahalanobis_calibrated_tail_fdr",
    }
    assert fields.ROLES == tuple(fields.FIELD_LOCATIONS)
    with pytest.raises(KeyError, match="not a field role"):
        fields.spec_of("smoothed")


def test_registry__field_mapping_matches_the_previous_records(old_uns):
    for raw in load_history(old_uns[HISTORY_KEY]):
        p = raw["params"]
        names = raw["field_names"]
        assert fields.field_mapping(list(names), names, p["condition1"], p["condition2"],
                                    p["fdr"]["threshold"]) == raw["field_mapping"]
        assert names == {r: n for r, n in fields.output_field_names(raw["result_key"], p["condition1"],
                                                                    p["condition2"]).items() if r in names}


# ---- RunRecord ---------------------------------------------------------------------------


def test_record__round_trips_and_keeps_the_stored_keys():
    record = _record()
    d = record.to_dict()
    assert list(d) == NEW_KEYS
    assert RunRecord.from_dict(d) == record
    assert RunRecord.from_dict(json.loads(json.dumps(d))).to_dict() == json.loads(json.dumps(d))
    assert d["fdr_keys"] == {"local_fdr_key": "kompot_de_Young_to_Old_mahalanobis_local_fdr",
                             "is_de_key": "kompot_de_Young_to_Old_is_de"}
    assert d["resumed"] == {"tasks_reused": 2, "tasks_run": 9}
    assert record.fields()["kompot_de_Old_imputed"].location == "layers"
    assert record.role_locations()["std1"] == "obs" and record.n_de == 3


def test_record__previous_code_history_reads_back_unchanged(old_uns):
    for raw in load_history(old_uns[HISTORY_KEY]):
        assert list(raw) == OLD_KEYS
        record = RunRecord.from_dict(raw)
        assert record.to_dict() == raw and list(record.to_dict()) == OLD_KEYS
        # older runs had neither the time split nor groups (their keys are written only with groups)
        assert not record.extra and record.absent == {"phase_seconds", "task_seconds", "has_groups", "subset_names",
                                                      "groups_summary", "varm_keys", "underrepresentation",
                                                      "auto_filtered", "posterior_covariance_key"}
        assert record.phase_seconds == {} and record.task_seconds == {}
    run1 = RunRecord.from_dict(load_history(old_uns[HISTORY_KEY])[1])
    assert run1.result_key == "rk2" and run1.fdr_keys == {} and run1.imputed_layer_keys == {}
    assert run1.model.n_landmarks == 50 and run1.layout.n_workers == 1 and run1.plan.status == "FEASIBLE"
    assert run1.resumed is None and run1.stored_result_key == "rk2"


def test_record__tolerates_foreign_and_partial_entries():
    kompot = {"run_id": 0, "function": "compute_differential_expression", "params": None, "model": "gp",
              "field_mapping": {"x_fold_change_zscores": {"location": "layers", "type": "fold_change_zscores"}},
              "sample_variance": {"n": 3}}
    record = RunRecord.from_dict(kompot)
    assert record.to_dict() == kompot
    assert record.params == {} and record.model == ModelInfo() and record.extra["model"] == "gp"
    assert record.role_names() == {"fold_change_zscores": "x_fold_change_zscores"}
    assert RunRecord.from_dict({}).to_dict() == {}


def test_uns_updates__history_tracking_and_removed_fields():
    first = _record(0)
    previous = {"run_history": [first.to_dict()], "anndata_fields": {"var": {"old": 0}},
                "removed_fields": {"layers": {"kompot_de_Old_imputed": {"run_id": 0, "timestamp": "t"},
                                              "other": {"run_id": 0, "timestamp": "t"}}}}
    second = _record(1)
    updates = uns_updates(previous, second, None, np.ones((3, 2)), "kmeans", store_landmarks=True)
    assert list(updates) == [HISTORY_KEY]
    entry = {k: json.loads(v) if isinstance(v, str) else v for k, v in updates[HISTORY_KEY].items()}
    assert [r["run_id"] for r in entry["run_history"]] == [0, 1] and entry["last_run_info"]["run_id"] == 1
    assert entry["anndata_fields"]["var"]["old"] == 0
    assert entry["anndata_fields"]["layers"]["kompot_de_Old_imputed"] == 1
    assert entry["anndata_fields"]["uns"] == {"kompot_de": 1}
    assert entry["removed_fields"] == {"layers": {"other": {"run_id": 0, "timestamp": "t"}}}
    assert entry["landmarks_info"]["shape"] == [3, 2] and entry["landmarks"].shape == (3, 2)
    other = uns_updates({}, _record(0, result_key="rk2"), {"note": "kept"}, np.ones((3, 2)), "user", False)
    assert set(other) == {HISTORY_KEY, "rk2"}
    assert json.loads(other["rk2"]["landmarks_info"])["source"] == "user" and other["rk2"]["note"] == "kept"
    assert "landmarks" not in other["rk2"] and "landmarks_info" not in other[HISTORY_KEY]


def _shape(value, depth: int = 0):
    """Keys and value types, two levels deep (what readers rely on)."""
    if isinstance(value, dict):
        return {k: _shape(v, depth + 1) for k, v in value.items()} if depth < 2 else "dict"
    return type(value).__name__


def test_de__writes_what_the_previous_code_wrote(tmp_path, client, old_uns):
    spec = SyntheticSpec(n_obs=400, n_vars=30, n_dims=4, seed=1)
    path = write_synthetic_store(tmp_path / "s.zarr", spec, cell_chunk=128, gene_chunk=16)
    common = dict(groupby="Age", layer="logged_counts", obsm_key="X_pca", gp=kd.GPSettings(n_landmarks=50),
                  output=kd.OutputSettings(progress=False), client=client)
    kd.de(path, condition1="Young", condition2="Old", fdr=kd.FDRSettings(null_genes=100), **common)
    kd.de(path, condition1="Old", condition2="Young", fdr=kd.FDRSettings(null_genes=0),
          storage=kd.StorageSettings(result_key="rk2", store_layers=False, store_landmarks=True), **common)
    handle = StoreHandle(path)
    entry, rk2 = handle.read_uns_json(HISTORY_KEY), handle.read_uns_json("rk2")
    old_entry = old_uns[HISTORY_KEY]
    assert set(entry) == set(old_entry)
    assert sorted(rk2) == ["landmarks", "landmarks_info"] and sorted(rk2["landmarks_info"]) == sorted(
        old_uns["rk2"]["landmarks_info"])
    assert entry["anndata_fields"] == old_entry["anndata_fields"] and entry["removed_fields"] == {}
    new, old = load_history(entry), load_history(old_entry)
    assert entry["last_run_info"] == new[-1]
    for n, o in zip(new, old, strict=True):
        assert list(n) == NEW_KEYS
        for key in ("field_names", "field_mapping", "fields_written", "fdr_keys", "imputed_layer_keys",
                    "std_keys"):
            assert n[key] == o[key], key
        params = dict(n["params"])
        assert params.pop("sample_col") is None  # recorded since issue 15 (sample variance)
        for section, added in NEW_PARAM_KEYS.items():
            assert set(params[section]) - set(o["params"][section]) == added
            params[section] = {k: v for k, v in params[section].items() if k not in added}
        assert params == o["params"]
        assert isinstance(n["phase_seconds"], dict) and n["phase_seconds"]["engine: all tasks"] > 0
        assert {"projection", "posterior std"} <= set(n["task_seconds"])
        shape = _shape(n)
        del shape["phase_seconds"], shape["task_seconds"], shape["params"]["sample_col"]
        assert shape == _shape(o)


# ---- readers through RunRecord -----------------------------------------------------------


def _adata_with(uns: dict) -> ad.AnnData:
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(4)]),
                       var=pd.DataFrame(index=[f"g{i}" for i in range(3)]))
    adata.uns.update({k: encode_entry(v) for k, v in uns.items()})
    return adata


def test_readers__previous_code_history_in_an_anndata(old_uns):
    adata = _adata_with(old_uns)
    adata.var["rk2_Old_to_Young_mahalanobis"] = [1.0, 2.0, 3.0]
    history = read_history(adata)
    assert len(history) == 2 and isinstance(history.record(-1), RunRecord)
    fields_ = get_run_fields(adata, -1, roles=["mahalanobis"])
    assert fields_["mahalanobis"] == "rk2_Old_to_Young_mahalanobis" and fields_.condition1 == "Old"
    assert fields_.locations["std1"] == "obs" and fields_.layer == "logged_counts"
    info = RunInfo(adata, 0)
    assert info.record == load_history(old_uns[HISTORY_KEY])[0]
    assert info.summary()["DE genes"].endswith("at local FDR < 0.05")
    assert dict(info.overwritten_fields) == {} and "kompot_de_Young_imputed" in info.missing_fields
    assert "Run 0 (DE Analysis)" in str(info) and info._repr_html_().count("<table>") == 4


def test_readers__a_kompot_history_cleans_by_type():
    record = {"run_id": 0, "function": "compute_differential_expression",
              "params": {"groupby": "g", "condition1": "A", "condition2": "B"},
              "field_mapping": {"k_A_to_B_fold_change_zscores": {"location": "layers", "type": "fold_change_zscores",
                                                                 "description": "z"},
                                "k_A_to_B_mahalanobis": {"location": "var", "type": "mahalanobis", "description": "m"}}}
    adata = _adata_with({HISTORY_KEY: {"run_history": [record], "anndata_fields": {}}})
    adata.layers["k_A_to_B_fold_change_zscores"] = np.zeros((4, 3))
    adata.var["k_A_to_B_mahalanobis"] = [1.0, 2.0, 3.0]
    assert get_run_fields(adata)["fold_change_zscores"] == "k_A_to_B_fold_change_zscores"
    kept = kd.cleanup(adata, keep_layers=["fold_change_zscores"], dry_run=True)
    assert kept.removed == [] and "(none)" in str(kept)
    summary = kd.cleanup(adata, dry_run=True)
    assert [r.type for r in summary.removed] == ["fold_change_zscores"]
    assert "Would remove:" in str(summary) and "Would free" in str(summary)
    assert "<table>" in summary._repr_html_()


# ---- the report renderer -----------------------------------------------------------------


def test_report__text_and_html_of_lines_tables_and_status():
    report = Report("Title", [
        Section("Lines", ["one", ("two", ["fix: a"])], mark="•"),
        Section.key_values("Pairs", {"k": None, "long": list(range(9))}),
        Section("Hidden", [], optional=True),
        Section.table("Empty", ("A", "B"), []),
    ], status="STATUS: ✓ OK", tone="ok")
    text = report.text()
    assert text.splitlines()[:2] == ["Title", "====="]
    assert "Lines:\n  • one\n  • two\n      fix: a\n" in text
    assert "  Parameter  Value\n  ---------  ----------------------\n  k          None\n" in text
    assert "[0, 1, 2, … (9 items)]" in text and "Hidden" not in text
    assert "Empty:\n  (none)\n" in text and text.rstrip().endswith("STATUS: ✓ OK")
    page = report.html()
    assert page.count("<table>") == 3 and "<li>fix: a</li>" in page and "#2e7d32" in page
    assert "Hidden" not in page and "<x>" not in Report("<x>").html()
