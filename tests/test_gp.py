"""Numerics without Dask: kernels, fit pieces and scores against small dense formulas."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kompot_dask._numerics import gp

RNG = np.random.default_rng(0)


def dense_matern(a, b, ls):
    d = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
    r = np.sqrt(5.0) * d / ls
    return (1 + r + r * r / 3) * np.exp(-r)


def problem(n1=60, n2=50, m=25, d=3, g=7, ls=2.5, seed=0):
    rng = np.random.default_rng(seed)
    X1, X2 = rng.normal(size=(n1, d)), rng.normal(size=(n2, d)) + 0.3
    Z = rng.normal(size=(m, d))
    Y1, Y2 = rng.normal(size=(n1, g)), rng.normal(size=(n2, g))
    return X1, X2, Z, Y1, Y2, ls


def test_matern52__matches_dense_formula():
    a, b = RNG.normal(size=(9, 4)), RNG.normal(size=(6, 4))
    np.testing.assert_allclose(gp.matern52(a, b, 1.7), dense_matern(a, b, 1.7), atol=1e-10)
    np.testing.assert_allclose(np.diag(gp.matern52(a, a, 1.7)), 1.0, atol=1e-10)


def test_matern52__float64_even_if_jax_default_is_32bit():
    import jax

    assert not jax.config.jax_enable_x64  # this process did not import mellon
    k = gp.matern52(RNG.normal(size=(3, 2)), RNG.normal(size=(2, 2)), 1.0)
    assert k.dtype == np.float64


@given(n=st.integers(1, 300), chunk=st.sampled_from([7, 64, 128]))
@settings(max_examples=15, deadline=None)
def test_cross_gram__chunking_invariant(n, chunk):
    X = np.random.default_rng(n).normal(size=(n, 3))
    Z = np.random.default_rng(1).normal(size=(10, 3))
    K = dense_matern(Z, X, 2.0)
    np.testing.assert_allclose(gp.symmetric_from_lower(gp.cross_gram(Z, X, 2.0, chunk=chunk)), K @ K.T, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(gp.kernel_column_sum(Z, X, 2.0, chunk=chunk), K.sum(1), rtol=1e-12, atol=1e-10)


def _fit_factors(Z, ls, S1, S2, sigma, eps, implicit=False):
    """The gene-independent factors, composed from the pieces the engine runs as tasks."""
    lp = gp.check_factor("Lp", gp.landmark_cholesky(Z, ls))
    c1 = gp.check_factor("C1", gp.condition_factor(Z, ls, S1, sigma))
    c2 = gp.check_factor("C2", gp.condition_factor(Z, ls, S2, sigma))
    r, diagonal = gp.landmark_metric(Z, ls, lp, c1, c2, eps, implicit=implicit)
    return {"Lp": lp, "C1": c1, "C2": c2, "R": r, "diagonal": diagonal}


@pytest.mark.parametrize("implicit", [False, True], ids=["dense R", "kernel metric"])
def test_fit_and_scores__match_closed_form(implicit):
    X1, X2, Z, Y1, Y2, ls = problem()
    sigma, eps = 1.3, 1e-8
    S1, S2 = gp.cross_gram(Z, X1, ls), gp.cross_gram(Z, X2, ls)
    f = _fit_factors(Z, ls, S1, S2, sigma, eps, implicit)
    assert isinstance(f["R"], gp.KernelMetric) == implicit
    acc1 = gp.ProjectionAccumulator(Z, ls, Y1.shape[1] + 3, 16)
    acc1.add(X1, Y1)
    acc2 = gp.ProjectionAccumulator(Z, ls, Y2.shape[1] + 3, 16)
    acc2.add(X2, Y2)
    Xall = np.vstack([X1, X2])
    kbar = dense_matern(Z, Xall, ls).mean(1)
    W1, W2, D, lfc = gp.block_scores(f, kbar, acc1.result(), acc2.result(), sigma)
    g = Y1.shape[1]
    # W = (σ² K̃uu + Kuf Kfu)⁻¹ Kuf Y
    Kuu = dense_matern(Z, Z, ls) + gp.JITTER * np.eye(len(Z))
    for X, Y, W in ((X1, Y1, W1), (X2, Y2, W2)):
        Kuf = dense_matern(Z, X, ls)
        W_ref = np.linalg.solve(sigma**2 * Kuu + Kuf @ Kuf.T, Kuf @ Y)
        np.testing.assert_allclose(W[:, :g], W_ref, rtol=1e-6, atol=1e-8)
    # Mahalanobis: δ = Kzz (W2 − W1), Σ = Σ1 + Σ2, D = sqrt(δᵀ (Σ + eps I)⁻¹ δ)
    Kzz = dense_matern(Z, Z, ls)
    cov = np.zeros_like(Kzz)
    for X in (X1, X2):
        Kuf = dense_matern(Z, X, ls)
        M = Kuu + Kuf @ Kuf.T / sigma**2
        cov += Kzz - Kzz @ np.linalg.solve(Kuu, Kzz) + Kzz @ np.linalg.solve(M, Kzz)
    delta = Kzz @ (W2 - W1)[:, :g]
    D_ref = np.sqrt(np.einsum("ig,ig->g", delta, np.linalg.solve(cov + eps * np.eye(len(Z)), delta)))
    assert not f["diagonal"]
    np.testing.assert_allclose(D[:g], D_ref, rtol=1e-6)
    # mean lfc equals the mean over cells of μ2 − μ1
    _, _, fc = gp.predict_pair(Xall, Z, W1[:, :g], W2[:, :g], ls)
    np.testing.assert_allclose(lfc[:g], fc.mean(0), rtol=1e-10, atol=1e-12)
    # padded columns stay zero
    np.testing.assert_array_equal(D[g:], 0.0)


def test_posterior_variances__match_dtc_formula():
    X1, X2, Z, _, _, ls = problem(seed=3)
    sigma = 0.7
    f = _fit_factors(Z, ls, gp.cross_gram(Z, X1, ls), gp.cross_gram(Z, X2, ls), sigma, 1e-8)
    Xq = np.random.default_rng(9).normal(size=(11, 3))
    v1, v2 = gp.posterior_variances(Xq, Z, f, ls)
    Kuu = dense_matern(Z, Z, ls) + gp.JITTER * np.eye(len(Z))
    kx = dense_matern(Z, Xq, ls)
    for X, v in ((X1, v1), (X2, v2)):
        Kuf = dense_matern(Z, X, ls)
        ref = 1 - np.einsum("ij,ij->j", kx, np.linalg.solve(Kuu, kx)) + sigma**2 * np.einsum(
            "ij,ij->j", kx, np.linalg.solve(sigma**2 * Kuu + Kuf @ Kuf.T, kx))
        np.testing.assert_allclose(v, ref, rtol=1e-6, atol=1e-9)


def test_fit_factors__diagonal_shortcut_when_landmarks_far_apart():
    Z = np.arange(20, dtype=float)[:, None] * 100.0
    X1, X2 = Z + 0.01, Z - 0.01
    f = _fit_factors(Z, 1.0, gp.cross_gram(Z, X1, 1.0), gp.cross_gram(Z, X2, 1.0), 1.0, 1e-8)
    assert f["diagonal"]
    g = _fit_factors(Z, 1.0, gp.cross_gram(Z, X1, 1.0), gp.cross_gram(Z, X2, 1.0), 1.0, 1e-8, implicit=True)
    assert g["diagonal"] and g["R"].factor is None and g["R"].scale.shape == (20,)
    x = np.random.default_rng(0).normal(size=(20, 4))
    np.testing.assert_allclose(gp.metric_product(g["R"], x), gp.metric_product(f["R"], x), rtol=1e-13, atol=1e-15)


def _metric_problem(m=40):
    X1, X2, Z, _, _, ls = problem(m=m)
    lp = gp.landmark_cholesky(Z, ls)
    c1 = gp.condition_factor(Z, ls, gp.cross_gram(Z, X1, ls, chunk=16), 0.7)
    c2 = gp.condition_factor(Z, ls, gp.cross_gram(Z, X2, ls, chunk=16), 0.7)
    return Z, ls, lp, c1, c2


@pytest.mark.parametrize("m", [1, 7, 40, 300])
def test_kernel_metric__is_the_dense_metric_applied(m):
    """The metric kept as its packed factor (R x = L⁻¹(Kzz x), Kzz a slab of rows at a
    time) equals the dense Rᵀ's product, for orders below, at and across slab edges."""
    Z, ls, lp, c1, c2 = _metric_problem(m)
    Rt, diag = gp.landmark_metric(Z, ls, lp, c1, c2, 1e-8, allow_diagonal=False)
    K, diag_k = gp.landmark_metric(Z, ls, lp, c1, c2, 1e-8, allow_diagonal=False, implicit=True)
    assert diag == diag_k is False and K.factor is not None
    x = np.random.default_rng(1).normal(size=(m, 5))
    dense = np.asarray(Rt).T @ x
    np.testing.assert_allclose(K.apply(x), dense, rtol=1e-9, atol=1e-9 * np.abs(dense).max())
    np.testing.assert_allclose(K.dense_t(), np.asarray(Rt), rtol=1e-9, atol=1e-9 * np.abs(dense).max())


