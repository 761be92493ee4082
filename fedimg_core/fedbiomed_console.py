"""Take Fed-BioMed's console logging over; shared by the site agent and the coordinator.

Fed-BioMed is imported inside the function only, so importing this module stays light.
"""

from __future__ import annotations

from fedimg_core.logs import route_fedbiomed


def quiet_fedbiomed_console() -> None:
    """Replace Fed-BioMed's console log handler by the CLIs' own route; its file logs are kept.

    Fed-BioMed logs to the console from import time on, in its own format. Its records reach
    the console through `fedimg_core.logs` instead: at WARNING, DEBUG with ``--verbose``, and
    not at all outside a CLI that set logging up. Its file logs (in the component's log/
    folder) are kept.
    """
    from fedbiomed.common.logger import logger  # deferred: importing Fed-BioMed takes seconds

    logger._internal_add_handler("CONSOLE", None)  # its documented way to remove a handler
    route_fedbiomed()
