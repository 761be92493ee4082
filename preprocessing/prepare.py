"""`site-agent prepare`: a site's DICOM/NIfTI images and labels -> a prepared dataset.

Details: docs/guide/preparing-data.md, "How `prepare` works".
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

from fedimg_core import atomic
from fedimg_core.dataset_manifest import CONVERTER_VERSION
from fedimg_core.hashing import sha256_file
from preprocessing.case_map import CASE_MAP_FORMAT, default_case_map, read_case_map, write_case_map
from preprocessing.dicom import Discovery, SeriesError, discover, load_series
from preprocessing.inputs import (
    GRID_TOLERANCE_MM,
    MIN_SLICES_MULTI_ORIENTATION,
    CaseSource,
    PrepareError,
    collect_sources,
    file_identity,
    is_prepared_dataset,
    pair_labels,
    scan_inputs,
    source_location,
)
from preprocessing.labels import read_seg, remap
from preprocessing.nifti import canonical, grid_difference_mm, load_nifti, qform_sform_disagree
from preprocessing.output_folder import STATE_DIR, OutputLock, check_out_folder, clean_temp_files, outputs_intact, write_case, write_metadata
from preprocessing.qc_flags import LABEL_LIKE_MAX_VALUES, SUSPECT_IMAGE_FLAGS, looks_like_label
from preprocessing.schema import LabelSchema, SiteLabelMap
from preprocessing.source_hash import input_fingerprint, read_or_create_salt, salted_hash

# the public names of this module and of the modules it was split into (preprocessing.inputs,
# .case_map, .qc_flags, .output_folder): the old import paths keep working
__all__ = [
    "CASE_MAP_FORMAT",
    "GRID_TOLERANCE_MM",
    "LABEL_LIKE_MAX_VALUES",
    "MIN_SLICES_MULTI_ORIENTATION",
    "MODALITIES",
    "STATE_DIR",
    "SUSPECT_IMAGE_FLAGS",
    "CaseSource",
    "Outcome",
    "PrepareError",
    "PrepareOptions",
    "PrepareResult",
    "collect_sources",
    "convert_case",
    "default_case_map",
    "is_prepared_dataset",
    "looks_like_label",
    "pair_labels",
    "prepare",
    "read_case_map",
]

log = logging.getLogger(__name__)

MODALITIES = ("CT", "MR", "PT", "CR", "DX", "US", "OT")


@dataclass
class PrepareOptions:
    """The options of ``site-agent prepare`` (see its --help); those in `fingerprint` decide whether a case is redone."""

    name: str = "dataset"
    modality: str | None = None  # required when inputs are NIfTI only; filters DICOM series otherwise
    tolerance_mm: float = 0.01
    allow_irregular: bool = False
    unknown_labels: str = "error"  # or "ignore": map unknown local values to the ignore label
    grid_tolerance_mm: float = GRID_TOLERANCE_MM
    require_labels: bool = False
    prune: bool = False  # drop cases of earlier runs whose sources were not given this time
    qc_report: bool = True

    def fingerprint(self) -> dict[str, Any]:
        """The options that change a converted case (part of each case's input fingerprint).

        Returns:
            Tolerances, irregular-series and unknown-label choices by name.
        """
        return {
            "tolerance_mm": self.tolerance_mm,
            "allow_irregular": self.allow_irregular,
            "unknown_labels": self.unknown_labels,
            "grid_tolerance_mm": self.grid_tolerance_mm,
        }


@dataclass
class Outcome:
    """What happened to one source (a case, or a label that matched no image)."""

    source_hash: str
    display: str
    status: str  # "ok" | "flagged" | "refused" | "unchanged"
    case_id: str | None = None
    flags: list[str] = field(default_factory=list)
    code: str = ""
    message: str = ""  # console only


@dataclass
class PrepareResult:
    """What a `prepare` call did: an outcome per source, skipped files and notes for the console."""

    root: Path
    outcomes: list[Outcome]
    skipped_files: list[tuple[Path, str, str]]
    grouping_notes: list[str]
    report: Path | None = None
    notes: list[str] = field(default_factory=list)  # inputs not scanned or skipped, for the console
    case_map: Path | None = None  # site-local case id -> source (never part of the dataset)

    def count(self, status: str) -> int:
        """How many outcomes have a status.

        Args:
            status: ok, flagged, refused or unchanged.

        Returns:
            The number of sources with that outcome.
        """
        return sum(o.status == status for o in self.outcomes)


Progress = Callable[[str, int, int], None]


def _choose_modality(sources: list[CaseSource], requested: str | None) -> str:
    if requested:
        return requested
    mods = sorted({s.modality for s in sources if s.kind == "dicom"})
    nifti = [str(s.nifti) for s in sources if s.kind == "nifti"]
    if nifti:
        found = ", ".join(nifti[:3]) + (f" and {len(nifti) - 3} more" if len(nifti) > 3 else "")
        raise PrepareError(
            f"NIfTI inputs carry no modality: pass --modality (e.g. --modality CT); found {found} (label maps belong in the folder given with --labels)"
        )
    if len(mods) > 1:
        raise PrepareError(f"the inputs mix modalities {mods}: prepare one per dataset with --modality")
    return mods[0] if mods else "OT"


def convert_case(
    src: CaseSource, schema: LabelSchema, label_map: SiteLabelMap, opts: PrepareOptions
) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None, list[str]]:
    """Read one source and bring it to the prepared form: canonical RAS+, labels in schema ids.

    Args:
        src: the source (with its label, if paired).
        schema: the federation's label schema.
        label_map: the site label map.
        opts: the prepare options (tolerances, unknown labels).

    Returns:
        (canonical image, canonical label or None, flags), as nibabel images.

    Raises:
        SeriesError: the case is refused (its ``code`` says why).
    """
    flags: list[str] = []
    unknown_to_ignore = opts.unknown_labels == "ignore"
    # a DICOM source has its series, a NIfTI source its file, a paired one its label file
    label: nib.Nifti1Image | None = None
    if src.kind == "dicom":
        assert src.series is not None
        vol = load_series(src.series, opts.tolerance_mm, opts.allow_irregular)
        flags += vol.flags
        image = nib.Nifti1Image(vol.array, vol.affine_ras)  # type: ignore[no-untyped-call]  # nibabel leaves it unannotated
        if src.label_kind == "seg":
            assert src.label is not None
            label_arr = read_seg(src.label, src.series, vol.geometry.order, label_map, schema, unknown_to_ignore)
            label = nib.Nifti1Image(label_arr, vol.affine_ras)  # type: ignore[no-untyped-call]  # idem
        elif src.label_kind == "nifti":
            assert src.label is not None
            label = load_nifti(src.label, "label")
    else:
        assert src.nifti is not None
        image = load_nifti(src.nifti, "image")
        if qform_sform_disagree(src.nifti):
            flags.append("qform_sform_mismatch")
        if src.label_kind == "nifti":
            assert src.label is not None
            label = load_nifti(src.label, "label")
    image = canonical(image)
    if label is not None:
        label = canonical(label)
        if label.shape != image.shape:
            raise SeriesError(
                f"{src.label}: label grid {label.shape} does not match image grid {image.shape} of {src.display}",
                "label_grid_mismatch",
            )
        diff = grid_difference_mm(image.affine, label.affine, image.shape)
        if diff > opts.grid_tolerance_mm:
            raise SeriesError(
                f"{src.label}: label and image grids differ by up to {diff:.4f} mm (max affine difference; tolerance {opts.grid_tolerance_mm} mm)",
                "label_grid_mismatch",
            )
        data = np.asanyarray(label.dataobj)
        mapped = data if src.label_kind == "seg" else remap(data, label_map, schema, str(src.label), unknown_to_ignore)
        label = nib.Nifti1Image(mapped.astype(np.uint8), image.affine)  # type: ignore[no-untyped-call]  # idem; the image's affine: identical grid
    return image, label, flags


def prepare(
    images: list[Path],
    out: Path,
    schema: LabelSchema,
    label_map: SiteLabelMap | None,
    labels: list[Path] | None = None,
    options: PrepareOptions | None = None,
    salt_file: Path | None = None,
    progress: Progress | None = None,
    case_map: Path | None = None,
) -> PrepareResult:
    """Convert images (+ labels) into the prepared dataset at `out` (see the module docstring).

    Args:
        images: DICOM/NIfTI files or folders to scan for images.
        out: the dataset folder: new, empty, or one this function wrote before.
        schema: the federation's label schema.
        label_map: the site label map (None: no labels).
        labels: label files or folders (never scanned for images).
        options: see `PrepareOptions`.
        salt_file: the secret salt of the source hashes (default `<out>/.state/salt`).
        progress: called with (stage, done, total). Each refusal is logged as a warning
            (logger ``preprocessing.prepare``) naming its files.
        case_map: the site-local case id -> source file (default `default_case_map(out)`).

    Returns:
        The outcome per case, skipped files and notes.

    Raises:
        PrepareError: wrong options or inputs, an output folder that is not ours, or no case
            could be prepared (nothing is left behind in a folder this call created).
    """
    opts = options or PrepareOptions()
    out = Path(out)
    if opts.modality and opts.modality not in MODALITIES:
        raise PrepareError(f"--modality {opts.modality!r} is not one of {', '.join(MODALITIES)}")
    if opts.modality and opts.modality not in schema.modalities:
        raise PrepareError(f"modality {opts.modality} has no rule in schema {schema.source} (modalities: {', '.join(schema.modalities)})")
    for p in [*images, *(labels or [])]:
        if not Path(p).exists():
            raise PrepareError(f"{p}: no such file or folder")
        if not os.access(p, os.R_OK):
            raise PrepareError(f"{p}: permission denied")
    check_out_folder(out)
    case_map = Path(case_map) if case_map is not None else default_case_map(out)
    if case_map.exists():
        read_case_map(case_map)  # somebody else's file of that name is never overwritten
    elif case_map.parent.is_dir() and not os.access(case_map.parent, os.W_OK):
        raise PrepareError(f"{case_map.parent}: not writable, so the case map {case_map.name} cannot be kept there; pass --case-map PATH")
    # Paths given for something else are never read as images (labels inside the input
    # folder became "CT images"; an output folder inside it was ingested on each re-run).
    excluded: dict[tuple[int, int], str] = {}
    for path, option in [
        *((Path(lab), "--labels") for lab in labels or []), (out, "--out"), (case_map, "case map"),
        (salt_file, "--salt-file"), (Path(label_map.source) if label_map is not None else None, "--label-map"),
        (Path(schema.source), "--schema"),
    ]:  # fmt: skip
        key = file_identity(path) if path is not None else None
        if key is not None:
            excluded.setdefault(key, option)
    label_excluded = {k: v for k, v in excluded.items() if v != "--labels"}
    created = not out.exists()
    try:
        try:
            files, _, scan_skipped, notes = scan_inputs(list(images), excluded, "images")
            label_files, label_roots, label_skipped, label_notes = scan_inputs(list(labels or []), label_excluded, "labels")
            disc = discover(files, progress=(lambda n, t: progress("scan", n, t)) if progress else None)
            label_disc = discover(label_files, progress=None) if label_files else Discovery()
        except OSError as exc:
            raise PrepareError(f"{exc.filename or exc}: {exc.strerror or exc}") from None
        notes += label_notes
        sources, skipped = collect_sources(disc, opts.modality)
        skipped = scan_skipped + list(disc.skipped) + skipped
        skipped += label_skipped + [s for s in label_disc.skipped if s[1] != "dicomdir"]
        if not sources:
            detail = f" ({len(skipped)} files skipped; first: {skipped[0][2]})" if skipped else ""
            raise PrepareError(f"no image series or NIfTI image found under {', '.join(str(p) for p in images)}{detail}")
        modality = _choose_modality(sources, opts.modality)
        if modality not in schema.modalities:
            raise PrepareError(f"modality {modality} has no rule in schema {schema.source} (modalities: {', '.join(schema.modalities)})")
        label_nifti = [p for p in label_disc.nifti]
        label_segs = disc.segs + label_disc.segs
        unmatched = pair_labels(sources, label_nifti, label_segs, label_roots)
        # images whose pairing was ambiguous are refused as cases; the others go on
        unmatched += [(Path(source_location(s)), *s.refusal) for s in sources if s.refusal is not None]
        sources = [s for s in sources if s.refusal is None]
        if label_map is None:
            if any(s.label is not None for s in sources):
                raise PrepareError("labels were found but no site label map was given (--label-map): their values cannot be mapped to the schema")
            label_map = SiteLabelMap(schema.name, schema.version, {0: "background"}, "<none>")
        out.mkdir(parents=True, exist_ok=True)
        with OutputLock(out):
            result = _run(sources, unmatched, skipped, disc, out, schema, label_map, modality, opts, salt_file, progress)
            salt = read_or_create_salt(out / STATE_DIR / "salt", salt_file)
            write_case_map(case_map, out, {salted_hash(salt, s.identifiers): s for s in sources})
    except BaseException:
        if created and out.exists() and not (out / "manifest.json").exists():
            # nothing of value yet (no case finished): leave no trace, not even the salt
            records = list((out / STATE_DIR / "cases").glob("*.json")) if (out / STATE_DIR / "cases").is_dir() else []
            if not records:
                shutil.rmtree(out, ignore_errors=True)
        raise
    result.notes = notes
    result.case_map = case_map
    return result


def _run(
    sources: list[CaseSource],
    unmatched: list[tuple[Path, str, str]],
    skipped: list[tuple[Path, str, str]],
    disc: Discovery,
    out: Path,
    schema: LabelSchema,
    label_map: SiteLabelMap,
    modality: str,
    opts: PrepareOptions,
    salt_file: Path | None,
    progress: Progress | None,
) -> PrepareResult:
    salt = read_or_create_salt(out / STATE_DIR / "salt", salt_file)
    state = out / STATE_DIR / "cases"
    state.mkdir(parents=True, exist_ok=True)
    clean_temp_files(out)
    records: dict[str, dict[str, Any]] = {}
    for f in state.glob("*.json"):
        try:
            rec = json.loads(f.read_text())
            records[rec["source_hash"]] = rec
        except (OSError, ValueError, KeyError):
            f.unlink(missing_ok=True)  # a damaged record: the case is simply redone
    used_ids = {int(r["case_id"].split("_")[1]) for r in records.values()}
    labeled = label_map.labeled_class_ids(schema)
    context = {
        "converter": CONVERTER_VERSION,
        "schema": [schema.name, schema.version, sorted(schema.classes.items())],
        "label_map": sorted((str(k), v) for k, v in label_map.mapping.items()),
        "modality": modality,
        "options": opts.fingerprint(),
    }
    outcomes: list[Outcome] = []
    for path, code, message in unmatched:
        outcomes.append(
            Outcome(salted_hash(salt, ["label", sha256_file(path) if path.is_file() else str(path)]), str(path), "refused", code=code, message=message)
        )
        log.debug("refused: %s", message)
    keyed = sorted(((salted_hash(salt, s.identifiers), s) for s in sources), key=lambda t: t[0])
    seen: set[str] = set()
    for n, (source_hash, src) in enumerate(keyed, 1):
        if progress:
            progress("convert", n - 1, len(keyed))
        seen.add(source_hash)
        if opts.require_labels and src.label is None:
            msg = f"{src.display}: no label found (--require-labels)"
            outcomes.append(Outcome(source_hash, src.display, "refused", code="no_label", message=msg))
            log.debug("refused: %s", msg)
            continue
        try:
            fingerprint = input_fingerprint(src, context)
        except OSError as exc:
            msg = f"{exc.filename}: {exc.strerror}"
            outcomes.append(Outcome(source_hash, src.display, "refused", code="unreadable", message=msg))
            log.debug("refused: %s", msg)
            continue
        rec = records.get(source_hash)
        if rec and rec.get("input_sha256") == fingerprint and outputs_intact(out, rec):
            outcomes.append(Outcome(source_hash, src.display, "unchanged", case_id=rec["case_id"], flags=rec["qc_flags"]))
            continue
        try:
            image, label, flags = convert_case(src, schema, label_map, opts)
        except SeriesError as exc:
            msg = str(exc) + _series_context(src, skipped)
            outcomes.append(Outcome(source_hash, src.display, "refused", code=exc.code, message=msg))
            log.debug("refused: %s", msg)
            continue
        except Exception as exc:  # noqa: BLE001 - one case's failure never stops the others
            outcomes.append(_unexpected(src, source_hash, exc, "converting"))
            continue
        if rec:
            case_id = rec["case_id"]
        else:
            nxt = max(used_ids, default=-1) + 1
            used_ids.add(nxt)
            case_id = f"case_{nxt:04d}"
        try:
            rec = write_case(out, case_id, source_hash, src, image, label, flags, fingerprint, modality, schema, labeled)
            atomic.write_json(state / f"{source_hash}.json", rec)
        except Exception as exc:  # noqa: BLE001 - idem; what this case wrote goes, so the manifest stays true
            for rel in (f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz", f"{STATE_DIR}/cases/{source_hash}.json"):
                (out / rel).unlink(missing_ok=True)
            records.pop(source_hash, None)
            outcomes.append(_unexpected(src, source_hash, exc, "writing"))
            continue
        records[source_hash] = rec
        outcomes.append(Outcome(source_hash, src.display, rec["status"], case_id=case_id, flags=rec["qc_flags"]))
    if progress:
        progress("convert", len(keyed), len(keyed))
    kept = {h: r for h, r in records.items() if h in seen or not opts.prune}
    for h, r in records.items():
        if h not in kept:
            for written in (r.get("image"), r.get("label")):
                if written:
                    (out / written).unlink(missing_ok=True)
            (state / f"{h}.json").unlink(missing_ok=True)
    if not kept:
        # image refusals first: an unpaired label is usually a consequence, not the cause
        refused = sorted((o for o in outcomes if o.status == "refused"), key=lambda o: o.code in ("unpaired_label", "duplicate_label"))
        if len(refused) == 1:
            raise PrepareError(refused[0].message)
        first = refused[0].message if refused else "no inputs"
        raise PrepareError(f"no case could be prepared: {len(refused)} refused (first: {first})")
    refused_entries = [{"source": o.source_hash, "reason_code": o.code} for o in outcomes if o.status == "refused"]
    write_metadata(out, kept, refused_entries, schema, modality, labeled, opts.name)
    report = None
    if opts.qc_report:
        report = _qc_report(out, schema, progress)
    notes = sorted({f"{se.grouping}: {se.note}" for se in disc.series if se.note})
    return PrepareResult(root=out, outcomes=outcomes, skipped_files=skipped, grouping_notes=notes, report=report)


def _unexpected(src: CaseSource, source_hash: str, exc: Exception, stage: str) -> Outcome:
    """A refusal for an error no check foresaw (MemoryError, a library's ValueError, ...):
    the files are named on the console, the traceback goes to the local log at debug level
    (FEDIMG_DEBUG=1 raises it instead, so a programming error is not hidden while testing)."""
    if os.environ.get("FEDIMG_DEBUG", "").lower() in ("1", "true", "yes"):
        raise exc
    where = getattr(exc, "filename", None) or (f"{src.display} (label {src.label})" if src.label else src.display)
    detail = " ".join(str(exc).split())[:200] or "no message"
    code = "out_of_memory" if isinstance(exc, MemoryError) else "unexpected_error"
    msg = f"{where}: unexpected error while {stage} the case ({type(exc).__name__}: {detail}); the case is refused, the others go on"
    log.debug("refused: %s", msg, exc_info=exc)
    return Outcome(source_hash, src.display, "refused", code=code, message=msg)


def _series_context(src: CaseSource, skipped: list[tuple[Path, str, str]]) -> str:
    """What else went wrong around a refused series: files of its folder that could not be
    read (often the real cause of a "missing slice"), and how the series was grouped."""
    if src.series is None:
        return ""
    extra = ""
    near = [m for p, _, m in skipped if Path(p).parent == src.series.folder]
    if near:
        extra += f"; {len(near)} other file(s) in that folder were unusable (first: {near[0]})"
    if src.series.note:
        extra += f"; grouping: {src.series.note}"
    return extra


def _qc_report(out: Path, schema: LabelSchema, progress: Progress | None) -> Path | None:
    try:
        # deferred on purpose: the report pulls in matplotlib, which a run without a QC report
        # (and every importer of this module) need not load; without it the report is skipped
        from preprocessing import qc
    except ImportError:
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    return qc.write_report(out, manifest, schema, progress=(lambda d, t: progress("qc", d, t)) if progress else None)
