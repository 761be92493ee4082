"""De-identification over the whole DICOM data dictionary (issue 17, case 8).

Every free-text attribute pydicom's dictionary knows (VR LO, LT, ST, UT, SH, PN, UC; retired
ones and repeater groups included) is planted with its own marker at the top level and inside
sequences: two levels deep, in the functional groups of an enhanced multi-frame image, in a
SEG's SegmentSequence, in a code sequence and in a D sequence (Content Sequence).  The file
``deidentify_tree`` writes is scanned byte for byte and value by value: no marker may survive
except in the attributes the module keeps on purpose (``KEPT_TEXT``, each with its reason).
Every single-tag entry of Table E.1-1 is checked for its action too.

Count the survivors with this checkout's module (the before/after numbers of the issue)::

    .venv/bin/python tests/test_deidentify_coverage.py
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.datadict import DicomDictionary, RepeatersDictionary, dictionary_has_tag, dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import deidentify as deid  # noqa: E402

SECRET = b"coverage-test-secret-0123456789abcdef"
FREE_TEXT_VRS = ("LO", "LT", "ST", "UT", "SH", "PN", "UC")
MARKER = re.compile(rb"ZZMK([A-Z])([0-9A-F]{8})")

# Where the markers are planted: a letter (part of the marker) -> the path of items to it.
# None of these containers is in Table E.1-1, so the de-identifier must walk into them; the
# Content Sequence is (action D), so nothing at all may survive there.
LOCATIONS = {
    "T": (),  # the top-level data set
    "N": ("ReferencedSeriesSequence", "ReferencedInstanceSequence"),  # two levels deep
    "F": ("PerFrameFunctionalGroupsSequence", "FrameContentSequence"),  # enhanced multi-frame
    "G": ("SharedFunctionalGroupsSequence", "PixelMeasuresSequence"),
    "S": ("SegmentSequence",),  # a SEG's segments
    "C": ("SegmentSequence", "SegmentedPropertyTypeCodeSequence"),  # a code sequence in a SEG
    "D": ("ContentSequence", "ContentSequence"),  # inside a D sequence
}


def free_text_tags() -> list[int]:
    """Every free-text tag of the dictionary, outside the command (0000) and file meta (0002)
    groups; repeater entries (overlays 60xx, curves 50xx...) instantiated at their first group."""
    tags = {tag for tag, entry in DicomDictionary.items() if entry[0] in FREE_TEXT_VRS and tag >> 16 >= 0x0008}
    for mask, entry in RepeatersDictionary.items():
        if entry[0] in FREE_TEXT_VRS:
            # the first instance that is not a tag of its own (0028,04x2 at x=0 is one)
            tags.add(next(t for d in "02468" if (t := int(mask.replace("x", d), 16)) not in DicomDictionary))
    return sorted(tags)


def _marker(loc: str, tag: int) -> str:
    return f"ZZMK{loc}{tag:08X}"  # 13 characters: fits every free-text VR (SH: 16)


def _fill(item: Dataset, loc: str, tags: list[int]) -> None:
    for tag in tags:
        item.add_new(tag, dictionary_VR(tag), _marker(loc, tag))


def planted_dataset(tags: list[int]) -> Dataset:
    """A SEG-like enhanced multi-frame data set with a marker in every free-text attribute at
    every location of LOCATIONS."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = pydicom.uid.BasicTextSRStorage  # no pixel data needed (an image without any is refused)
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.8.1"
    _fill(ds, "T", tags)
    for loc, path in LOCATIONS.items():
        if not path:
            continue
        parent = ds
        for kw in path:
            if kw not in parent:
                setattr(parent, kw, Sequence([Dataset()]))
            parent = getattr(parent, kw)[0]
        _fill(parent, loc, tags)
    ds.ContentSequence[0].ValueType = "CONTAINER"
    return ds


def surviving(module, tags: list[int], workdir: Path) -> tuple[set[tuple[str, int]], bytes, Dataset]:
    """(location, tag) of every marker left in the file that module.deidentify_tree writes for
    the planted data set, with the file's bytes and its data set."""
    src = workdir / "src"
    src.mkdir(parents=True)
    ds = planted_dataset(tags)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # value checks on the planted values
        ds.save_as(src / "planted.dcm", enforce_file_format=True)
    module.deidentify_tree(src, workdir / "out", SECRET)
    (out,) = [f for f in (workdir / "out").rglob("*") if f.is_file()]
    data = out.read_bytes()
    found = {(m.group(1).decode(), int(m.group(2), 16)) for m in MARKER.finditer(data)}
    return found, data, pydicom.dcmread(out)


