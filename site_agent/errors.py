"""Errors a user can act on (former home; they live in `fedimg_core`). CLIs print them as one line."""

from fedimg_core.cli import run_cli
from fedimg_core.errors import ConfigError, FedimgError, UserError

__all__ = ["ConfigError", "FedimgError", "UserError", "run_cli"]
