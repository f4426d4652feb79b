"""``tools/complexity.py``: one row per variant of a config, ratios against the first."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import CHECKOUT_ENV

ROOT = Path(__file__).resolve().parents[2]


def test_complexity_tool_prints_a_row_per_variant(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "complexity.py"), "model=yolov3_cpu", "--size", "64", "--classes", "3",
         "--variant", "model.backbone.block=igc"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=CHECKOUT_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    header, base, igc = result.stdout.strip().splitlines()
    assert "params" in header and "at 1x3x64x64" in header
    assert base.split()[0] == "model=yolov3_cpu" and base.split()[2] == "1.000"
    assert igc.split()[0] == "model.backbone.block=igc" and float(igc.split()[2]) < 1.0
