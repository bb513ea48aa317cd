"""The few BLAS/LAPACK routines the fit and the scores need, called without holding the GIL.

``scipy.linalg.blas``/``lapack`` wrappers hold the GIL for the whole call: two Dask threads
of one worker then run their triangular solves one after the other (measured here: two
threads solving at once finish 1.0× as many solves per second as one). These wrappers
call the same routines, found through SciPy's ``cython_blas``/``cython_lapack`` function
tables, through :mod:`ctypes`, which releases the GIL around a foreign call.

Matrices are Fortran-ordered (column-major) numpy arrays of float32 or float64; the
routines work in place like their LAPACK namesakes.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

_c_int = ctypes.c_int
_ptr = ctypes.c_void_p


def _capsule_pointer(capsule) -> int:
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype = ctypes.c_char_p
    get_name.argtypes = [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return get_pointer(capsule, get_name(capsule))


@cache
def _routine(name: str, n_args: int):
    """The Fortran routine ``name`` (every argument passed by pointer)."""
    from scipy.linalg import cython_blas, cython_lapack

    for module in (cython_blas, cython_lapack):
        capsule = module.__pyx_capi__.get(name)
        if capsule is not None:
            return ctypes.CFUNCTYPE(None, *([_ptr] * n_args))(_capsule_pointer(capsule))
    raise AttributeError(f"SciPy exports no BLAS/LAPACK routine {name!r}")


def _prefix(a: np.ndarray) -> str:
    if a.dtype == np.float64:
        return "d"
    if a.dtype == np.float32:
        return "s"
    raise TypeError(f"BLAS needs float32 or float64 arrays, not {a.dtype}")


def _char(c: str):
    return ctypes.c_char_p(c.encode())


def _int(v: int):
    return ctypes.byref(_c_int(int(v)))


def _scalar(a: np.ndarray, v: float):
    return ctypes.byref((ctypes.c_double if a.dtype == np.float64 else ctypes.c_float)(v))


def _fortran(a: np.ndarray, name: str, writable: bool = False) -> None:
    if not a.flags.f_contiguous:
        raise ValueError(f"{name} must be Fortran-ordered")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable")


def syrk_lower(c: np.ndarray, a: np.ndarray, alpha: float = 1.0, beta: float = 1.0, *, trans: bool) -> np.ndarray:
    """Lower triangle of ``c ← alpha·A Aᵀ + beta·c`` (``trans=False``, A is n × k) or
    ``alpha·Aᵀ A + beta·c`` (``trans=True``, A is k × n), in place."""
    _fortran(c, "c", writable=True)
    _fortran(a, "a")
    if a.dtype != c.dtype:
        raise TypeError("syrk: a and c must have one dtype")
    n = c.shape[0]
    k = a.shape[0] if trans else a.shape[1]
    if (a.shape[1] if trans else a.shape[0]) != n or c.shape != (n, n):
        raise ValueError(f"syrk: shapes {a.shape} and {c.shape} do not fit")
    _routine(_prefix(c) + "syrk", 10)(
        _char("L"), _char("T" if trans else "N"), _int(n), _int(k), _scalar(c, alpha),
        _ptr(a.ctypes.data), _int(max(1, a.shape[0])), _scalar(c, beta), _ptr(c.ctypes.data), _int(max(1, n)),
    )
    return c


def trsm_left_lower(lower: np.ndarray, b: np.ndarray, *, transpose: bool = False, alpha: float = 1.0) -> np.ndarray:
    """``b ← alpha·L⁻¹ b`` (or ``L⁻ᵀ b``) in place, for a lower-triangular ``L``."""
    _fortran(lower, "the factor")
    _fortran(b, "b", writable=True)
    if lower.dtype != b.dtype:
        raise TypeError("trsm: the factor and b must have one dtype")
    m = lower.shape[0]
    n = b.shape[1] if b.ndim == 2 else 1
    if lower.shape != (m, m) or b.shape[0] != m:
        raise ValueError(f"trsm: shapes {lower.shape} and {b.shape} do not fit")
    _routine(_prefix(b) + "trsm", 11)(
        _char("L"), _char("L"), _char("T" if transpose else "N"), _char("N"), _int(m), _int(n),
        _scalar(b, alpha), _ptr(lower.ctypes.data), _int(max(1, m)), _ptr(b.ctypes.data), _int(max(1, m)),
    )
    return b


def potrf_lower(a: np.ndarray) -> int:
    """Cholesky factor of the lower triangle of ``a``, in place (LAPACK ``potrf``, upper
    triangle untouched); returns LAPACK's ``info`` (0 on success)."""
    _fortran(a, "a", writable=True)
    n = a.shape[0]
    info = _c_int(0)
    _routine(_prefix(a) + "potrf", 5)(_char("L"), _int(n), _ptr(a.ctypes.data), _int(max(1, n)), ctypes.byref(info))
    return int(info.value)


