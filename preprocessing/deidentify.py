"""DICOM de-identification: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

``site-agent deidentify SRC DST --secret-file F`` calls :func:`load_secret` and :func:`deidentify_tree`;
:func:`deidentify_dataset` does one dataset in place. What the output looks like, the decisions the profile
leaves open, and what dicom-anonymizer gets wrong (so that only its table is used): docs/design/deidentify.md.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import os
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, cast

import pydicom
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.datadict import dictionary_has_tag, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.multival import MultiValue
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence
from pydicom.sr.codedict import Collection, codes
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from fedimg_core import atomic
from fedimg_core.errors import FedimgError

__all__ = [
    "DeidReport",
    "DeidentifyError",
    "KEPT_TEXT",
    "deidentify_dataset",
    "deidentify_tree",
    "deidentify_uid",
    "load_secret",
    "patient_pseudonym",
    "pseudonymize_relpath",
]

TOOL_NAME = "fedimg deidentify"
TABLE_VERSION = "dicomfields_2026c"
MIN_SECRET_BYTES = 16
PROFILE_METHOD = "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
DUMMY_TEXT = "ANONYMIZED"
DUMMY_DATE = "19000101"
DUMMY_TIME = "000000"
DUMMY_DATETIME = "19000101000000"
KEPT_SUFFIXES = {".dcm", ".dicom", ".ima"}
MAX_PROBLEMS = 50  # stop reading after this many bad files; they are all listed

_STRING_VRS = {"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
# Free text: emptied outside the table unless in KEPT_TEXT, replaced inside D sequences.
# (LO, LT, ST, UT, SH, PN, UC, and AE titles and URLs, which name hosts and sites.)
_TEXT_VRS = _STRING_VRS - {"CS", "AS"}

# The only free-text attributes outside Table E.1-1 kept as they are, each with the reason.
# Everything else of a free-text VR that the table does not list is emptied (zero length).
KEPT_TEXT = {
    "SegmentLabel": "names a DICOM SEG segment ('liver'); prepare maps segments to classes by this name "
    "through the site label map (preprocessing.labels.read_seg). Type 1. Residual risk: what an "
    "annotator typed as a segment name",
    "RescaleType": "the unit of the rescaled pixel values (defined terms HU, US, OD, MGML...): pixel "
    "interpretation, not a description of the patient or the site",
}
# Type 1 text of SEG and algorithm identification that readers need present and non-empty:
# replaced by the dummy rather than emptied (its content goes either way).
_DUMMY_TEXT = {"SegmentAlgorithmName", "AlgorithmName", "AlgorithmVersion"}
# Coded entries (Code Sequence Macro, PS3.3 Table 8.8-1): see _clean_code_item.
_CODE_VALUE_KEYWORDS = ("CodeValue", "LongCodeValue", "URNCodeValue")
_CODE_KEYWORDS = (*_CODE_VALUE_KEYWORDS, "CodingSchemeDesignator", "CodeMeaning")
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_DATE_VRS = {"DA", "DT", "TM"}

# UI attributes that name a class, syntax or coding scheme rather than an instance: kept.
_EXTRA_CLASS_UIDS = {"ImplementationClassUID", "CodingSchemeUID", "ContextUID", "MappingResourceUID", "SegmentationTemplateUID"}
# Removed although not in the table (they carry original data or signatures over it).
_EXTRA_REMOVE = {Tag("EncryptedAttributesSequence"), Tag("MACParametersSequence"), Tag("DataSetTrailingPadding"), Tag("DigitalSignaturesSequence")}
_PATIENT_ID = Tag("PatientID")
_PATIENT_NAME = Tag("PatientName")

# Table E.1-1 category (dicom-anonymizer's list name) -> the action we apply.
_CATEGORY_ACTION = {
    "X_TAGS": "X",
    "Z_TAGS": "Z",
    "D_TAGS": "D",
    "U_TAGS": "U",
    "X_Z_TAGS": "Z",
    "Z_D_TAGS": "D",
    "X_D_TAGS": "D",
    "X_Z_D_TAGS": "D",
    "X_Z_U_STAR_TAGS": "U*",
}


class DeidentifyError(FedimgError):
    """A de-identification problem; the message names the file (when there is one) and why."""


@dataclass
class DeidReport:
    """What `deidentify_tree` did: files in and out, what was skipped, how many UIDs and
    patients/studies/series it wrote (no identifier, only counts and relative input paths).
    """

    files_in: int  # regular files found under src (DICOM or not)
    files_out: int  # de-identified DICOM files written under dst
    skipped: list[tuple[str, str]]  # (relative input path, reason): DICOMDIR, and non-DICOM with non_dicom="skip"
    uids_replaced: int  # UID values replaced, all files together
    patients: int = 0  # distinct patient pseudonyms written
    studies: int = 0  # distinct (new) StudyInstanceUIDs
    series: int = 0  # distinct (new) SeriesInstanceUIDs
    dst: str = ""
    table: str = TABLE_VERSION


# -- the table -----------------------------------------------------------------------------


def _load_table() -> tuple[dict[BaseTag, str], list[tuple[int, int, int, int, str]]]:
    lists = dicom_anonymization_database_selector(TABLE_VERSION)
    single: dict[BaseTag, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _CATEGORY_ACTION.items():
        for entry in lists[category]:
            if len(entry) == 2:
                single[Tag(*entry)] = action
            else:  # (group, element, group mask, element mask): curves and overlays
                g, e, gm, em = entry
                masked.append((g, e, gm, em, action))
    return single, masked


_TABLE, _MASKED = _load_table()


def _table_action(tag: BaseTag) -> str | None:
    action = _TABLE.get(tag)
    if action is not None:
        return action
    for g, e, gm, em, act in _MASKED:
        if tag.group & gm == g & gm and tag.element & em == e & em:
            return act
    return None


def _removed_group(tag: BaseTag) -> bool:
    group = tag.group
    return (
        group & 1 == 1  # private (creators included)
        or tag.element == 0  # group length: stale after editing
        or 0x5000 <= group <= 0x50FF  # curves
        or 0x6000 <= group <= 0x60FF  # overlays (data, description, label...)
        or (0x7F00 <= group <= 0x7FFF and group != 0x7FE0)  # retired variable pixel data
        or group == 0xFFFC  # trailing padding
        or group == 0x0002  # file meta elements misplaced in the data set (the meta is rebuilt)
        or group == 0x0000  # command elements (DIMSE messages) do not belong in a stored instance
    )


# -- keyed pseudonyms ----------------------------------------------------------------------


def _hmac(secret: bytes, domain: bytes, value: str) -> bytes:
    return hmac.new(secret, domain + b"\0" + value.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def deidentify_uid(uid: str, secret: bytes) -> str:
    """The keyed replacement of a UID.

    Args:
        uid: the original UID (surrounding whitespace and NUL padding ignored).
        secret: the site secret.

    Returns:
        ``2.25.<decimal of a version-8 UUID from HMAC(secret, uid)>``: the same for the same
        UID and secret, unlinkable without the secret.
    """
    b = bytearray(_hmac(secret, b"uid", str(uid).strip().rstrip("\0"))[:16])
    b[6] = (b[6] & 0x0F) | 0x80  # UUID version 8 (custom, RFC 9562)
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return "2.25." + str(int.from_bytes(b, "big"))


def patient_pseudonym(patient_key: str, secret: bytes) -> str:
    """The keyed pseudonym of a patient.

    Args:
        patient_key: the patient key (the original PatientID).
        secret: the site secret.

    Returns:
        ``anon-<16 hex>``.
    """
    return "anon-" + _hmac(secret, b"patient", patient_key.strip()).hex()[:16]


def _path_component(name: str, secret: bytes, is_file: bool) -> str:
    digest = _hmac(secret, b"path", name).hex()[:16]
    suffix = Path(name).suffix.lower() if is_file else ""
    return digest + (suffix if suffix in KEPT_SUFFIXES else "")


def pseudonymize_relpath(rel: str | os.PathLike[str], secret: bytes) -> Path:
    """The output path for an input file at relative path `rel`.

    Args:
        rel: the input file's path relative to the source folder.
        secret: the site secret.

    Returns:
        The same depth of path, every component replaced by a keyed pseudonym (a file keeps
        an allowlisted suffix such as ``.dcm``).
    """
    parts = Path(rel).parts
    return Path(*[_path_component(p, secret, i == len(parts) - 1) for i, p in enumerate(parts)])


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
        raise DeidentifyError(f"the site secret must be at least {MIN_SECRET_BYTES} bytes")


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a site secret file.

    Args:
        path: the secret file: at least 16 bytes once surrounding whitespace is stripped,
            not readable or writable by other users (group access is allowed, for service groups).

    Returns:
        The secret (stripped).

    Raises:
        DeidentifyError: the file is missing, unreadable, not a regular file, open to other
            users, or too short (the message says how to fix it).
    """
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise DeidentifyError(f"secret file {path}: not a regular file")
        data = path.read_bytes().strip()
    except FileNotFoundError:
        raise DeidentifyError(f"secret file {path}: not found") from None
    except PermissionError:
        raise DeidentifyError(f"secret file {path}: permission denied") from None
    if os.name == "posix" and st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise DeidentifyError(
            f"secret file {path}: readable or writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"anyone holding it can link pseudonyms back to patients: run chmod o-rwx {path}"
        )
    if len(data) < MIN_SECRET_BYTES:
        raise DeidentifyError(f"secret file {path}: {len(data)} bytes, need at least {MIN_SECRET_BYTES} (e.g. head -c 32 /dev/urandom | base64 > {path})")
    return data


