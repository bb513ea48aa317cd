"""The architecture's walls (docs/architecture.md), enforced: import-linter contracts in
pyproject.toml, plus the anndata I/O calls that an import check cannot see."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "kompot_dask")


def test_layering__import_contracts_hold():
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_layering__anndata_io_only_in_the_io_layer():
    """read_zarr / read_elem / write_elem / read_lazy are I/O: only kompot_dask/_io calls them."""
    pattern = re.compile(r"\b(read_zarr|write_zarr|read_elem|write_elem|read_lazy|read_elem_lazy|read_h5ad|sparse_dataset)\b")
    offenders = []
    for root, _, files in os.walk(PACKAGE):
        if os.path.relpath(root, PACKAGE).split(os.sep)[0] == "_io":
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            for i, line in enumerate(open(path, encoding="utf-8"), start=1):
                code = line.split("#", 1)[0]
                if pattern.search(code) and not code.lstrip().startswith(('"', "'", 'f"', "f'")):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not offenders, "anndata I/O outside kompot_dask/_io:\n" + "\n".join(offenders)


def test_layering__only_documented_namespaces_are_public():
    import pkgutil

    import kompot_dask

    public = sorted(m.name for m in pkgutil.walk_packages(kompot_dask.__path__, "kompot_dask.")
                    if not any(part.startswith("_") for part in m.name.split(".")[1:]))
    assert public == ["kompot_dask.cli", "kompot_dask.deploy", "kompot_dask.plot", "kompot_dask.testing"]
