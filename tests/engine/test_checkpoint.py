"""Checkpoints: a file that is not one detkit can read is a one-line CheckpointError naming it."""

import random

import pytest
import torch

from detkit.engine.checkpoint import load_checkpoint, save_checkpoint
from detkit.errors import CheckpointError


class NotATensor:  # a pickled instance of this is what weights_only refuses to load
    pass


def test_round_trip(tmp_path):
    path = save_checkpoint({"model": {"w": torch.arange(3.0)}, "epoch": 2}, tmp_path / "a" / "last.pt")
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.arange(3.0)) and state["epoch"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def write_bad_files(folder) -> dict[str, str]:
    """{file name: expected reason} for files that are not readable detkit checkpoints."""
    (folder / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    save_checkpoint({"model": {"w": torch.zeros(4096)}}, folder / "full.pt")
    data = (folder / "full.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {"w": torch.zeros(1)}}, folder / "foreign.pt")
    torch.save({"model": NotATensor()}, folder / "objects.pt")
    (folder / "empty.pt").write_bytes(b"")
    return {"random.pt": "not a file written by torch.save", "truncated.pt": "truncated or corrupt",
            "foreign.pt": "no 'model' entry", "objects.pt": "holds Python objects", "empty.pt": "empty"}


def test_unreadable_files_are_one_line_checkpoint_errors(tmp_path):
    for name, reason in write_bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name} is not a readable detkit checkpoint: ") and reason in message
        assert "\n" not in message and "weights_only" not in message
        assert isinstance(info.value, ValueError) and info.value.__cause__ is None