def test_kernel_metric__pickles_stores_and_is_sized_as_its_factor():
    import pickle

    from dask.sizeof import sizeof

    Z, ls, lp, c1, c2 = _metric_problem(300)
    K, _ = gp.landmark_metric(Z, ls, lp, c1, c2, 1e-8, allow_diagonal=False, implicit=True)
    x = np.random.default_rng(2).normal(size=(300, 3))
    want = K.apply(x)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(K)).apply(x), want)
    stored = gp.stored_form(K)
    assert stored.ndim == 1 and stored.shape == (300 * 301 // 2,)
    np.testing.assert_array_equal(gp.KernelMetric.from_stored(stored.copy(), Z, ls).apply(x), want)
    # the diagonal path keeps m numbers and loads back as a scale
    D = gp.KernelMetric(Z, ls, scale=np.linspace(1, 2, 300))
    assert gp.KernelMetric.from_stored(gp.stored_form(D), Z, ls).factor is None
    assert 300 * 301 // 2 * 8 <= sizeof(K) < 300 * 301 // 2 * 8 + 300 * 3 * 8 + 1024  # not 300² numbers


def test_kernel_metric__failed_factorisation_gives_nan_and_wrong_uses_are_refused():
    Z, ls, lp, c1, c2 = _metric_problem()
    K, _ = gp.landmark_metric(Z, ls, lp, c1, c2, -1e6, allow_diagonal=False, implicit=True)
    assert np.isnan(K.apply(np.ones((40, 2)))).all()
    with pytest.raises(ValueError, match="implicit metric"):
        gp.landmark_metric(Z, ls, lp, c1, c2, 1e-8, implicit=True, with_inverse_squares=True)
    with pytest.raises(ValueError, match="implicit metric"):
        gp.landmark_metric(Z, ls, lp, c1, c2, 1e-8, implicit=True, points=Z[:5])
    with pytest.raises(ValueError, match="either a factor or a scale"):
        gp.KernelMetric(Z, ls)


def test_kernel_metric__slab_is_the_planners():
    from kompot_dask._layout import METRIC_SLAB_ROWS

    assert gp.KernelMetric.SLAB == METRIC_SLAB_ROWS


def test_length_scale__matches_reference_formula_and_guards_duplicates():
    nn = np.array([0.5, 1.0, 2.0], dtype=np.float32)
    expected = 10 * np.exp(np.mean(np.log(nn.astype(np.float64))) + 3)
    assert gp.length_scale_from_distances(nn, 10.0) == pytest.approx(expected, rel=1e-6)
    with_dupes = np.array([0.0, 0.5, 1.0, 2.0], dtype=np.float32)
    assert gp.length_scale_from_distances(with_dupes, 10.0) > 0
    with pytest.raises(ValueError, match="GPSettings"):
        gp.length_scale_from_distances(np.zeros(4), 10.0)


def test_compute_landmarks__all_cells_or_seeded_kmeans():
    X = np.random.default_rng(0).normal(size=(50, 2))
    np.testing.assert_array_equal(gp.compute_landmarks(X, 100, 0), X)
    a, b = gp.compute_landmarks(X, 5, 0), gp.compute_landmarks(X, 5, 0)
    assert a.shape == (5, 2)
    np.testing.assert_array_equal(a, b)


def test_device_matrix__dask_sees_its_buffer_without_a_registration():
    """Dask sizes a factor by its buffer through ``__sizeof__``: the numerics register
    nothing with Dask, so a worker's accounting holds whatever that worker imported first."""
    from dask.sizeof import sizeof

    assert sizeof.dispatch(gp.DeviceMatrix) is sizeof.dispatch(object)
    assert 64 * 64 * 8 <= sizeof(gp.DeviceMatrix(np.eye(64))) < 64 * 64 * 8 + 1024


# --------------------------------------------------------------------------------------
# Packed (RFP) factors


def _spd(n, seed=0):
    g = np.random.default_rng(seed).normal(size=(n, n + 2))
    return g @ g.T + n * np.eye(n)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 33])