# --------------------------------------------------------------------------------------
# Rectangular full packed (RFP) storage: a symmetric or triangular n × n matrix's lower
# triangle in n(n + 1)/2 numbers, in LAPACK's layout for TRANSR = 'N', UPLO = 'L' (see
# :class:`kompot_dask._numerics.packed.PackedLower`). The routines run at level-3 speed.


def _packed(arf: np.ndarray, n: int, name: str = "the packed matrix") -> None:
    if arf.ndim != 1 or arf.shape[0] != n * (n + 1) // 2:
        raise ValueError(f"{name} must hold n(n + 1)/2 = {n * (n + 1) // 2} numbers, not {arf.shape}")
    if not arf.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous")


def tfsm_left_lower(arf: np.ndarray, n: int, b: np.ndarray, *, transpose: bool = False,
                    alpha: float = 1.0) -> np.ndarray:
    """``b ← alpha·L⁻¹ b`` (or ``L⁻ᵀ b``) in place, for a lower-triangular ``L`` in RFP."""
    _packed(arf, n, "the factor")
    _fortran(b, "b", writable=True)
    if arf.dtype != b.dtype:
        raise TypeError("tfsm: the factor and b must have one dtype")
    cols = b.shape[1] if b.ndim == 2 else 1
    if b.shape[0] != n:
        raise ValueError(f"tfsm: a factor of order {n} and b of shape {b.shape} do not fit")
    _routine(_prefix(b) + "tfsm", 11)(
        _char("N"), _char("L"), _char("L"), _char("T" if transpose else "N"), _char("N"), _int(n), _int(cols),
        _scalar(b, alpha), _ptr(arf.ctypes.data), _ptr(b.ctypes.data), _int(max(1, n)),
    )
    return b


def tfsm_right_lower(arf: np.ndarray, n: int, bt: np.ndarray, *, transpose: bool = False) -> np.ndarray:
    """``bt ← bt·L⁻¹`` (or ``bt·L⁻ᵀ``) in place, for a lower-triangular ``L`` in RFP and a
    Fortran-ordered ``bt`` (k × n): a C-ordered ``b`` (n × k) seen transposed, so that
    ``L⁻¹b`` and ``L⁻ᵀb`` need no Fortran copy of it."""
    _packed(arf, n, "the factor")
    _fortran(bt, "b", writable=True)
    if arf.dtype != bt.dtype:
        raise TypeError("tfsm: the factor and b must have one dtype")
    if bt.ndim != 2 or bt.shape[1] != n:
        raise ValueError(f"tfsm: a factor of order {n} and b of shape {bt.shape} do not fit")
    _routine(_prefix(bt) + "tfsm", 11)(
        _char("N"), _char("R"), _char("L"), _char("T" if transpose else "N"), _char("N"), _int(bt.shape[0]), _int(n),
        _scalar(bt, 1.0), _ptr(arf.ctypes.data), _ptr(bt.ctypes.data), _int(max(1, bt.shape[0])),
    )
    return bt


