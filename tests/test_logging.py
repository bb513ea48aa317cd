"""Importing kompot_dask never doubles an application's log lines, and a script that
configures no logging still sees kompot's timestamped INFO lines once.

Each case runs in a fresh interpreter: logging configuration is process-wide, and pytest's
own capture handlers on the root logger would hide what an application sees.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = "kompot-logging-probe"


def _stderr_of(script: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stderr.splitlines() if LINE in line]


@pytest.mark.parametrize("order", ["configure_then_import", "import_then_configure"])
def test_logging__application_config_shows_each_line_once(order):
    configure = 'logging.basicConfig(level=logging.INFO, format="APP %(name)s %(message)s")'
    steps = ["import kompot_dask", configure]
    if order == "configure_then_import":
        steps.reverse()
    lines = _stderr_of("import logging\n" + "\n".join(steps) + f"""
logging.getLogger("kompot_dask").info("{LINE}")
""")
    assert lines == [f"APP kompot_dask {LINE}"]


def test_logging__own_handler_on_the_kompot_logger_shows_each_line_once():
    lines = _stderr_of(f"""
        import logging, sys
        import kompot_dask
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("MINE %(message)s"))
        logging.getLogger("kompot_dask").addHandler(handler)
        logging.getLogger("kompot_dask").info("{LINE}")
    """)
    assert lines == [f"MINE {LINE}"]


def test_logging__no_config_shows_timestamped_info_once():
    lines = _stderr_of(f"""
        import logging
        import kompot_dask
        logging.getLogger("kompot_dask").info("{LINE}")
    """)
    assert len(lines) == 1
    assert re.fullmatch(rf"\[\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}}\] \[INFO    \] {LINE}", lines[0]), lines