def _values(ds: Dataset):
    """(keyword, string value) of every element, at every nesting level."""
    for elem in ds.iterall():
        if isinstance(elem.value, (str, bytes)) or elem.VR == "PN":
            yield elem.keyword, str(elem.value)
        elif isinstance(elem.value, (list, pydicom.multival.MultiValue)):
            for v in elem.value:
                yield elem.keyword, str(v)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return surviving(deid, free_text_tags(), tmp_path_factory.mktemp("coverage"))


def test_the_planted_dataset_holds_every_free_text_attribute_everywhere():
    tags = free_text_tags()
    assert len(tags) > 700  # pydicom 3.0: 741 (728 plain entries, 13 repeater groups)
    data = io.BytesIO()
    ds = planted_dataset(tags)
    pydicom.dcmwrite(data, ds, enforce_file_format=True)
    found = {(m.group(1).decode(), int(m.group(2), 16)) for m in MARKER.finditer(data.getvalue())}
    assert found == {(loc, t) for loc in LOCATIONS for t in tags}


def test_no_free_text_survives_except_the_kept_attributes(result):
    found, _, _ = result
    tags = free_text_tags()
    kept = {Tag(kw) for kw in getattr(deid, "KEPT_TEXT", {})}
    leaks = sorted(f"{loc} {keyword_for_tag(t) or hex(t)}" for loc, t in found if t not in kept)
    assert not leaks, f"{len(leaks)} free-text attribute(s) kept their content:\n  " + "\n  ".join(leaks[:40])
    # the kept ones survive everywhere but inside the D sequence (its free text is replaced)
    assert found == {(loc, t) for loc in LOCATIONS if loc != "D" for t in kept}
    assert len(kept) <= 4 and len(tags) > 700  # a short allowlist against the whole dictionary


def test_every_kept_attribute_is_free_text_outside_the_table_and_justified():
    for kw, why in deid.KEPT_TEXT.items():
        tag = Tag(kw)
        assert DicomDictionary[tag][0] in FREE_TEXT_VRS, kw
        assert deid._table_action(tag) is None, f"{kw} is in Table E.1-1: the table's action applies"
        assert len(why) > 40, f"{kw}: say why it is kept"


def test_the_walk_reaches_every_container(result):
    """The markers are gone because the walker cleaned the items, not because it dropped the
    containers: every nesting of LOCATIONS is still there (the D one with its structure)."""
    _, _, ds = result
    for loc, path in LOCATIONS.items():
        parent = ds
        for kw in path:
            assert kw in parent and len(getattr(parent, kw)) == 1, f"{loc}: {'.'.join(path)} lost"
            parent = getattr(parent, kw)[0]
    assert ds.ContentSequence[0].ValueType == "CONTAINER"
    assert str(ds.SegmentSequence[0].SegmentLabel) == _marker("S", Tag("SegmentLabel"))


def test_element_values_carry_no_marker(result):
    """The same check on the decoded values (a marker split by an encoding would escape the
    byte scan)."""
    _, _, ds = result
    left = [(kw, v) for kw, v in _values(ds) if "ZZMK" in v and kw not in getattr(deid, "KEPT_TEXT", {})]
    assert not left, left[:20]


def test_codes_keep_standard_values_and_lose_free_text():
    from pydicom.sr.codedict import codes

    ds = Dataset()
    ds.SOPClassUID = pydicom.uid.SegmentationStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.8.2"
    known, typed, local = Dataset(), Dataset(), Dataset()
    known.CodeValue, known.CodingSchemeDesignator, known.CodeMeaning = codes.SCT.Liver.value, "SCT", codes.SCT.Liver.meaning
    typed.CodeValue, typed.CodingSchemeDesignator, typed.CodeMeaning = codes.SCT.Liver.value, "SCT", "ZZPHI liver of Mr Smith"
    typed.CodingSchemeVersion = "ZZPHI-VERSION"
    local.CodeValue, local.CodingSchemeDesignator, local.CodeMeaning = "DRJONES", "99HOSP", "ZZPHI Dr Jones' cases"
    ds.AnatomicRegionSequence = Sequence([known, typed, local])
    deid.deidentify_dataset(ds, SECRET)
    k, t, loc = ds.AnatomicRegionSequence
    assert (k.CodeValue, k.CodingSchemeDesignator, k.CodeMeaning) == (codes.SCT.Liver.value, "SCT", codes.SCT.Liver.meaning)
    assert (t.CodeValue, t.CodingSchemeDesignator) == (codes.SCT.Liver.value, "SCT")
    assert "ZZPHI" not in str(t.CodeMeaning) and t.CodeMeaning  # a dictionary meaning, type 1 kept
    assert not t.get("CodingSchemeVersion")
    assert (loc.CodeValue, loc.CodingSchemeDesignator, loc.CodeMeaning) == (deid.DUMMY_TEXT,) * 3