def test_packed__layout_is_lapacks_rfp_and_solves_match_dense(n):
    """PackedLower keeps LAPACK's own RFP layout (TRANSR='N', UPLO='L', odd and even
    orders): its numbers equal scipy's dtrttf of the same lower triangle, its blockwise
    fill equals the dense matrix, and its Cholesky and solves (left and, for C-ordered
    right-hand sides, through the transposed right-side solve) agree with numpy's."""
    from scipy.linalg import lapack

    from kompot_dask._numerics.packed import PackedLower

    a = _spd(n)
    p = PackedLower.zeros(n)
    p.add_symmetric(lambda r, c: a[r, c], width=3)
    ref, info = lapack.dtrttf(np.asfortranarray(np.tril(a)), transr="N", uplo="L")
    assert info == 0
    np.testing.assert_array_equal(p.data, ref)
    np.testing.assert_array_equal(p.diagonal(), np.diag(a))
    assert p.abs_sum() == pytest.approx(np.abs(a).sum(), rel=1e-12)
    assert p.cholesky()
    low = np.linalg.cholesky(a)
    np.testing.assert_allclose(p.lower(), low, rtol=1e-12, atol=1e-12)
    b = np.random.default_rng(1).normal(size=(n, 4))
    for transpose, op in ((False, low), (True, low.T)):
        for order in ("F", "C"):
            x = p.solve(np.array(b, order=order), transpose=transpose)
            np.testing.assert_allclose(op @ x, b, rtol=1e-10, atol=1e-10)


