"""Wall time of `site-agent prepare` vs dcm2niix on the same DICOM series, side by side.

Both run as whole processes (start-up included), alternating, several repeats; the
script prints the median of each and the ratio prepare / dcm2niix. Both write gzip'd
NIfTI at compression level 1 (nibabel's default; dcm2niix `-z y -1`). prepare runs with
`--no-qc` (the QC PNGs are extra work dcm2niix does not do) and also once with QC for
reference. The series is a phantom CT written as real DICOM (uncompressed by default).

    .venv/bin/python benchmarks/prepare_vs_dcm2niix.py [--slices 200] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedimg_testing.phantom import PlantedIdentifiers, make_phantom, write_dicom_series  # noqa: E402

BIN = Path(sys.executable).parent
TRANSFER_SYNTAXES = {
    "explicit": pydicom.uid.ExplicitVRLittleEndian,
    "jpegls": pydicom.uid.JPEGLSLossless,
    "j2k": pydicom.uid.JPEG2000Lossless,
    "rle": pydicom.uid.RLELossless,
}


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="rows = columns")
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default="explicit")
    args = ap.parse_args()
    dcm2niix = shutil.which("dcm2niix", path=str(BIN)) or shutil.which("dcm2niix")
    if not dcm2niix:
        raise SystemExit("dcm2niix not found (it is a dev dependency: ./scripts/venv.sh installs it)")
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        print(f"writing a {args.size}x{args.size}x{args.slices} phantom CT series ({args.transfer_syntax}) ...", flush=True)
        vol = make_phantom(seed=1, shape=(args.size, args.size, args.slices), spacing=(0.8, 0.8, 1.25))
        series = work / "dicom" / "case_000"
        write_dicom_series(vol, series, PlantedIdentifiers.for_case(1, 0), transfer_syntax=TRANSFER_SYNTAXES[args.transfer_syntax])
        size_mb = sum(f.stat().st_size for f in series.iterdir()) / 1e6
        prep, d2n, prep_qc = [], [], []
        for r in range(args.repeats):
            for out in work.glob("out-*"):
                shutil.rmtree(out)
            prep.append(timed([str(BIN / "site-agent"), "prepare", str(series), "--out", str(work / f"out-prep-{r}"), "--no-qc", "--modality", "CT"]))
            (work / f"out-d2n-{r}").mkdir()
            d2n.append(timed([dcm2niix, "-z", "y", "-1", "-b", "n", "-f", "case", "-o", str(work / f"out-d2n-{r}"), str(series)]))
        prep_qc.append(timed([str(BIN / "site-agent"), "prepare", str(series), "--out", str(work / "out-prep-qc"), "--modality", "CT"]))
        p, d = statistics.median(prep), statistics.median(d2n)
        print(f"series: {args.slices} slices of {args.size}x{args.size}, {size_mb:.0f} MB, {args.transfer_syntax}")
        print(f"{'converter':<28}{'median s':>10}{'runs':>30}")
        print(f"{'site-agent prepare --no-qc':<28}{p:>10.2f}{str([round(x, 2) for x in prep]):>30}")
        print(f"{'dcm2niix -z y -1':<28}{d:>10.2f}{str([round(x, 2) for x in d2n]):>30}")
        print(f"{'site-agent prepare (QC)':<28}{prep_qc[0]:>10.2f}")
        print(f"ratio prepare / dcm2niix = {p / d:.2f}x (target <= 2x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
