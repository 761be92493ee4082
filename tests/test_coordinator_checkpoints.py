"""Checkpoints are read with ``torch.load(weights_only=True)``: a pickled callable is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from coordinator import checkpoints


class _Payload:
    """Unpickling this would call ``Path.touch`` on a marker file (code run at load time)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_round_trips_as_plain_tensors(tmp_path):
    target = tmp_path / "ckpt.pt"
    checkpoints.save_tensors(target, {"w": torch.arange(3.0)})
    loaded = checkpoints.load_tensors(target)
    assert torch.equal(loaded["w"], torch.arange(3.0))


def test_a_checkpoint_holding_a_callable_is_refused(tmp_path):
    marker = tmp_path / "ran"
    target = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, target)
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.load_tensors(target)
    assert not marker.exists()  # the callable never ran


def test_select_best_refuses_a_global_checkpoint_holding_a_callable(tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, ckpt / "global_round_0000.pt")
    record = {"round": 1, "sites": {"n1": {"name": "a", "val_global": {"dice_liver": 0.5}}}}
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.select_best(tmp_path, {}, record, {}, {"n1": "a"})
    assert not marker.exists()
