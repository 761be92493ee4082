"""Projection radiographs (CR, DX) in `site-agent prepare`, on real files nobody here wrote.

The files come from public packages (`fedimg_testing.public_radiographs`: pydicom-data's NEMA WG04
CR chest and leg, deid's DX cat thorax, the installed pydicom's downsized CR spine); without network
only the pydicom ones are there and the tests of the others skip, naming the file. What is checked:

* grey values: MONOCHROME1 is inverted, the window (or VOI LUT) applied; compared with SimpleITK, an
  independent reader, and with the window function of the standard written out here; JPEG 2000
  lossless decodes to exactly the uncompressed image;
* the plane: (columns, rows, 1), pixel (i, j) = DICOM column i, row j, the spacing by the documented
  rule and its source recorded (PixelSpacing, ImagerPixelSpacing, the magnification-corrected one,
  declared), images without one refused with one line naming the file and the option;
* labels: PNG masks as drawn and NIfTI masks columns x rows, on the radiograph's pixel grid;
* malformed radiographs: one refusal each with a reason code, the other cases prepared, exit code 3;
* nothing identifying (the real files' own names, IDs, UIDs, clinic) in any output byte.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import cli
from PIL import Image

from fedimg_testing.public_radiographs import ensure_public_radiographs
from preprocessing.dicom import SeriesError
from preprocessing.prepare import PrepareOptions, prepare
from preprocessing.radiograph import load_radiograph, radiograph_spacing
from preprocessing.schema import load_label_map, load_schema

SCHEMA = "chest-xr"


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    return ensure_public_radiographs()


def _need(files: dict[str, Path], *names: str) -> list[Path]:
    missing = [n for n in names if n not in files]
    if missing:
        pytest.skip(f"public radiograph(s) not available (no network?): {', '.join(missing)}")
    return [files[n] for n in names]


def _window_then_invert(ds: pydicom.Dataset) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) on the rescaled stored values, output range of the stored bits, then
    MONOCHROME1 inverted: written out here, independently of pydicom's apply_voi_lut."""
    raw = ds.pixel_array.astype(np.float64)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    x = raw * slope + intercept
    c, w = float(np.atleast_1d(ds.WindowCenter)[0]), float(np.atleast_1d(ds.WindowWidth)[0])
    y_min, y_max = 0.0 * slope + intercept, (2**ds.BitsStored - 1) * slope + intercept
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * (y_max - y_min) + y_min
    y = np.where(x <= c - 0.5 - (w - 1) / 2, y_min, np.where(x > c - 0.5 + (w - 1) / 2, y_max, y))
    out = (y - y_min) / (y_max - y_min)
    return 1.0 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


@pytest.mark.parametrize("name", ["pydicom/6154", "pydicom/6247", "pydicom-data/RG1_UNCR.dcm", "deid/cat.dcm"])
def test_grey_values_follow_the_display_pipeline_and_agree_with_simpleitk(files, name):
    import SimpleITK as sitk

    (path,) = _need(files, name)
    ds = pydicom.dcmread(path)
    r = load_radiograph(path, pydicom.dcmread(path), declared_spacing=(0.2, 0.2))
    assert r.array.shape == (ds.Columns, ds.Rows, 1) and r.array.dtype == np.float32
    assert 0.0 <= float(r.array.min()) and float(r.array.max()) <= 1.0
    shown = r.array[:, :, 0].T  # back to rows x columns
    assert r.values == "window" and r.photometric == ds.PhotometricInterpretation
    np.testing.assert_allclose(shown, _window_then_invert(ds), atol=1e-5)
    # SimpleITK (GDCM) inverts MONOCHROME1 and applies the rescale, no window: the same picture up to a
    # monotonic window, so the two rank the pixels alike (the window clips, hence rank, not values)
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0].astype(np.float64)
    inside = (shown > 0.0) & (shown < 1.0)  # pixels the window does not clip
    assert inside.mean() > 0.3
    rank = lambda a: np.argsort(np.argsort(a))  # noqa: E731
    rho = np.corrcoef(rank(shown[inside]), rank(itk[inside]))[0, 1]
    assert rho > 0.99, rho


