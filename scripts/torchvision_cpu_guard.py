"""Make the CUDA-only torchvision wheel importable next to CPU torch (idempotent).

torchvision 0.28.0 is the only release pinned to torch 2.13.0 and it ships a CUDA build
of its native extension, which cannot load against the CPU torch build. Its pure-Python
parts work, but `_meta_registrations.py` registers fake kernels for `torchvision::nms`
and `torchvision::qnms` unconditionally, and that raises at import time when the native
ops are missing. Fed-BioMed imports torchvision in every training plan, so this guard
makes those two registrations conditional on the native ops being present, exactly like
the file's own `register_meta` helper already does for the other ops.

Effect: `import torchvision` works; native ops (nms, roi_align, image decoding) do not,
which this project never uses. Nothing changes when the native extension does load
(e.g. container images built against the matching CPU/CUDA wheel index).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

MARKER = "# fedimg: register only when the native ops loaded"
PATTERN = re.compile(r'^@torch\.library\.register_fake\("(torchvision::q?nms)"\)$', re.M)


def main() -> int:
    """Make torchvision importable next to the CPU torch build, if it is not.

    Returns:
        The exit status (0: importable, or made so).
    """
    if subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0:
        return 0  # already importable: nothing to do
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return 0  # not installed
    target = Path(spec.origin).parent / "_meta_registrations.py"
    text = target.read_text()
    if MARKER not in text:
        patched, n = PATTERN.subn(
            lambda m: f'@(torch.library.register_fake("{m.group(1)}") if torchvision.extension._has_ops() else (lambda fn: fn))  {MARKER}',
            text,
        )
        if n == 0:
            print(f"torchvision guard: no known registration to guard in {target}", file=sys.stderr)
            return 1
        target.write_text(patched)
    check = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"torchvision guard: torchvision still fails to import:\n{check.stderr[-2000:]}", file=sys.stderr)
        return 1
    print(f"torchvision guard: applied to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
