"""docs/cli.md is the CLIs' own help: it must match what the code prints today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_cli_reference_matches_the_clis():
    proc = subprocess.run([sys.executable, "scripts/cli_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        "docs/cli.md differs from the CLIs' --help (an option or verb changed): regenerate it with "
        f"`.venv/bin/python scripts/cli_reference.py` and commit the result.\n{proc.stderr}"
    )


def test_cli_reference_lists_every_verb():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for verb in ("site-agent prepare", "site-agent plans approve", "coordinator run", "coordinator validate", "coordinator testbed"):
        assert f"### `{verb}`" in text