def test_jpeg2000_lossless_is_the_uncompressed_image_and_lossy_is_close(files):
    unc, j2kr, unc3, j2ki = _need(files, "pydicom-data/RG1_UNCR.dcm", "pydicom-data/RG1_J2KR.dcm", "pydicom-data/RG3_UNCR.dcm", "pydicom-data/RG3_J2KI.dcm")
    a = load_radiograph(unc, pydicom.dcmread(unc), (0.2, 0.2)).array
    b = load_radiograph(j2kr, pydicom.dcmread(j2kr), (0.2, 0.2)).array
    assert np.array_equal(a, b)
    c = load_radiograph(unc3, pydicom.dcmread(unc3), (0.2, 0.2)).array
    d = load_radiograph(j2ki, pydicom.dcmread(j2ki), (0.2, 0.2)).array
    assert not np.array_equal(c, d) and float(np.abs(c - d).mean()) < 0.01


def test_spacing_rule_and_its_source(files, tmp_path):
    cat, cr, rg1, rg3 = _need(files, "deid/cat.dcm", "pydicom/6154", "pydicom-data/RG1_UNCR.dcm", "pydicom-data/RG3_UNCR.dcm")
    assert radiograph_spacing(pydicom.dcmread(cat, stop_before_pixels=True), cat) == (0.14, 0.14, "PixelSpacing")
    ds = pydicom.dcmread(cr, stop_before_pixels=True)
    assert radiograph_spacing(ds, cr) == (0.1, 0.1, "ImagerPixelSpacing")
    ds.EstimatedRadiographicMagnificationFactor = "1.25"
    assert radiograph_spacing(ds, cr) == pytest.approx((0.08, 0.08, "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"))
    ds.PixelSpacing = [0.07, 0.09]  # a calibrated spacing wins over the detector's
    assert radiograph_spacing(ds, cr) == (0.07, 0.09, "PixelSpacing")
    for path in (rg1, rg3):  # PixelSpacing 0\0 and no spacing at all: refused unless declared, and the header's is never overridden
        header = pydicom.dcmread(path, stop_before_pixels=True)
        with pytest.raises(SeriesError, match=f"{path.name}: no usable PixelSpacing or ImagerPixelSpacing.*--pixel-spacing") as err:
            radiograph_spacing(header, path)
        assert err.value.code == "no_pixel_spacing"
        assert radiograph_spacing(header, path, (0.175, 0.2)) == (0.175, 0.2, "declared")
    assert radiograph_spacing(pydicom.dcmread(cat, stop_before_pixels=True), cat, (0.5, 0.5))[2] == "PixelSpacing"


def _site(tmp_path: Path, files: dict[str, Path]) -> tuple[Path, Path, Path]:
    """Images (the offline CR files, plus the others when fetched), a PNG mask and a NIfTI mask, and the label map."""
    img, lab = tmp_path / "images", tmp_path / "labels"
    img.mkdir()
    lab.mkdir()
    for name in ("pydicom/6154", "pydicom/6247", "pydicom/6278"):
        shutil.copy(files[name], img / f"cr{name[-4:]}.dcm")
    mask = np.zeros((16, 16), np.uint8)  # rows x columns, as drawn
    mask[2:9, 9:14] = 1
    Image.fromarray(mask).save(lab / "cr6154.png")
    nifti = np.zeros((16, 16, 1), np.uint8)  # columns x rows
    nifti[3:7, 8:15, 0] = 2
    nib.save(nib.Nifti1Image(nifti, np.eye(4) * 7), lab / "cr6247.nii.gz")  # its affine is not used
    label_map = tmp_path / "site-labels.yaml"
    label_map.write_text("format: fedimg-site-labels\nschema: chest-xr\nschema_version: 0.1.0\nlabels:\n  0: background\n  1: left_lung\n  2: heart\n")
    return img, lab, label_map