# -- one dataset ---------------------------------------------------------------------------


class _Ctx:
    def __init__(self, secret: bytes, pseudonym: str):
        self.secret = secret
        self.pseudonym = pseudonym
        self.uids_replaced = 0


def _is_class_uid(tag: BaseTag) -> bool:
    kw = keyword_for_tag(tag)
    return "SOPClass" in kw or "TransferSyntax" in kw or kw in _EXTRA_CLASS_UIDS


def _new_uid(value: object, ctx: _Ctx) -> str:
    value = str(value).strip().rstrip("\0")
    if not value or value.startswith("1.2.840.10008."):  # empty, or a DICOM registry UID
        return value
    ctx.uids_replaced += 1
    return deidentify_uid(value, ctx.secret)


def _replace_uids(elem: DataElement, ctx: _Ctx) -> None:
    if elem.VR != "UI" or elem.value is None:
        return
    if isinstance(elem.value, (MultiValue, list, tuple)):
        elem.value = [_new_uid(v, ctx) for v in elem.value]
    else:
        elem.value = _new_uid(elem.value, ctx)


def _empty(elem: DataElement) -> None:
    """Z: zero-length value (a sequence with no items)."""
    if elem.VR == "SQ":
        elem.value = Sequence()
    elif elem.VR in _BINARY_VRS:
        elem.value = b""
    elif elem.VR in _STRING_VRS or elem.VR in _DATE_VRS or elem.VR in {"UI", "DS", "IS"}:
        elem.value = ""
    else:
        elem.value = None


