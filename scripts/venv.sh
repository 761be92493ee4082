#!/usr/bin/env bash
# Create or update the project-local virtual environment (.venv). Idempotent: when
# pyproject.toml, constraints.txt and the install scripts are unchanged it returns at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.fedimg-install-stamp"
cd "$ROOT"

pick_python() {
  for candidate in "${PYTHON:-}" python3.11 python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "fedimg needs Python 3.11 (Fed-BioMed 6.4.1 requires <3.12); set PYTHON=/path/to/python3.11" >&2
  return 1
}

want="$(cat pyproject.toml constraints.txt scripts/venv.sh scripts/torchvision_cpu_guard.py | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  py="$(pick_python)"
  echo "creating $VENV with $py"
  "$py" -m venv "$VENV"
fi
echo "installing fedimg and its dependencies into .venv (the first time takes ~5 minutes)..."
# The constraints file keeps the CPU torch build: any unpinned torch requirement would
# otherwise pull a newer CUDA build and several GB of nvidia wheels.
"$VENV/bin/pip" install --progress-bar off -q -c constraints.txt -e ".[dev]"
"$VENV/bin/python" scripts/torchvision_cpu_guard.py

# The Compose file schema, to validate docker-compose.yml where no Docker engine runs:
# taken from the docker-compose 1.29.2 wheel on the package index (not installed: its
# pins conflict with ours; only the JSON schema is extracted).
if [ ! -f "$VENV/share/compose_spec.json" ]; then
  tmp="$(mktemp -d)"
  if "$VENV/bin/pip" download --no-deps -q -d "$tmp" docker-compose==1.29.2 >/dev/null 2>&1; then
    mkdir -p "$VENV/share"
    "$VENV/bin/python" - "$tmp" "$VENV/share/compose_spec.json" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/docker_compose-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("compose/config/compose_spec.json"))
PY
  else
    echo "warning: could not fetch the Compose schema; its test will be skipped" >&2
  fi
  rm -rf "$tmp"
fi
echo "$want" > "$STAMP"
echo "environment ready: $VENV"
