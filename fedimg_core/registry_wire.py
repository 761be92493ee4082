"""The artifact registry's wire protocol constants, shared by server and client.

The coordinator's registry (`coordinator.registry`, `coordinator.registry_http`) and the
site's client (`site_agent.registry_client`) both import these, so the two sides cannot
drift apart.
"""

from __future__ import annotations

import re

KINDS = ("factory", "segmentation-branch", "model", "atlas")  # artifact kinds (atlas: FedSR's one labelled image)
ALLOWED_SUFFIXES = (".pt", ".safetensors", ".json", ".yaml", ".md")  # weights, configs and model cards; images only as a FedSR atlas (tensors in safetensors)
RECORD_FILE = "artifact.json"  # an artifact version's record
SHA256_HEADER = "X-Content-SHA256"  # the file's checksum, on every file download
TOKEN_ENV = "FEDIMG_SITE_TOKEN"  # the site's registry token, if not in a token file
MAX_PUSH_BYTES = 256 * 1024 * 1024  # a push request body, base64 included
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # an artifact name (and not starting with '.')
MIN_CASES_SENT = 5  # a site's evaluation sent to the coordinator: at least this many cases behind every number sent
FILENAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # a file name within an artifact
