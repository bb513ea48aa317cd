"""The rendered tutorial (docs/tutorial.md) cannot rot: its script runs here, reduced
(fewer null genes), as a plain process, and every step must produce what the page shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tutorial__every_step_runs_and_every_figure_is_written(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "make_tutorial.py"), "--quick",
                           "--out", str(out), "--workdir", str(work)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    page = (out / "tutorial.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\((tutorial_images/[^)]+)\)", page)
    assert len(images) >= 12
    for image in images:
        with open(out / image, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", image
    # the tutorial's sections, kompot's log lines and the run tracking, as the page shows them
    for expected in ("## Volcano plot customization", "## Heatmap customization", "## Multiple comparisons",
                     "## Inspecting run metadata", "## Resource planning", "## Cleaning up",
                     "Fitting expression estimator for condition 1...", "This run will have `run_id=1`.",
                     "Using DE run 0: comparing G1 to S", "Overwritten by Run 1", "Removed by cleanup",
                     "RESOURCE USAGE PLAN", "Comparison of Run 0 and Run 1"):
        assert expected in page, expected
    assert "Traceback" not in page
    # the committed page comes from the same steps (headings and code), only the outputs differ
    committed = open(os.path.join(ROOT, "docs", "tutorial.md")).read()
    code = re.compile(r"```python\n.*?```", re.S)
    assert code.findall(committed) == code.findall(page)
