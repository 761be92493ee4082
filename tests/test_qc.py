"""QC report of a prepared dataset: per-case PNGs and the HTML summary page."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from preprocessing import qc
from preprocessing.schema import load_schema

SCHEMA = load_schema()
SPACING = (0.8, 0.8, 3.0)
SHAPE = (24, 24, 12)
LPS = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # i -> patient's left, j -> posterior
PLANTED = "DOE^JOHN_1957-03-04"


def _save(path: Path, array: np.ndarray, affine=LPS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(40, 30, SHAPE).astype(np.float32)


def _label() -> np.ndarray:
    """Kidney on the patient's right (low i of an LPS grid), liver on the left, same slices."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:8, 8:14, 3:9] = SCHEMA.classes["kidney"]  # 6*6*6 = 216 voxels
    lab[16:21, 8:13, 3:9] = SCHEMA.classes["liver"]  # 5*5*6 = 150 voxels
    return lab


def _chroma(rgb: np.ndarray) -> np.ndarray:
    return rgb - rgb.mean(axis=-1, keepdims=True)


def _overlay_mask(png: np.ndarray, class_id: int) -> np.ndarray:
    """Pixels showing class_id's colour blended at the overlay alpha over the grey image:
    the grey contributes no chroma, so their chroma is alpha * chroma(colour)."""
    want = qc.OVERLAY_ALPHA * _chroma(np.array(qc.class_colour(class_id)))
    return np.abs(_chroma(png[..., :3].astype(np.float64)) - want).max(axis=-1) < 0.03


def _png_chunks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return kinds


# ---------------------------------------------------------------------------- case_figure


def test_case_figure_writes_a_png_with_the_class_overlay(tmp_path):
    image = _save(tmp_path / "img.nii.gz", _image())
    label = _save(tmp_path / "lab.nii.gz", _label())
    out = tmp_path / "qc" / "case_0000.png"
    qc.case_figure(image, label, out, SCHEMA, modality="CT", case_id="case_0000")

    kinds = _png_chunks(out)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    assert not {b"tEXt", b"zTXt", b"iTXt", b"eXIf"} & set(kinds), kinds  # no metadata text at all
    assert [p.name for p in out.parent.iterdir()] == ["case_0000.png"]  # no temp file left behind
    png = mpimg.imread(out)
    h, w = png.shape[:2]
    assert w >= 600 and 200 <= h <= w and png.shape[2] in (3, 4)
    # The overlay colours many pixels in each labelled class's colour (a legend patch is
    # drawn at full colour, so it does not match), and none in an absent class's colour.
    assert _overlay_mask(png, SCHEMA.classes["kidney"]).sum() > 1000
    assert _overlay_mask(png, SCHEMA.classes["liver"]).sum() > 1000
    assert _overlay_mask(png, SCHEMA.classes["spleen"]).sum() == 0


