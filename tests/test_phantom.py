"""The abdominal-CT phantom: anatomy, intensities, DICOM series, labels and site layout."""

from __future__ import annotations

import re
from datetime import datetime

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from scipy import ndimage

from fedimg_testing.phantom import (
    PHASES,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    SITES,
    TISSUES,
    PlantedIdentifiers,
    make_phantom,
    site_label_volume,
    volume_affine_lps,
    volume_affine_ras,
    write_dicom_series,
    write_phantom_site,
)
from preprocessing.schema import load_label_map, load_schema

SCHEMA = load_schema()
SMALL = (48, 48, 12)
SPACING = (1.2, 1.6, 3.0)  # anisotropic in-plane, so a PixelSpacing swap cannot go unnoticed


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    def rx(a):
        c, s = np.cos(a), np.sin(a)
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])

    def ry(a):
        c, s = np.cos(a), np.sin(a)
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])

    def rz(a):
        c, s = np.cos(a), np.sin(a)
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])

    return rz(az) @ ry(ay) @ rx(ax)


_R = _rotation(np.radians(20), np.radians(-15), np.radians(30))
OBLIQUE = (*_R[:, 0], *_R[:, 1])


def _read_series(paths):
    """(datasets sorted along the normal, HU volume [x, y, z]) of a written series."""
    dss = [pydicom.dcmread(p) for p in paths]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
    hu = np.stack([d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss], axis=-1)
    return dss, hu


@pytest.fixture(scope="module")
def volume():
    return make_phantom(3, "portal_venous", SMALL, SPACING)


@pytest.fixture(scope="module")
def ids():
    return PlantedIdentifiers.for_case(3, 0)


# --------------------------------------------------------------------------- anatomy


def test_deterministic_in_seed_and_phase():
    a = make_phantom(7, "portal_venous", SMALL)
    b = make_phantom(7, "portal_venous", SMALL)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.label, b.label)
    assert a.hu.dtype == np.int16 and a.label.dtype == np.uint8 and a.hu.shape == a.label.shape == SMALL

    other = make_phantom(8, "portal_venous", SMALL)
    assert (other.label != a.label).mean() > 0.01  # a different patient, not just different noise

    art = make_phantom(7, "arterial", SMALL)
    assert np.array_equal(art.label, a.label) and np.array_equal(art.tissue, a.tissue)
    liver = a.label == SCHEMA.classes["liver"]
    assert art.hu[liver].mean() < a.hu[liver].mean() - 20  # liver peaks in the portal-venous phase
    # The noise pattern depends only on the seed: where contrast changes nothing (deep in
    # fat, away from partial-volume edges) the two phases are identical voxel for voxel.
    fat = ndimage.binary_erosion(a.tissue == TISSUES.index("fat"), iterations=2)
    assert fat.sum() > 100 and np.array_equal(art.hu[fat], a.hu[fat])


@pytest.mark.parametrize("seed", [0, 1, 2, 11, 123])
def test_every_schema_class_present(seed):
    vol = make_phantom(seed, "portal_venous", SMALL)
    present = set(np.unique(vol.label).tolist())
    assert present == set(SCHEMA.classes.values())


def test_too_small_grid_is_refused():
    with pytest.raises(ValueError, match="too small"):
        make_phantom(0, shape=(8, 8, 2))
    with pytest.raises(ValueError, match="unknown phase"):
        make_phantom(0, phase="venous")


