"""scripts/code_metrics.py counts hand-written config validators by what they do, not by their name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "code_metrics.py"

SOURCE = """
def parse_cfg(raw):  # a hand validator: two keys, types checked by hand
    problems = []
    if not isinstance(raw.get("rounds"), int):
        problems.append("rounds: must be an integer")
    lr = raw.get("lr")
    if not isinstance(lr, float):
        problems.append("lr: must be a number")
    for key in raw:
        if key not in ("rounds", "lr"):
            raise ValueError(f"{key}: unknown key")
    if problems:
        raise ValueError("; ".join(problems))


def _number(problems, cfg, key):  # a per-key helper
    if not isinstance(cfg.get(key), float):
        raise ValueError(f"{key}: must be a number")


def check_dicom(ds):  # a file-format check: DICOM keywords, not config keys
    if "PixelData" not in ds or not isinstance(ds["Rows"], int):
        raise ValueError("no pixel data")


def check_tensor(x):  # a runtime precondition, whatever its name
    if not isinstance(x, list):
        raise TypeError("x must be a list")


def validate_with_model(data):  # the declarative way
    return Model.model_validate(data)
"""


def test_validators_are_found_by_what_they_do(tmp_path: Path) -> None:
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "m.py").write_text(textwrap.dedent(SOURCE), encoding="utf-8")
    listed = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--validators"], check=True, capture_output=True, text=True).stdout.split("\n")
    assert [line.split(" ", 1)[1] for line in listed if line] == ["parse_cfg", "_number"]
    counts = json.loads(subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], check=True, capture_output=True, text=True).stdout)
    assert counts["validators"] == 2 and counts["validator_named_functions"] == 3  # by name: _number, check_dicom, check_tensor
