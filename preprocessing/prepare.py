"""`site-agent prepare`: a site's DICOM/NIfTI images and labels -> a prepared dataset.

Test-only reference labels (classes the site does not train on, scored on its test cases
only) go through the same pairing, grid check and remapping as labels, into ``labelsRef/``;
a reference label that fails is refused alone, its case is prepared without it.

Details: docs/guide/preparing-data.md, "How `prepare` works" and "Test-only reference labels".
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

from fedimg_core import atomic
from fedimg_core.dataset_manifest import CONVERTER_VERSION
from fedimg_core.hashing import sha256_file
from preprocessing.case_map import CASE_MAP_FORMAT, default_case_map, read_case_map, write_case_map
from preprocessing.dicom import Discovery, SeriesError, discover, load_series, read_header, series_geometry
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
from preprocessing.nifti import canonical, grid_difference_mm, load_nifti, qform_sform_disagree, set_compress_threads
from preprocessing.output_folder import (
    STATE_DIR,
    OutputLock,
    check_out_folder,
    clean_temp_files,
    commit_case,
    discard_staged,
    outputs_intact,
    stage_case,
    staged_names,
    write_metadata,
)
from preprocessing.parallel import ordered_map
from preprocessing.qc_flags import LABEL_LIKE_MAX_VALUES, SUSPECT_IMAGE_FLAGS, looks_like_label
from preprocessing.radiograph import RADIOGRAPH_MODALITIES, load_picture, load_radiograph, read_mask
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
    "convert_reference_label",
    "default_case_map",
    "is_prepared_dataset",
    "looks_like_label",
    "pair_labels",
    "prepare",
    "read_case_map",
    "write_qc_report",
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
    pixel_spacing: tuple[float, float] | None = None  # radiographs without a pixel spacing in their header: (row, column) mm
    jobs: int = 1  # cases converted at once, in worker processes (no part of the fingerprint: the outputs are the same)

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
            **({"pixel_spacing": list(self.pixel_spacing)} if self.pixel_spacing is not None else {}),  # absent: old fingerprints stay valid
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
    reference: bool = False  # a refused test-only reference label (its case, if any, is prepared without it)


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
    mods = sorted({s.modality for s in sources if s.kind in ("dicom", "radiograph")})
    nifti = [str(s.nifti) for s in sources if s.kind == "nifti"]
    if nifti:
        found = ", ".join(nifti[:3]) + (f" and {len(nifti) - 3} more" if len(nifti) > 3 else "")
        raise PrepareError(
            f"NIfTI inputs carry no modality: pass --modality (e.g. --modality CT); found {found} (label maps belong in the folder given with --labels)"
        )
    if len(mods) > 1:
        raise PrepareError(f"the inputs mix modalities {mods}: prepare one per dataset with --modality")
    return mods[0] if mods else "OT"


def _read_label(
    path: Path, kind: str, src: CaseSource, order: list[int] | None, affine_ras: np.ndarray | None, label_map: SiteLabelMap, schema: LabelSchema,
    opts: PrepareOptions, image_shape: tuple[int, ...] | None = None,
) -> nib.Nifti1Image:  # fmt: skip
    """A label (or reference label) file as read: a NIfTI as stored, a DICOM SEG on its series' grid
    in schema ids (``order``/``affine_ras``: the series' slice order and affine), a radiograph's mask on its
    pixel grid (``affine_ras``/``image_shape``: the radiograph's).

    Raises:
        SeriesError: an unreadable or unfitting file (see `load_nifti`, `read_seg`, `read_mask`).
    """
    if src.planar:
        assert affine_ras is not None and image_shape is not None  # the radiograph's, from convert_case
        if kind == "seg":  # frames placed by the one SOP instance they reference: [column, row, 0] like the image
            assert src.series is not None  # a SEG pairs with a DICOM image only
            arr = read_seg(path, src.series, [0], label_map, schema, opts.unknown_labels == "ignore")
            return nib.Nifti1Image(arr, affine_ras)  # type: ignore[no-untyped-call]  # nibabel leaves it unannotated
        return nib.Nifti1Image(read_mask(path, kind, image_shape), affine_ras)  # type: ignore[no-untyped-call]  # the image's grid: the mask has no place of its own
    if kind == "png":
        raise SeriesError(f"{path}: a PNG mask labels a radiograph (CR, DX) only; {src.display} is a volume", "unsupported_label")
    if kind == "seg":
        assert src.series is not None and order is not None  # a SEG pairs with a DICOM series only
        arr = read_seg(path, src.series, order, label_map, schema, opts.unknown_labels == "ignore")
        return nib.Nifti1Image(arr, affine_ras)  # type: ignore[no-untyped-call]  # nibabel leaves it unannotated
    return load_nifti(path, "label")


def _fit_label(
    label: nib.Nifti1Image, kind: str, path: Path, image: nib.Nifti1Image, src: CaseSource, label_map: SiteLabelMap, schema: LabelSchema,
    opts: PrepareOptions, what: str = "label",
) -> nib.Nifti1Image:  # fmt: skip
    """A read label (or reference label) on the canonical image's exact grid, in schema ids (uint8).

    Raises:
        SeriesError: another grid (``label_grid_mismatch``) or values the map refuses (see `remap`).
    """
    label = canonical(label)
    if label.shape != image.shape:
        raise SeriesError(f"{path}: {what} grid {label.shape} does not match image grid {image.shape} of {src.display}", "label_grid_mismatch")
    diff = grid_difference_mm(image.affine, label.affine, image.shape)
    if diff > opts.grid_tolerance_mm:
        raise SeriesError(
            f"{path}: {what} and image grids differ by up to {diff:.4f} mm (max affine difference; tolerance {opts.grid_tolerance_mm} mm)",
            "label_grid_mismatch",
        )
    data = np.asanyarray(label.dataobj)
    # a SEG was mapped to schema ids while read (by segment name); a NIfTI holds local values
    mapped = data if kind == "seg" else remap(data, label_map, schema, str(path), opts.unknown_labels == "ignore")
    return nib.Nifti1Image(mapped.astype(np.uint8), image.affine)  # type: ignore[no-untyped-call]  # nibabel leaves it unannotated; the image's affine: identical grid


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
    # a DICOM source has its series, a NIfTI source its file, a paired one its label file
    order: list[int] | None = None
    affine_ras: np.ndarray | None = None
    if src.planar:
        if src.picture is not None:
            radiograph = load_picture(src.picture, src.modality, opts.pixel_spacing)
        else:
            assert src.series is not None
            header = src.series.first
            radiograph = load_radiograph(header.path, header.dataset if header.dataset is not None else read_header(header.path), opts.pixel_spacing)
            header.dataset = None  # pixel data cached on the dataset: dropped once copied
        src.radiograph = radiograph.details()
        affine_ras = radiograph.affine_ras
        image = nib.Nifti1Image(radiograph.array, radiograph.affine_ras)  # type: ignore[no-untyped-call]  # nibabel leaves it unannotated
    elif src.kind == "dicom":
        assert src.series is not None
        vol = load_series(src.series, opts.tolerance_mm, opts.allow_irregular)
        flags += vol.flags
        order, affine_ras = vol.geometry.order, vol.affine_ras
        image = nib.Nifti1Image(vol.array, vol.affine_ras)  # type: ignore[no-untyped-call]  # nibabel leaves it unannotated
    else:
        assert src.nifti is not None
        image = load_nifti(src.nifti, "image")
        if qform_sform_disagree(src.nifti):
            flags.append("qform_sform_mismatch")
    label: nib.Nifti1Image | None = None
    if src.label is not None and src.label_kind is not None:
        label = _read_label(src.label, src.label_kind, src, order, affine_ras, label_map, schema, opts, image.shape)
    image = canonical(image)
    if label is not None:
        assert src.label is not None and src.label_kind is not None
        label = _fit_label(label, src.label_kind, src.label, image, src, label_map, schema, opts)
    return image, label, flags


def convert_reference_label(src: CaseSource, image: nib.Nifti1Image, schema: LabelSchema, reference_map: SiteLabelMap, opts: PrepareOptions) -> nib.Nifti1Image:
    """A case's test-only reference label, brought to the prepared form like its label (`convert_case`).

    The same readers, grid check and remapping as a training label, through the reference
    label map: on the canonical image's exact grid, in schema ids (uint8).

    Args:
        src: the source, with ``reference_label`` paired.
        image: the case's canonical image (`convert_case`).
        schema: the federation's label schema.
        reference_map: the site's reference label map.
        opts: the prepare options (grid tolerance, unknown labels).

    Returns:
        The canonical reference label in schema ids.

    Raises:
        SeriesError: the reference label is refused (its ``code`` says why); the case itself is not.
    """
    path, kind = src.reference_label, src.reference_label_kind
    assert path is not None and kind is not None
    order: list[int] | None = None
    affine_ras: np.ndarray | None = None
    if src.planar:
        affine_ras = image.affine  # the radiograph's own grid (its plane; canonical leaves it as it is)
    elif kind == "seg":
        assert src.series is not None  # a SEG pairs with a DICOM series only
        # the image's slice order and affine, as load_series found them (same series, same options)
        geo = series_geometry(src.series, opts.tolerance_mm, opts.allow_irregular)
        order, affine_ras = geo.order, geo.affine_ras
    label = _read_label(path, kind, src, order, affine_ras, reference_map, schema, opts, image.shape)
    return _fit_label(label, kind, path, image, src, reference_map, schema, opts, what="reference label")


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
    reference_labels: list[Path] | None = None,
    reference_label_map: SiteLabelMap | None = None,
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
        reference_labels: test-only reference label files or folders (classes the site does
            not train on; paired to images like `labels`, written to ``labelsRef/``).
        reference_label_map: the label map of the reference labels (its classes must be
            disjoint from `label_map`'s).

    Returns:
        The outcome per case (and per refused reference label), skipped files and notes.

    Raises:
        PrepareError: wrong options or inputs (reference labels without their map or with
            classes the label map also labels), an output folder that is not ours, or no case
            could be prepared (nothing is left behind in a folder this call created).
    """
    opts = options or PrepareOptions()
    out = Path(out)
    reference_labels = list(reference_labels or [])
    _check_reference_options(schema, label_map, reference_labels, reference_label_map)
    if opts.modality and opts.modality not in MODALITIES:
        raise PrepareError(f"--modality {opts.modality!r} is not one of {', '.join(MODALITIES)}")
    if opts.modality and opts.modality not in schema.modalities:
        raise PrepareError(f"modality {opts.modality} has no rule in schema {schema.source} (modalities: {', '.join(schema.modalities)})")
    for p in [*images, *(labels or []), *reference_labels]:
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
        *((Path(lab), "--labels") for lab in labels or []), *((Path(ref), "--reference-labels") for ref in reference_labels),
        (out, "--out"), (case_map, "case map"),
        (salt_file, "--salt-file"), (Path(label_map.source) if label_map is not None else None, "--label-map"),
        (Path(reference_label_map.source) if reference_label_map is not None else None, "--reference-label-map"),
        (Path(schema.source), "--schema"),
    ]:  # fmt: skip
        key = file_identity(path) if path is not None else None
        if key is not None:
            excluded.setdefault(key, option)
    label_excluded = {k: v for k, v in excluded.items() if v != "--labels"}
    reference_excluded = {k: v for k, v in excluded.items() if v != "--reference-labels"}
    created = not out.exists()
    try:
        try:
            files, _, scan_skipped, notes = scan_inputs(list(images), excluded, "images")
            label_files, label_roots, label_skipped, label_notes = scan_inputs(list(labels or []), label_excluded, "labels")
            ref_files, ref_roots, ref_skipped, ref_notes = scan_inputs(reference_labels, reference_excluded, "reference labels")
            # PNG/JPEG files are radiographs only when the site says so (--modality CR/DX): a CT folder's screenshots are not images
            disc = discover(files, progress=(lambda n, t: progress("scan", n, t)) if progress else None, pictures=opts.modality in RADIOGRAPH_MODALITIES)
            label_disc = discover(label_files, progress=None, masks=True) if label_files else Discovery()
            ref_disc = discover(ref_files, progress=None, masks=True) if ref_files else Discovery()
        except OSError as exc:
            raise PrepareError(f"{exc.filename or exc}: {exc.strerror or exc}") from None
        notes += label_notes + ref_notes
        sources, skipped = collect_sources(disc, opts.modality)
        skipped = scan_skipped + list(disc.skipped) + skipped
        skipped += label_skipped + [s for s in label_disc.skipped if s[1] != "dicomdir"]
        skipped += ref_skipped + [s for s in ref_disc.skipped if s[1] != "dicomdir"]
        if not sources:
            detail = f" ({len(skipped)} files skipped; first: {skipped[0][2]})" if skipped else ""
            raise PrepareError(f"no image series, radiograph or NIfTI image found under {', '.join(str(p) for p in images)}{detail}")
        modality = _choose_modality(sources, opts.modality)
        if modality not in schema.modalities:
            raise PrepareError(f"modality {modality} has no rule in schema {schema.source} (modalities: {', '.join(schema.modalities)})")
        label_files = [*label_disc.nifti, *label_disc.masks]  # a PNG mask pairs with a radiograph only (checked when read)
        label_segs = disc.segs + label_disc.segs
        unmatched = pair_labels(sources, label_files, label_segs, label_roots)
        # the same pairing for reference labels; one that fits no image is refused alone
        ref_unmatched = [
            (p, code, f"reference label {msg}")
            for p, code, msg in pair_labels(sources, [*ref_disc.nifti, *ref_disc.masks], list(ref_disc.segs), ref_roots, reference=True)
        ]
        # images whose pairing was ambiguous are refused as cases; the others go on
        unmatched += [(Path(source_location(s)), *s.refusal) for s in sources if s.refusal is not None]
        sources = [s for s in sources if s.refusal is None]
        if label_map is None:
            if any(s.label is not None for s in sources):
                raise PrepareError("labels were found but no site label map was given (--label-map): their values cannot be mapped to the schema")
            label_map = SiteLabelMap(schema.name, schema.version, {0: "background"}, "<none>")
        out.mkdir(parents=True, exist_ok=True)
        with OutputLock(out):
            result = _run(sources, unmatched, skipped, disc, out, schema, label_map, modality, opts, salt_file, progress, reference_label_map, ref_unmatched)
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


def _check_reference_options(schema: LabelSchema, label_map: SiteLabelMap | None, reference_labels: list[Path], reference_map: SiteLabelMap | None) -> None:
    """Reference labels need their own map, whose classes the site does not train on.

    Raises:
        PrepareError: one without the other, a map naming no class, or classes both maps label
            (naming both files and the classes).
    """
    if reference_labels and reference_map is None:
        raise PrepareError("reference labels were given (--reference-labels) but no reference label map (--reference-label-map): their values cannot be mapped")
    if reference_map is None:
        return
    if not reference_labels:
        raise PrepareError(f"a reference label map ({reference_map.source}) was given without reference labels (--reference-labels)")
    ref_ids = reference_map.labeled_class_ids(schema)
    if not ref_ids:
        raise PrepareError(f"the reference label map {reference_map.source} names no class of schema {schema.name}")
    both = sorted(set(ref_ids) & set(label_map.labeled_class_ids(schema) if label_map is not None else []))
    if both:
        names = ", ".join(n for n, v in sorted(schema.classes.items(), key=lambda kv: kv[1]) if v in both)
        raise PrepareError(
            f"the reference label map {reference_map.source} and the label map {label_map.source if label_map else '-'} both label {names}: "
            "reference labels must be of classes the site does not train on"
        )


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
    reference_map: SiteLabelMap | None = None,
    ref_unmatched: list[tuple[Path, str, str]] | None = None,
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
    reference_classes = reference_map.labeled_class_ids(schema) if reference_map is not None else None
    if reference_map is not None:  # only then: datasets without reference labels keep their fingerprints
        context["reference_label_map"] = sorted((str(k), v) for k, v in reference_map.mapping.items())
    outcomes: list[Outcome] = []
    for path, code, message in unmatched:
        outcomes.append(
            Outcome(salted_hash(salt, ["label", sha256_file(path) if path.is_file() else str(path)]), str(path), "refused", code=code, message=message)
        )
        log.debug("refused: %s", message)
    for path, code, message in ref_unmatched or []:
        ref_hash = salted_hash(salt, ["reference_label", sha256_file(path) if path.is_file() else str(path)])
        outcomes.append(Outcome(ref_hash, str(path), "refused", code=code, message=message, reference=True))
        log.debug("refused: %s", message)
    keyed = sorted(((salted_hash(salt, s.identifiers), s) for s in sources), key=lambda t: t[0])
    seen: set[str] = set()
    todo: list[_CaseJob] = []
    # each source's outcomes, in the sources' order whichever worker finishes first (as a serial run lists them)
    slots: list[list[Outcome]] = [[] for _ in keyed]
    job = _Job(out, schema, label_map, reference_map, opts, context, modality, labeled)
    for position, (source_hash, src) in enumerate(keyed):
        seen.add(source_hash)
        if opts.require_labels and src.label is None:
            msg = f"{src.display}: no label found (--require-labels)"
            slots[position].append(Outcome(source_hash, src.display, "refused", code="no_label", message=msg))
            log.debug("refused: %s", msg)
            continue
        rec = records.get(source_hash)
        fingerprint = None
        if rec:  # a case of an earlier run: redone only when its inputs or the settings changed
            try:
                fingerprint = input_fingerprint(src, context)
            except OSError as exc:
                slots[position].append(_unreadable(src, source_hash, exc))
                continue
            if rec.get("input_sha256") == fingerprint and outputs_intact(out, rec):
                slots[position].append(Outcome(source_hash, src.display, "unchanged", case_id=rec["case_id"], flags=rec["qc_flags"]))
                if rec.get("reference_refusal"):  # still refused: the same files as when it was refused
                    msg = f"{src.reference_label}: reference label of {rec['case_id']} refused ({rec['reference_refusal']}, unchanged since); the case is prepared without it"
                    slots[position].append(Outcome(salted_hash(salt, ["reference_label", source_hash]), str(src.reference_label), "refused",
                                                   code=rec["reference_refusal"], message=msg, reference=True))  # fmt: skip
                continue
        todo.append(_CaseJob(job, source_hash, src, fingerprint, _series_context(src, skipped), token=f"{source_hash[:24]}-{position}",
                             position=position))  # fmt: skip
    if progress:
        progress("convert", 0, len(todo))
    for done, staged in enumerate(ordered_map(_stage_one, todo, opts.jobs, on_crash=_crashed), 1):
        if progress:
            progress("convert", done, len(todo))
        for level, text in staged.logs:  # what a worker process logged about the case
            log.log(level, "%s", text)
        slots[staged.position].extend(_commit(out, state, staged, records, used_ids, salt))
    outcomes += [o for slot in slots for o in slot]
    kept = {h: r for h, r in records.items() if h in seen or not opts.prune}
    for h, r in records.items():
        if h not in kept:
            for written in (r.get("image"), r.get("label"), r.get("reference_label")):
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
    refused_entries = [
        {"source": o.source_hash, "reason_code": o.code, **({"kind": "reference_label"} if o.reference else {})} for o in outcomes if o.status == "refused"
    ]
    write_metadata(out, kept, refused_entries, schema, modality, labeled, opts.name, reference_classes=reference_classes)
    report = None
    if opts.qc_report:
        report = _qc_report(out, schema, progress, opts.jobs)
    notes = sorted({f"{se.grouping}: {se.note}" for se in disc.series if se.note})
    return PrepareResult(root=out, outcomes=outcomes, skipped_files=skipped, grouping_notes=notes, report=report)


def _commit(out: Path, state: Path, staged: _Staged, records: dict[str, dict[str, Any]], used_ids: set[int], salt: bytes) -> list[Outcome]:
    """Give a staged case its id (its earlier one, or the next free one, in the sources' order) and its record; its outcomes."""
    source_hash, src = staged.source_hash, staged.src
    if staged.refused is not None:
        return [staged.refused]
    assert staged.record is not None  # staged: either refused or a record
    rec = records.get(source_hash)
    if rec:
        case_id = rec["case_id"]
    else:
        nxt = max(used_ids, default=-1) + 1
        used_ids.add(nxt)
        case_id = f"case_{nxt:04d}"
    ref_refused = None
    if staged.reference_refusal is not None:
        code, msg = staged.reference_refusal
        msg = f"{msg}; {case_id} is prepared without a reference label"
        log.debug("refused: %s", msg)
        ref_refused = Outcome(salted_hash(salt, ["reference_label", source_hash]), str(src.reference_label), "refused", code=code, message=msg,
                              reference=True)  # fmt: skip
    had_reference = bool(rec and rec.get("reference_label"))
    try:
        rec = commit_case(out, case_id, source_hash, staged.record)
        rec["reference_refusal"] = ref_refused.code if ref_refused is not None else None  # .state only (never in the manifest)
        atomic.write_json(state / f"{source_hash}.json", rec)
    except Exception as exc:  # noqa: BLE001 - idem; what this case wrote goes, so the manifest stays true
        discard_staged(out, staged.record)
        for rel in (f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz", f"labelsRef/{case_id}.nii.gz", f"{STATE_DIR}/cases/{source_hash}.json"):
            (out / rel).unlink(missing_ok=True)
        records.pop(source_hash, None)
        return [_unexpected(src, source_hash, exc, "writing")]
    if had_reference and rec.get("reference_label") is None:
        (out / f"labelsRef/{case_id}.nii.gz").unlink(missing_ok=True)  # an earlier run's reference label this run did not give
    records[source_hash] = rec
    done = [Outcome(source_hash, src.display, rec["status"], case_id=case_id, flags=rec["qc_flags"])]
    return done + ([ref_refused] if ref_refused is not None else [])


@dataclass(frozen=True)
class _Job:
    """What converting any case of one `prepare` call needs (sent to each worker process once per case)."""

    out: Path
    schema: LabelSchema
    label_map: SiteLabelMap
    reference_map: SiteLabelMap | None
    opts: PrepareOptions
    context: dict[str, Any]  # the fingerprint's context (converter, schema, maps, options)
    modality: str
    labeled: list[int]


@dataclass(frozen=True)
class _CaseJob:
    """One case to convert: its source, its fingerprint when an earlier run's record made it known."""

    job: _Job
    source_hash: str
    src: CaseSource
    fingerprint: str | None
    series_context: str  # what else went wrong around its series (for a refusal's message)
    token: str  # names its staged files: unique within the run (two sources may share a hash)
    position: int  # in the sources' order


@dataclass
class _Staged:
    """A converted case, its files staged under hidden names (`stage_case`), or why it was refused."""

    source_hash: str
    src: CaseSource
    position: int
    record: dict[str, Any] | None = None
    refused: Outcome | None = None
    reference_refusal: tuple[str, str] | None = None  # (code, message without the case id, which is given later)
    logs: list[tuple[int, str]] = field(default_factory=list)  # a worker's log records of the case (level, text)


def _stage_one(case: _CaseJob) -> _Staged:
    """Convert one case and stage its files: in a `--jobs` worker process, or in this one.

    The input fingerprint of a new case is hashed on a second thread while the case converts
    (the hashing releases the GIL); a case whose fingerprint an earlier record needed has it. In
    a worker process the log records of the case are carried back to the caller, which logs them.
    """
    if case.job.opts.jobs <= 1:
        return _convert_and_stage(case)
    set_compress_threads(1)  # a worker process: the workers share the cores
    capture = _CapturedLog()
    with capture:
        staged = _convert_and_stage(case)
    staged.logs = capture.records
    return staged


def _convert_and_stage(case: _CaseJob) -> _Staged:
    job, src, source_hash = case.job, case.src, case.source_hash
    with ThreadPoolExecutor(max_workers=1) as hasher:
        pending = hasher.submit(input_fingerprint, src, job.context) if case.fingerprint is None else None
        try:
            image, label, flags = convert_case(src, job.schema, job.label_map, job.opts)
        except Exception as exc:  # noqa: BLE001 - one case's failure never stops the others
            unreadable = pending.exception() if pending is not None else None
            if isinstance(unreadable, OSError):  # a file that cannot be read: said as such, as before conversion
                return _Staged(source_hash, src, case.position, refused=_unreadable(src, source_hash, unreadable))
            if isinstance(exc, SeriesError):
                msg = str(exc) + case.series_context
                log.debug("refused: %s", msg)
                return _Staged(source_hash, src, case.position, refused=Outcome(source_hash, src.display, "refused", code=exc.code, message=msg))
            return _Staged(source_hash, src, case.position, refused=_unexpected(src, source_hash, exc, "converting"))
        try:
            fingerprint = pending.result() if pending is not None else case.fingerprint
        except OSError as exc:
            return _Staged(source_hash, src, case.position, refused=_unreadable(src, source_hash, exc))
    assert fingerprint is not None
    reference, reference_refusal = None, None
    if src.reference_label is not None and job.reference_map is not None:
        reference, reference_refusal = _reference(src, image, job.schema, job.reference_map, job.opts)
    try:
        record = stage_case(job.out, case.token, src, image, label, flags, fingerprint, job.modality, job.schema, job.labeled, reference)
    except Exception as exc:  # noqa: BLE001 - idem (stage_case removed what it staged)
        return _Staged(source_hash, src, case.position, refused=_unexpected(src, source_hash, exc, "writing"))
    return _Staged(source_hash, src, case.position, record=record, reference_refusal=reference_refusal)


class _CapturedLog(logging.Handler):
    """The log records of one case in a worker process (which has no handler of its own), for the caller to log."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[tuple[int, str]] = []
        self._logger = logging.getLogger("preprocessing")
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        self.records.append((record.levelno, text))

    def __enter__(self) -> _CapturedLog:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def _crashed(case: _CaseJob) -> _Staged:
    """A case whose worker process died twice (a decoder crash, out of memory): refused, the others go on; what it staged goes."""
    discard_staged(case.job.out, staged_names(case.token))
    msg = (f"{case.src.display}: the process converting this case ended abruptly, twice (a crashing decoder or the system running out of "
           "memory); the case is refused, the others go on")  # fmt: skip
    return _Staged(
        case.source_hash, case.src, case.position, refused=Outcome(case.source_hash, case.src.display, "refused", code="converter_crashed", message=msg)
    )


def _unreadable(src: CaseSource, source_hash: str, exc: OSError) -> Outcome:
    msg = f"{exc.filename}: {exc.strerror}"
    log.debug("refused: %s", msg)
    return Outcome(source_hash, src.display, "refused", code="unreadable", message=msg)


def _reference(
    src: CaseSource, image: nib.Nifti1Image, schema: LabelSchema, reference_map: SiteLabelMap, opts: PrepareOptions
) -> tuple[nib.Nifti1Image | None, tuple[str, str] | None]:
    """A case's reference label converted, or why it was refused (code, message; the caller adds the case id):
    either way the case goes on without stopping (an unforeseen error too, unless FEDIMG_DEBUG=1 asks for it to be raised)."""
    try:
        return convert_reference_label(src, image, schema, reference_map, opts), None
    except SeriesError as exc:
        return None, (exc.code, str(exc))
    except Exception as exc:  # noqa: BLE001 - a reference label never stops its case
        if os.environ.get("FEDIMG_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        code = "out_of_memory" if isinstance(exc, MemoryError) else "unexpected_error"
        msg = f"{src.reference_label}: unexpected error while converting the reference label ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        log.debug("reference label refused: %s", msg, exc_info=exc)
        return None, (code, msg)


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


def _qc_report(out: Path, schema: LabelSchema, progress: Progress | None, jobs: int = 1) -> Path | None:
    try:
        # deferred on purpose: the report pulls in matplotlib, which a run without a QC report
        # (and every importer of this module) need not load; without it the report is skipped
        from preprocessing import qc
    except ImportError:
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    return qc.write_report(out, manifest, schema, progress=(lambda d, t: progress("qc", d, t)) if progress else None, jobs=jobs)


def write_qc_report(out: Path, schema: LabelSchema | None = None, jobs: int = 1, progress: Progress | None = None) -> Path:
    """Write (or bring up to date) the QC report of a prepared dataset, apart from `prepare`.

    For a dataset prepared with ``--no-qc``, or one of thousands of cases whose figures a site
    draws later (or at night, in the background): figures newer than their case's files are
    kept, the others are drawn, ``jobs`` at a time. It holds the folder's lock, so it never
    runs beside a `prepare` of the same folder.

    Args:
        out: the prepared dataset.
        schema: the federation's label schema (None: the built-in schema the manifest names).
        jobs: figures drawn at once, each in a worker process.
        progress: called with ("qc", done, total).

    Returns:
        The report's index.html.

    Raises:
        PrepareError: not a prepared dataset, a schema other than the manifest's, or a folder another prepare is writing.
    """
    from preprocessing.schema import builtin_schema_path, load_schema

    out = Path(out)
    if not is_prepared_dataset(out):
        raise PrepareError(f"{out}: not a prepared dataset (no manifest.json of `site-agent prepare`)")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    named = manifest.get("schema") if isinstance(manifest.get("schema"), dict) else {}
    if schema is None:
        path = builtin_schema_path(str(named.get("name", "")))
        if path is None:
            raise PrepareError(f"{out}: its schema {named.get('name')!r} is not built in: pass the schema file (--schema)")
        schema = load_schema(path)
    if (schema.name, schema.version) != (named.get("name"), named.get("version")):
        raise PrepareError(f"{out}: prepared with schema {named.get('name')} {named.get('version')}, not {schema.name} {schema.version} ({schema.source})")
    with OutputLock(out):
        report = _qc_report(out, schema, progress, jobs)
    if report is None:
        raise PrepareError("the QC report needs matplotlib, which is not installed here")
    return report