def test_case_figure_is_in_radiological_convention(tmp_path):
    """The kidney, on the patient's right, is drawn left of the liver in the axial view."""
    image = _save(tmp_path / "img.nii.gz", _image())
    label = _save(tmp_path / "lab.nii.gz", _label())
    out = tmp_path / "case.png"
    qc.case_figure(image, label, out, SCHEMA, case_id="case_0000")
    png = mpimg.imread(out)
    axial = png[: int(png.shape[0] * 0.4), : png.shape[1] // 3]  # the main axial view (the strips are below)
    kidney_cols = np.nonzero(_overlay_mask(axial, SCHEMA.classes["kidney"]))[1]
    liver_cols = np.nonzero(_overlay_mask(axial, SCHEMA.classes["liver"]))[1]
    assert kidney_cols.size and liver_cols.size
    assert kidney_cols.max() < liver_cols.min()


def test_views_reorient_to_ras_and_keep_the_physical_aspect(tmp_path):
    vol = np.zeros(SHAPE, np.float32)
    vol[0, 0, SHAPE[2] - 1] = 1.0  # LPS grid: i=0 is the most right, j=0 the most anterior, k=max the most superior
    data, spacing = qc._load_canonical(_save(tmp_path / "v.nii.gz", vol))
    assert spacing == pytest.approx(SPACING)
    centre = tuple(int(c[0]) for c in np.nonzero(data))
    (axial, a_ax), (coronal, a_co), (sagittal, a_sa) = qc._views(data, centre, spacing)
    # Top-left pixel: right+anterior (axial), right+superior (coronal), anterior+superior (sagittal).
    assert axial[0, 0] == coronal[0, 0] == sagittal[0, 0] == 1.0
    assert axial.shape == (SHAPE[1], SHAPE[0]) and coronal.shape == (SHAPE[2], SHAPE[0]) and sagittal.shape == (SHAPE[2], SHAPE[1])
    assert a_ax == pytest.approx(1.0) and a_co == pytest.approx(3.0 / 0.8) and a_sa == pytest.approx(3.0 / 0.8)


@pytest.mark.parametrize("with_label", ["none", "empty"])
def test_case_figure_without_label(tmp_path, with_label):
    image = _save(tmp_path / "img.nii.gz", _image())
    label = _save(tmp_path / "lab.nii.gz", np.zeros(SHAPE, np.uint8)) if with_label == "empty" else None
    out = tmp_path / "case.png"
    qc.case_figure(image, label, out, SCHEMA, modality="MR", case_id="case_0001")
    png = mpimg.imread(out)
    assert png.shape[1] >= 600
    for cid in range(1, SCHEMA.num_classes):
        assert _overlay_mask(png, cid).sum() == 0


def test_case_figure_refuses_a_label_on_another_grid(tmp_path):
    image = _save(tmp_path / "img.nii.gz", _image())
    label = _save(tmp_path / "lab.nii.gz", np.zeros((10, 10, 10), np.uint8))
    with pytest.raises(ValueError, match="grid"):
        qc.case_figure(image, label, tmp_path / "x.png", SCHEMA)
    assert not (tmp_path / "x.png").exists()


def test_label_volumes_ml():
    lab = _label()
    lab[0, 0, 0] = SCHEMA.ignore_label
    spacing = (0.5, 0.7, 2.5)
    voxel_ml = 0.5 * 0.7 * 2.5 / 1000
    vols = qc.label_volumes_ml(lab, spacing, SCHEMA)
    assert list(vols) == ["kidney", "liver"]  # present classes only, by id; no background / ignore
    assert vols["kidney"] == pytest.approx(216 * voxel_ml)
    assert vols["liver"] == pytest.approx(150 * voxel_ml)
    assert qc.label_volumes_ml(lab.astype(np.int32), spacing, SCHEMA) == pytest.approx(vols)
    assert qc.label_volumes_ml(np.zeros(SHAPE, np.uint8), spacing, SCHEMA) == {}


# ---------------------------------------------------------------------------- write_report


def _dataset(root: Path) -> dict:
    """Three cases (labelled, unlabelled, empty label) and a refused input, as the converter writes them."""
    past = time.time() - 100  # inputs clearly older than any PNG written by the test
    cases = []
    specs = [
        ("case_0000", _label(), ["irregular_spacing", "gantry_tilt"]),
        ("case_0001", None, []),
        ("case_0002", np.zeros(SHAPE, np.uint8), ["label_empty"]),
    ]
    for n, (case_id, lab, flags) in enumerate(specs):
        img_path = _save(root / "imagesTr" / f"{case_id}.nii.gz", _image(n), np.diag([*SPACING, 1.0]))
        os.utime(img_path, (past, past))
        entry = {
            "case_id": case_id,
            "image": f"imagesTr/{case_id}.nii.gz",
            "label": None,
            "shape": list(SHAPE),
            "spacing": list(SPACING),
            "orientation": ["R", "A", "S"],
            "intensity_range": [-1024.0, 1500.5],
            "qc_flags": flags,
            "label_voxels": {},
            "status": "flagged" if flags else "ok",
            "series_description": PLANTED,  # a field the report must not show
        }
        if lab is not None:
            lab_path = _save(root / "labelsTr" / f"{case_id}.nii.gz", lab, np.diag([*SPACING, 1.0]))
            os.utime(lab_path, (past, past))
            entry["label"] = f"labelsTr/{case_id}.nii.gz"
            entry["label_voxels"] = {name: int((lab == cid).sum()) for name, cid in SCHEMA.classes.items() if cid and (lab == cid).any()}
        cases.append(entry)
    return {
        "modality": "CT",
        "schema": {"name": SCHEMA.name, "version": SCHEMA.version},
        "labeled_classes": [1, 3],
        "cases": cases,
        "refused": [{"source": "3f9a1c2b7d", "reason_code": "not_a_volume", "message": f"series of {PLANTED}: 1 slice"}],
    }


def test_write_report(tmp_path):
    manifest = _dataset(tmp_path)
    calls = []
    index = qc.write_report(tmp_path, manifest, SCHEMA, progress=lambda done, total: calls.append((done, total)))
    assert index == tmp_path / "qc" / "index.html"
    assert calls == [(1, 3), (2, 3), (3, 3)]
    for case in manifest["cases"]:
        png = tmp_path / "qc" / f"{case['case_id']}.png"
        assert mpimg.imread(png).shape[1] >= 600
    text = index.read_text(encoding="utf-8")
    for needle in [
        "case_0000",
        "case_0001",
        "case_0002",
        "irregular_spacing",
        "gantry_tilt",
        "label_empty",
        "3f9a1c2b7d",
        "not_a_volume",
        SCHEMA.name,
        SCHEMA.version,
        'href="case_0000.png"',
        "radiological convention",
        "[-1024, 1500.5]",
        "0.8×0.8×3",
        "24×24×12",
        "RAS",
    ]:
        assert needle in text, needle
    voxel_ml = 0.8 * 0.8 * 3.0 / 1000
    assert f"{216 * voxel_ml:.2f}" in text and f"{150 * voxel_ml:.2f}" in text  # kidney, liver mL
    assert "<th>kidney (mL)</th>" in text and "<th>liver (mL)</th>" in text and "spleen (mL)" not in text
    row = text[text.index("<td><code>case_0001</code>") :]
    row = row[: row.index("</tr>")]
    assert row.count("&mdash;") == 2 and '<td class="num">0</td>' not in row  # no label: no volumes, not 0 mL
    # summary counts: 3 cases, 1 ok, 2 flagged, 1 refused
    assert '<td class="num">3</td><td class="num">1</td><td class="num">2</td><td class="num">1</td>' in text
    # Nothing but allowlisted fields: not the refused message, not other header fields.
    for path in (tmp_path / "qc").iterdir():
        assert PLANTED.encode() not in path.read_bytes(), path
    assert "series of" not in text


def test_write_report_keeps_free_text_and_markup_out(tmp_path):
    manifest = _dataset(tmp_path)
    manifest["cases"][0]["qc_flags"] = ["gantry_tilt", f"<script>alert('{PLANTED}')</script>"]
    manifest["cases"][0]["orientation"] = ["R", "A", PLANTED]
    manifest["cases"][1]["case_id"] = "../escaped"
    manifest["refused"].append({"source": f"/data/{PLANTED}/IM0001", "reason_code": f"bad {PLANTED}", "message": "x"})
    manifest["modality"] = f"CT {PLANTED}"
    text = qc.write_report(tmp_path, manifest, SCHEMA).read_text(encoding="utf-8")
    assert PLANTED not in text and "<script" not in text and "escaped" not in text
    assert "invalid_code" in text and "invalid_case_id" in text
    assert not (tmp_path / "escaped.png").exists()
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["case_0000.png", "case_0002.png", "index.html"]


def test_write_report_rerun_skips_up_to_date_pngs(tmp_path):
    manifest = _dataset(tmp_path)
    qc.write_report(tmp_path, manifest, SCHEMA)
    pngs = {c["case_id"]: tmp_path / "qc" / f"{c['case_id']}.png" for c in manifest["cases"]}
    before = {k: p.stat().st_mtime_ns for k, p in pngs.items()}
    qc.write_report(tmp_path, manifest, SCHEMA)
    assert {k: p.stat().st_mtime_ns for k, p in pngs.items()} == before
    # A newer label (the case was re-converted) re-renders that case only.
    future = time.time() + 100
    os.utime(tmp_path / "labelsTr" / "case_0000.nii.gz", (future, future))
    qc.write_report(tmp_path, manifest, SCHEMA)
    after = {k: p.stat().st_mtime_ns for k, p in pngs.items()}
    assert after["case_0000"] != before["case_0000"]
    assert after["case_0001"] == before["case_0001"] and after["case_0002"] == before["case_0002"]


def test_write_report_goes_on_past_a_broken_case(tmp_path):
    manifest = _dataset(tmp_path)
    (tmp_path / "imagesTr" / "case_0001.nii.gz").unlink()
    (tmp_path / "labelsTr" / "case_0002.nii.gz").write_bytes(b"not a nifti")
    text = qc.write_report(tmp_path, manifest, SCHEMA).read_text(encoding="utf-8")
    assert (tmp_path / "qc" / "case_0000.png").is_file()
    assert not (tmp_path / "qc" / "case_0001.png").exists() and not (tmp_path / "qc" / "case_0002.png").exists()
    assert "image_missing" in text and "render_failed" in text
    assert str(tmp_path) not in text  # error messages (which carry paths) are not shown