def sfrk_lower(arf: np.ndarray, n: int, a: np.ndarray, alpha: float = 1.0, beta: float = 1.0, *,
               trans: bool) -> np.ndarray:
    """``C ← alpha·A Aᵀ + beta·C`` (``trans=False``, A is n × k) or ``alpha·Aᵀ A + beta·C``
    (``trans=True``, A is k × n) in place, for a symmetric ``C`` in RFP."""
    _packed(arf, n)
    _fortran(a, "a")
    if a.dtype != arf.dtype:
        raise TypeError("sfrk: a and c must have one dtype")
    k = a.shape[0] if trans else a.shape[1]
    if (a.shape[1] if trans else a.shape[0]) != n:
        raise ValueError(f"sfrk: a of shape {a.shape} does not fit order {n}")
    _routine(_prefix(arf) + "sfrk", 10)(
        _char("N"), _char("L"), _char("T" if trans else "N"), _int(n), _int(k), _scalar(arf, alpha),
        _ptr(a.ctypes.data), _int(max(1, a.shape[0])), _scalar(arf, beta), _ptr(arf.ctypes.data),
    )
    return arf


def pftrf_lower(arf: np.ndarray, n: int) -> int:
    """Cholesky factor of a symmetric matrix in RFP, in place; returns LAPACK's ``info``."""
    _packed(arf, n)
    info = _c_int(0)
    _routine(_prefix(arf) + "pftrf", 5)(_char("N"), _char("L"), _int(n), _ptr(arf.ctypes.data), ctypes.byref(info))
    return int(info.value)


def pftri_lower(arf: np.ndarray, n: int) -> int:
    """The inverse (A = L Lᵀ)⁻¹ of a matrix whose Cholesky factor ``L`` is held in RFP,
    in place (lower triangle, RFP); returns LAPACK's ``info``."""
    _packed(arf, n)
    info = _c_int(0)
    _routine(_prefix(arf) + "pftri", 5)(_char("N"), _char("L"), _int(n), _ptr(arf.ctypes.data), ctypes.byref(info))
    return int(info.value)


def trttf_lower(a: np.ndarray, arf: np.ndarray) -> np.ndarray:
    """The lower triangle of the Fortran-ordered ``a`` into ``arf`` (RFP)."""
    _fortran(a, "a")
    n = a.shape[0]
    _packed(arf, n)
    info = _c_int(0)
    _routine(_prefix(a) + "trttf", 7)(_char("N"), _char("L"), _int(n), _ptr(a.ctypes.data), _int(max(1, n)),
                                      _ptr(arf.ctypes.data), ctypes.byref(info))
    return arf


def tfttr_lower(arf: np.ndarray, n: int, a: np.ndarray) -> np.ndarray:
    """The lower triangle held in ``arf`` (RFP) into the Fortran-ordered ``a`` (upper untouched)."""
    _packed(arf, n)
    _fortran(a, "a", writable=True)
    info = _c_int(0)
    _routine(_prefix(arf) + "tfttr", 7)(_char("N"), _char("L"), _int(n), _ptr(arf.ctypes.data),
                                        _ptr(a.ctypes.data), _int(max(1, n)), ctypes.byref(info))
    return a


def _row_stride(a: np.ndarray, name: str) -> int:
    """The row stride, in elements, of a 2-D array whose rows are contiguous."""
    if a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != a.itemsize) or a.strides[0] % a.itemsize:
        raise ValueError(f"{name} must be a 2-D array with contiguous rows")
    return max(1, a.strides[0] // a.itemsize, a.shape[1])


def gemm_accumulate(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``c += alpha·a @ b`` in place, for 2-D arrays with contiguous rows (C order, or row
    slices and leading-column slices of it): no product temporary, no copy of a strided
    operand. In BLAS's column-major terms it is ``cᵀ += bᵀ aᵀ``."""
    if not (a.dtype == b.dtype == c.dtype):
        raise TypeError("gemm: a, b and c must have one dtype")
    if a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"gemm: shapes {a.shape} @ {b.shape} into {c.shape} do not fit")
    if not c.flags.writeable:
        raise ValueError("c must be writable")
    lda, ldb, ldc = _row_stride(a, "a"), _row_stride(b, "b"), _row_stride(c, "c")
    if 0 in (a.shape[0], a.shape[1], b.shape[1]):
        return c
    _routine(_prefix(c) + "gemm", 13)(
        _char("N"), _char("N"), _int(c.shape[1]), _int(c.shape[0]), _int(a.shape[1]), _scalar(c, alpha),
        _ptr(b.ctypes.data), _int(ldb), _ptr(a.ctypes.data), _int(lda), _scalar(c, 1.0), _ptr(c.ctypes.data),
        _int(ldc),
    )
    return c