def test_text_outside_the_table_is_emptied_and_allowlisted_text_kept():
    ds = Dataset()
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.8.3"
    # the examples: none of them is in Table E.1-1
    ds.AcquisitionProtocolName = "ZZPHI-PROTOCOL"
    ds.CommentsOnTheScheduledProcedureStep = "ZZPHI call Mrs Smith"
    ds.ImageID = "ZZPHI-IMAGEID"
    ds.Manufacturer = "ZZPHI-MANUFACTURER"
    ds.RescaleType = "HU"
    item = Dataset()
    item.TextValue = "ZZPHI free text outside a D sequence"
    ds.ReferencedSeriesSequence = Sequence([item])
    deid.deidentify_dataset(ds, SECRET)
    for kw in ("AcquisitionProtocolName", "CommentsOnTheScheduledProcedureStep", "ImageID", "Manufacturer"):
        assert kw in ds and ds[kw].is_empty, kw  # zero length: legal for type 2 and 3
    assert ds.ReferencedSeriesSequence[0]["TextValue"].is_empty
    assert ds.RescaleType == "HU"


# -- every attribute of Table E.1-1 gets its action ------------------------------------------

_SAMPLE = {
    "DA": "20200102",
    "TM": "101112",
    "DT": "20200102101112",
    "AS": "042Y",
    "DS": "1.5",
    "IS": "3",
    "CS": "ZZMKCS",
    "UR": "http://zzmk.example",
    "AT": 0x00100010,
    "US": 7,
    "SS": 7,
    "UL": 7,
    "SL": 7,
    "UV": 7,
    "SV": 7,
    "FL": 7.0,
    "FD": 7.0,
    "OB": b"ZZMKBYTES",
    "OW": b"ZZMKWORD",
    "OD": b"ZZMKDOUB",
    "OF": b"ZZMKFLOA",
    "OL": b"ZZMKLONG",
    "OV": b"ZZMKVERY",
    "UN": b"ZZMKUNKN",
}


def _sample(tag: int, n: int):
    # entries newer than pydicom's dictionary arrive as UN (implicit VR files) or with their VR
    vr = dictionary_VR(tag).split(" or ")[0] if dictionary_has_tag(tag) else "UN"
    if vr == "SQ":
        item = Dataset()
        item.TextValue = f"ZZMKITEM{n}"
        return vr, Sequence([item])
    if vr == "UI":
        return vr, f"1.2.826.0.1.3680043.99.9.{n}"
    return vr, _SAMPLE.get(vr, f"ZZMK{n:09d}")


def _table_entries() -> dict[int, str]:
    """Every single-tag entry of the table (command group 0000 and file meta 0002 aside: both
    are dropped whole) -> its action as applied (X, Z, D, U, U*)."""
    return {int(t): a for t, a in deid._TABLE.items() if t.group not in (0x0000, 0x0002)}


