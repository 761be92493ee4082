#!/usr/bin/env bash
# Runs the test suite (unit + integration with real Fed-BioMed processes on loopback).
# Extra arguments go to pytest (e.g. -m "not integration", -k spec).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/venv.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