def _dummy(elem: DataElement, ctx: _Ctx) -> None:
    """D: a non-zero-length dummy consistent with the VR."""
    vr = elem.VR
    if vr == "SQ":
        for item in elem.value:
            _clean(item, ctx, scrub=True)
    elif vr == "UI":
        _replace_uids(elem, ctx)
    elif vr == "DA":
        elem.value = DUMMY_DATE
    elif vr == "TM":
        elem.value = DUMMY_TIME
    elif vr == "DT":
        elem.value = DUMMY_DATETIME
    elif vr == "AS":
        elem.value = "000Y"
    elif vr == "UR":
        elem.value = "http://anonymized.invalid"
    elif vr in _STRING_VRS:
        elem.value = DUMMY_TEXT
    elif vr in {"DS", "IS"}:
        elem.value = "0"
    elif vr in _BINARY_VRS:
        elem.value = b"\0" * 8 if vr in {"OD", "OV", "OL", "OF", "OW"} else DUMMY_TEXT.encode()
    else:
        elem.value = 0


@functools.lru_cache(maxsize=1)
def _standard_codes() -> dict[tuple[str, str], tuple[str, ...]]:
    """(coding scheme designator, code value) -> meanings, for every code of pydicom's
    dictionary of the codes the DICOM standard uses (PS3.16: DCM, SCT, LN, UCUM, FMA...)."""
    index: dict[tuple[str, str], list[str]] = {}
    for scheme in codes.schemes():
        for code in Collection(scheme).concepts.values():
            meanings = index.setdefault((code.scheme_designator, code.value), [])
            if code.meaning not in meanings:
                meanings.append(code.meaning)
    return {key: tuple(meanings) for key, meanings in index.items()}


