#!/usr/bin/env bash
# Main job: a real Fed-BioMed federation on this machine (coordinator + 3 site nodes as
# processes on loopback) trains a small MONAI segmentation network with FedAvg on
# synthetic demo volumes, and prints per-round metrics from every site.
# Extra arguments go to `coordinator testbed` (e.g. --sites 4 --rounds 5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/venv.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/coordinator" testbed --sites 3 "$@"
