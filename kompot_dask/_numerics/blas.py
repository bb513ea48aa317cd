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
