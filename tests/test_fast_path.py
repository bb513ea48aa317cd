"""The pieces behind issue 12's speed-ups, each against an independent reference: the
GIL-free BLAS calls against SciPy's wrappers, the exact neighbour search against a k-d tree,
the sampled landmarks and length scale, the in-process cluster rule and the planner's view
of where the model preparation runs. Speed itself is measured by benchmarks/phases.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import scipy.linalg as sla
from scipy.linalg import blas as sblas
from scipy.spatial import cKDTree

import kompot_dask as kd
from kompot_dask import _layout as L
from kompot_dask._engine.cluster import IN_PROCESS_MAX_ELEMENTS, use_in_process
from kompot_dask._numerics import blas, gp


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_blas__equal_scipy_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    m, k = 70, 40
    a = np.asfortranarray(rng.standard_normal((k, m)).astype(dtype))
    c0 = np.asfortranarray(rng.standard_normal((m, m)).astype(dtype))
    ref = (sblas.dsyrk if dtype == np.float64 else sblas.ssyrk)(
        -2.0, a, beta=0.5, c=c0.copy(order="F"), trans=1, lower=1)
    got = blas.syrk_lower(c0.copy(order="F"), a, -2.0, 0.5, trans=True)
    np.testing.assert_array_equal(np.tril(got), np.tril(ref))
    got_n = blas.syrk_lower(np.zeros((k, k), dtype=dtype, order="F"), a, trans=False)
    np.testing.assert_allclose(np.tril(got_n), np.tril(a @ a.T), rtol=1e-4)

    spd = np.asfortranarray((a.T @ a + m * np.eye(m)).astype(dtype))
    chol = spd.copy(order="F")
    assert blas.potrf_lower(chol) == 0
    ref_chol, info = (sla.lapack.dpotrf if dtype == np.float64 else sla.lapack.spotrf)(spd, lower=1, clean=1)
    assert info == 0
    np.testing.assert_array_equal(np.tril(chol), ref_chol)
    lower = np.asfortranarray(np.tril(chol))
    b = np.asfortranarray(rng.standard_normal((m, 5)).astype(dtype))
    for transpose in (False, True):
        got = blas.trsm_left_lower(lower, b.copy(order="F"), transpose=transpose)
        np.testing.assert_array_equal(got, sla.solve_triangular(lower, b, lower=True, trans=int(transpose)))
    assert blas.potrf_lower(np.asfortranarray(-np.eye(3, dtype=dtype))) > 0  # not positive definite


def test_blas__refuses_arrays_it_would_misread():
    c = np.zeros((4, 4))  # C order
    with pytest.raises(ValueError, match="Fortran"):
        blas.syrk_lower(c, np.zeros((2, 4), order="F"), trans=True)
    with pytest.raises(TypeError, match="one dtype"):
        blas.trsm_left_lower(np.eye(4, order="F"), np.zeros((4, 2), dtype=np.float32, order="F"))
    with pytest.raises(ValueError, match="do not fit"):
        blas.trsm_left_lower(np.eye(4, order="F"), np.zeros((3, 2), order="F"))
    with pytest.raises(TypeError, match="float32 or float64"):
        blas.potrf_lower(np.eye(3, dtype=np.int64, order="F"))


def test_blas__calls_release_the_gil():
    """While one thread is inside a long BLAS call, another runs Python code: SciPy's own
    wrappers hold the GIL for the whole call, these do not."""
    m = 1500
    a = np.asfortranarray(np.random.default_rng(1).standard_normal((m, m)))
    c = np.zeros((m, m), order="F")
    inside = threading.Event()
    done = threading.Event()

    def work():
        inside.set()
        for _ in range(4):
            blas.syrk_lower(c, a, trans=True)
        done.set()

    ticks = 0
    t = threading.Thread(target=work)
    t.start()
    inside.wait()
    t0 = time.perf_counter()
    while not done.is_set():
        ticks += 1
    elapsed = time.perf_counter() - t0
    t.join()
    assert elapsed > 0.05, "the BLAS work was too short to tell"
    # with the GIL held, this loop would only run between the calls (a handful of ticks)
    assert ticks > 1000, (ticks, elapsed)


def test_exact_nearest_distances__equal_a_kd_tree_and_skip_the_cell_itself():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((3000, 8))
    X[10] = X[11]  # a duplicate: distance 0 to its twin, not to itself
    ref, _ = cKDTree(X).query(X, k=2)
    got = gp.exact_nearest_distances(X, query_block=100, ref_block=700)  # blocks not aligned with n
    np.testing.assert_allclose(got, ref[:, 1], rtol=1e-12, atol=1e-12)
    assert got[10] == 0.0 and got[11] == 0.0
    rows = gp.sample_rows(3000, 500, 0)
    np.testing.assert_allclose(gp.sampled_nearest_distances(X, 500, 0), ref[rows, 1], rtol=1e-12, atol=1e-12)
    assert gp.sample_rows(3000, None, 0) is None and gp.sample_rows(3000, 3000, 0) is None
    np.testing.assert_array_equal(gp.sample_rows(3000, 500, 0), np.sort(gp.sample_rows(3000, 500, 0)))
    with pytest.raises(ValueError, match="at least 2"):
        gp.exact_nearest_distances(X[:1])


def test_compute_landmarks__sample_bounds_the_pool_and_is_seeded():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((2000, 4))
    a = gp.compute_landmarks(X, 20, 0, sample=300)
    b = gp.compute_landmarks(X, 20, 0, sample=300)
    np.testing.assert_array_equal(a, b)
    rows = gp.sample_rows(2000, 300, 0)
    from sklearn.cluster import k_means

    ref, _, _ = k_means(X[rows], 20, n_init=1, random_state=0)
    np.testing.assert_array_equal(a, ref)
    # a sample at least as large as the pool, or None, clusters every cell (kompot's way)
    np.testing.assert_array_equal(gp.compute_landmarks(X, 20, 0, sample=None),
                                  gp.compute_landmarks(X, 20, 0, sample=5000))
    # never fewer cells than landmarks
    assert gp.compute_landmarks(X, 20, 0, sample=5).shape == (20, 4)


def test_gp_settings__fast_path_fields_validate_and_kompot_preset():
    s = kd.GPSettings()
    assert (s.neighbors, s.neighbor_sample, s.landmark_sample) == ("exact", 20_000, 100_000)
    k = kd.GPSettings.kompot(n_landmarks=50)
    assert (k.neighbors, k.neighbor_sample, k.landmark_sample, k.n_landmarks) == ("pynndescent", None, None, 50)
    with pytest.raises(kd.SettingsError, match="GPSettings.neighbors='annoy'"):
        kd.GPSettings(neighbors="annoy")
    with pytest.raises(kd.SettingsError, match="neighbor_sample=1"):
        kd.GPSettings(neighbor_sample=1)
    with pytest.raises(kd.SettingsError, match="landmark_sample=0"):
        kd.GPSettings(landmark_sample=0)
    with pytest.raises(kd.SettingsError, match="processes='yes'"):
        kd.ComputeSettings(processes="yes")


def test_in_process_cluster__only_for_small_default_runs():
    small, large = 10_000 * 2_000, IN_PROCESS_MAX_ELEMENTS + 1
    assert use_in_process(kd.ComputeSettings(), small)
    assert not use_in_process(kd.ComputeSettings(), large)
    assert not use_in_process(kd.ComputeSettings(), None)
    assert not use_in_process(kd.ComputeSettings(processes=True), small)
    assert use_in_process(kd.ComputeSettings(processes=False), large)
    # asking for workers, threads or a memory limit (enforced by a nanny) means processes
    assert not use_in_process(kd.ComputeSettings(n_workers=2), small)
    assert not use_in_process(kd.ComputeSettings(threads_per_worker=1), small)
    assert not use_in_process(kd.ComputeSettings(memory_limit="2GiB"), small)


def test_prep_placement__client_on_the_fast_path_else_helpers_or_workers():
    km = L.LandmarkSource.KMEANS
    assert L.prep_in_client("exact", 100_000, 10_000_000, km)
    assert not L.prep_in_client("exact", None, 10_000_000, km)  # all cells: too many for the client
    assert L.prep_in_client("exact", None, 50_000, km)
    assert L.prep_in_client("exact", None, 10_000_000, L.LandmarkSource.PROVIDED)
    assert not L.prep_in_client("pynndescent", 100_000, 10_000, km)


def test_value_dtype__float32_only_where_it_is_exact():
    assert L.null_value_dtype(np.float32) == np.float32
    assert L.null_value_dtype(np.int16) == np.float32
    assert L.null_value_dtype(np.float64) == np.float64
    assert L.null_value_dtype(np.int32) == np.float64
