"""Label sources (NIfTI label maps, DICOM SEG) remapped to the federation schema through the site label map."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom

from preprocessing.dicom import Series
from preprocessing.dicom_pixels import in_process_plugins_only
from preprocessing.refusals import SeriesError
from preprocessing.schema import IGNORE, LabelSchema, SchemaError, SiteLabelMap

_DENSE_LUT_MAX = 65535  # label values up to this map through a table indexed by value


def remap(local: np.ndarray, label_map: SiteLabelMap, schema: LabelSchema, source: str, unknown_to_ignore: bool = False) -> np.ndarray:
    """Local integer labels -> schema ids through the site label map.

    Args:
        local: the label volume in the site's values.
        label_map: the site label map (its integer entries are used).
        schema: the federation's label schema.
        source: the label file, named in messages.
        unknown_to_ignore: map values the map does not list to the ignore label instead of refusing.

    Returns:
        The volume in schema ids (uint8), same shape.

    Raises:
        SeriesError: non-finite or non-integer values (``non_finite``, ``label_not_integer``),
            negative values or values the map does not list (``label_outside_schema``).
    """
    if local.dtype.kind == "f":
        if not np.all(np.isfinite(local)):
            raise SeriesError(f"{source}: label map contains NaN or infinite values", "non_finite")
        if not np.all(local == np.round(local)):
            raise SeriesError(f"{source}: label map has non-integer values (a probability map or an interpolated label?)", "label_not_integer")
    values = np.unique(local)
    if values.size and values.min() < 0:
        raise SeriesError(f"{source}: negative label values {values[values < 0][:5].tolist()}", "label_outside_schema")
    int_map = SiteLabelMap(
        label_map.schema_name, label_map.schema_version, {k: v for k, v in label_map.mapping.items() if isinstance(k, int)}, label_map.source
    )
    try:
        table = int_map.lookup_table(schema, values, source, unknown_to_ignore)
    except SchemaError as exc:
        raise SeriesError(str(exc), "label_outside_schema") from None
    if not values.size:
        return np.zeros(local.shape, np.uint8)
    if values.max() <= _DENSE_LUT_MAX:
        lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
        for v, target in table.items():
            lut[v] = target
        return lut[local.astype(np.int64)]
    # sparse huge values (1e20 in a float label): a table indexed by value cannot be built;
    # index by rank among the distinct values instead
    targets = np.array([table[int(v)] for v in values], dtype=np.uint8)
    return targets[np.searchsorted(values, local)]


def seg_referenced_series(path: Path) -> str:
    """The SeriesInstanceUID a DICOM SEG was drawn on (see `seg_references`).

    Args:
        path: the SEG file.

    Returns:
        The referenced series' UID.

    Raises:
        SeriesError: the SEG references no series (code ``seg_unreferenced``).
    """
    return seg_references(path)[0]


def seg_references(path: Path) -> tuple[str, set[str]]:
    """The source series a DICOM SEG was drawn on: its SeriesInstanceUID and the SOP
    instances it lists (empty when the SEG does not list them).

    Args:
        path: the SEG file.

    Returns:
        (series instance UID, referenced SOP instance UIDs).

    Raises:
        SeriesError: the SEG references no series (code ``seg_unreferenced``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    try:
        ref = ds.ReferencedSeriesSequence[0]
        uid = str(ref.SeriesInstanceUID)
    except (AttributeError, IndexError):
        raise SeriesError(f"{path}: DICOM SEG does not reference a source series (ReferencedSeriesSequence)", "seg_unreferenced") from None
    sops = {str(item.ReferencedSOPInstanceUID) for item in ref.get("ReferencedInstanceSequence") or [] if "ReferencedSOPInstanceUID" in item}
    return uid, sops


def read_seg(path: Path, series: Series, order: list[int], label_map: SiteLabelMap, schema: LabelSchema, unknown_to_ignore: bool = False) -> np.ndarray:
    """A DICOM SEG on its source series' grid as schema ids, voxel order [i, j, k] like the image.

    Segments are matched to the label map by their SegmentLabel (or, failing that, their
    segment number). Frames are placed by the source SOP instances they reference, so the
    label lands on exactly the image's slices.

    Args:
        path: the SEG file.
        series: the series it was drawn on.
        order: slice index k -> index into ``series.slices`` (`Geometry.order`).
        label_map: the site label map.
        schema: the federation's label schema.
        unknown_to_ignore: map segments the map does not list to the ignore label instead of refusing.

    Returns:
        The label volume in schema ids (uint8), [column, row, slice].

    Raises:
        SeriesError: an unreadable SEG (``corrupt_seg``), frames that do not fit the series
            (``seg_grid_mismatch``), or segments the map does not list (``label_outside_schema``).
    """
    import highdicom as hd  # here: only a DICOM SEG label needs it (its import costs 0.1 s of start-up)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = hd.seg.segread(str(path))
    except Exception as exc:  # noqa: BLE001
        raise SeriesError(f"{path}: unreadable DICOM SEG ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})", "corrupt_seg") from None
    try:
        seg_grid = (int(seg.Rows), int(seg.Columns))
    except (AttributeError, TypeError, ValueError):
        seg_grid = None
    if seg_grid != (series.first.rows, series.first.cols):
        # before decoding: frames are allocated as the SEG's header declares them
        raise SeriesError(f"{path}: SEG frames are {seg_grid} but the images are {(series.first.rows, series.first.cols)}", "seg_grid_mismatch")
    numbers = list(seg.get_segment_numbers())
    lut = np.zeros(max(numbers, default=0) + 1, dtype=np.uint8)
    unknown = []
    for number in numbers:
        desc = seg.get_segment_description(number)
        name = str(desc.segment_label)
        target = label_map.mapping.get(name, label_map.mapping.get(number))
        if target is None:
            if unknown_to_ignore:
                lut[number] = schema.ignore_label
                continue
            unknown.append(f"{number}:{name}")
            continue
        lut[number] = schema.ignore_label if target == IGNORE else schema.classes[target]
    if unknown:
        raise SeriesError(
            f"{path}: segments {unknown} are not in the site label map {label_map.source} (map their names there)",
            "label_outside_schema",
        )
    uids = [series.slices[i].sop_uid for i in order]
    try:
        # highdicom lets pydicom pick any plugin: keep GDCM (which may abort() on a crafted
        # frame) out of this process
        with warnings.catch_warnings(), in_process_plugins_only():
            warnings.simplefilter("ignore")
            pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True, ignore_spatial_locations=True, dtype=np.uint16)
    except Exception as exc:  # noqa: BLE001
        raise SeriesError(
            f"{path}: SEG frames do not match the slices of series {series.first.series_uid[-12:]}… ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})",
            "seg_grid_mismatch",
        ) from None
    if pixels.shape[1:] != (series.first.rows, series.first.cols):
        raise SeriesError(f"{path}: SEG frames are {pixels.shape[1:]} but the images are {(series.first.rows, series.first.cols)}", "seg_grid_mismatch")
    label: np.ndarray = lut[np.transpose(pixels, (2, 1, 0))]
    return label
