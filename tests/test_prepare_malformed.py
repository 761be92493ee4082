"""Malformed inputs to `site-agent prepare`: each gives one clear error line naming the
problem, a non-zero exit, no traceback, and nothing half-written.

Every case starts from a valid tiny phantom site (one DICOM series + its NIfTI label, or a
NIfTI image + label) and breaks one thing. The CLI runs in-process through the same
`run_cli` wrapper the console script uses (a subprocess per case would cost ~1 s each);
a few cases also run as real subprocesses.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

from fedimg_testing.phantom import PlantedIdentifiers, make_phantom, write_dicom_series
from tests.conftest import cli as run_console_script
from tests.conftest import site_agent_in_process

SHAPE = (24, 24, 10)
SPACING = (1.5, 1.5, 2.5)
ORIGIN = (-20.0, -30.0, -40.0)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A valid site: dicom/case_a/<slices>, labels/case_a.nii.gz, nifti/case_b.nii.gz (+ label), label map."""
    root = tmp_path_factory.mktemp("template")
    vol = make_phantom(seed=7, shape=SHAPE, spacing=SPACING)
    files = write_dicom_series(vol, root / "dicom" / "case_a", PlantedIdentifiers.for_case(7, 0), origin=ORIGIN, file_names="instance")
    assert len(files) == SHAPE[2]
    from fedimg_testing.phantom import volume_affine_ras

    affine = volume_affine_ras(vol, ORIGIN, (1, 0, 0, 0, 1, 0))
    local = np.zeros(SHAPE, np.uint8)
    local[vol.label == 3] = 1  # liver
    local[vol.label == 4] = 2  # liver tumour
    (root / "labels").mkdir()
    nib.save(nib.Nifti1Image(local, affine), root / "labels" / "case_a.nii.gz")
    (root / "nifti").mkdir()
    nib.save(nib.Nifti1Image(vol.hu.astype(np.float32), affine), root / "nifti" / "case_b.nii.gz")
    (root / "nifti_labels").mkdir()
    nib.save(nib.Nifti1Image(local, affine), root / "nifti_labels" / "case_b.nii.gz")
    (root / "map.yaml").write_text(
        yaml.safe_dump(
            {"format": "fedimg-site-labels", "schema": "abdominal-ct", "schema_version": "1.0.0", "labels": {0: "background", 1: "liver", 2: "liver_tumor"}}
        )
    )
    return root


def run_prepare(args: list[str]) -> tuple[int, str, str]:
    """`site-agent prepare ARGS` in this process: (exit code, stdout, stderr)."""
    return site_agent_in_process("prepare", *args)


def dicom_files(site: Path) -> list[Path]:
    return sorted((site / "dicom" / "case_a").iterdir())


def by_position(site: Path) -> list[Path]:
    return sorted(dicom_files(site), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


def edit(path: Path, fn) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path, enforce_file_format=False)


def edit_all(site: Path, fn) -> None:
    for f in dicom_files(site):
        edit(f, fn)


def truncate(path: Path, keep: float | int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])


def save_nifti(path: Path, array, affine=None) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.5, 1.0]) if affine is None else affine), path)


def label_like(site: Path, fn) -> None:
    p = site / "labels" / "case_a.nii.gz"
    img = nib.load(p)
    arr, aff = fn(np.asarray(img.dataobj).copy(), img.affine.copy())
    p.unlink()
    nib.save(nib.Nifti1Image(arr, aff), p)


def _del(*keywords):
    def fn(ds):
        for k in keywords:
            if k in ds:
                delattr(ds, k)

    return fn


def _set(**values):
    def fn(ds):
        for k, v in values.items():
            setattr(ds, k, v)

    return fn


def _shift_one(site: Path, dz: float) -> None:
    f = by_position(site)[4]
    edit(f, lambda ds: setattr(ds, "ImagePositionPatient", [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], float(ds.ImagePositionPatient[2]) + dz]))


def _shift_x(site: Path, dx: float) -> None:
    f = by_position(site)[4]
    edit(f, lambda ds: setattr(ds, "ImagePositionPatient", [float(ds.ImagePositionPatient[0]) + dx, ds.ImagePositionPatient[1], ds.ImagePositionPatient[2]]))


def _shear(site: Path) -> None:
    for k, f in enumerate(by_position(site)):
        edit(f, lambda ds, k=k: setattr(ds, "ImagePositionPatient", [ORIGIN[0], ORIGIN[1] + 0.5 * k, float(ds.ImagePositionPatient[2])]))


