"""`site-agent prepare` on phantom DICOM sites: geometry, labels, re-runs, resume, no PHI."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fedimg_testing.phantom import PhantomSite, PlantedIdentifiers, make_phantom, volume_affine_ras, write_dicom_series, write_phantom_site
from preprocessing import prepare as prepare_mod
from preprocessing.dataset import load_dataset
from preprocessing.dicom import discover, load_series
from preprocessing.prepare import PrepareOptions, prepare
from preprocessing.schema import load_label_map, load_schema
from tests.conftest import BIN, cli

SHAPE = (32, 28, 12)
SCHEMA = load_schema()


def lps_to_ras(p):
    return np.array([-p[0], -p[1], p[2]])


def assert_slices_on_grid(series_dir, nifti_path, hu_check=True):
    """Every input slice position maps to an integer voxel index (0.01 mm) of the output,
    and the output voxel values there equal the rescaled DICOM pixels."""
    img = nib.load(nifti_path)
    inv = np.linalg.inv(img.affine)
    data = np.asanyarray(img.dataobj)
    for f in sorted(series_dir.iterdir()):
        ds = pydicom.dcmread(f)
        ijk = inv @ np.append(lps_to_ras(np.asarray(ds.ImagePositionPatient, float)), 1)
        assert np.max(np.abs(ijk[:3] - np.round(ijk[:3]))) * max(img.header.get_zooms()) < 0.01, (f.name, ijk)
        if hu_check:
            row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
            ps = [float(x) for x in ds.PixelSpacing]
            hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for r, c in [(0, 0), (ds.Rows - 1, 0), (3, ds.Columns - 2), (ds.Rows // 2, ds.Columns // 2)]:
                world = np.asarray(ds.ImagePositionPatient, float) + c * ps[1] * row + r * ps[0] * col
                v = np.round(inv @ np.append(lps_to_ras(world), 1))[:3].astype(int)
                assert data[tuple(v)] == hu[r, c], (f.name, r, c)


@pytest.fixture(scope="module")
def liver_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("liver")
    return write_phantom_site(root, ["liver", "liver_tumor"], n_cases=3, seed=11, shape=SHAPE)


def run(site, out, **kw):
    lmap = load_label_map(site.label_map, SCHEMA)
    return prepare([site.dicom_dir], out, SCHEMA, lmap, labels=[site.labels_dir], options=PrepareOptions(name="liver", **kw))


def test_prepare_phantom_site_exact_geometry_and_schema_ids(liver_site, tmp_path):
    out = tmp_path / "ds"
    result = run(liver_site, out)
    assert result.count("refused") == 0 and result.count("ok") + result.count("flagged") == 3
    ds = load_dataset(out, verify_checksums=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labeled_classes"] == [3, 4]
    assert manifest["schema"] == {"name": "abdominal-ct", "version": SCHEMA.version}
    assert "liver" in ds.description() and "kidney" not in ds.description()
    for case in manifest["cases"]:
        img = nib.load(out / case["image"])
        lab = nib.load(out / case["label"])
        assert img.header["qform_code"] == img.header["sform_code"] == 1
        assert np.allclose(img.get_qform(), img.get_sform(), atol=1e-4)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert img.get_data_dtype() == np.int16  # CT stays integer HU
        assert np.array_equal(img.affine, lab.affine)
        values = set(np.unique(np.asarray(lab.dataobj)).tolist())
        assert values <= {0, 3, 4} and 3 in values  # local 1/2 remapped to schema liver/liver_tumor
    # every slice position of every input series lands on the voxel grid, values exact
    series_dirs = sorted(p for p in liver_site.dicom_dir.iterdir())
    hashes = {c["source_hash"]: c for c in manifest["cases"]}
    assert len(hashes) == 3
    for d in series_dirs:
        v = load_series(discover([d]).series[0])
        match = [c for c in manifest["cases"] if np.allclose(c["affine"], nib.as_closest_canonical(nib.Nifti1Image(v.array, v.affine_ras)).affine, atol=1e-4)]
        assert match, d
        assert_slices_on_grid(d, out / match[0]["image"])


def test_rerun_skips_unchanged_and_redoes_changed_case(liver_site, tmp_path):
    site_copy = tmp_path / "site"
    shutil.copytree(liver_site.root, site_copy)
    site = PhantomSite(  # same layout, copied
        root=site_copy,
        dicom_dir=site_copy / "dicom",
        labels_dir=site_copy / "labels",
        label_map=site_copy / "site-labels.yaml",
        cases=liver_site.cases,
        identifiers=liver_site.identifiers,
        classes=liver_site.classes,
        phase=liver_site.phase,
    )
    out = tmp_path / "ds"
    run(site, out)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "imagesTr").iterdir()}
    second = run(site, out)
    assert [o.status for o in second.outcomes] == ["unchanged"] * 3
    assert {p: p.stat().st_mtime_ns for p in (out / "imagesTr").iterdir()} == mtimes
    # change one label voxel: only that case is converted again, its case id kept
    lab_path = sorted(site.labels_dir.iterdir())[0]
    img = nib.load(lab_path)
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(arr, img.affine), lab_path)
    third = run(site, out)
    statuses = sorted(o.status for o in third.outcomes)
    assert statuses in (["flagged", "unchanged", "unchanged"], ["ok", "unchanged", "unchanged"])
    assert sorted(o.case_id for o in third.outcomes) == ["case_0000", "case_0001", "case_0002"]
    load_dataset(out, verify_checksums=True)


def test_resume_after_interruption(liver_site, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    calls = {"n": 0}
    real = prepare_mod.convert_case

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(prepare_mod, "convert_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(liver_site, out)
    assert not (out / "manifest.json").exists()  # not a dataset yet
    assert len(list((out / ".state" / "cases").glob("*.json"))) == 1
    monkeypatch.setattr(prepare_mod, "convert_case", real)
    converted = []
    monkeypatch.setattr(prepare_mod, "convert_case", lambda *a, **k: converted.append(1) or real(*a, **k))
    result = run(liver_site, out)
    assert len(converted) == 2 and result.count("unchanged") == 1
    load_dataset(out, verify_checksums=True)


def _all_output_bytes(out):
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            yield p, data
            if p.name.endswith(".gz"):
                yield p, gzip.decompress(data)
        yield p, str(p.relative_to(out)).encode()


def test_no_planted_identifier_in_any_output(tmp_path):
    site = write_phantom_site(tmp_path / "site", ["kidney", "kidney_tumor"], n_cases=2, seed=5, shape=SHAPE)
    out = tmp_path / "ds"
    r = cli("site-agent", "prepare", site.dicom_dir, "--labels", site.labels_dir, "--label-map", site.label_map, "--out", out, "--name", "kidney-site")
    assert r.returncode == 0, r.stderr
    planted = [s for ident in site.identifiers for s in ident.strings()]
    assert len(planted) > 20
    # the planted values are really in the inputs (so the scan below means something)
    raw_inputs = b"".join(f.read_bytes() for f in site.dicom_dir.rglob("*") if f.is_file())
    assert all(s.encode() in raw_inputs for s in planted)
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in site.dicom_dir.rglob("*") if f.is_file()}
    needles = [s.encode() for s in planted] + [u.encode() for u in uids]
    for p, data in _all_output_bytes(out):
        for n in needles:
            assert n not in data, f"{n!r} found in {p}"
    for n in needles:
        assert n not in (r.stdout + r.stderr).encode()
    ds = load_dataset(out)
    for n in needles:
        assert n not in ds.description().encode()


def test_compressed_transfer_syntaxes_give_identical_volumes(tmp_path):
    vol = make_phantom(seed=3, shape=(48, 40, 6), spacing=(0.9, 0.7, 3.0))  # J2K needs >= 32 px per side
    ident = PlantedIdentifiers.for_case(3, 0)
    arrays = {}
    for ts in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.RLELossless, pydicom.uid.JPEGLSLossless, pydicom.uid.JPEG2000Lossless):
        d = tmp_path / ts.name.replace(" ", "_")
        write_dicom_series(vol, d, ident, transfer_syntax=ts)
        v = load_series(discover([d]).series[0])
        arrays[ts.name] = (v.array, v.affine_ras)
    ref_arr, ref_aff = arrays.pop(pydicom.uid.ExplicitVRLittleEndian.name)
    assert np.array_equal(ref_arr, vol.hu)
    for name, (arr, aff) in arrays.items():
        assert np.array_equal(arr, ref_arr), name
        assert np.allclose(aff, ref_aff), name


@pytest.mark.parametrize(
    "orientation",
    [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (0.8660254, 0.5, 0, -0.5, 0.8660254, 0), (0.9396926, 0, -0.3420201, 0.1188, 0.9378, 0.3264)],
    ids=["axial", "sagittal", "axial-rotated-30", "double-oblique"],
)
def test_oblique_geometry_is_exact(tmp_path, orientation):
    o = np.asarray(orientation, float)
    row = o[:3] / np.linalg.norm(o[:3])
    col = o[3:] - (o[3:] @ row) * row
    col /= np.linalg.norm(col)
    orientation = (*row, *col)
    vol = make_phantom(seed=4, shape=(20, 18, 7), spacing=(1.1, 0.9, 2.2))
    d = tmp_path / "case_x"
    write_dicom_series(vol, d, PlantedIdentifiers.for_case(4, 0), orientation=orientation, origin=(12.5, -40.25, 101.0))
    v = load_series(discover([d]).series[0])
    assert np.allclose(v.affine_ras, volume_affine_ras(vol, (12.5, -40.25, 101.0), orientation), atol=1e-5)
    assert v.geometry.max_position_error_mm < 0.01
    out = tmp_path / "ds"
    prepare([d], out, SCHEMA, None, options=PrepareOptions(qc_report=False))
    assert_slices_on_grid(d, out / "imagesTr" / "case_0000.nii.gz")


def test_dcm2niix_agrees_on_geometry_and_voxels(tmp_path):
    """An independent converter (dcm2niix) puts the same values at the same world points."""
    dcm2niix = BIN / "dcm2niix"
    if not dcm2niix.exists():
        pytest.skip("dcm2niix not installed")
    vol = make_phantom(seed=9, shape=(24, 22, 8), spacing=(0.8, 0.75, 2.5))
    orientation = (0.9848078, 0.1736482, 0, -0.1736482, 0.9848078, 0)
    d = tmp_path / "case_y"
    write_dicom_series(vol, d, PlantedIdentifiers.for_case(9, 0), orientation=orientation)
    out = tmp_path / "ds"
    prepare([d], out, SCHEMA, None, options=PrepareOptions(qc_report=False))
    ours = nib.load(out / "imagesTr" / "case_0000.nii.gz")
    (tmp_path / "d2n").mkdir()
    subprocess.run([str(dcm2niix), "-z", "n", "-b", "n", "-f", "ref", "-o", str(tmp_path / "d2n"), str(d)], check=True, capture_output=True)
    ref = nib.load(tmp_path / "d2n" / "ref.nii")
    ours_c, ref_c = nib.as_closest_canonical(ours), nib.as_closest_canonical(ref)
    assert ours_c.shape == ref_c.shape
    assert np.allclose(ours_c.affine, ref_c.affine, atol=1e-3)
    assert np.array_equal(np.asarray(ours_c.dataobj), np.asarray(ref_c.get_fdata()).astype(np.int16))


def test_seg_labels_are_remapped_by_segment_name(tmp_path):
    site = write_phantom_site(tmp_path / "site", ["kidney", "kidney_tumor"], n_cases=1, seed=8, shape=SHAPE, label_format="seg")
    out = tmp_path / "ds"
    lmap = load_label_map(site.label_map, SCHEMA)
    result = prepare([site.dicom_dir], out, SCHEMA, lmap, labels=[site.labels_dir], options=PrepareOptions(qc_report=False))
    assert result.count("refused") == 0, [o.message for o in result.outcomes]
    manifest = json.loads((out / "manifest.json").read_text())
    case = manifest["cases"][0]
    assert case["label_source_kind"] == "seg"
    lab = np.asarray(nib.load(out / case["label"]).dataobj)
    # the SEG and the phantom truth agree voxel for voxel (after the canonical reorientation)
    vol = make_phantom(seed=8 * 1000, shape=SHAPE)
    truth = np.where(np.isin(vol.label, [1, 2]), vol.label, 0).astype(np.uint8)
    truth_c = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(truth, volume_affine_ras(vol, (-150.0, -180.0, -300.0), (1, 0, 0, 0, 1, 0)))).dataobj)
    assert np.array_equal(lab, truth_c)


def test_series_grouping_without_and_with_duplicated_uids(tmp_path):
    vol = make_phantom(seed=2, shape=(16, 16, 6))
    a = write_dicom_series(vol, tmp_path / "mixed" / "a", PlantedIdentifiers.for_case(2, 0), series_uid="1.2.826.0.1.3680043.8.498.1")
    # a second series sharing the (duplicated) UID but rotated 90 degrees
    b = write_dicom_series(
        vol, tmp_path / "mixed" / "b", PlantedIdentifiers.for_case(2, 0), series_uid="1.2.826.0.1.3680043.8.498.1", orientation=(0, 1, 0, 0, 0, -1), seed=1
    )
    assert len(a) == len(b) == 6
    disc = discover([tmp_path / "mixed"])
    assert len(disc.series) == 2 and all(s.grouping == "series_uid+split" for s in disc.series)
    for s in disc.series:
        load_series(s)  # each is a clean volume
    # empty SeriesInstanceUID: fallback grouping by geometry still finds one volume
    c = write_dicom_series(vol, tmp_path / "nouid", PlantedIdentifiers.for_case(2, 1))
    for f in c:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ""
        ds.save_as(f, enforce_file_format=False)
    disc = discover([tmp_path / "nouid"])
    assert len(disc.series) == 1 and disc.series[0].grouping == "fallback" and len(disc.series[0].slices) == 6
    assert np.array_equal(load_series(disc.series[0]).array, vol.hu)


def test_irregular_series_is_flagged_with_option(tmp_path):
    vol = make_phantom(seed=2, shape=(16, 16, 8))
    files = write_dicom_series(vol, tmp_path / "s", PlantedIdentifiers.for_case(2, 0), file_names="instance")
    by_z = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    by_z[3].unlink()
    out = tmp_path / "ds"
    with pytest.raises(prepare_mod.PrepareError, match="missing slice"):
        prepare([tmp_path / "s"], out, SCHEMA, None, options=PrepareOptions(qc_report=False))
    assert not out.exists()
    r = prepare([tmp_path / "s"], out, SCHEMA, None, options=PrepareOptions(qc_report=False, allow_irregular=True))
    assert "missing_slices" in r.outcomes[0].flags and r.outcomes[0].status == "flagged"


def test_cli_deidentify_then_prepare_gives_the_same_volume(tmp_path):
    site = write_phantom_site(tmp_path / "site", ["spleen"], n_cases=1, seed=6, shape=SHAPE)
    secret = tmp_path / "secret"
    secret.write_text("a-site-secret-of-enough-length\n")
    secret.chmod(0o600)
    r = cli("site-agent", "deidentify", site.dicom_dir, tmp_path / "deid", "--secret-file", secret)
    assert r.returncode == 0, r.stderr
    n_in = len([f for f in site.dicom_dir.rglob("*") if f.is_file()])
    assert f"{n_in} of {n_in} files" in r.stdout
    planted = [s.encode() for i in site.identifiers for s in i.strings()]
    for f in (tmp_path / "deid").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not [p for p in planted if p in data], f
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("site-agent", "prepare", site.dicom_dir, "--out", a, "--no-qc").returncode == 0
    assert cli("site-agent", "prepare", tmp_path / "deid", "--out", b, "--no-qc").returncode == 0
    ia, ib = nib.load(a / "imagesTr" / "case_0000.nii.gz"), nib.load(b / "imagesTr" / "case_0000.nii.gz")
    assert np.array_equal(ia.affine, ib.affine)
    assert np.array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
    # a second run with an existing destination is refused and changes nothing
    r2 = cli("site-agent", "deidentify", site.dicom_dir, tmp_path / "deid", "--secret-file", secret)
    assert r2.returncode != 0 and "Traceback" not in r2.stderr and len(r2.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]
)
def test_real_compressed_files_decode_like_the_uncompressed_original(name):
    """Encodings made by other tools (shipped with pydicom) decode to the same pixels."""
    from pydicom.data import get_testdata_file

    from preprocessing.dicom import read_pixels

    ref, _ = read_pixels(Path(get_testdata_file("MR_small.dcm")))
    arr, ds = read_pixels(Path(get_testdata_file(name)))
    assert np.array_equal(arr, ref), ds.file_meta.TransferSyntaxUID.name


def test_lossless_jpeg_process14_decodes(tmp_path):
    """Lossless JPEG (process 14, common in older CT archives) through the GDCM plugin."""
    import gdcm
    from pydicom.data import get_testdata_file

    from preprocessing.dicom import read_pixels

    src = get_testdata_file("CT_small.dcm")
    reader = gdcm.ImageReader()
    reader.SetFileName(src)
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(tmp_path / "ct.dcm"))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    arr, ds = read_pixels(tmp_path / "ct.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    assert np.array_equal(arr, read_pixels(Path(src))[0])


def test_enhanced_multiframe_equals_the_single_frame_series(tmp_path):
    """A Legacy Converted Enhanced CT (one file, per-frame functional groups) made by
    highdicom from a series converts to exactly the volume of the series itself."""
    import warnings

    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    vol = make_phantom(seed=4, shape=(40, 36, 8), spacing=(0.9, 0.8, 2.5))
    files = write_dicom_series(vol, tmp_path / "single", PlantedIdentifiers.for_case(4, 0), orientation=(0.8660254, 0.5, 0, -0.5, 0.8660254, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf = LegacyConvertedEnhancedCTImage(
            [pydicom.dcmread(f) for f in files], series_instance_uid=pydicom.uid.generate_uid(), series_number=9,
            sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1,
        )  # fmt: skip
    (tmp_path / "multi").mkdir()
    mf.save_as(tmp_path / "multi" / "enhanced.dcm")
    single = load_series(discover([tmp_path / "single"]).series[0])
    disc = discover([tmp_path / "multi"])
    assert len(disc.series) == 1 and len(disc.series[0].slices) == 8 and not disc.skipped
    multi = load_series(disc.series[0])
    assert np.array_equal(multi.array, single.array) and np.array_equal(multi.array, vol.hu)
    assert np.allclose(multi.affine_ras, single.affine_ras, atol=1e-6)
