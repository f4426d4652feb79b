"""detkit as a user gets it: a non-editable install into a fresh virtual environment, used from outside the
repository, loads a checkpoint and predicts with the configs it ships; and the package never reaches for the
repository's benchmarks/ or tools/."""

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in the fresh environment, from a folder outside the repository (argv[1]: that folder).
USER_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import detkit
    from detkit.app.build import build_model

    repository, work = Path(sys.argv[1]), Path(sys.argv[2])
    installed = Path(detkit.__file__).resolve().parent
    assert repository not in installed.parents, f"imported the repository's detkit: {installed}"
    assert (detkit.config_dir() / "train.yaml").is_file() and installed in detkit.config_dir().parents

    with initialize_config_dir(config_dir=str(detkit.config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "data.img_size=96", "model.backbone.width=8", "model.backbone.depths=[1,1,1,1]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    weights = model.state_dict()
    torch.save({"model": weights, "weights": weights, "config": OmegaConf.to_container(cfg, resolve=True),
                "class_names": ["a", "b", "c"], "label_to_category_id": [1, 2, 3]}, work / "tiny.pt")

    d = detkit.load(work / "tiny.pt")
    image = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    results = d.predict(image)
    assert isinstance(results, list) and len(results) == 1, results  # one dict per image
    result = results[0]
    n = len(result["boxes"])
    assert tuple(result["boxes"].shape) == (n, 4), result["boxes"].shape
    assert len(result["scores"]) == n and len(result["labels"]) == n
    print("installed detkit OK:", installed)
""")


@pytest.mark.skipif(importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None,
                    reason="pip and setuptools are needed to install detkit")
def test_a_non_editable_install_loads_a_checkpoint_and_predicts_from_outside_the_repository(tmp_path):
    # Build from a copy of what the package is made of, so the build leaves nothing in the repository.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("detkit", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    venv = tmp_path / "venv"
    # Without its own pip and setuptools the environment uses this interpreter's (from the system site-packages,
    # like torch and the other dependencies), so nothing is downloaded.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                   check=True, env=env, cwd=tmp_path)
    shutil.rmtree(source)  # the installed copy must stand on its own
    work = tmp_path / "work"
    work.mkdir()
    (work / "user.py").write_text(USER_SCRIPT)
    run = subprocess.run([str(python), "user.py", str(ROOT), str(work)], cwd=work, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "installed detkit OK: " + str(venv.resolve()) in run.stdout


def test_the_package_imports_neither_benchmarks_nor_tools():
    outside = ("benchmarks", "tools", "tests")
    offenders = []
    for file in sorted((ROOT / "detkit").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{file.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in outside]
    assert not offenders
