from pathlib import Path

import detkit


def test_config_dir_is_the_repository_configs_folder_in_a_development_install():
    folder = detkit.config_dir()
    assert (folder / "train.yaml").is_file() and (folder / "model" / "yolov3.yaml").is_file()
    # pip install -e .: the package data is the repository's folder itself, so edits to it are seen
    here = (Path(__file__).resolve().parents[2] / "configs").resolve()
    assert folder.resolve() == here, f"detkit.configs is {folder}, not {here}: run pip install -e . in this checkout"
