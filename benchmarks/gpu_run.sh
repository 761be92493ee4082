#!/usr/bin/env bash
# Everything issue 22 measures or checks on a GPU, in one short run (for a lent GPU machine or
# any site with one): the tests marked `gpu`, then the device suite's full set on CUDA.
# Results go to ${OUT:-gpu-results}/ (device_suite.md, device_suite.json, pytest-gpu.txt).
#   bash benchmarks/gpu_run.sh
# The venv needs torch's CUDA build: scripts/venv.sh installs the CPU one; on a GPU machine run
#   .venv/bin/pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 torchvision==0.28.0
# (or run it in the CUDA variant of the site image, docs/guide/docker.md).
# On a machine whose Python already has CUDA torch but not the project (e.g. Python 3.12, where
# Fed-BioMed does not install), the suite alone runs with PYTHON=python3 and, carried as wheels,
# monai, nibabel, pydantic, pydantic-core, annotated-types and typing-inspection on PYTHONPATH:
#   PYTHONPATH=/tmp/site:. python3 benchmarks/device_suite.py --device cuda --full
# (the `gpu` tests of the plans need Fed-BioMed, hence Python 3.11).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu-results}"
mkdir -p "$OUT"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))' || exit 2
"$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt"
"$PY" benchmarks/device_suite.py --device cuda --full --timeout 300 --json "$OUT/device_suite.json" --markdown "$OUT/device_suite.md"