def test_phase_table_is_plausible():
    assert set(PHASES) >= {"non_contrast", "arterial", "portal_venous", "delayed"}
    for phase, hu in PHASES.items():
        assert set(hu) == set(TISSUES)
        assert hu["air"] == -1000 and -120 <= hu["fat"] <= -80 and 40 <= hu["muscle"] <= 70
        assert 300 <= hu["bone_cancellous"] <= hu["bone_cortical"] <= 1000
        if phase != "non_contrast":  # lesions are hypodense to their organ after contrast
            assert hu["liver_tumor"] < hu["liver"] - 15
            assert hu["pancreas_tumor"] < hu["pancreas"] - 10
            assert hu["kidney_tumor"] < hu["kidney_cortex"] - 30
    nc, art, pv = PHASES["non_contrast"], PHASES["arterial"], PHASES["portal_venous"]
    assert 45 <= nc["liver"] <= 65 and pv["liver"] >= nc["liver"] + 40
    assert art["kidney_cortex"] > art["kidney_medulla"] + 60  # corticomedullary phase
    assert max(PHASES, key=lambda p: PHASES[p]["aorta"]) == "arterial"


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_tissue_means_match_phase_table(phase):
    vol = make_phantom(5, phase, (64, 64, 20))
    checked = 0
    for name in ("liver", "spleen", "muscle", "fat", "pancreas", "aorta", "kidney_medulla", "air"):
        core = ndimage.binary_erosion(vol.tissue == TISSUES.index(name), iterations=1)
        if core.sum() < 30:
            continue
        checked += 1
        assert abs(vol.hu[core].mean() - PHASES[phase][name]) < 6, name
    assert checked >= 6
    liver_core = ndimage.binary_erosion(vol.tissue == TISSUES.index("liver"), iterations=2)
    assert 8 < vol.hu[liver_core].std() < 16  # ~12 HU noise
    # Lesions (label level, edges included) are darker than their organ after contrast.
    if phase != "non_contrast":
        for organ, lesion in (("liver", "liver_tumor"), ("kidney", "kidney_tumor"), ("pancreas", "pancreas_tumor")):
            organ_hu = vol.hu[vol.label == SCHEMA.classes[organ]].mean()
            lesion_hu = vol.hu[vol.label == SCHEMA.classes[lesion]].mean()
            assert lesion_hu < organ_hu - 10, (organ, organ_hu, lesion_hu)


def test_organs_on_the_anatomical_side():
    vol = make_phantom(4, shape=(64, 64, 20))
    nx, ny, _ = vol.label.shape

    def centroid(name):
        return np.argwhere(vol.label == SCHEMA.classes[name]).mean(axis=0)

    liver, spleen, pancreas = centroid("liver"), centroid("spleen"), centroid("pancreas")
    # +x is the patient's left in LPS: liver (patient right) at low x, spleen at high x.
    assert liver[0] < nx / 2 < spleen[0]
    assert spleen[1] > pancreas[1]  # spleen posterior (+y) of the pancreas
    kidneys, n = ndimage.label(vol.label == SCHEMA.classes["kidney"])
    sizes = ndimage.sum(np.ones_like(kidneys), kidneys, range(1, n + 1))
    two = np.argsort(sizes)[-2:] + 1
    xs = sorted(np.argwhere(kidneys == i)[:, 0].mean() for i in two)
    assert xs[0] < nx / 2 < xs[1]  # one kidney on each side
    for i in two:
        assert np.argwhere(kidneys == i)[:, 1].mean() > pancreas[1]  # kidneys posterior
    # Everything outside the body is air.
    assert (vol.hu[0, 0, :] < -900).all()


# --------------------------------------------------------------------------- identifiers


def test_planted_identifiers_unique_distinctive_and_valid():
    a, b, c = PlantedIdentifiers.for_case(1, 0), PlantedIdentifiers.for_case(1, 1), PlantedIdentifiers.for_case(2, 0)
    assert a == PlantedIdentifiers.for_case(1, 0)  # deterministic
    values = a.strings()
    assert len(values) >= 20 and len(set(values)) == len(values)
    for v in values:
        assert not any(v != w and v in w for w in values), f"{v!r} is a substring of another planted value"
    assert not set(values) & set(b.strings()) and not set(values) & set(c.strings())
    for v in (a.patient_id, a.accession, a.institution, a.private_text, a.patient_name):
        assert "ZZPHI" in v
    datetime.strptime(a.birth_date, "%Y%m%d")
    datetime.strptime(a.study_date, "%Y%m%d")
    assert re.fullmatch(r"\d{6}\.\d{6}", a.study_time)
    assert len(a.accession) <= 16 and len(a.station) <= 16 and len(a.ae_title) <= 16 and len(a.study_id) <= 16
    assert re.fullmatch(r"\d{3}Y", a.patient_age) and a.patient_sex in "MF"


# --------------------------------------------------------------------------- DICOM series


