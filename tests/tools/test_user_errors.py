"""User errors end in one line, ``error: <message>``, through every tool: no traceback, no torch advice."""

import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from detkit.app.build import build_model
from detkit.engine.checkpoint import save_checkpoint
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]


def tiny_data(root: Path) -> list[str]:
    return [f"data.builtin.root={root}", "data.builtin.num_train=24", "data.builtin.num_val=8",
            "++data.builtin.min_size=96", "++data.builtin.max_size=128", "++data.builtin.workers=1",
            "data.img_size=96", "model.backbone.width=8", "trainer.threads=1"]


def checkpoint_commands(path: Path, run_dir: Path, data: Path) -> dict[str, list[str]]:
    """Every tool that reads a checkpoint, given ``path`` as that checkpoint."""
    return {
        "eval": ["tools/eval.py", f"checkpoint={path}"],
        "predict": ["tools/predict.py", f"checkpoint={path}", f"source={data}"],
        "export": ["tools/export.py", f"checkpoint={path}"],
        "slim": ["tools/slim.py", f"checkpoint={path}", f"out={run_dir}"],
        "compare_compression": ["tools/compare_compression.py", f"checkpoint={path}", f"out={run_dir}"],
        "distill": ["tools/distill.py", f"teacher={path}", *tiny_data(data)],
        "train resume": ["tools/train.py", f"resume={path}", *tiny_data(data)],
        "train weights": ["tools/train.py", f"weights={path}", *tiny_data(data)],
    }


def run_tools(commands: dict[str, list[str]], run_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    def run(name: str, args: list[str]) -> subprocess.CompletedProcess:
        hydra_dir = f"hydra.run.dir={run_dir / name.replace(' ', '_')}"
        return subprocess.run([sys.executable, *args, hydra_dir], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:  # mostly interpreter start-up and imports
        return dict(zip(commands, pool.map(run, commands, commands.values())))


def assert_one_error_line(result: subprocess.CompletedProcess, *parts: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert all(part in lines[0] for part in parts), lines[0]
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory, tiny_builtin) -> Path:
    """A checkpoint as training writes it (config, classes, weights) of an untrained tiny model."""
    cfg = compose_config("train", tiny_data(tiny_builtin))
    names = ["circle", "square", "triangle"]
    model = build_model(cfg.model, len(names))
    path = tmp_path_factory.mktemp("checkpoint") / "last.pt"
    return save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True),
                            "class_names": names, "label_to_category_id": [1, 2, 3]}, path)


def test_unreadable_checkpoint_is_one_line_in_every_tool(untrained_checkpoint, tiny_builtin, tmp_path):
    # two kinds of unreadable file, each given to half the tools in turn: every tool and every kind is covered
    # with one start-up per tool
    random_file, truncated = tmp_path / "random.pt", tmp_path / "truncated.pt"
    random_file.write_bytes(random.Random(0).randbytes(4096))
    data = untrained_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    bad = {name: (random_file, truncated)[i % 2]
           for i, name in enumerate(checkpoint_commands(random_file, tmp_path, tiny_builtin))}
    commands = {name: checkpoint_commands(path, tmp_path / "runs", tiny_builtin)[name] for name, path in bad.items()}
    results = run_tools(commands, tmp_path / "runs")
    for name, result in results.items():
        assert result.returncode == 1, (name, result.stderr[-3000:])
        assert_one_error_line(result, str(bad[name]), "is not a readable detkit checkpoint")


def test_test_size_not_a_multiple_of_the_stride_is_one_line(untrained_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "tools/eval.py", f"checkpoint={untrained_checkpoint}", "test_size=100",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_error_line(result, "test_size=100", "must be a multiple of 32")
    assert not (tmp_path / "report.txt").exists()
