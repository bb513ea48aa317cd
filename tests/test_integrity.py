"""Input integrity: chunk manifests, the tile reader's checks against them, and
``verify`` / ``kompot-dask verify``.

A deleted chunk file of the expression layer must not read as zeros, and a truncated one
must not fail with a bare codec message: both raise StoreIntegrityError naming the layer
and the chunk, before anything is written into the store.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import warnings

import anndata as ad
import numpy as np
import pytest
import zarr
from conftest import tree_digest

import kompot_dask as kd
from kompot_dask import cli
from kompot_dask._io.manifest import (
    ID_ATTR,
    MANIFEST_DIR,
    StoreIntegrityError,
    manifest_path,
    read_manifest,
)
from kompot_dask._io.store import Store, StoreError
from kompot_dask._io.tiles import clear_caches
from kompot_dask._runs.verify import verify
from kompot_dask.testing import SyntheticSpec, make_synthetic_adata

SPEC = SyntheticSpec(n_obs=1200, n_vars=90, n_dims=8, seed=3)
GROUPBY, COND1, COND2 = "Age", "Young", "Old"
LAYER, OBSM = "logged_counts", "X_pca"
ELEM = f"layers/{LAYER}"


def _fast_de(path, client, **overrides):
    """``kd.de`` with settings that keep a run short (fixed length scale, few landmarks and
    null genes, no output layers)."""
    kwargs = dict(
        groupby=GROUPBY, condition1=COND1, condition2=COND2, layer=LAYER, obsm_key=OBSM, client=client,
        gp=kd.GPSettings(n_landmarks=100, ls=50.0), fdr=kd.FDRSettings(null_genes=20),
        storage=kd.StorageSettings(store_layers=False),
        output=kd.OutputSettings(progress=False, return_full_results=True),
    )
    kwargs.update(overrides)
    return kd.de(path, **kwargs)


def _snapshot(path) -> tuple[dict[str, str], list[str]]:
    dirs = sorted(os.path.relpath(root, path) for root, _, _ in os.walk(path))
    return tree_digest(path), dirs


def _chunk(path, key: str, elem: str = ELEM) -> str:
    return os.path.join(path, elem, *key.split("/"))


def _truncate(path: str) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


def _flip_bit(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte ^ 0x01]))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def ingested(tmp_path):
    """The small dataset through kd.ingest: zarr v2, dense tiles of 256 × 32, so
    chunk keys run from 0.0 to 4.2; X holds the same values."""
    adata = make_synthetic_adata(SPEC)
    adata.X = adata.layers[LAYER].copy()
    path = kd.ingest(adata, tmp_path / "ingested.zarr", cell_chunk=256, gene_chunk=32, progress=False)
    clear_caches()
    return path


def _anndata_store(path, zarr_format: int, shard: bool = False) -> str:
    """A store written by anndata itself: a dense layer in (256, 32) chunks and a CSR one
    whose data/indices come in several chunks."""
    adata = make_synthetic_adata(SPEC, sparse=True)
    csr = adata.layers[LAYER]
    del adata.layers[LAYER]
    path = os.fspath(path)
    with ad.settings.override(zarr_write_format=zarr_format, auto_shard_zarr_v3=shard), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notices about zarr format defaults
        adata.write_zarr(path)
        g = zarr.open_group(path, mode="r+", use_consolidated=False)
        ad.io.write_elem(g, f"layers/{LAYER}", csr.toarray(), dataset_kwargs={"chunks": (256, 32)})
        ad.io.write_elem(g, "layers/csr", csr, dataset_kwargs={"chunks": (5000,)})
        zarr.consolidate_metadata(path)
    clear_caches()
    return path


# ---------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------


def test_ingest__writes_a_manifest_per_expression_element(ingested):
    for elem in ("X", ELEM):
        manifest = read_manifest(ingested, elem)
        assert manifest is not None, elem
        arr = zarr.open_array(ingested, path=elem, mode="r")
        assert manifest["id"] == arr.attrs[ID_ATTR]
        rec = manifest["arrays"][""]
        assert rec["zarr_format"] == 2 and rec["shape"] == [1200, 90] and rec["grid"] == [256, 32]
        on_disk = sorted(n for n in os.listdir(os.path.join(ingested, elem)) if not n.startswith("."))
        assert sorted(rec["chunks"]) == on_disk and len(on_disk) == 15
        for key, (size, crc) in rec["chunks"].items():
            assert os.path.getsize(_chunk(ingested, key, elem)) == size and len(crc) == 8
    assert os.path.dirname(manifest_path(ingested, ELEM)) == os.path.join(ingested, MANIFEST_DIR)


def test_manifest__invisible_to_anndata_and_zarr(ingested):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        zarr.consolidate_metadata(ingested)
    adata = ad.read_zarr(ingested)
    assert list(adata.layers.keys()) == [LAYER]
    assert ".kompot" not in zarr.open_group(ingested, mode="r").keys()
    expected = make_synthetic_adata(SPEC).layers[LAYER]
    np.testing.assert_array_equal(np.asarray(adata.layers[LAYER]), expected)


def test_integrity_error__pickles_with_its_fields():
    err = StoreIntegrityError("chunk '1.1' is missing", "/data/s.zarr", ELEM, f"{ELEM}/1.1")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StoreIntegrityError and isinstance(back, StoreError)
    assert (str(back), back.store, back.elem_path, back.chunk_key) == (str(err), err.store, err.elem_path, err.chunk_key)


# ---------------------------------------------------------------------------
# The reader, through kd.de
# ---------------------------------------------------------------------------


def test_de__deleted_chunk_raises_naming_layer_and_chunk(ingested, client):
    os.remove(_chunk(ingested, "3.1"))
    before = _snapshot(ingested)
    with pytest.raises(StoreIntegrityError) as excinfo:
        _fast_de(ingested, client)
    message = str(excinfo.value)
    assert "chunk '3.1' of layer 'logged_counts'" in message
    assert "is missing" in message and ingested in message
    assert f"kompot-dask verify {ingested}" in message and "restore it from a copy or re-ingest" in message
    assert excinfo.value.chunk_key == f"{ELEM}/3.1" and excinfo.value.elem_path == ELEM
    assert _snapshot(ingested) == before, "a failed run modified the store"


def test_de__truncated_chunk_raises_naming_layer_and_chunk(ingested, client):
    _truncate(_chunk(ingested, "2.0"))
    before = _snapshot(ingested)
    with pytest.raises(StoreIntegrityError, match=r"chunk '2\.0' of layer 'logged_counts'.*has \d+ bytes, "
                                                  r"the manifest records \d+ \(truncated"):
        _fast_de(ingested, client)
    assert _snapshot(ingested) == before


def test_de__undecodable_chunk_is_named_without_a_manifest(ingested, client):
    """No manifest: a missing file cannot be told from an empty chunk, but a file that
    fails to decode is still named instead of a bare codec error."""
    shutil.rmtree(os.path.join(ingested, ".kompot"))
    _truncate(_chunk(ingested, "1.2"))
    before = _snapshot(ingested)
    with pytest.raises(StoreIntegrityError, match=r"chunk '1\.2' of layer 'logged_counts'.*cannot be decoded "
                                                  r"\(RuntimeError: error during blosc decompression"):
        _fast_de(ingested, client)
    assert _snapshot(ingested) == before


def test_de__csr_layer_deleted_chunk_is_named_by_the_transposition(tmp_path, client):
    """A CSR layer is read once, by the transposition tasks: a chunk they need that is gone
    is named there, and the failed run leaves the store as it was."""
    path = _anndata_store(tmp_path / "anndata.zarr", 2)
    verify(path, record=True)
    os.remove(_chunk(path, "3", "layers/csr/data"))
    clear_caches()
    before = _snapshot(path)
    with pytest.raises(StoreIntegrityError, match=r"chunk '3' of layer 'csr' \(array 'layers/csr/data'\).*is missing"):
        _fast_de(path, client, layer="csr")
    assert _snapshot(path) == before, "a failed run modified the store"


def test_de__intact_store_with_manifest_runs_and_verifies(ingested, client, capsys):
    result = _fast_de(ingested, client)
    assert np.all(np.isfinite(result["table"]["mahalanobis"]))
    report = verify(ingested)
    assert report.ok and report.runs_checked == 1 and not report.run_problems
    assert [e.status for e in report.elements] == ["ok", "ok"]
    # Fields removed by cleanup are noted in the history: not damage.
    kd.cleanup(ingested, keep_var_fields=False)
    report = verify(ingested)
    assert report.ok and not report.run_problems
    # A field that its last writer recorded, gone without a cleanup: an inconsistency.
    g = zarr.open_group(ingested, mode="r+", use_consolidated=False)
    obs = ad.io.read_elem(g["obs"])
    ad.io.write_elem(g, "obs", obs.drop(columns=["kompot_de_Young_std"]))
    zarr.consolidate_metadata(ingested)
    report = verify(ingested)
    assert not report.ok and report.run_problems
    assert {p.location for p in report.run_problems} == {"obs"}
    assert all(p.run_id == 0 and p.status == "Missing" for p in report.run_problems)
    rc, out, err = run_cli(capsys, "verify", ingested)
    assert rc == 1 and "run 0: obs/" in out and "DAMAGED" in err


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------


def test_verify__clean_on_a_fresh_store(ingested, capsys):
    report = verify(ingested)
    assert report.ok and not report.unverifiable
    assert [(e.element, e.status, e.n_chunks) for e in report.elements] == [("X", "ok", 15), (ELEM, "ok", 15)]
    rc, out, err = run_cli(capsys, "verify", ingested)
    assert rc == 0 and out.strip().splitlines()[-1].startswith("OK: ") and err == ""
    rc, out, _ = run_cli(capsys, "--json", "verify", ingested)
    payload = json.loads(out)
    assert rc == 0 and payload["ok"] and payload["elements"][1]["status"] == "ok"


def test_verify__reports_missing_truncated_and_bitflipped_chunks(ingested, capsys):
    os.remove(_chunk(ingested, "0.0"))
    _truncate(_chunk(ingested, "1.1"))
    _flip_bit(_chunk(ingested, "4.2"))
    report = verify(ingested)
    assert not report.ok
    bad = {e.element: e for e in report.damaged}
    assert list(bad) == [ELEM]
    assert {(p.key, p.problem) for p in bad[ELEM].problems} == {("0.0", "missing"), ("1.1", "size"), ("4.2", "checksum")}
    text = str(report)
    assert "0.0: missing" in text and "4.2: CRC32C" in text and "restore it from a copy" in text
    rc, out, err = run_cli(capsys, "verify", ingested)
    assert rc == 1 and "DAMAGED: " in err and "3 damaged chunk(s) in layers/logged_counts" in err
    rc, out, _ = run_cli(capsys, "--json", "verify", ingested)
    payload = json.loads(out)
    assert rc == 1 and not payload["ok"]
    assert sorted(p["key"] for p in payload["elements"][1]["problems"]) == ["0.0", "1.1", "4.2"]


def test_verify__bad_store_is_bad_input(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "verify", tmp_path / "nowhere.zarr")
    assert rc == 2 and "does not exist" in err


@pytest.mark.parametrize(
    ("zarr_format", "shard", "dense_key", "csr_key"),
    [(2, False, "1.1", "3"), (3, False, "c/1/1", "c/3"), (3, True, "c/0/0", "c/0")],
    ids=["v2", "v3", "v3-sharded"],
)
def test_verify_record__anndata_store_then_detects_a_deleted_chunk(tmp_path, capsys, zarr_format, shard,
                                                                   dense_key, csr_key):
    path = _anndata_store(tmp_path / "anndata.zarr", zarr_format, shard)
    report = verify(path)
    assert report.ok and [e.status for e in report.unverifiable] == ["no manifest", "no manifest"]
    assert "not verifiable (no manifest): run `kompot-dask verify" in str(report)
    rc, out, _ = run_cli(capsys, "verify", path, "--record")
    assert rc == 0 and "manifest recorded" in out
    assert [e.status for e in verify(path).elements] == ["ok", "ok"]
    # anndata still reads the store (its consolidated metadata was refreshed), same values
    adata = ad.read_zarr(path)
    np.testing.assert_array_equal(adata.layers["csr"].toarray(), adata.layers[LAYER])

    os.remove(_chunk(path, dense_key))
    os.remove(_chunk(path, csr_key, "layers/csr/data"))
    report = verify(path)
    found = {(p.element, p.array, p.key, p.problem) for e in report.damaged for p in e.problems}
    assert found == {(ELEM, "", dense_key, "missing"), ("layers/csr", "data", csr_key, "missing")}

    clear_caches()
    store = Store(path)
    with pytest.raises(StoreIntegrityError, match=rf"chunk '{dense_key}' of layer 'logged_counts'.*is missing"):
        store.tile_reader(store.layer_info(LAYER)).read(256, 512, slice(32, 64))
    with pytest.raises(StoreIntegrityError, match=rf"chunk '{csr_key}' of layer 'csr' \(array 'layers/csr/data'\)"):
        store.tile_reader(store.layer_info("csr")).read(0, 1200, slice(0, 90))


def test_manifest__stale_after_the_element_is_rewritten(tmp_path, caplog):
    """anndata's write_elem replaces the element without our id: the manifest no longer
    describes it, which is said, not reported as damage; --record renews it."""
    path = _anndata_store(tmp_path / "anndata.zarr", 2)
    verify(path, record=True)
    g = zarr.open_group(path, mode="r+", use_consolidated=False)
    ad.io.write_elem(g, f"layers/{LAYER}", np.ones((1200, 90), dtype=np.float32), dataset_kwargs={"chunks": (100, 30)})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        zarr.consolidate_metadata(path)
    report = verify(path)
    assert report.ok and [(e.element, e.status) for e in report.unverifiable] == [(ELEM, "stale manifest")]
    clear_caches()
    store = Store(path)
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        tile = store.tile_reader(store.layer_info(LAYER)).read(0, 100, slice(0, 30))
    assert np.all(tile == 1.0)
    assert any("Integrity checks are off for layers/logged_counts" in r.getMessage() and "stale" in r.getMessage()
               for r in caplog.records)
    assert [e.status for e in verify(path, record=True).elements if e.element == ELEM] == ["recorded"]
    assert verify(path).elements[1].status == "ok"


def test_reader__without_manifest_says_so_once(tmp_path, caplog):
    path = _anndata_store(tmp_path / "anndata.zarr", 3)
    store = Store(path)
    info = store.layer_info(LAYER)
    with caplog.at_level(logging.INFO, logger="kompot_dask"):
        for _ in range(3):
            store.tile_reader(info).read(0, 256, slice(0, 32))
    off = [r for r in caplog.records if "Integrity checks are off" in r.getMessage()]
    assert len(off) == 1 and off[0].levelno == logging.INFO
    assert f"kompot-dask verify {path} --record" in off[0].getMessage()