def test_series_headers_pixels_and_geometry(tmp_path, volume, ids):
    origin = (-40.0, 12.5, 210.0)
    paths = write_dicom_series(volume, tmp_path / "s", ids, origin=origin, seed=9)
    nz = volume.hu.shape[2]
    assert len(paths) == nz and sorted(tmp_path.joinpath("s").iterdir()) == sorted(paths)
    assert all(re.fullmatch(r"[0-9A-F]{16}", p.name) for p in paths)
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left behind

    dss, hu = _read_series(paths)
    assert np.array_equal(hu, volume.hu)  # rescale gives back the HU
    first = dss[0]
    assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
    assert first.Rows == volume.hu.shape[1] and first.Columns == volume.hu.shape[0]
    assert [float(v) for v in first.PixelSpacing] == [SPACING[1], SPACING[0]]  # [rows, columns]
    assert float(first.SliceThickness) == SPACING[2]
    assert first.BitsAllocated == 16 and first.RescaleType == "HU" and first.PixelRepresentation == 0
    assert sorted(int(d.InstanceNumber) for d in dss) == list(range(1, nz + 1))
    assert [int(d.InstanceNumber) for d in dss] != list(range(1, nz + 1))  # shuffled vs position
    assert len({d.SOPInstanceUID for d in dss}) == nz
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({str(getattr(d, key)) for d in dss}) == 1
    for k, d in enumerate(dss):
        assert d.SOPInstanceUID == d.file_meta.MediaStorageSOPInstanceUID
        expected = np.array(origin) + k * SPACING[2] * np.array([0, 0, 1.0])
        assert np.allclose([float(v) for v in d.ImagePositionPatient], expected)
        assert float(d.SliceLocation) == pytest.approx(expected[2])

    # Writing again gives the same bytes (deterministic UIDs, names and order).
    again = write_dicom_series(volume, tmp_path / "again", ids, origin=origin, seed=9)
    assert [p.name for p in again] == [p.name for p in paths]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(paths, again))


def test_mr_series_same_anatomy_mr_intensities(tmp_path, volume, ids):
    from fedimg_testing.phantom import mr_like

    paths = write_dicom_series(volume, tmp_path / "s", ids, seed=4, modality="MR")
    dss = [pydicom.dcmread(p) for p in paths]
    first = dss[0]
    assert first.SOPClassUID == pydicom.uid.MRImageStorage and first.Modality == "MR"
    assert "RescaleSlope" not in first and "KVP" not in first and float(first.MagneticFieldStrength) == 1.5
    pixels = np.stack([d.pixel_array.T for d in dss], axis=-1)  # paths are in slice order
    assert np.array_equal(pixels, np.rint(mr_like(volume, 4)).astype(np.uint16))
    assert (pixels[volume.hu < -500] == 0).all() and (pixels[volume.hu > -100] > 0).all()
    with pytest.raises(ValueError, match="modality"):
        write_dicom_series(volume, tmp_path / "x", ids, modality="PT")


def test_mr_site_prepares_as_an_mr_dataset(tmp_path):
    from preprocessing.dataset import load_dataset
    from preprocessing.prepare import PrepareOptions, prepare

    site = write_phantom_site(tmp_path / "h", ["liver", "spleen"], n_cases=1, seed=2, modality="MR", shape=SMALL, spacing=SPACING)
    prepare([site.dicom_dir], tmp_path / "ds", SCHEMA, load_label_map(site.label_map, SCHEMA), labels=[site.labels_dir],
            options=PrepareOptions(name="mr", qc_report=False))  # fmt: skip
    ds = load_dataset(tmp_path / "ds")
    assert ds.modality == "MR" and len(ds.cases) == 1


def test_instance_file_names_and_signed_rescale(tmp_path, volume, ids):
    paths = write_dicom_series(volume, tmp_path / "s", ids, file_names="instance", rescale=(1.0, 0.0), instance_order="ascending")
    dss, hu = _read_series(paths)
    assert [p.name for p in paths] == [f"IM{k + 1:04d}" for k in range(len(paths))]
    assert [int(d.InstanceNumber) for d in dss] == list(range(1, len(paths) + 1))
    assert dss[0].PixelRepresentation == 1 and np.array_equal(hu, volume.hu)  # int16 storage


def test_oblique_geometry(tmp_path, volume, ids):
    origin = (-20.0, 35.5, 100.0)
    paths = write_dicom_series(volume, tmp_path / "s", ids, origin=origin, orientation=OBLIQUE)
    dss, hu = _read_series(paths)
    assert np.array_equal(hu, volume.hu)
    row, col = _R[:, 0], _R[:, 1]
    normal = np.cross(row, col)
    lps = volume_affine_lps(volume, origin, OBLIQUE)
    for k, d in enumerate(dss):
        assert np.allclose([float(v) for v in d.ImageOrientationPatient], OBLIQUE, atol=1e-6)
        ipp = np.array([float(v) for v in d.ImagePositionPatient])
        assert np.allclose(ipp, np.array(origin) + k * SPACING[2] * normal, atol=1e-4)
        # Pixel (row j, column i) of this slice lies at IPP + i*dx*row_dir + j*dy*col_dir.
        i, j = 7, 3
        world = ipp + i * SPACING[0] * row + j * SPACING[1] * col
        assert np.allclose(lps @ [i, j, k, 1], [*world, 1], atol=1e-4)
    ras = volume_affine_ras(volume, origin, OBLIQUE)
    assert np.allclose(ras, np.diag([-1, -1, 1, 1]) @ lps)
    assert np.allclose(np.linalg.norm(ras[:3, :3], axis=0), SPACING)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SWIG noise from ITK's bindings