def test_prepare_writes_the_plane_with_masks_as_drawn_and_records_how(files, tmp_path):
    img, lab, label_map = _site(tmp_path, files)
    schema = load_schema(SCHEMA)
    res = prepare([img], tmp_path / "out", schema, load_label_map(label_map, schema), labels=[lab], options=PrepareOptions(name="cxr"))
    # each mask holds one of the two classes the site labels: the other is flagged missing; the third image is unlabelled
    assert sorted(tuple(o.flags) for o in res.outcomes) == [("missing_heart",), ("missing_left_lung",), ("unlabeled",)]
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["modality"] == "CR"
    by_label = {c["label_source_kind"]: c for c in man["cases"]}
    assert set(by_label) == {"png", "nifti", None}
    for case in man["cases"]:
        assert case["shape"] == [16, 16, 1] and case["spacing"] == [0.1, 0.1, 1.0] and case["source_kind"] == "radiograph"
        assert case["radiograph"]["spacing_source"] == "ImagerPixelSpacing" and case["radiograph"]["photometric"] == "MONOCHROME1"
        assert case["radiograph"]["patient_orientation"] == "L\\F" and case["radiograph"]["view"] in ("LL", "AP")
        assert "few_slices" not in case["qc_flags"] and "anisotropic" not in case["qc_flags"]
    png_case = by_label["png"]
    image = np.asanyarray(nib.load(tmp_path / "out" / png_case["image"]).dataobj)
    label = np.asanyarray(nib.load(tmp_path / "out" / png_case["label"]).dataobj)
    want = np.zeros((16, 16, 1), np.uint8)
    want[9:14, 2:9, 0] = 1  # the PNG's rows 2..8 x columns 9..13 -> (column, row)
    assert np.array_equal(label, want) and png_case["label_voxels"] == {"left_lung": 35}
    # the image's pixel (i, j) is the file's column i, row j
    np.testing.assert_allclose(image[:, :, 0].T, _window_then_invert(pydicom.dcmread(img / "cr6154.dcm")), atol=1e-5)
    nii_case = by_label["nifti"]
    assert np.count_nonzero(np.asanyarray(nib.load(tmp_path / "out" / nii_case["label"]).dataobj) == 3) == 28  # local 2 -> heart (3)
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["tensorImageSize"] == "2D"
    assert (tmp_path / "out" / "qc" / f"{png_case['case_id']}.png").is_file()


def test_the_training_loader_reads_a_prepared_radiograph_on_its_plane(files, tmp_path):
    """The segmentation plans' reader (schema spacing 0.8 x 0.8 x 1 mm): the singleton axis stays one voxel."""
    from pipelines.transforms import deterministic_transforms

    img, lab, label_map = _site(tmp_path, files)
    schema = load_schema(SCHEMA)
    prepare([img], tmp_path / "out", schema, load_label_map(label_map, schema), labels=[lab], options=PrepareOptions(name="cxr"))
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    case = next(c for c in man["cases"] if c["label"])
    item = deterministic_transforms(schema, "CR")({"image": str(tmp_path / "out" / case["image"]), "label": str(tmp_path / "out" / case["label"])})
    assert item["image"].shape[-1] == 1 and item["label"].shape == item["image"].shape
    assert all(abs(n - 16 * 0.1 / 0.8) <= 1.5 for n in item["image"].shape[1:3])  # 16 x 0.1 mm resampled to 0.8 mm pixels


def test_malformed_radiographs_are_refused_one_line_each_and_the_others_prepared(files, tmp_path):
    img, lab, label_map = _site(tmp_path, files)

    def variant(name: str, **changes) -> None:
        ds = pydicom.dcmread(files["pydicom/6278"])
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        for key, value in changes.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.save_as(img / f"{name}.dcm")

    variant("for_processing", PresentationIntentType="FOR PROCESSING")
    variant("no_spacing", ImagerPixelSpacing=None)
    variant("two_frames", NumberOfFrames=2)
    variant("zero_width", WindowWidth=0)
    variant("colour_photometric", PhotometricInterpretation="RGB")
    blank = pydicom.dcmread(files["pydicom/6278"])
    blank.SOPInstanceUID = pydicom.uid.generate_uid()
    blank.PixelData = np.full((16, 16), 3000, np.uint16).tobytes()
    blank.save_as(img / "blank.dcm")
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(lab / "cr6278.png")  # a mask of another size
    out = tmp_path / "out"
    res = cli("site-agent", "prepare", img, "--out", out, "--labels", lab, "--label-map", label_map, "--schema", SCHEMA, "--json")
    assert res.returncode == 3, res.stdout + res.stderr
    cases = json.loads(res.stdout)["cases"]
    codes = sorted(o["reason_code"] for o in cases if o["status"] == "refused")
    assert codes == sorted(
        ["for_processing", "no_pixel_spacing", "multiframe_unsupported", "bad_presentation", "colour_image", "constant_image", "label_grid_mismatch"]
    )
    assert sum(o["status"] in ("ok", "flagged") for o in cases) == 2  # cr6154 and cr6247
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["cases"]) == 2 and sorted(r["reason_code"] for r in manifest["refused"]) == codes
    # each refusal is one line naming its file
    schema = load_schema(SCHEMA)
    again = prepare([img], tmp_path / "again", schema, load_label_map(label_map, schema), labels=[lab], options=PrepareOptions(name="cxr"))
    refused = [o for o in again.outcomes if o.status == "refused"]
    assert len(refused) == len(codes)
    for o in refused:
        assert "\n" not in o.message and (str(img) in o.message or str(lab) in o.message), o.message


