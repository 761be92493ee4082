"""De-identification (PS3.15 Annex E basic profile): identifiers planted in every usual place
of real DICOM files shipped with pydicom, then every output byte and path is scanned."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from preprocessing.deidentify import (
    DeidentifyError,
    deidentify_dataset,
    deidentify_tree,
    deidentify_uid,
    load_secret,
    patient_pseudonym,
    pseudonymize_relpath,
)

SECRET = b"test-site-secret-0123456789abcdef"
OTHER_SECRET = b"another-site-secret-fedcba987654"
CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"

# Every planted value is distinctive so that a byte scan cannot miss it or hit it by chance.
PHI = {
    "name": "ZZPHI-NAME-0001",
    "pid": "ZZPHI-PID-0002",
    "other_pid": "ZZPHI-OPID-0003",
    "birth": "19230405",
    "accession": "ZZPHI-ACC-0004",
    "institution": "ZZPHI-INST-0005",
    "address": "ZZPHI-ADDR-0006",
    "station": "ZZPHI-STN-0007",
    "serial": "ZZPHI-SER-0008",
    "referring": "ZZPHI-REF-0009",
    "operator": "ZZPHI-OPR-0010",
    "performing": "ZZPHI-PERF-0011",
    "study_date": "19870605",
    "series_date": "19870606",
    "acq_date": "19870607",
    "content_date": "19870608",
    "study_time": "112233.4455",
    "acq_datetime": "19870609101112",
    "study_desc": "ZZPHI-SDESC-0012",
    "series_desc": "ZZPHI-SERDESC-0013",
    "comments": "ZZPHI-COMMENT-0014",
    "req_proc_id": "ZZPHI-RPID-0015",
    "req_proc_desc": "ZZPHI-RPDESC-0016",
    "nested_inst": "ZZPHI-CEINST-0017",
    "nested_evaluator": "ZZPHI-EVAL-0018",
    "private_creator": "ZZPHI-CREATOR-0019",
    "private_text": "ZZPHI-PRIV-0020",
    "nested_private": "ZZPHI-NPRIV-0021",
    "meta_source_ae": "ZZPHI-AE-0022",
    "meta_sending_ae": "ZZPHI-SAE-0023",
    "meta_impl_version": "ZZPHI-IMPL-24",
    "preamble": "ZZPHI-PREAMBLE-0025",
    "overlay_desc": "ZZPHI-OVL-0026",
    "overlay_data": "ZZPHI-OVLDATA-0027",
    "curve": "ZZPHI-CURVE-0028",
    "unknown_public": "ZZPHI-UNKNOWN-0029",
    "expiry_date": "19991230",
    "sr_text": "ZZPHI-SRTEXT-0030",
    "patient_address": "ZZPHI-PADDR-0031",
    "other_name": "ZZPHI-OTHER-0032",
    "other_pid2": "ZZPHI-PID-0033",
    "file_name": "ZZPHI-FILE-0034",
}
PLANTED_UIDS = {
    "ref_study": "1.2.826.0.1.3680043.99.7.1111111",
    "volume_for": "1.2.826.0.1.3680043.99.7.2222222",  # a UID attribute Table E.1-1 does not list
}
GEOMETRY = [
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "PhotometricInterpretation",
    "Modality",
    "SamplesPerPixel",
    "SOPClassUID",
    "NumberOfFrames",
    "SpacingBetweenSlices",
    "PixelData",
]


def _plant(ds: Dataset, name: str, pid: str) -> Dataset:
    """Identifiers in the patient, study, institution, device, private and file-meta places."""
    p = PHI
    ds.PatientName = f"{name}^Jane"
    ds.PatientID = pid
    ds.OtherPatientIDs = p["other_pid"]
    ds.PatientBirthDate = p["birth"]
    ds.PatientAddress = p["patient_address"]
    ds.AccessionNumber = p["accession"]
    ds.InstitutionName = p["institution"]
    ds.InstitutionAddress = p["address"]
    ds.StationName = p["station"]
    ds.DeviceSerialNumber = p["serial"]
    ds.ReferringPhysicianName = p["referring"]
    ds.OperatorsName = p["operator"]
    ds.PerformingPhysicianName = p["performing"]
    ds.StudyDate, ds.SeriesDate = p["study_date"], p["series_date"]
    ds.AcquisitionDate, ds.ContentDate = p["acq_date"], p["content_date"]
    ds.StudyTime = p["study_time"]
    ds.AcquisitionDateTime = p["acq_datetime"]
    ds.StudyDescription, ds.SeriesDescription = p["study_desc"], p["series_desc"]
    ds.ImageComments = p["comments"]
    ds.ExpiryDate = p["expiry_date"]  # a date Table E.1-1 does not list
    ds.VolumeFrameOfReferenceUID = PLANTED_UIDS["volume_for"]
    req = Dataset()
    req.RequestedProcedureID = p["req_proc_id"]
    req.RequestedProcedureDescription = p["req_proc_desc"]
    ds.RequestAttributesSequence = Sequence([req])
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = PLANTED_UIDS["ref_study"]
    ds.ReferencedStudySequence = Sequence([ref])
    equip = Dataset()
    equip.InstitutionName = p["nested_inst"]
    equip.EvaluatorName = p["nested_evaluator"]  # a person name Table E.1-1 does not list
    equip.ContributionDateTime = p["acq_datetime"]
    equip.private_block(0x0009, p["private_creator"], create=True).add_new(0x01, "LO", p["nested_private"])
    ds.ContributingEquipmentSequence = Sequence([equip])
    block = ds.private_block(0x0029, p["private_creator"], create=True)
    block.add_new(0x01, "LO", p["private_text"])
    block.add_new(0x02, "UT", p["private_text"] + " again")
    # overlay plane 6000 with a description and data holding text; a curve; an unknown public tag
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000022, "LO", p["overlay_desc"])
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", p["overlay_data"].encode().ljust(8, b"\0")[:8] + p["overlay_data"].encode())
    ds.add_new(0x50002500, "LO", p["curve"])
    ds.add_new(0x00300010, "LO", p["unknown_public"])
    sr = Dataset()
    sr.ValueType = "TEXT"
    sr.TextValue = p["sr_text"]
    ds.ContentSequence = Sequence([sr])
    ds.file_meta.SourceApplicationEntityTitle = p["meta_source_ae"]
    ds.file_meta.SendingApplicationEntityTitle = p["meta_sending_ae"]
    ds.file_meta.ImplementationVersionName = p["meta_impl_version"]
    ds.preamble = p["preamble"].encode().ljust(128, b"\0")
    return ds


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _instance_uids(ds: Dataset) -> set[str]:
    """Every instance UID in a dataset (what must not survive)."""
    found: set[str] = set()

    def visit(d, elem):
        kw = elem.keyword or ""
        if elem.VR != "UI" or "SOPClass" in kw or "TransferSyntax" in kw or kw == "ImplementationClassUID":
            return
        values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
        found.update(str(v) for v in values if v and not str(v).startswith("1.2.840.10008."))

    ds.walk(visit)
    if hasattr(ds, "file_meta"):
        ds.file_meta.walk(visit)
    return found


def _build_src(root: Path) -> Path:
    """src/<patient name>/...: a 5-slice CT series, a SEG on it, a JPEG 2000 and a JPEG-LS
    image, and a second patient (CT_small, which also carries GE private tags)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    src = root / "src"
    patient = src / f"{PHI['name']} Jane"
    slices = []
    for f in sorted(CT5N.iterdir()):
        ds = _plant(pydicom.dcmread(f), PHI["name"], PHI["pid"])
        _save(ds, patient / "ct series" / f"{PHI['file_name']}-{f.name}.dcm")
        slices.append(ds)
    mask = np.zeros((len(slices), slices[0].Rows, slices[0].Columns), dtype=bool)
    mask[1:4, 4:9, 5:11] = True
    seg = hd.seg.Segmentation(
        source_images=slices,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="lesion",
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        ],
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number=PHI["serial"],
        series_description=PHI["series_desc"],
    )
    _save(seg, patient / "seg" / "seg.dcm")
    for name in ("JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        ds = _plant(pydicom.dcmread(get_testdata_file(name)), PHI["name"], PHI["pid"])
        _save(ds, patient / "compressed" / name)
    other = _plant(pydicom.dcmread(get_testdata_file("CT_small.dcm")), PHI["other_name"], PHI["other_pid2"])
    _save(other, src / PHI["other_name"] / "ct_small.dcm")
    return src


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return _build_src(tmp_path_factory.mktemp("deid"))


@pytest.fixture(scope="module")
def run(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "deid"
    calls = []
    report = deidentify_tree(src, dst, SECRET, progress=lambda d, t: calls.append((d, t)))
    return dst, report, calls


def _pairs(src: Path, dst: Path):
    for rel in _files(src):
        yield rel, src / rel, dst / pseudonymize_relpath(rel, SECRET)


# -- the tree ------------------------------------------------------------------------------


def test_planted_identifiers_are_really_in_the_input(src):
    """Guard for the scan below: every planted value does reach the input bytes."""
    blob = b"".join((src / rel).read_bytes() for rel in _files(src))
    paths = "\n".join(str(rel) for rel in _files(src))
    for key, value in PHI.items():
        if key == "file_name":
            assert value in paths
        else:
            assert value.encode() in blob, key
    for uid in PLANTED_UIDS.values():
        assert uid.encode() in blob


def test_no_identifier_in_any_output_byte_or_path(src, run):
    dst, _, _ = run
    needles = {v.encode() for v in PHI.values()} | {v.encode() for v in PLANTED_UIDS.values()}
    # the identifiers the pydicom sample files came with, and every original instance UID
    needles |= {b"Doe^Peter", b"98890234", b"CompressedSamples", b"4MR1", b"8NM1", b"1CT1"}
    for rel in _files(src):
        ds = pydicom.dcmread(src / rel)
        needles |= {u.encode() for u in _instance_uids(ds) if len(u) > 12}
    outputs = _files(dst)
    assert outputs
    for rel in outputs:
        data = (dst / rel).read_bytes()
        assert data[:128] == b"\0" * 128
        for needle in needles:
            assert needle not in data, (rel, needle)
        for needle in needles:
            assert needle.decode() not in str(rel)
        for part in rel.parts:  # no original name survives as a path component
            assert not any(part.startswith(w) for w in ("ZZPHI", "ct", "seg", "compressed", "JPEG", "MR"))


def test_file_counts_tree_shape_and_progress(src, run):
    dst, report, calls = run
    ins, outs = _files(src), _files(dst)
    assert report.files_in == report.files_out == len(ins) == len(outs) == 9
    assert report.skipped == []
    assert sorted(pseudonymize_relpath(r, SECRET) for r in ins) == outs
    assert all(len(o.parts) == len(i.parts) for i, o in zip(sorted(ins, key=lambda r: pseudonymize_relpath(r, SECRET)), outs))
    assert all(o.suffix == ".dcm" for o in outs)
    assert calls[0] == (0, 9) and calls[-1] == (9, 9) and len(calls) == 10
    assert report.patients == 2
    assert report.uids_replaced > 50


def test_pixels_geometry_and_transfer_syntax_unchanged(src, run):
    dst, _, _ = run
    for rel, inp, out in _pairs(src, dst):
        a, b = pydicom.dcmread(inp), pydicom.dcmread(out)
        assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID, rel
        for kw in GEOMETRY:
            if kw in a:
                # raw bytes as stored, before any value conversion
                assert kw in b, (rel, kw)
                assert a.get_item(kw).value == b.get_item(kw).value, (rel, kw)
        for item_a, item_b in zip(a.get("PerFrameFunctionalGroupsSequence", []), b.get("PerFrameFunctionalGroupsSequence", [])):
            assert item_a.PlanePositionSequence[0].ImagePositionPatient == item_b.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)  # decodes the JPEG 2000 / JPEG-LS ones


def test_compressed_files_stay_compressed_and_decode(src, run):
    dst, _, _ = run
    seen = set()
    for rel, inp, out in _pairs(src, dst):
        b = pydicom.dcmread(out)
        if b.file_meta.TransferSyntaxUID.is_compressed:
            seen.add(b.file_meta.TransferSyntaxUID.name)
            assert b.pixel_array.shape == (b.Rows, b.Columns)
    assert {"JPEG 2000 Image Compression", "JPEG-LS Lossless Image Compression"} <= seen


def test_deidentification_attributes_and_pseudonyms(src, run):
    dst, _, _ = run
    for rel, inp, out in _pairs(src, dst):
        b = pydicom.dcmread(out)
        assert b.PatientIdentityRemoved == "YES"
        assert b.DeidentificationMethod[0] == "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"
        code = b.DeidentificationMethodCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("113100", "DCM", "Basic Application Confidentiality Profile")
        assert b.LongitudinalTemporalInformationModified == "REMOVED"
        pid = PHI["other_pid2"] if PHI["other_name"] in str(rel) else PHI["pid"]
        assert b.PatientID == b.PatientName == patient_pseudonym(pid, SECRET)
        assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
        assert b.file_meta.MediaStorageSOPClassUID == b.SOPClassUID
        assert {e.keyword for e in b.file_meta} == {
            "FileMetaInformationGroupLength",
            "FileMetaInformationVersion",
            "MediaStorageSOPClassUID",
            "MediaStorageSOPInstanceUID",
            "TransferSyntaxUID",
            "ImplementationClassUID",
            "ImplementationVersionName",
        }

        # no real date survives; no private, overlay, curve or unknown public element anywhere
        def visit(d, e):
            assert not e.tag.is_private, (rel, e)
            assert e.tag.group >> 8 not in (0x50, 0x60), (rel, e)
            assert e.tag.group != 0x0030, (rel, e)
            if e.VR in ("DA", "DT") and e.value:
                assert str(e.value).startswith("1900"), (rel, e)

        b.walk(visit)
        assert b.get("StudyDate", "") == "" and "PatientBirthDate" in b and b.PatientBirthDate == ""
        assert "OtherPatientIDs" not in b and "RequestAttributesSequence" not in b
        assert "ExpiryDate" not in b or b.ExpiryDate == ""


def test_uids_consistent_across_series_and_seg_references_resolve(src, run):
    dst, _, _ = run
    ct, seg = [], None
    for rel, inp, out in _pairs(src, dst):
        if "ct series" in str(rel):
            ct.append((pydicom.dcmread(inp), pydicom.dcmread(out)))
        elif rel.parts[-2] == "seg":
            seg = (pydicom.dcmread(inp), pydicom.dcmread(out))
    assert len(ct) == 5 and seg is not None
    for a, b in ct:
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
            assert b[kw].value == deidentify_uid(a[kw].value, SECRET)
            assert b[kw].value.startswith("2.25.") and len(b[kw].value) <= 64
            pydicom.uid.UID(b[kw].value).is_valid
    assert len({b.SeriesInstanceUID for _, b in ct}) == 1
    assert len({b.StudyInstanceUID for _, b in ct}) == 1
    assert len({b.SOPInstanceUID for _, b in ct}) == 5
    seg_in, seg_out = seg
    new_ct_uids = {b.SOPInstanceUID for _, b in ct}
    ref_series = seg_out.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == ct[0][1].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence} == new_ct_uids
    assert all(r.ReferencedSOPClassUID == ct[0][1].SOPClassUID for r in ref_series.ReferencedInstanceSequence)
    per_frame_refs = {
        src_img.ReferencedSOPInstanceUID
        for frame in seg_out.PerFrameFunctionalGroupsSequence
        for deriv in frame.DerivationImageSequence
        for src_img in deriv.SourceImageSequence
    }
    assert per_frame_refs and per_frame_refs <= new_ct_uids
    assert seg_out.FrameOfReferenceUID == ct[0][1].FrameOfReferenceUID
    assert seg_out.StudyInstanceUID == ct[0][1].StudyInstanceUID
    # still a valid SEG for highdicom, same mask
    import highdicom as hd

    s = hd.seg.Segmentation.from_dataset(seg_out)
    np.testing.assert_array_equal(seg_in.pixel_array, seg_out.pixel_array)
    assert s.number_of_segments == 1


