"""Child process that decodes DICOM pixel data with GDCM for `preprocessing.dicom`.

GDCM (C++) ends its process with abort() on some corrupt or crafted data (a C++ exception
it does not catch, e.g. in a JPEG 2000 codestream), which no Python handler can stop. So
`preprocessing.dicom` never runs it in its own process: it starts this script, which
decodes a list of files in order, and turns the child's death into a refusal of the file
it was decoding.

Protocol: stdin holds a JSON list of file paths. For each, in order, stdout gets one JSON
line (``{"ok": true, "dtype": "<i2", "shape": [...]}`` followed by the array's bytes in C
order, or ``{"ok": false, "error": "..."}``). ``argv[1]`` is a time limit per file in
seconds: SIGALRM keeps its default action, so a decoder stuck in C code is killed too.
The script imports nothing from this project: it runs as ``python -I decode_worker.py``.
"""

import json
import signal
import sys
import warnings

import numpy as np
import pydicom


def main() -> int:
    """Decode the files listed on stdin, in order, writing one result per file to stdout.

    Returns:
        The exit status (0; a file that cannot be decoded is reported on stdout, not by the status).
    """
    timeout = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    paths = json.loads(sys.stdin.read())
    out = sys.stdout.buffer
    for path in paths:
        signal.alarm(timeout)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
                ds.pixel_array_options(decoding_plugin="gdcm")
                arr = np.ascontiguousarray(ds.pixel_array)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which refuses the file
            signal.alarm(0)
            text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            out.write(json.dumps({"ok": False, "error": text}).encode() + b"\n")
        else:
            signal.alarm(0)
            out.write(json.dumps({"ok": True, "dtype": arr.dtype.str, "shape": list(arr.shape)}).encode() + b"\n")
            out.write(arr.data.cast("B"))  # the C-order bytes, without a copy
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