def test_no_identifier_of_the_real_files_in_any_output(files, tmp_path):
    values: set[str] = set()
    texts: list[bytes] = []
    for modality, names in (("DX", ["deid/cat.dcm"]), ("CR", ["pydicom/6154", "pydicom-data/RG1_UNCR.dcm"])):
        img = tmp_path / f"images-{modality}"
        img.mkdir()
        for n in [n for n in names if n in files]:
            shutil.copy(files[n], img / f"{Path(n).name.removesuffix('.dcm')}.dcm")
            ds = pydicom.dcmread(files[n], stop_before_pixels=True)
            for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
                       "OperatorsName", "StationName", "DeviceSerialNumber", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                       "SOPInstanceUID", "StudyDate", "StudyID"):  # fmt: skip
                v = str(ds.get(kw, "") or "").strip()
                if len(v) >= 4:
                    values.add(v)
        if not any(img.iterdir()):
            continue
        out = tmp_path / f"out-{modality}"
        res = cli("site-agent", "prepare", img, "--out", out, "--schema", SCHEMA, "--modality", modality, "--pixel-spacing", "0.2")
        assert res.returncode == 0, res.stdout + res.stderr
        blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
        texts += blobs + [gzip.decompress(b) for b in blobs if b[:2] == b"\x1f\x8b"] + [res.stdout.encode(), res.stderr.encode()]
    assert len(values) >= 6
    text = b"\n".join(texts)
    assert not [v for v in values if v.encode() in text]


def test_a_bad_pixel_spacing_option_is_one_error_line(files, tmp_path):
    img, _, _ = _site(tmp_path, files)
    for bad in ("abc", "0,0.2", "0.1,0.2,0.3"):
        res = cli("site-agent", "prepare", img, "--out", tmp_path / "out", "--schema", SCHEMA, "--pixel-spacing", bad)
        assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
        assert f"--pixel-spacing '{bad}'" in res.stderr and not (tmp_path / "out").exists()
    res = cli("site-agent", "prepare", img, "--out", tmp_path / "out", "--schema", SCHEMA, "--pixel-spacing", "0.15")
    assert res.returncode == 0, res.stdout + res.stderr  # their own ImagerPixelSpacing is used, the option is not
    assert {c["radiograph"]["spacing_source"] for c in json.loads((tmp_path / "out" / "manifest.json").read_text())["cases"]} == {"ImagerPixelSpacing"}


def test_png_and_jpeg_radiographs_with_a_declared_spacing(files, tmp_path):
    """Pictures derived from a real CR file: a 16-bit PNG gives its grey levels back to 1/65535, an 8-bit
    JPEG to its quantisation; they are images only with --modality CR/DX, and only with a declared spacing."""
    (path,) = _need(files, "deid/cat.dcm")
    reference = load_radiograph(path, pydicom.dcmread(path)).array[:, :, 0].T  # rows x columns in [0, 1]
    img, lab = tmp_path / "images", tmp_path / "labels"
    img.mkdir()
    lab.mkdir()
    Image.fromarray(np.round(reference * 65535).astype(np.uint16)).save(img / "cat16.png")
    Image.fromarray(np.round(reference * 255).astype(np.uint8)).save(img / "cat8.jpg", quality=95)
    Image.fromarray(np.round(reference * 255).astype(np.uint8)).convert("RGB").save(img / "catrgb.png")
    (img / "notes.txt").write_text("not an image")
    mask = np.zeros(reference.shape, np.uint8)
    mask[500:1500, 800:2000] = 1
    Image.fromarray(mask).save(lab / "cat16.png")
    label_map = tmp_path / "site-labels.yaml"
    label_map.write_text("format: fedimg-site-labels\nschema: chest-xr\nschema_version: 0.1.0\nlabels:\n  0: background\n  1: heart\n")
    common = ["--labels", lab, "--label-map", label_map, "--schema", SCHEMA]
    res = cli("site-agent", "prepare", img, "--out", tmp_path / "no-modality", *common)
    assert res.returncode == 2 and "no image series, radiograph or NIfTI image found" in res.stderr  # PNG/JPEG are no images without --modality
    res = cli("site-agent", "prepare", img, "--out", tmp_path / "no-spacing", *common, "--modality", "DX", "--json")
    assert res.returncode == 2 and "carries no pixel spacing" in res.stderr and "--pixel-spacing" in res.stderr
    out = tmp_path / "out"
    res = cli("site-agent", "prepare", img, "--out", out, *common, "--modality", "DX", "--pixel-spacing", "0.14")
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["cases"]) == 3 and manifest["modality"] == "DX"
    for case in manifest["cases"]:
        assert case["source_kind"] == "picture" and case["shape"] == [reference.shape[1], reference.shape[0], 1] and case["spacing"] == [0.14, 0.14, 1.0]
        assert case["radiograph"] == {"spacing_source": "declared", "values": "picture", "photometric": "MONOCHROME2", "view": "", "patient_orientation": ""}
        shown = np.asanyarray(nib.load(out / case["image"]).dataobj)[:, :, 0].T
        error = np.abs(shown - reference)
        if case["label"]:  # the 16-bit PNG, labelled
            assert float(error.max()) <= 0.5 / 65535 + 1e-6
            label = np.asanyarray(nib.load(out / case["label"]).dataobj)[:, :, 0].T
            assert np.array_equal(label == 3, mask == 1)
        else:  # 8 bits (JPEG: lossy too)
            assert float(error.mean()) < 0.01