def _clean_code_item(ds: Dataset) -> set[BaseTag]:
    """Coded entry attributes (value, scheme, meaning) of `ds`; returns the tags handled here.

    A code of the standard's dictionary keeps its value and scheme (they say nothing a
    published code does not) and a meaning of the dictionary's (the one it had when it is
    one of them, else the first): free text typed as a meaning does not survive.  Any other
    code (a site's local scheme, a code pydicom does not list) gets the dummy in each of
    them: local codes and their meanings are site vocabulary, possibly names.  Kept non-empty
    because they are type 1 wherever a code is (SEG property codes, SR concept names)."""
    present = [kw for kw in _CODE_KEYWORDS if kw in ds]
    if not present:
        return set()
    value = next((str(ds[kw].value or "").strip() for kw in _CODE_VALUE_KEYWORDS if kw in ds), "")
    scheme = str(ds.get("CodingSchemeDesignator", "") or "").strip()
    meanings = _standard_codes().get((scheme, value)) if value and scheme else None
    if meanings:
        if "CodeMeaning" in ds:
            meaning = str(ds.CodeMeaning or "").strip()
            lowered = [m.lower() for m in meanings]
            ds.CodeMeaning = meanings[lowered.index(meaning.lower())] if meaning.lower() in lowered else meanings[0]
    else:
        for kw in present:
            ds[kw].value = "http://anonymized.invalid" if ds[kw].VR == "UR" else DUMMY_TEXT
    return {Tag(kw) for kw in present}


def _patient_key(ds: Dataset) -> str:
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return pid
    return "name:" + str(ds.get("PatientName", "") or "").strip() + "\0" + str(ds.get("PatientBirthDate", "") or "")


def _clean(ds: Dataset, ctx: _Ctx, scrub: bool = False) -> None:
    """Apply the profile to every element of `ds`, recursing into sequences. `scrub` is set
    inside a sequence with a D action: free text, dates and UIDs there are replaced too."""
    local_pid = str(ds.get("PatientID", "") or "").strip()
    coded = _clean_code_item(ds)
    for tag in list(ds.keys()):
        if _removed_group(tag) or tag in _EXTRA_REMOVE:
            del ds[tag]
            continue
        elem = ds[tag]
        if tag == _PATIENT_ID:
            elem.value = patient_pseudonym(local_pid, ctx.secret) if local_pid else ctx.pseudonym
            continue
        if tag == _PATIENT_NAME:
            elem.value = patient_pseudonym(local_pid, ctx.secret) if local_pid else ctx.pseudonym
            continue
        action = _table_action(tag)
        if action == "X":
            del ds[tag]
        elif action == "Z":
            _empty(elem)
        elif action == "D":
            _dummy(elem, ctx)
        elif action in ("U", "U*"):
            if elem.VR == "SQ":
                for item in elem.value:
                    _clean(item, ctx, scrub)
            elif elem.VR == "UI":
                _replace_uids(elem, ctx)
            elif action == "U":
                _dummy(elem, ctx)
            else:
                _empty(elem)
        elif not dictionary_has_tag(tag):
            del ds[tag]  # a public tag nobody can say is harmless
        elif elem.VR == "SQ":
            # Coded concepts (Concept Name Code Sequence... in a Content Sequence) keep their
            # codes; the identification code sequences are table entries handled above.
            child_scrub = scrub and not elem.keyword.endswith("CodeSequence")
            for item in elem.value:
                _clean(item, ctx, child_scrub)
        elif elem.VR == "UI":
            if not _is_class_uid(tag):
                _replace_uids(elem, ctx)
        elif elem.VR in _DATE_VRS:
            if scrub and not elem.is_empty:
                _dummy(elem, ctx)
            else:
                _empty(elem)
        elif elem.VR in _TEXT_VRS and tag not in coded:
            if scrub or elem.keyword in _DUMMY_TEXT:
                if not elem.is_empty:
                    _dummy(elem, ctx)
            elif elem.keyword not in KEPT_TEXT:
                _empty(elem)  # the default for free text outside the table (see the module docstring)