def test_oblique_geometry_matches_itk(tmp_path, volume, ids):
    """An independent reader (ITK/GDCM) sees the same voxels at the same positions."""
    itk = pytest.importorskip("itk")
    origin = (-20.0, 35.5, 100.0)
    write_dicom_series(volume, tmp_path / "s", ids, origin=origin, orientation=OBLIQUE)
    names = itk.GDCMSeriesFileNames.New()
    names.SetDirectory(str(tmp_path / "s"))
    image = itk.imread(names.GetInputFileNames(), itk.SS)
    assert np.array_equal(itk.array_from_image(image).transpose(2, 1, 0), volume.hu)
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()) * np.array(image.GetSpacing())
    affine[:3, 3] = np.array(image.GetOrigin())
    assert np.allclose(affine, volume_affine_lps(volume, origin, OBLIQUE), atol=1e-4)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_transfer_syntaxes_round_trip_losslessly(tmp_path, volume, ids, syntax):
    reference = write_dicom_series(volume, tmp_path / "ref", ids)
    paths = write_dicom_series(volume, tmp_path / "ts", ids, transfer_syntax=syntax)
    ref_dss, _ = _read_series(reference)
    dss, hu = _read_series(paths)
    assert np.array_equal(hu, volume.hu)
    for r, d in zip(ref_dss, dss):
        assert d.file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(d.pixel_array, r.pixel_array)
        # Lossless compression keeps the instance (pydicom 3's compress() would re-UID it).
        assert d.SOPInstanceUID == r.SOPInstanceUID == d.file_meta.MediaStorageSOPInstanceUID


def test_invalid_arguments_are_refused(tmp_path, volume, ids):
    with pytest.raises(ValueError, match="orthonormal"):
        write_dicom_series(volume, tmp_path, ids, orientation=(1, 0, 0, 1, 1, 0))
    with pytest.raises(ValueError, match="transfer syntax"):
        write_dicom_series(volume, tmp_path, ids, transfer_syntax=pydicom.uid.JPEGBaseline8Bit)
    with pytest.raises(ValueError, match="16 bits"):
        write_dicom_series(volume, tmp_path, ids, rescale=(0.01, -1024.0))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless])
def test_planted_identifiers_in_raw_bytes(tmp_path, volume, ids, syntax):
    paths = write_dicom_series(volume, tmp_path / "s", ids, transfer_syntax=syntax)
    other = PlantedIdentifiers.for_case(3, 1)
    for path in paths:
        raw = path.read_bytes()
        for value in ids.strings():
            assert value.encode() in raw, value
        assert not any(v.encode() in raw for v in other.strings())
        # The file meta (group 0002, before the dataset proper) carries the AE title.
        meta_len = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value
        assert ids.ae_title.encode() in raw[132 : 144 + meta_len]
    ds = pydicom.dcmread(paths[0])
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)

    def text(v):  # implicit VR: private tags read as UN
        return v.decode().rstrip() if isinstance(v, bytes) else v

    assert text(block[0x10].value) == ids.private_text and text(block[0x11].value) == ids.patient_id
    assert ds.RequestAttributesSequence[0].RequestedProcedureDescription == ids.requested_procedure_description
    assert ds.OtherPatientIDsSequence[0].PatientID == ids.other_patient_id
    assert str(ds.PatientName) == ids.patient_name and ds.PatientBirthDate == ids.birth_date
    assert ds.AcquisitionDateTime == ids.study_date + ids.study_time
    assert ds.file_meta.SourceApplicationEntityTitle == ids.ae_title
    assert not any(v in str(p) for p in paths for v in ids.strings())  # names carry no PHI


# --------------------------------------------------------------------------- sites