def _dup_position(site: Path) -> None:
    files = by_position(site)
    src = pydicom.dcmread(files[3])
    edit(files[4], lambda ds: setattr(ds, "ImagePositionPatient", list(src.ImagePositionPatient)))


def _mixed_orientation(site: Path) -> None:
    edit(by_position(site)[2], _set(ImageOrientationPatient=[1, 0, 0, 0, 0.9950042, 0.0998334]))


def _singular_nifti(path: Path) -> None:
    img = nib.Nifti1Image(np.zeros(SHAPE, np.float32), None)
    flat = np.diag([1.5, 1.5, 0.0, 1.0])  # a zero column: every slice at the same place
    img.set_sform(flat, code=1)
    img.set_qform(None, code=0)
    nib.save(img, path)


def _colour(ds):
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0


def _bad_pixels_size(ds):
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _garbage_compressed(ds):
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x01garbage-not-a-codestream" * 4])


def _enhanced(ds):
    # claims to be enhanced multi-frame but its functional groups place nothing
    ds.NumberOfFrames = 1
    ds.PerFrameFunctionalGroupsSequence = [pydicom.Dataset()]


def _localizer(ds):
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


# Each case: (id, how to break the template, extra CLI args, which inputs). `inputs` picks
# the input set: "dicom" (dicom/ + labels/) or "nifti" (nifti/ + nifti_labels/, --modality CT).
CASES = [
    # --- DICOM files ---
    ("truncated-half", lambda s: truncate(by_position(s)[3], 0.5), [], "dicom"),
    ("truncated-header", lambda s: truncate(by_position(s)[3], 60), [], "dicom"),
    ("all-truncated", lambda s: [truncate(f, 100) for f in dicom_files(s)], [], "dicom"),
    ("zero-byte-slice", lambda s: truncate(by_position(s)[5], 0), [], "dicom"),
    ("missing-pixel-data", lambda s: edit(by_position(s)[2], _del("PixelData")), [], "dicom"),
    ("missing-pixel-data-all", lambda s: edit_all(s, _del("PixelData")), [], "dicom"),
    ("pixel-data-short", lambda s: edit(by_position(s)[1], _bad_pixels_size), [], "dicom"),
    ("garbage-jpeg2000", lambda s: edit(by_position(s)[1], _garbage_compressed), [], "dicom"),
    ("unknown-transfer-syntax", lambda s: edit(by_position(s)[1], lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4.5.6.7")), [], "dicom"),
    ("missing-slice", lambda s: by_position(s)[4].unlink(), [], "dicom"),
    ("missing-first-interior-slices", lambda s: [f.unlink() for f in by_position(s)[1:3]], [], "dicom"),
    ("irregular-spacing", lambda s: _shift_one(s, 0.3), [], "dicom"),
    ("irregular-spacing-small", lambda s: _shift_one(s, 0.05), [], "dicom"),
    ("duplicate-position", _dup_position, [], "dicom"),
    ("duplicate-file", lambda s: shutil.copy(by_position(s)[3], s / "dicom" / "case_a" / "copy.dcm"), [], "dicom"),
    ("gantry-tilt", _shear, [], "dicom"),
    ("mixed-orientation", _mixed_orientation, [], "dicom"),
    ("missing-ipp", lambda s: edit(by_position(s)[3], _del("ImagePositionPatient")), [], "dicom"),
    ("missing-iop-all", lambda s: edit_all(s, _del("ImageOrientationPatient")), [], "dicom"),
    ("missing-pixel-spacing", lambda s: edit_all(s, _del("PixelSpacing")), [], "dicom"),
    ("ipp-not-numeric", lambda s: edit(by_position(s)[3], lambda ds: ds.add_new(0x00200032, "LO", ["a", "b", "c"])), [], "dicom"),
    ("ipp-two-values", lambda s: edit(by_position(s)[3], _set(ImagePositionPatient=[1.0, 2.0])), [], "dicom"),
    ("iop-not-orthogonal", lambda s: edit_all(s, _set(ImageOrientationPatient=[1, 0, 0, 0.5, 0.5, 0])), [], "dicom"),
    ("iop-zero", lambda s: edit_all(s, _set(ImageOrientationPatient=[0, 0, 0, 0, 0, 0])), [], "dicom"),
    ("pixel-spacing-zero", lambda s: edit_all(s, _set(PixelSpacing=[0, 1.5])), [], "dicom"),
    ("pixel-spacing-negative", lambda s: edit_all(s, _set(PixelSpacing=[-1.5, 1.5])), [], "dicom"),
    ("rows-mismatch", lambda s: edit(by_position(s)[3], _set(Rows=SHAPE[1] + 2)), [], "dicom"),
    ("rescale-slope-zero", lambda s: edit(by_position(s)[3], _set(RescaleSlope=0)), [], "dicom"),
    ("rescale-not-numeric", lambda s: edit(by_position(s)[3], lambda ds: ds.add_new(0x00281052, "LO", "abc")), [], "dicom"),
    ("colour-image", lambda s: edit_all(s, _colour), [], "dicom"),
    ("enhanced-multiframe", lambda s: edit_all(s, _enhanced), [], "dicom"),
    ("single-slice", lambda s: [f.unlink() for f in by_position(s)[1:]], [], "dicom"),
    ("localizer-only", lambda s: edit_all(s, _localizer), [], "dicom"),
    ("localizer-by-name", lambda s: edit_all(s, _set(SeriesDescription="3-plane Localizer", ImageType=["ORIGINAL", "PRIMARY", "M"])), [], "dicom"),
    ("inplane-jitter", lambda s: _shift_x(s, 0.05), [], "dicom"),
    ("wrong-modality-filter", lambda s: None, ["--modality", "MR"], "dicom"),
    ("not-dicom-files", lambda s: [f.write_text("hello, not an image\n") for f in dicom_files(s)], [], "dicom"),
    ("empty-input-folder", lambda s: [f.unlink() for f in dicom_files(s)], [], "dicom"),
    ("broken-symlink", lambda s: ([f.unlink() for f in dicom_files(s)], os.symlink(s / "nowhere.dcm", s / "dicom" / "case_a" / "x.dcm")), [], "dicom"),
    ("input-does-not-exist", lambda s: shutil.rmtree(s / "dicom"), [], "dicom"),
    # --- labels ---
    ("label-shape-mismatch", lambda s: label_like(s, lambda a, aff: (a[:, :, :-1], aff)), [], "dicom"),
    ("label-shifted-1mm", lambda s: label_like(s, lambda a, aff: (a, aff + np.array([[0, 0, 0, 1.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))), [], "dicom"),
    ("label-rotated-grid", lambda s: label_like(s, lambda a, aff: (a, aff @ np.diag([1, -1, 1, 1]))), [], "dicom"),
    ("label-value-not-in-map", lambda s: label_like(s, lambda a, aff: (np.where(a == 1, 9, a).astype(np.uint8), aff)), [], "dicom"),
    ("label-fractional", lambda s: label_like(s, lambda a, aff: (a.astype(np.float32) * 0.5, aff)), [], "dicom"),
    ("label-nan", lambda s: label_like(s, lambda a, aff: (np.where(a == 1, np.nan, a).astype(np.float32), aff)), [], "dicom"),
    ("label-negative", lambda s: label_like(s, lambda a, aff: (np.where(a == 1, -1, a.astype(np.int16)).astype(np.int16), aff)), [], "dicom"),
    ("label-4d", lambda s: label_like(s, lambda a, aff: (np.stack([a, a], -1), aff)), [], "dicom"),
    ("label-unpaired", lambda s: (s / "labels" / "case_a.nii.gz").rename(s / "labels" / "someone_else.nii.gz"), [], "dicom"),
    ("label-corrupt", lambda s: truncate(s / "labels" / "case_a.nii.gz", 40), [], "dicom"),
    ("label-required-missing", lambda s: (s / "labels" / "case_a.nii.gz").unlink(), ["--require-labels"], "dicom"),
    # --- NIfTI images ---
    ("nifti-nan", lambda s: save_nifti(s / "nifti" / "case_b.nii.gz", np.full(SHAPE, np.nan, np.float32)), [], "nifti"),
    (
        "nifti-inf",
        lambda s: save_nifti(s / "nifti" / "case_b.nii.gz", np.where(np.eye(24)[:, :, None] > 0, np.inf, 1).repeat(10, 2).astype(np.float32)),
        [],
        "nifti",
    ),
    ("nifti-2d", lambda s: save_nifti(s / "nifti" / "case_b.nii.gz", np.zeros(SHAPE[:2], np.float32)), [], "nifti"),
    ("nifti-4d", lambda s: save_nifti(s / "nifti" / "case_b.nii.gz", np.zeros((*SHAPE, 3), np.float32)), [], "nifti"),
    ("nifti-5d", lambda s: save_nifti(s / "nifti" / "case_b.nii.gz", np.zeros((*SHAPE, 1, 2), np.float32)), [], "nifti"),
    ("nifti-truncated", lambda s: truncate(s / "nifti" / "case_b.nii.gz", 0.5), [], "nifti"),
    ("nifti-garbage", lambda s: (s / "nifti" / "case_b.nii.gz").write_bytes(b"\x1f\x8b not really gzip" * 10), [], "nifti"),
    ("nifti-empty-file", lambda s: (s / "nifti" / "case_b.nii.gz").write_bytes(b""), [], "nifti"),
    ("nifti-singular-affine", lambda s: _singular_nifti(s / "nifti" / "case_b.nii.gz"), [], "nifti"),
    ("nifti-complex", lambda s: save_nifti(s / "nifti" / "case_b.nii.gz", np.zeros(SHAPE, np.complex64)), [], "nifti"),
    ("nifti-no-modality", lambda s: None, ["--no-modality"], "nifti"),
    # --- configuration files ---
    ("label-map-bad-yaml", lambda s: (s / "map.yaml").write_text("labels: [unclosed\n"), [], "dicom"),
    ("label-map-unknown-class", lambda s: (s / "map.yaml").write_text((s / "map.yaml").read_text().replace("liver_tumor", "livr_tumor")), [], "dicom"),
    ("label-map-other-schema", lambda s: (s / "map.yaml").write_text((s / "map.yaml").read_text().replace("abdominal-ct", "brain-mr")), [], "dicom"),
    ("label-map-major-version", lambda s: (s / "map.yaml").write_text((s / "map.yaml").read_text().replace("1.0.0", "2.0.0")), [], "dicom"),
    ("label-map-missing", lambda s: (s / "map.yaml").unlink(), [], "dicom"),
    (
        "schema-not-contiguous",
        lambda s: (s / "schema.yaml").write_text("format: fedimg-label-schema\nname: x\nversion: 1.0.0\nclasses: {background: 0, liver: 3}\n"),
        ["--schema", "{site}/schema.yaml"],
        "dicom",
    ),
]


# What the message must say (the problem, in the user's terms).
EXPECTED = {
    "truncated-half": "unusable",
    "truncated-header": "unusable",
    "all-truncated": "not a DICOM file",
    "zero-byte-slice": "unusable",
    "missing-pixel-data": "without pixel data",
    "missing-pixel-data-all": "without pixel data",
    "pixel-data-short": "cannot be decoded",
    "garbage-jpeg2000": "cannot be decoded",
    "unknown-transfer-syntax": "cannot be decoded",
    "missing-slice": "missing slice",
    "missing-first-interior-slices": "2 missing slice",
    "irregular-spacing": "irregular slice spacing",
    "irregular-spacing-small": "irregular slice spacing",
    "duplicate-position": "duplicate slice position",
    "duplicate-file": "duplicate slice position",
    "gantry-tilt": "gantry tilt",
    "mixed-orientation": "grouping",
    "missing-ipp": "missing ImagePositionPatient",
    "missing-iop-all": "missing ImageOrientationPatient",
    "missing-pixel-spacing": "missing PixelSpacing",
    "ipp-not-numeric": "ImagePositionPatient is not numeric",
    "ipp-two-values": "ImagePositionPatient must have 3",
    "iop-not-orthogonal": "not two orthogonal unit vectors",
    "iop-zero": "not two orthogonal unit vectors",
    "pixel-spacing-zero": "PixelSpacing must be positive",
    "pixel-spacing-negative": "PixelSpacing must be positive",
    "rows-mismatch": "SeriesInstanceUID shared by 2",
    "rescale-slope-zero": "RescaleSlope 0.0",
    "rescale-not-numeric": "not numeric",
    "colour-image": "colour image",
    "enhanced-multiframe": "missing ImagePositionPatient",
    "single-slice": "single-slice series",
    "localizer-only": "localizer",
    "localizer-by-name": "localizer",
    "inplane-jitter": "drift up to 0.0500 mm in-plane",
    "wrong-modality-filter": "modality CT, not MR",
    "not-dicom-files": "not a DICOM file",
    "empty-input-folder": "no image series",
    "broken-symlink": "No such file",
    "input-does-not-exist": "no such file or folder",
    "label-shape-mismatch": "does not match image grid",
    "label-shifted-1mm": "differ by up to 1.0000 mm",
    "label-rotated-grid": "grids differ",
    "label-value-not-in-map": "label values [9]",
    "label-fractional": "non-integer",
    "label-nan": "NaN",
    "label-negative": "negative label values",
    "label-4d": "must be a 3D volume",
    "label-unpaired": "unpaired_label",
    "label-corrupt": "unreadable NIfTI",
    "label-required-missing": "no label found",
    "nifti-nan": "NaN",
    "nifti-inf": "infinite",
    "nifti-2d": "3D volume",
    "nifti-4d": "3D volume",
    "nifti-5d": "3D volume",
    "nifti-truncated": "unreadable NIfTI",
    "nifti-garbage": "unreadable NIfTI",
    "nifti-empty-file": "unreadable NIfTI",
    "nifti-singular-affine": "singular",
    "nifti-complex": "complex",
    "nifti-no-modality": "--modality",
    "label-map-bad-yaml": "not valid YAML",
    "label-map-unknown-class": "did you mean 'liver_tumor'",
    "label-map-other-schema": "federation schema is 'abdominal-ct'",
    "label-map-major-version": "another major version",
    "label-map-missing": "cannot read",
    "schema-not-contiguous": "contiguous",
}


@pytest.mark.parametrize("case_id,breaker,extra,inputs", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_refused_cleanly(template, tmp_path, case_id, breaker, extra, inputs):
    site = tmp_path / "site"
    shutil.copytree(template, site, symlinks=True)
    breaker(site)
    out = tmp_path / "out"
    args = [str(a).replace("{site}", str(site)) for a in extra if a != "--no-modality"]
    if inputs == "dicom":
        args = [site / "dicom", "--labels", site / "labels", *args]
    else:
        args = [site / "nifti", "--labels", site / "nifti_labels", *args]
        if "--no-modality" not in extra:
            args += ["--modality", "CT"]
    code, stdout, stderr = run_prepare([*args, "--label-map", site / "map.yaml", "--out", out, "--no-qc"])
    assert code != 0, f"{case_id}: exit 0\nstdout: {stdout}\nstderr: {stderr}"
    assert "Traceback" not in stdout + stderr
    err_lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(err_lines) == 1, f"{case_id}: expected one error line, got {err_lines}"
    assert err_lines[0].startswith("site-agent:"), err_lines
    assert EXPECTED[case_id] in stdout + stderr, f"{case_id}: {EXPECTED[case_id]!r} not in {stderr!r} / {stdout[-500:]!r}"
    if code == 2:
        # nothing prepared: no output folder at all
        assert not out.exists(), f"{case_id}: left {sorted(p.name for p in out.rglob('*'))}"
    else:
        assert code == 3, f"{case_id}: unexpected exit code {code}: {stderr}"
        # the refused case is named on stdout with its reason; prepared cases are complete
        assert "refused" in stdout
        from preprocessing.dataset import load_dataset

        load_dataset(out, verify_checksums=True)
    assert not list(out.rglob(".*.tmp")) if out.exists() else True


def test_there_are_at_least_fifty_malformed_cases():
    assert len(CASES) >= 50
    assert set(EXPECTED) == {c[0] for c in CASES}


@pytest.mark.parametrize("case_id", ["truncated-header", "label-value-not-in-map", "nifti-nan"])
def test_malformed_input_as_a_real_process(template, tmp_path, case_id):
    breaker, extra, inputs = next((b, e, i) for c, b, e, i in CASES if c == case_id)
    site = tmp_path / "site"
    shutil.copytree(template, site)
    breaker(site)
    src = [site / "dicom", "--labels", site / "labels"] if inputs == "dicom" else [site / "nifti", "--labels", site / "nifti_labels", "--modality", "CT"]
    r = run_console_script("site-agent", "prepare", *src, *extra, "--label-map", site / "map.yaml", "--out", tmp_path / "out", "--no-qc")
    assert r.returncode in (2, 3), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert len([l for l in r.stderr.splitlines() if l.strip()]) == 1, r.stderr
