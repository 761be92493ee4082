"""Wall time of `site-agent prepare` vs dcm2niix on the same DICOM series, side by side; and `--jobs`.

Both run as whole processes (start-up included), alternating, several repeats; the script
prints the median of each and the ratio prepare / dcm2niix next to the goal (<= 1.5x at 120
slices, <= 1.2x at 400). Both write gzip'd NIfTI at level 1 (nibabel's default; dcm2niix
`-z y -1`); prepare runs with `--no-qc` (the QC figures are extra work dcm2niix does not do;
one run with QC is timed for reference). The series are phantom CTs written as real DICOM
(uncompressed by default).

Then a folder of several series, converted by one process each (``prepare --jobs 1`` against
dcm2niix on the folder): what a site converting many cases pays per case, start-up paid once.

Then `--jobs`: a folder of several series prepared with ``--jobs 1`` and with ``--jobs N``
(QC on: its figures are drawn by the same workers), the speed-up, and whether the two datasets
are byte for byte the same.

    .venv/bin/python benchmarks/prepare_vs_dcm2niix.py [--slices 120,400] [--size 512] [--repeats 3] [--series 6] [--jobs 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedimg_testing.files import same_tree  # noqa: E402
from fedimg_testing.phantom import PlantedIdentifiers, make_phantom, write_dicom_series  # noqa: E402

BIN = Path(sys.executable).parent
TRANSFER_SYNTAXES = {
    "explicit": pydicom.uid.ExplicitVRLittleEndian,
    "jpegls": pydicom.uid.JPEGLSLossless,
    "j2k": pydicom.uid.JPEG2000Lossless,
    "rle": pydicom.uid.RLELossless,
}
GOALS = {120: 1.5, 400: 1.2}  # issue 27: prepare / dcm2niix, whole processes, QC off


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return dt


def prepare_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    # the case map goes next to the output; a fixed salt file makes two outputs comparable byte for byte
    return [str(BIN / "site-agent"), "prepare", str(src), "--out", str(out), "--modality", "CT", *extra]


def write_series(folder: Path, size: int, slices: int, seed: int, syntax: str) -> Path:
    vol = make_phantom(seed=seed, shape=(size, size, slices), spacing=(0.8, 0.8, 1.25))
    write_dicom_series(vol, folder, PlantedIdentifiers.for_case(seed, 0), transfer_syntax=TRANSFER_SYNTAXES[syntax])
    return folder


def one_series(work: Path, dcm2niix: str, size: int, slices: int, repeats: int, syntax: str) -> dict[str, float]:
    """prepare --no-qc and dcm2niix alternating on one series; one prepare with QC."""
    print(f"writing a {size}x{size}x{slices} phantom CT series ({syntax}) ...", flush=True)
    series = write_series(work / f"dicom-{slices}" / "case_000", size, slices, 1, syntax)
    outs = work / f"outs-{slices}"
    prep, d2n = [], []
    for r in range(repeats):
        shutil.rmtree(outs, ignore_errors=True)
        outs.mkdir()
        prep.append(timed(prepare_cmd(series, outs / "prep", "--no-qc")))
        (outs / "d2n").mkdir()
        d2n.append(timed([dcm2niix, "-z", "y", "-1", "-b", "n", "-f", "case", "-o", str(outs / "d2n"), str(series)]))
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    with_qc = timed(prepare_cmd(series, outs / "prep-qc"))
    shutil.rmtree(outs, ignore_errors=True)
    return {"prepare": statistics.median(prep), "dcm2niix": statistics.median(d2n), "qc": with_qc, "mb": sum(f.stat().st_size for f in series.iterdir()) / 1e6,
            "runs_prepare": prep, "runs_dcm2niix": d2n}  # fmt: skip


def one_folder(work: Path, folder: Path, dcm2niix: str, repeats: int) -> dict[str, Any]:
    """prepare --no-qc --jobs 1 and dcm2niix, each one process over a folder of series, alternating."""
    outs = work / "outs-folder"
    prep, d2n = [], []
    for _ in range(repeats):
        shutil.rmtree(outs, ignore_errors=True)
        outs.mkdir()
        prep.append(timed(prepare_cmd(folder, outs / "prep", "--no-qc", "--jobs", "1")))
        (outs / "d2n").mkdir()
        d2n.append(timed([dcm2niix, "-z", "y", "-1", "-b", "n", "-o", str(outs / "d2n"), str(folder)]))
    n_series = len([d for d in folder.iterdir() if d.is_dir()])
    for tool, written in (("dcm2niix", outs / "d2n"), ("prepare", outs / "prep" / "imagesTr")):
        n_written = len(list(written.glob("*.nii.gz")))
        if n_written != n_series:  # both must have converted every series, or the times compare different work
            raise SystemExit(f"{tool} wrote {n_written} NIfTI files for {n_series} series in {folder}")
    shutil.rmtree(outs, ignore_errors=True)
    return {"prepare": statistics.median(prep), "dcm2niix": statistics.median(d2n), "runs_prepare": prep, "runs_dcm2niix": d2n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="rows = columns")
    ap.add_argument("--slices", default="120,400", help="series lengths to compare with dcm2niix")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default="explicit")
    ap.add_argument("--series", type=int, default=6, help="series in the --jobs comparison (0: skip it)")
    ap.add_argument("--series-slices", type=int, default=120)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    dcm2niix = shutil.which("dcm2niix", path=str(BIN)) or shutil.which("dcm2niix")
    if not dcm2niix:
        raise SystemExit("dcm2niix not found (it is a dev dependency: ./scripts/venv.sh installs it)")
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        rows = {int(n): one_series(work, dcm2niix, args.size, int(n), args.repeats, args.transfer_syntax) for n in args.slices.split(",") if n}
        print(f"\nprepare --no-qc vs dcm2niix -z y -1, whole processes, median of {args.repeats} alternating runs ({args.transfer_syntax}, "
              f"{args.size}x{args.size}, {os.cpu_count()} cores)")  # fmt: skip
        print(f"{'slices':>7}{'MB':>7}{'prepare s':>11}{'dcm2niix s':>12}{'ratio':>8}{'goal':>8}{'with QC s':>11}   runs (prepare | dcm2niix)")
        for n, row in rows.items():
            goal = GOALS.get(n)
            ratio = row["prepare"] / row["dcm2niix"]
            verdict = "" if goal is None else ("ok" if ratio <= goal else "MISSED")
            print(f"{n:>7}{row['mb']:>7.0f}{row['prepare']:>11.2f}{row['dcm2niix']:>12.2f}{ratio:>7.2f}x"
                  f"{('<=' + format(goal, '.1f') + 'x') if goal else '-':>8}{row['qc']:>11.2f}   "
                  f"{[round(x, 2) for x in row['runs_prepare']]} | {[round(x, 2) for x in row['runs_dcm2niix']]} {verdict}")  # fmt: skip
        if args.series:
            print(f"\nwriting {args.series} series of {args.series_slices} slices for --jobs ...", flush=True)
            folder = work / "many"
            for i in range(args.series):
                write_series(folder / f"series_{i:03d}", args.size, args.series_slices, 10 + i, args.transfer_syntax)
            salt = work / "salt"
            salt.write_text(os.urandom(32).hex() + "\n")
            batch = one_folder(work, folder, dcm2niix, args.repeats)
            print(f"\n{args.series} series x {args.series_slices} slices in one process each (prepare --no-qc --jobs 1 | dcm2niix on the folder), "
                  f"median of {args.repeats} alternating runs: prepare {batch['prepare']:.2f} s, dcm2niix {batch['dcm2niix']:.2f} s, "
                  f"ratio {batch['prepare'] / batch['dcm2niix']:.2f}x ({batch['prepare'] / args.series:.2f} s | {batch['dcm2niix'] / args.series:.2f} s per series)   "
                  f"runs {[round(x, 2) for x in batch['runs_prepare']]} | {[round(x, 2) for x in batch['runs_dcm2niix']]}")  # fmt: skip
            t1 = timed(prepare_cmd(folder, work / "jobs-1", "--salt-file", str(salt), "--case-map", str(work / "jobs-1.map"), "--jobs", "1"))
            tn = timed(
                prepare_cmd(folder, work / f"jobs-{args.jobs}", "--salt-file", str(salt), "--case-map", str(work / "jobs-n.map"), "--jobs", str(args.jobs))
            )
            same = same_tree(work / "jobs-1", work / f"jobs-{args.jobs}")
            print(f"{args.series} series x {args.series_slices} slices, QC on: --jobs 1 {t1:.1f} s, --jobs {args.jobs} {tn:.1f} s, "
                  f"speed-up {t1 / tn:.2f}x on {os.cpu_count()} cores; datasets byte for byte the same: {same}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