def test_same_secret_same_bytes_other_secret_other_uids(src, run, tmp_path):
    dst, _, _ = run
    again = tmp_path / "again"
    deidentify_tree(src, again, SECRET)
    assert _files(again) == _files(dst)
    for rel in _files(dst):  # fully deterministic: the same bytes
        assert (again / rel).read_bytes() == (dst / rel).read_bytes()
    other = tmp_path / "other"
    deidentify_tree(src, other, OTHER_SECRET)
    assert set(_files(other)).isdisjoint(_files(dst))
    for rel in _files(src):
        a = pydicom.dcmread(dst / pseudonymize_relpath(rel, SECRET))
        b = pydicom.dcmread(other / pseudonymize_relpath(rel, OTHER_SECRET))
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            assert a[kw].value != b[kw].value
        assert a.PatientID != b.PatientID


# -- failures leave nothing at dst ---------------------------------------------------------


def _no_leftovers(dst: Path) -> None:
    assert not dst.exists() or not any(dst.iterdir())
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.deid-")]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_run_leaves_nothing(src, tmp_path, exc):
    dst = tmp_path / "deid"

    def progress(done, total):
        if done == 3:
            raise exc("stop")

    with pytest.raises(exc):
        deidentify_tree(src, dst, SECRET, progress=progress)
    _no_leftovers(dst)
    assert not dst.exists()


