"""Silence Fed-BioMed's console logging; shared by the site agent and the coordinator.

Fed-BioMed is imported inside the function only, so importing this module stays light.
"""

from __future__ import annotations


def quiet_fedbiomed_console() -> None:
    """Remove Fed-BioMed's console log handler; its file logs are kept.

    Fed-BioMed logs to the console from import time on; our CLIs print only their own
    lines. Its file logs (in the component's log/ folder) are kept.
    """
    from fedbiomed.common.logger import logger

    logger._internal_add_handler("CONSOLE", None)  # its documented way to remove a handler
