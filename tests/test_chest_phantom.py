"""The chest radiograph phantom (fedimg_testing.phantom.chest) and `site-agent prepare` on its sites.

Each of the four scanners (CR/DX, MONOCHROME1/2, 12-16 bits, the spacing in PixelSpacing,
ImagerPixelSpacing or with a magnification factor, uncompressed, RLE, JPEG 2000) writes a real
DICOM file per case with identifiers planted where scanners put them; prepare must give back the
phantom's picture, its labels, the right spacing, and none of the identifiers.
"""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import cli

from fedimg_testing.phantom.chest import CHEST_CLASSES, SCANNERS, make_chest_radiograph, write_chest_site

SITE_CLASSES = (["left_lung"], ["right_lung"], ["heart"], ["pneumothorax"])  # the ConDistFL paper's four 2D sites


def test_the_phantom_is_deterministic_and_anatomical():
    a = make_chest_radiograph(3, 1, SCANNERS[0], pneumothorax=1.0, scale=0.2)
    b = make_chest_radiograph(3, 1, SCANNERS[0], pneumothorax=1.0, scale=0.2)
    assert np.array_equal(a.stored, b.stored) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.stored, make_chest_radiograph(3, 2, SCANNERS[0], pneumothorax=1.0, scale=0.2).stored)
    counts = np.bincount(a.label.ravel(), minlength=5)
    assert all(counts[1:] > 0) and a.pneumothorax in ("left", "right")
    cols = a.label.shape[1]
    right, left = np.nonzero(a.label == CHEST_CLASSES["right_lung"])[1].mean(), np.nonzero(a.label == CHEST_CLASSES["left_lung"])[1].mean()
    assert right < cols / 2 < left  # PA: the patient's right lung on the viewer's left
    lung = np.isin(a.label, [1, 2])
    assert a.display[lung].mean() < a.display[a.label == CHEST_CLASSES["heart"]].mean()  # air darker than the heart
    assert a.display[a.label == CHEST_CLASSES["pneumothorax"]].mean() < a.display[lung].mean()  # pleural air: no lung tissue, darker
    none = make_chest_radiograph(3, 1, SCANNERS[0], pneumothorax=0.0, scale=0.2)
    assert none.pneumothorax == "" and not (none.label == CHEST_CLASSES["pneumothorax"]).any()


@pytest.mark.parametrize("site", range(4))
def test_prepare_reads_each_scanner_back_exactly(tmp_path, site):
    scanner = SCANNERS[site]
    others = [c for c in ("left_lung", "right_lung", "heart") if c not in SITE_CLASSES[site]]
    chest = write_chest_site(tmp_path / "site", seed=site, n_cases=2, scanner=scanner, classes=SITE_CLASSES[site], reference_classes=others,
                             scale=0.15, pneumothorax=0.5)  # fmt: skip
    out = tmp_path / "out"
    res = cli("site-agent", "prepare", chest.root / "images", "--out", out, "--labels", chest.root / "labels", "--label-map", chest.label_map,
              "--reference-labels", chest.root / "reference-labels", "--reference-label-map", chest.reference_label_map, "--schema", "chest-xr")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modality"] == scanner.modality and len(manifest["cases"]) == 2
    want_source = {"PixelSpacing": "PixelSpacing", "ImagerPixelSpacing": "ImagerPixelSpacing",
                   "ImagerPixelSpacing+magnification": "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"}[scanner.spacing_tag]  # fmt: skip
    case_map = json.loads(out.with_name(out.name + ".case-map.json").read_text())
    for case in manifest["cases"]:
        number = int(case_map["cases"][case["case_id"]]["source"].split("cxr_")[-1][:3])
        phantom = make_chest_radiograph(site, number, scanner, pneumothorax=0.5, scale=0.15)
        assert case["radiograph"]["spacing_source"] == want_source and case["radiograph"]["photometric"] == scanner.photometric
        spacing = phantom.spacing_mm / (1.1 if want_source.endswith("Factor") else 1.0)
        assert case["spacing"][:2] == pytest.approx([spacing, spacing], rel=1e-6)
        shown = np.asanyarray(nib.load(out / case["image"]).dataobj)[:, :, 0].T
        # the display pipeline gives the phantom's picture back through the scanner's window (monotonic, bone white)
        inside = (shown > 0.001) & (shown < 0.999)
        assert np.corrcoef(shown[inside], phantom.display[inside])[0, 1] > 0.999
        label = np.asanyarray(nib.load(out / case["label"]).dataobj)[:, :, 0].T
        mine = [CHEST_CLASSES[c] for c in SITE_CLASSES[site]]
        assert np.array_equal(label, np.where(np.isin(phantom.label, mine), phantom.label, 0))
        reference = np.asanyarray(nib.load(out / case["reference_label"]).dataobj)[:, :, 0].T
        theirs = [CHEST_CLASSES[c] for c in others]
        assert np.array_equal(reference, np.where(np.isin(phantom.label, theirs), phantom.label, 0))
    # nothing planted reaches the output
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    text = b"\n".join(blobs + [gzip.decompress(b) for b in blobs if b[:2] == b"\x1f\x8b"]) + res.stdout.encode()
    planted = {s for ids in chest.identifiers for s in ids.strings() if len(s) >= 6}
    assert planted and not [s for s in planted if s.encode() in text]
    ds = pydicom.dcmread(chest.images[0])
    assert str(ds.PatientName) in {str(i.patient_name) for i in chest.identifiers}  # they were there to find