def test_every_table_entry_gets_its_action_at_every_level():
    """Each single-tag entry of Table E.1-1, at the top level and one sequence down, gets the
    action the module resolves it to (combined codes as in the module docstring)."""
    entries = _table_entries()
    assert len(entries) > 600  # Table E.1-1 2026c: 655 single-tag entries
    ds = Dataset()
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.9.0"
    nested = Dataset()
    ds.ReferencedSeriesSequence = Sequence([nested])
    original = {}
    for n, tag in enumerate(sorted(entries), 1):
        if tag in (Tag("SOPInstanceUID"), Tag("ReferencedSeriesSequence")):
            continue
        vr, value = _sample(tag, n)
        original[tag] = value
        for target in (ds, nested):
            target.add_new(tag, vr, value if vr != "SQ" else Sequence([Dataset(value[0])]))
    deid.deidentify_dataset(ds, SECRET)
    wrong = []
    for where, target in (("top", ds), ("nested", ds.ReferencedSeriesSequence[0])):
        for tag, value in original.items():
            action, kw = entries[tag], keyword_for_tag(tag)
            elem = target.get(tag)
            if kw in ("PatientID", "PatientName"):
                ok = elem is not None and str(elem.value).startswith("anon-")
            elif action == "X":
                ok = elem is None
            elif action == "Z":
                ok = elem is not None and (elem.is_empty or (elem.VR == "SQ" and len(elem.value) == 0))
            elif elem is None:
                ok = False
            elif elem.VR == "SQ":  # D, U, U*: the items stay, their free text does not
                ok = len(elem.value) == 1 and "ZZMK" not in str(elem.value[0].get("TextValue", ""))
            elif action == "D" or elem.VR != "UI":
                ok = not elem.is_empty and elem.value != value
            else:  # U: a new UID
                ok = str(elem.value) == deid.deidentify_uid(value, SECRET)
            if not ok:
                wrong.append(f"{where} {kw} ({action}): {elem.value if elem is not None else 'absent'!r}")
    assert not wrong, f"{len(wrong)} table entries without their action:\n  " + "\n  ".join(wrong[:30])


# -- a de-identified phantom site converts identically, labels included ---------------------


def test_deidentified_phantom_with_seg_labels_prepares_identically(tmp_path):
    """Images and DICOM SEG labels (matched by SegmentLabel, placed by referenced UIDs) of a
    de-identified copy give the same NIfTI images and labels as the originals."""
    from fedimg_testing.phantom import write_phantom_site
    from preprocessing.prepare import PrepareOptions, prepare
    from preprocessing.schema import load_label_map, load_schema

    schema = load_schema()  # the built-in abdominal-ct schema
    site = write_phantom_site(tmp_path / "site", ["liver", "kidney"], n_cases=1, seed=11, shape=(24, 24, 8), label_format="seg")
    src = tmp_path / "src"
    shutil.copytree(site.dicom_dir, src / "dicom")
    shutil.copytree(site.labels_dir, src / "labels")
    report = deid.deidentify_tree(src, tmp_path / "deid", SECRET)
    assert report.files_out == report.files_in
    deid_images = tmp_path / "deid" / deid.pseudonymize_relpath("dicom", SECRET).name
    deid_labels = tmp_path / "deid" / deid.pseudonymize_relpath("labels", SECRET).name
    lmap = load_label_map(site.label_map, schema)
    opts = PrepareOptions(qc_report=False)
    a = prepare([site.dicom_dir], tmp_path / "a", schema, lmap, labels=[site.labels_dir], options=opts)
    b = prepare([deid_images], tmp_path / "b", schema, lmap, labels=[deid_labels], options=opts)
    assert a.count("refused") == b.count("refused") == 0, [o.message for o in (*a.outcomes, *b.outcomes)]
    ca = json.loads((tmp_path / "a" / "manifest.json").read_text())["cases"]
    cb = json.loads((tmp_path / "b" / "manifest.json").read_text())["cases"]
    assert len(ca) == len(cb) == 1 and ca[0]["label_source_kind"] == cb[0]["label_source_kind"] == "seg"
    for key in ("image", "label"):
        ia, ib = nib.load(tmp_path / "a" / ca[0][key]), nib.load(tmp_path / "b" / cb[0][key])
        assert np.array_equal(ia.affine, ib.affine), key
        assert np.array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj)), key
    assert np.unique(np.asarray(nib.load(tmp_path / "b" / cb[0]["label"]).dataobj)).size == 3  # background + 2


if __name__ == "__main__":  # the count reported in the issue, for this checkout's module
    tags = free_text_tags()
    with tempfile.TemporaryDirectory() as tmp:
        found, _, _ = surviving(deid, tags, Path(tmp))
    top = {t for loc, t in found if loc == "T"}
    anywhere = {t for _, t in found}
    print(f"free-text attributes surviving at the top level: {len(top)}/{len(tags)}")
    print(f"surviving at any of the {len(LOCATIONS)} locations: {len(anywhere)}/{len(tags)} ({len(found)} markers)")
    for t in sorted(top):
        print(f"  {keyword_for_tag(t) or hex(t)}")