def test_nifti_site_labels_share_the_image_grid(tmp_path):
    site = write_phantom_site(tmp_path / "site", ["liver", "liver_tumor"], 2, seed=6, shape=SMALL, spacing=SPACING, orientation=OBLIQUE)
    assert site.cases == ["case_000", "case_001"]
    assert site.identifiers[0] != site.identifiers[1]
    assert sorted(p.name for p in site.labels_dir.iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
    schema_to_local = {SCHEMA.classes["liver"]: 1, SCHEMA.classes["liver_tumor"]: 2}
    for i, case in enumerate(site.cases):
        img = nib.load(site.labels_dir / f"{case}.nii.gz")
        vol = make_phantom(6 * 1000 + i, site.phase, SMALL, SPACING)
        expected_affine = volume_affine_ras(vol, site.origins[i], OBLIQUE)
        assert np.allclose(img.affine, expected_affine, atol=1e-5)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert np.allclose(img.get_qform(), img.get_sform(), atol=1e-4)
        data = np.asarray(img.dataobj)
        assert data.dtype == np.uint8 and data.shape == SMALL
        assert set(np.unique(data).tolist()) == {0, 1, 2}  # local values, not schema ids (3, 4)
        expected = np.zeros_like(vol.label)
        for sid, local in schema_to_local.items():
            expected[vol.label == sid] = local
        assert np.array_equal(data, expected)  # other organs are background

        dss, hu = _read_series(sorted(site.series_dir(i).iterdir()))
        assert np.array_equal(hu, vol.hu)
        for k in (0, len(dss) - 1):
            ipp_lps = np.array([float(v) for v in dss[k].ImagePositionPatient])
            ipp_ras = ipp_lps * [-1, -1, 1]
            assert np.allclose(img.affine @ [0, 0, k, 1], [*ipp_ras, 1], atol=1e-3)
        assert not any(v in str(p) for p in site.root.rglob("*") for v in site.identifiers[i].strings())

    label_map = load_label_map(site.label_map, SCHEMA)
    assert label_map.mapping == {0: "background", 1: "liver", 2: "liver_tumor"}


def test_site_local_values_and_lesion_merging(tmp_path):
    site = write_phantom_site(tmp_path / "k", ["kidney"], 1, seed=2, shape=SMALL, local_values={"kidney": 5})
    data = np.asarray(nib.load(site.label_paths[0]).dataobj)
    vol = make_phantom(2000, site.phase, SMALL)
    kidney_or_tumour = np.isin(vol.label, [SCHEMA.classes["kidney"], SCHEMA.classes["kidney_tumor"]])
    assert np.array_equal(data == 5, kidney_or_tumour) and set(np.unique(data).tolist()) == {0, 5}
    assert load_label_map(site.label_map, SCHEMA).mapping == {0: "background", 5: "kidney"}
    # A site labelling only lesions leaves the organ as background.
    only = site_label_volume(vol.label, ["kidney_tumor"], {"kidney_tumor": 1}, SCHEMA)
    assert np.array_equal(only == 1, vol.label == SCHEMA.classes["kidney_tumor"])
    with pytest.raises(ValueError, match="not a foreground class"):
        write_phantom_site(tmp_path / "bad", ["kidneys"], 1, seed=0, shape=SMALL)


def test_seg_site_readable_by_highdicom(tmp_path):
    hd = pytest.importorskip("highdicom")
    classes = ["pancreas", "pancreas_tumor"]
    site = write_phantom_site(tmp_path / "p", classes, 1, seed=8, shape=SMALL, label_format="seg", transfer_syntax=JPEGLSLossless)
    seg_path = site.labels_dir / "case_000.dcm"
    assert site.label_paths == [seg_path]
    seg = hd.seg.segread(seg_path)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == classes
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == site.series_uids[0]

    dss, _ = _read_series(sorted(site.series_dir(0).iterdir()))
    assert dss[0].SeriesInstanceUID == site.series_uids[0]
    pixels = seg.get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in dss], combine_segments=True, assert_missing_frames_are_empty=True
    )  # [slice, row, column], values = segment numbers
    vol = make_phantom(8000, site.phase, SMALL)
    expected = site_label_volume(vol.label, classes, {"pancreas": 1, "pancreas_tumor": 2}, SCHEMA)
    assert np.array_equal(pixels.transpose(2, 1, 0), expected)
    assert set(np.unique(pixels).tolist()) == {0, 1, 2}

    label_map = load_label_map(site.label_map, SCHEMA)
    assert label_map.mapping == {"pancreas": "pancreas", "pancreas_tumor": "pancreas_tumor"}


def test_default_federation_covers_every_class():
    labelled = {c for classes in SITES.values() for c in classes}
    assert labelled == {c for c in SCHEMA.classes if c != "background"}
    assert SITES["liver"] == ["liver", "liver_tumor"] and SITES["spleen"] == ["spleen"]
