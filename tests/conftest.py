import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cli(name: str, *args: str, env: dict | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run one of the project's console scripts as a user would."""
    return subprocess.run(
        [str(BIN / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


@pytest.fixture
def site_yaml(tmp_path):
    """A valid site config dict rooted in tmp_path."""
    return {
        "site_name": "site-a",
        "coordinator": {"host": "localhost", "port": 50051},
        "data_dir": str(tmp_path / "data"),
        "work_dir": str(tmp_path / "work"),
        "runtime": "process",
    }