def test_packed__not_positive_definite_is_nan_and_refused():
    from kompot_dask._numerics.packed import PackedLower, order_of

    p = PackedLower.from_lower(np.asfortranarray(-np.eye(4)))
    assert not p.cholesky()
    assert np.isnan(p.data).all()
    with pytest.raises(FloatingPointError, match="Cholesky factor C1 is not finite"):
        gp.check_factor("C1", p)
    with pytest.raises(ValueError, match="not the lower triangle of a square matrix"):
        order_of(11)


def test_packed__pickles_and_dask_sizes_its_numbers():
    import pickle

    from dask.sizeof import sizeof

    from kompot_dask._numerics.packed import PackedLower

    p = PackedLower.from_lower(np.asfortranarray(np.linalg.cholesky(_spd(64))))
    q = pickle.loads(pickle.dumps(p))
    assert q.n == 64 and np.array_equal(q.data, p.data)
    assert 64 * 65 // 2 * 8 <= sizeof(p) < 64 * 65 // 2 * 8 + 1024  # half a dense 64 × 64 array


def test_factors__stored_forms_load_and_solve_alike():
    """A saved packed factor (one-dimensional numbers) and an older staging's dense upper
    factor (U = Lᵀ, two-dimensional) give the same weights."""
    X1, X2, Z, Y1, Y2, ls = problem()
    c = gp.condition_factor(Z, ls, gp.cross_gram(Z, X1, ls, chunk=16), 0.5)
    B = np.random.default_rng(2).normal(size=(Z.shape[0], 3))
    w = gp.condition_weights(c, B, 0.5)
    np.testing.assert_allclose(gp.condition_weights(gp.stored_form(c).copy(), B, 0.5), w, rtol=1e-12)
    np.testing.assert_allclose(gp.condition_weights(np.ascontiguousarray(gp.dense_lower(c).T), B, 0.5), w,
                               rtol=1e-10)
    # in place on a C-ordered right-hand side: the same weights, and B is the result
    Bc = np.ascontiguousarray(B)
    out = gp.condition_weights(c, Bc, 0.5, overwrite=True)
    assert out is Bc
    np.testing.assert_allclose(out, w, rtol=1e-10)


