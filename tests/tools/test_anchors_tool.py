"""``tools/anchors.py`` end to end on the tiny built-in dataset: it prints grouped anchors and writes nothing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_anchors_tool_prints_groups_and_writes_nothing(tiny_builtin, tmp_path):
    before = sorted(tiny_builtin.rglob("*"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "anchors.py"), f"data.builtin.root={tiny_builtin}",
         "data.builtin.num_train=24", "data.builtin.num_val=8", "data.builtin.min_size=96",
         "data.builtin.max_size=128", "data.builtin.workers=1", "data.img_size=96", "k=6", "num_scales=3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("6 anchors") and "mean best IoU" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["  scale 0", "  scale 1", "  scale 2"]
    assert list(tmp_path.iterdir()) == [] and sorted(tiny_builtin.rglob("*")) == before