def test_a_dicom_seg_drawn_on_a_real_radiograph_lands_on_its_pixels(files, tmp_path):
    """highdicom writes a SEG on the real CR file (no frame of reference, no position: a projection);
    prepare pairs it by the instance it references and maps its segment by name."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    img, lab = tmp_path / "images", tmp_path / "labels"
    img.mkdir()
    lab.mkdir()
    shutil.copy(files["pydicom/6154"], img / "a.dcm")
    shutil.copy(files["pydicom/6247"], img / "b.dcm")
    ds = pydicom.dcmread(img / "a.dcm")
    drawn = np.zeros((1, 16, 16), np.uint8)  # frames x rows x columns
    drawn[0, 2:9, 9:14] = 1
    segment = hd.seg.SegmentDescription(segment_number=1, segment_label="right lung", segmented_property_category=codes.SCT.Organ,
                                        segmented_property_type=codes.SCT.Lung, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)  # fmt: skip
    seg = hd.seg.Segmentation(source_images=[ds], pixel_array=drawn, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                              segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=90, sop_instance_uid=hd.UID(),
                              instance_number=1, manufacturer="fedimg-tests", manufacturer_model_name="tests", software_versions="1",
                              device_serial_number="1")  # fmt: skip
    seg.save_as(lab / "whatever-name.dcm")
    label_map = tmp_path / "site-labels.yaml"
    label_map.write_text("format: fedimg-site-labels\nschema: chest-xr\nschema_version: 0.1.0\nlabels:\n  0: background\n  right lung: right_lung\n")
    schema = load_schema(SCHEMA)
    res = prepare([img], tmp_path / "out", schema, load_label_map(label_map, schema), labels=[lab], options=PrepareOptions(name="cxr"))
    assert sorted(o.status for o in res.outcomes) == ["ok", "ok"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (case,) = [c for c in manifest["cases"] if c["label"]]
    assert case["label_source_kind"] == "seg" and case["label_voxels"] == {"right_lung": 35}
    label = np.asanyarray(nib.load(tmp_path / "out" / case["label"]).dataobj)[:, :, 0].T
    assert np.array_equal(label == 2, drawn[0] == 1)
    image = np.asanyarray(nib.load(tmp_path / "out" / case["image"]).dataobj)[:, :, 0].T
    np.testing.assert_allclose(image, _window_then_invert(ds), atol=1e-5)  # the SEG went to a.dcm, not b.dcm


def test_overlays_show_a_radiograph_as_a_viewer_does():
    """Run reports' case figures (`fedimg_core.reporting.overlays`): a radiograph's plane (column, row) is shown first row
    at the top, first column on the left, not flipped like an axial CT slice."""
    from fedimg_core.reporting.overlays import _display, plot_case

    plane = np.zeros((4, 3), dtype=np.float32)  # 4 columns, 3 rows
    plane[0, 0] = 1.0  # the first column of the first row
    shown = _display(plane, planar=True)
    assert shown.shape == (3, 4) and shown[0, 0] == 1.0
    assert _display(plane)[-1, -1] == 1.0  # an axial slice: patient's right on the left, anterior up
    image = np.random.default_rng(0).random((16, 12, 1)).astype(np.float32)
    label = np.zeros((16, 12, 1), dtype=np.uint8)
    label[2:6, 3:8, 0] = 1
    assert plot_case(image, label, label, [], "radiograph")[:8] == b"\x89PNG\r\n\x1a\n"