def test_metric__with_the_prior_part_computed_apart_is_the_same():
    """The engine computes the metric's Lp part in a task of its own (it needs no cells):
    handing it in gives the metric computed in one piece, bit for bit."""
    X1, X2, Z, Y1, Y2, ls = problem(m=30)
    lp = gp.landmark_cholesky(Z, ls)
    c1 = gp.condition_factor(Z, ls, gp.cross_gram(Z, X1, ls, chunk=16), 0.7)
    c2 = gp.condition_factor(Z, ls, gp.cross_gram(Z, X2, ls, chunk=16), 0.7)
    whole, diag_whole = gp.landmark_metric(Z, ls, lp, c1, c2, 1e-8, allow_diagonal=False)
    apart, diag_apart = gp.landmark_metric(Z, ls, None, c1, c2, 1e-8, allow_diagonal=False,
                                           prior=gp.prior_covariance(Z, ls, lp))
    np.testing.assert_array_equal(np.asarray(apart), np.asarray(whole))
    assert diag_whole == diag_apart


@pytest.mark.parametrize("m", [7, 40, 300])
def test_prior_covariance__identity_matches_the_explicit_form(m):
    """At the landmarks the prior part 2(K − PᵀP) comes from j·I − j²(K + jI)⁻¹ (one packed
    inversion): it equals numpy's explicit 2(K − K(K + jI)⁻¹K) and the triangular-solve
    form the engine keeps for other points, to rounding (~1e-16·‖K‖; values ~2e-6)."""
    Z = np.random.default_rng(m).normal(size=(m, 5)) * 2
    ls = 3.0
    lp = gp.landmark_cholesky(Z, ls)
    K = dense_matern(Z, Z, ls)
    explicit = 2 * (K - K @ np.linalg.solve(K + gp.JITTER * np.eye(m), K))
    by_identity = gp.symmetric_from_lower(gp.prior_covariance(Z, ls, lp))
    by_solves = gp.symmetric_from_lower(gp.prior_covariance(Z, ls, gp._DenseLower(gp.dense_lower(lp))))
    scale = np.abs(K).sum(axis=1).max() * 1e-14
    np.testing.assert_allclose(by_identity, explicit, rtol=0, atol=scale)
    np.testing.assert_allclose(by_identity, by_solves, rtol=0, atol=scale)
    assert np.abs(np.diag(by_identity) - 2 * gp.JITTER).max() < 1e-8  # the diagonal is 2j − O(j²)


def test_packed__invert_factor_is_the_inverse_and_nan_when_singular():
    from kompot_dask._numerics.packed import PackedLower

    for n in (1, 6, 9):
        a = _spd(n)
        p = PackedLower.from_lower(np.asfortranarray(np.linalg.cholesky(a)))
        assert p.invert_factor()
        np.testing.assert_allclose(gp.symmetric_from_lower(p), np.linalg.inv(a), rtol=1e-10, atol=1e-12)
    p = PackedLower.from_lower(np.asfortranarray(np.diag([1.0, 0.0, 2.0])))
    assert not p.invert_factor()
    assert np.isnan(p.data).all()
