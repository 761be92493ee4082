#!/usr/bin/env bash
# Main job: a real Fed-BioMed federation on this machine. Four phantom hospitals (each
# labels only its own organs: kidney, liver, pancreas or spleen groups) write DICOM,
# convert it with `site-agent prepare` and run a Fed-BioMed node each; the coordinator
# trains a MONAI MedNeXt with ConDistFL, scores the result on an out-of-federation test
# set in another contrast phase, and writes the run report (path printed at the end).
# Extra arguments go to `coordinator testbed` (e.g. --rounds 4, --spec FILE).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/venv.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/coordinator" testbed --sites 4 "$@"