def test_corrupt_file_is_named_and_nothing_written(src, tmp_path):
    bad_src = tmp_path / "src"
    shutil.copytree(src / f"{PHI['name']} Jane" / "compressed", bad_src / "ok")
    good = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw = (Path(get_testdata_file("CT_small.dcm"))).read_bytes()
    (bad_src / "cut").mkdir()
    (bad_src / "cut" / "truncated.dcm").write_bytes(raw[: len(raw) - 5000])  # pydicom reads it silently
    (bad_src / "cut" / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    j2k = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    (bad_src / "cut" / "j2k_cut_in_pixels.dcm").write_bytes(j2k[:-40])
    (bad_src / "cut" / "j2k_cut_before_pixels.dcm").write_bytes(j2k[:2880])  # exactly between two elements
    dst = tmp_path / "empty-dst"
    dst.mkdir()  # an existing empty folder is accepted
    with pytest.raises(DeidentifyError) as info:
        deidentify_tree(bad_src, dst, SECRET)
    msg = str(info.value)
    assert "cut/truncated.dcm" in msg and "truncated" in msg
    assert "cut/garbage.dcm" in msg
    assert "cut/j2k_cut_in_pixels.dcm" in msg and "cut/j2k_cut_before_pixels.dcm" in msg
    assert "4 problem(s)" in msg
    assert "ok/" not in msg
    _no_leftovers(dst)
    assert good.Rows == 128  # the source file is untouched


def test_non_dicom_file_is_an_error_or_skipped(src, tmp_path):
    mixed = tmp_path / "src"
    shutil.copytree(src / PHI["other_name"], mixed / "p")
    (mixed / "p" / "notes.txt").write_text("ZZPHI-NAME-0001 called on Monday\n")
    shutil.copy(CT5N.parent.parent / "DICOMDIR", mixed / "DICOMDIR")
    with pytest.raises(DeidentifyError, match=r"p/notes\.txt: not a DICOM file"):
        deidentify_tree(mixed, tmp_path / "out1", SECRET)
    _no_leftovers(tmp_path / "out1")
    report = deidentify_tree(mixed, tmp_path / "out2", SECRET, non_dicom="skip")
    assert report.files_in == 3 and report.files_out == 1
    assert dict(report.skipped).keys() == {"DICOMDIR", "p/notes.txt"}
    assert "DICOMDIR" in dict(report.skipped)["DICOMDIR"]
    assert len(_files(tmp_path / "out2")) == 1


def test_refuses_bad_destinations(src, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(DeidentifyError, match="not empty"):
        deidentify_tree(src, full, SECRET)
    with pytest.raises(DeidentifyError, match="must not be inside"):
        deidentify_tree(src, src / "out", SECRET)
    with pytest.raises(DeidentifyError, match="at least 16"):
        deidentify_tree(src, tmp_path / "o", b"short")
    assert not (tmp_path / "o").exists()


def test_burned_in_annotation_is_refused_unless_allowed():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentifyError, match="BurnedInAnnotation"):
        deidentify_dataset(ds, SECRET)
    assert deidentify_dataset(ds, SECRET, allow_burned_in_annotation=True).PatientIdentityRemoved == "YES"


# -- load_secret ---------------------------------------------------------------------------


def test_load_secret(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(b"0123456789abcdefXYZ\n")
    f.chmod(0o600)
    assert load_secret(f) == b"0123456789abcdefXYZ"
    f.chmod(0o640)  # group access allowed
    assert load_secret(f) == b"0123456789abcdefXYZ"
    f.chmod(0o644)
    with pytest.raises(DeidentifyError, match="other users.*chmod o-rwx"):
        load_secret(f)
    f.write_bytes(b"short\n")
    f.chmod(0o600)
    with pytest.raises(DeidentifyError, match="5 bytes, need at least 16"):
        load_secret(f)
    with pytest.raises(DeidentifyError, match="not found"):
        load_secret(tmp_path / "missing")


# -- regressions for what dicom-anonymizer gets wrong ----------------------------------------


def _ds() -> Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def test_nested_attributes_are_cleaned_and_references_kept():
    ds = _ds()
    sop = ds.SOPInstanceUID
    inst = Dataset()
    inst.ReferencedSOPClassUID = ds.SOPClassUID
    inst.ReferencedSOPInstanceUID = sop
    series = Dataset()
    series.SeriesInstanceUID = ds.SeriesInstanceUID
    series.ReferencedInstanceSequence = Sequence([inst])
    series.PatientName = "ZZPHI^NESTED"
    series.InstitutionName = "ZZPHI-NESTED-INST"
    ds.ReferencedSeriesSequence = Sequence([series])
    img = Dataset()
    img.ReferencedSOPClassUID = ds.SOPClassUID
    img.ReferencedSOPInstanceUID = sop
    ds.ReferencedImageSequence = Sequence([img])  # X/Z/U*: the library empties both UIDs
    deidentify_dataset(ds, SECRET)
    new = deidentify_uid(sop, SECRET)
    assert ds.SOPInstanceUID == new
    item = ds.ReferencedSeriesSequence[0]
    assert item.SeriesInstanceUID == ds.SeriesInstanceUID
    assert item.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == new
    assert item.PatientName != "ZZPHI^NESTED" and item.InstitutionName == "ANONYMIZED"
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == ds.SOPClassUID


def test_dates_removed_or_emptied_not_faked():
    ds = _ds()
    ds.PatientBirthTime = "101010"  # X
    ds.AcquisitionDate = "20200101"  # X/Z
    ds.StudyDate = "20200101"  # Z
    deidentify_dataset(ds, SECRET)
    assert "PatientBirthTime" not in ds
    assert ds.AcquisitionDate == "" and ds.StudyDate == ""


def test_d_sequence_keeps_structure_and_handles_every_vr():
    ds = _ds()
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "ZZPHI free text"
    item.add_new(0x00281201, "OW", b"\x00\x01")  # the library raises NotImplementedError on OW here
    item.DateTime = "20200101101010"
    item.UID = "1.2.826.0.1.3680043.99.5"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = Sequence([concept])
    observer = Dataset()
    observer.CodeValue, observer.CodingSchemeDesignator, observer.CodeMeaning = "E1234", "99HOSP", "ZZPHI Dr Who"
    item.PersonIdentificationCodeSequence = Sequence([observer])
    ds.ContentSequence = Sequence([item])
    deidentify_dataset(ds, SECRET)
    out = ds.ContentSequence[0]
    assert out.ValueType == "TEXT"  # CS kept
    assert out.TextValue == "ANONYMIZED"
    assert out.DateTime == "19000101000000"
    assert out.UID == deidentify_uid("1.2.826.0.1.3680043.99.5", SECRET)
    code = out.ConceptNameCodeSequence[0]  # coded concepts keep their meaning
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("121071", "DCM", "Finding")
    who = out.PersonIdentificationCodeSequence[0]  # identification codes do not
    assert (who.CodeValue, who.CodingSchemeDesignator, who.CodeMeaning) == ("ANONYMIZED",) * 3


def test_file_without_preamble_gets_a_proper_file_meta(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(get_testdata_file("ExplVR_LitEndNoMeta.dcm"), src / "IM0001")  # no DICM, no meta
    deidentify_tree(src, tmp_path / "out", SECRET)
    (out,) = _files(tmp_path / "out")
    assert out.suffix == ""
    data = (tmp_path / "out" / out).read_bytes()
    assert data[128:132] == b"DICM"
    ds = pydicom.dcmread(tmp_path / "out" / out)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_uid_mapping_is_deterministic_and_keyed():
    uid = "1.2.826.0.1.3680043.99.42"
    a, b = deidentify_uid(uid, SECRET), deidentify_uid(uid, SECRET)
    assert a == b != deidentify_uid(uid, OTHER_SECRET)
    assert a.startswith("2.25.") and pydicom.uid.UID(a).is_valid
    ds1, ds2 = _ds(), _ds()
    deidentify_dataset(ds1, SECRET)
    deidentify_dataset(ds2, SECRET)
    assert ds1.StudyInstanceUID == ds2.StudyInstanceUID
    assert ds1.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # class UIDs are not touched