def _set_deid_attributes(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    try:
        version = metadata.version("dicom-anonymizer")
    except metadata.PackageNotFoundError:  # pragma: no cover
        version = "?"
    ds.DeidentificationMethod = [PROFILE_METHOD, f"{TOOL_NAME}; dicom-anonymizer {version} table {TABLE_VERSION[-5:]}"[:64]]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"


def _rebuild_file_meta(ds: Dataset, old: FileMetaDataset | None, secret: bytes) -> None:
    old = old if old is not None else FileMetaDataset()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    sop_class = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
    if sop_class:
        meta.MediaStorageSOPClassUID = sop_class
    sop_instance = ds.get("SOPInstanceUID")
    if not sop_instance and old.get("MediaStorageSOPInstanceUID"):
        sop_instance = deidentify_uid(old.MediaStorageSOPInstanceUID, secret)
    if sop_instance:
        meta.MediaStorageSOPInstanceUID = sop_instance
    ts = old.get("TransferSyntaxUID")
    if not ts:  # no meta (or none given): the encoding the file was read with
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is not None and little is not None:
            ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if ts:
        meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PYDICOM " + pydicom.__version__
    ds.file_meta = meta


def _deidentify(ds: Dataset, secret: bytes, allow_burned_in_annotation: bool) -> int:
    """deidentify_dataset; returns how many UID values were replaced."""
    _check_secret(secret)
    secret = bytes(secret)
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES" and not allow_burned_in_annotation:
        raise DeidentifyError("BurnedInAnnotation is YES: the basic profile does not remove text burned into the pixels")
    ctx = _Ctx(secret, patient_pseudonym(_patient_key(ds), secret))
    old_meta = getattr(ds, "file_meta", None)
    _clean(ds, ctx)
    ds.PatientName = ctx.pseudonym
    ds.PatientID = ctx.pseudonym
    _set_deid_attributes(ds)
    _rebuild_file_meta(ds, old_meta, secret)
    ds.preamble = b"\0" * 128
    return ctx.uids_replaced


def deidentify_dataset(ds: Dataset, secret: bytes, *, allow_burned_in_annotation: bool = False) -> Dataset:
    """De-identify a dataset in place (its file meta is rebuilt, its preamble zeroed).

    Args:
        ds: the dataset.
        secret: the site secret (keys the UID and patient pseudonyms).
        allow_burned_in_annotation: de-identify it even when BurnedInAnnotation is YES.

    Returns:
        ``ds``, de-identified.

    Raises:
        DeidentifyError: a short secret, or BurnedInAnnotation = YES (unless allowed).
    """
    _deidentify(ds, secret, allow_burned_in_annotation)
    return ds


# -- reading and checking one file ---------------------------------------------------------


class _NotDicom(Exception):
    pass


def _check_integrity(ds: Dataset, size: int) -> None:
    """Raise ValueError for a file pydicom read without complaint but that is cut short:
    pydicom stops silently at a partial element header and returns short values."""
    keys = list(ds.keys())
    if not keys:
        raise ValueError("no data elements")
    # pydicom's overload types it DataElement, but an element not yet accessed comes back raw
    last = cast(DataElement | RawDataElement, ds.get_item(keys[-1]))
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if isinstance(last, RawDataElement) and last.value is not None and not (ts and UID(ts).is_deflated):
        length = last.length if last.length != 0xFFFFFFFF else len(last.value) + 8  # + delimiter
        end = last.value_tell + length
        if end != size:
            raise ValueError(f"truncated or damaged: its last element ends at byte {end}, the file has {size} bytes")
    for tag in keys:
        raw = cast(DataElement | RawDataElement, ds.get_item(tag))
        if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes) and raw.length != 0xFFFFFFFF:
            if len(raw.value) < raw.length:
                raise ValueError(f"truncated: {keyword_for_tag(tag) or tag} has {len(raw.value)} of {raw.length} bytes")
    # convert everything now, inside the caller's error handling (sequences are parsed here)
    ds.walk(lambda d, e: None)
    if "PixelData" in ds:
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if ts and UID(ts).is_encapsulated:
            if not any(True for _ in generate_fragments(ds.PixelData)):
                raise ValueError("encapsulated PixelData has no fragments")
        else:
            missing = [k for k in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel") if k not in ds]
            if missing:
                raise ValueError(f"PixelData without {', '.join(missing)}")
            expected = get_expected_length(ds, "bytes")
            if len(ds.PixelData) < expected:
                raise ValueError(f"truncated: PixelData has {len(ds.PixelData)} of {expected} bytes")
    elif "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop_class = UID(str(ds.get("SOPClassUID", "")))
        if "Rows" in ds or "Image Storage" in sop_class.name or sop_class.name == "Segmentation Storage":
            raise ValueError(f"no pixel data in a {sop_class.name or 'image'} file (truncated?)")


def _read(path: Path) -> Dataset:
    """Read a DICOM file: with the DICM preamble, or without one when it parses as an
    instance (SOP class and instance UIDs present). Raises _NotDicom or ValueError/other."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if has_preamble:
            ds = pydicom.dcmread(path)
        else:
            try:
                ds = pydicom.dcmread(path, force=True)
                ok = "SOPClassUID" in ds and "SOPInstanceUID" in ds
            except Exception:
                ok = False
            if not ok:
                raise _NotDicom("not a DICOM file (no DICM preamble and no DICOM instance found)")
        _check_integrity(ds, path.stat().st_size)
    for w in caught:
        text = str(w.message)
        if any(k in text.lower() for k in ("eof", "end of file", "truncat", "premature", "delimiter")):
            raise ValueError(text)
    return ds


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # value-validation warnings about the source's values
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# -- a tree --------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _walk(src: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Regular files under src (sorted, relative), and entries that are not (links to folders...)."""
    files: list[Path] = []
    odd: list[tuple[str, str]] = []
    for root, dirs, names in os.walk(src, followlinks=False):
        dirs.sort()
        rroot = Path(root)
        for d in list(dirs):
            if (rroot / d).is_symlink():
                odd.append((str((rroot / d).relative_to(src)), "symbolic link to a folder: not followed"))
                dirs.remove(d)
        for name in sorted(names):
            p = rroot / name
            if p.is_file():
                files.append(p.relative_to(src))
            else:
                odd.append((str(p.relative_to(src)), "not a regular file (broken link, socket, ...)"))
    return files, odd


def _check_dst(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise DeidentifyError(f"{src}: not a folder")
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir() or dst.is_symlink():
            raise DeidentifyError(f"{dst}: exists and is not a folder")
        if any(dst.iterdir()):
            raise DeidentifyError(f"{dst}: exists and is not empty")
    rs, rd = src.resolve(), dst.resolve()
    if rd == rs or rs in rd.parents or rd in rs.parents:
        raise DeidentifyError(f"{dst}: must not be inside {src} (or contain it)")


def _one_file(
    src: Path,
    rel: Path,
    staging: Path,
    secret: bytes,
    allow_burned_in_annotation: bool,
    outputs: dict[Path, Path],
    report: DeidReport,
    seen: dict[str, set[str]],
) -> tuple[str, str] | None:
    """Read, de-identify and write one file. Returns None, or (kind, reason) with kind
    "skip" (DICOMDIR), "non-dicom" or "error". Write failures raise DeidentifyError."""
    path = src / rel
    try:
        ds = _read(path)
    except _NotDicom as exc:
        return "non-dicom", str(exc)
    except OSError as exc:
        return "error", f"cannot read: {exc.strerror or exc}"
    except Exception as exc:  # pydicom's many ways of failing on a damaged file
        return "error", f"corrupt DICOM: {type(exc).__name__}: {exc}"
    meta_class = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    if MediaStorageDirectoryStorage in (ds.get("SOPClassUID"), meta_class):
        return "skip", "DICOMDIR index: lists original identifiers and file names; regenerate it from the output"
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        return "non-dicom", "DICOM file without SOPClassUID/SOPInstanceUID in its data set: not a storable instance"
    try:
        report.uids_replaced += _deidentify(ds, secret, allow_burned_in_annotation)
        data = _encode(ds)
    except DeidentifyError as exc:
        return "error", str(exc)
    except Exception as exc:
        return "error", f"cannot de-identify: {type(exc).__name__}: {exc}"
    out_rel = pseudonymize_relpath(rel, secret)
    if out_rel in outputs:  # a 64-bit HMAC collision; never silently overwrite
        return "error", f"output name {out_rel} collides with the one for {outputs[out_rel]}"
    outputs[out_rel] = rel
    try:
        atomic.write_bytes(staging / out_rel, data)
    except OSError as exc:
        raise DeidentifyError(f"{rel}: writing its de-identified copy under {staging} failed: {exc}") from exc
    report.files_out += 1
    seen["patients"].add(str(ds.PatientID))
    seen["studies"].add(str(ds.get("StudyInstanceUID", "")))
    seen["series"].add(str(ds.get("SeriesInstanceUID", "")))
    return None


def deidentify_tree(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    secret: bytes,
    *,
    progress: Callable[[int, int], None] | None = None,
    non_dicom: str = "error",
    allow_burned_in_annotation: bool = False,
) -> DeidReport:
    """De-identify every DICOM file under `src` into `dst`.

    Each output path is the input's relative path with every component replaced by a keyed
    pseudonym. The tree is built in a hidden staging folder next to `dst` and renamed to
    `dst` only when every file succeeded: on any error or interruption nothing appears at
    `dst` (a killed process may leave ``.<dst name>.deid-*`` behind). DICOMDIR files are
    always skipped and reported. A damaged or unreadable DICOM file, or one with
    BurnedInAnnotation = YES (unless `allow_burned_in_annotation`), fails the run.

    Args:
        src: the source folder.
        dst: the output folder: must not exist, or be an empty folder.
        secret: the site secret (`load_secret`).
        progress: called as progress(0, total) first, then progress(n_done, total) per file.
        non_dicom: "error" (default): non-DICOM files make the run fail, listing them all;
            "skip": they are left out and listed in the report's `skipped`.
        allow_burned_in_annotation: de-identify files with BurnedInAnnotation = YES too.

    Returns:
        The report; files_out + (files skipped) == files_in is checked before the rename.

    Raises:
        DeidentifyError: listing every problem file with its reason (nothing is written to
            `dst`), a short secret, a `src` that is not a folder, or a `dst` that is not
        allowed (a file, not empty, inside `src` or containing it).
        ValueError: `non_dicom` is neither "error" nor "skip".
    """
    if non_dicom not in ("error", "skip"):
        raise ValueError("non_dicom must be 'error' or 'skip'")
    _check_secret(secret)
    secret = bytes(secret)
    src, dst = Path(src), Path(dst)
    _check_dst(src, dst)
    files, odd = _walk(src)
    problems: list[str] = []
    skipped: list[tuple[str, str]] = []
    for odd_rel, reason in odd:
        (skipped.append((odd_rel, reason)) if non_dicom == "skip" else problems.append(f"{odd_rel}: {reason}"))

    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.deid-", dir=dst.parent))
    try:
        os.chmod(staging, atomic.default_mode(directory=True))
        report = DeidReport(files_in=len(files), files_out=0, skipped=skipped, uids_replaced=0, dst=str(dst))
        seen: dict[str, set[str]] = {"patients": set(), "studies": set(), "series": set()}
        outputs: dict[Path, Path] = {}
        skipped_files = 0
        total = len(files)
        if progress is not None:
            progress(0, total)
        for n, rel in enumerate(files, 1):
            problem = _one_file(src, rel, staging, secret, allow_burned_in_annotation, outputs, report, seen)
            if problem is not None:
                kind, reason = problem
                if kind == "skip" or (kind == "non-dicom" and non_dicom == "skip"):
                    skipped.append((str(rel), reason))
                    skipped_files += 1
                else:
                    problems.append(f"{rel}: {reason}")
            if len(problems) >= MAX_PROBLEMS:
                problems.append(f"... stopped after {MAX_PROBLEMS} problems")
                break
            if progress is not None:
                progress(n, total)
        if problems:
            count = sum(not p.startswith("...") for p in problems)
            listed = "\n  ".join(problems)
            raise DeidentifyError(f"{count} problem(s) under {src}; nothing was written to {dst}:\n  {listed}")

        written = sum(len(names) for _, _, names in os.walk(staging))
        if written != report.files_out or report.files_out + skipped_files != report.files_in:
            raise DeidentifyError(
                f"file count mismatch: {report.files_in} in, {report.files_out} de-identified, "
                f"{skipped_files} skipped, {written} in the staging folder; nothing was written to {dst}"
            )
        for root, _, _ in os.walk(staging, topdown=False):
            _fsync_dir(Path(root))
        try:
            os.rename(staging, dst)  # POSIX: also replaces an empty folder
        except OSError:
            if not (dst.is_dir() and not any(dst.iterdir())):
                raise DeidentifyError(f"{dst}: appeared or filled up while de-identifying") from None
            os.rmdir(dst)
            os.rename(staging, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.patients = len(seen["patients"])
    report.studies = len(seen["studies"] - {""})
    report.series = len(seen["series"] - {""})
    return report
