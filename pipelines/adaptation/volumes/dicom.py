"""2D inference on a DICOM series (converted as `site-agent prepare` converts it) and the
result written as a DICOM SEG of that series.

nibabel leaves most of its functions unannotated: calls to them are marked
``type: ignore[no-untyped-call]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.sr.codedict import codes

from pipelines.adaptation.volumes.inference import PredictFn, VolumePrediction, predict_volume_2d
from pipelines.factory.slices import SliceSettings
from preprocessing.dicom import SEG_SOP_CLASS, Series, SeriesError, load_series, read_header, series_geometry, slice_headers
from preprocessing.schema import LabelSchema
from preprocessing.seg import write_seg

GRID_TOLERANCE_MM = 0.01  # a label and a DICOM series are the same grid within this

LabelInput = np.ndarray | nib.spatialimages.SpatialImage | VolumePrediction
"""A label volume: an array on a series grid, or an image of that grid in any orientation."""


@dataclass
class SeriesGrid:
    """A DICOM series' voxel grid as `preprocessing.dicom.load_series` builds it.

    Args:
        series: the series' slice headers.
        shape: (columns, rows, slices).
        affine: the RAS+ voxel-to-world affine.
        sources: the instance files in slice order.
        order: the position of each slice's header in ``series``, in slice order.
    """

    series: Series
    shape: tuple[int, int, int]
    affine: np.ndarray
    sources: list[Path]
    order: list[int]


def series_grid(source_series: Sequence[str | os.PathLike[str]]) -> SeriesGrid:
    """Read the headers of one DICOM series and return its voxel grid.

    Args:
        source_series: the series' single-frame instance files, any order.

    Returns:
        The grid.

    Raises:
        ValueError: naming a file, for anything that is not one series with an exact geometry
            (see `preprocessing.dicom.series_geometry`).
    """
    files = [Path(p) for p in source_series]
    if not files:
        raise ValueError("no DICOM files given for the source series")
    headers = []
    for f in files:
        try:
            ds = read_header(f)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types
            raise ValueError(f"{f}: not a readable DICOM file ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
        if str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS:
            raise ValueError(f"{f}: a DICOM SEG, not an image of the source series")
        if "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"{f}: multi-frame images are not supported as SEG sources (one file per slice expected)")
        try:
            headers.extend(slice_headers(f, ds))
        except SeriesError as exc:
            raise ValueError(str(exc)) from None
    uids = {h.series_uid for h in headers}
    if len(uids) != 1:
        raise ValueError(f"{files[0].parent}: the files belong to {len(uids)} series; give the instances of one series")
    series = Series(headers, "series_uid")
    try:
        geometry = series_geometry(series)
    except SeriesError as exc:
        raise ValueError(str(exc)) from None
    first = series.first
    return SeriesGrid(
        series=series,
        shape=(int(first.cols), int(first.rows), len(headers)),
        affine=np.asarray(geometry.affine_ras, dtype=np.float64),
        sources=[headers[o].path for o in geometry.order],
        order=list(geometry.order),
    )


def predict_dicom_series(
    source_series: Sequence[str | os.PathLike[str]],
    schema: LabelSchema,
    settings: SliceSettings,
    predict_fn: PredictFn,
    modality: str | None = None,
    batch: int = 16,
    return_probabilities: bool = False,
) -> VolumePrediction:
    """`predict_volume_2d` on a DICOM series, converted exactly as `site-agent prepare` does.

    The conversion is `preprocessing.dicom.load_series` (HU after rescale, RAS affine from the
    headers, no interpolation). The prediction is on the series' own grid: ``label[i, j, k]``
    is column ``i``, row ``j`` of ``sources[k]`` (instances sorted along the slice normal),
    ready for `write_dicom_seg` with the same files.

    Args:
        source_series: the series' instance files, any order.
        schema: the label schema.
        settings: the factory's slice settings.
        predict_fn: the 2D model (see `predict_volume_2d`).
        modality: the intensity rule to apply (default: the series' Modality).
        batch: slices per ``predict_fn`` call.
        return_probabilities: also return the probabilities.

    Returns:
        The prediction, with ``sources`` set.

    Raises:
        ValueError: naming a file or the series, for anything `series_grid`,
            `preprocessing.dicom.load_series` or `predict_volume_2d` refuses.
    """
    image, series_modality, sources = series_image(source_series)
    pred = predict_volume_2d(image, modality or series_modality, schema, settings, predict_fn, batch, return_probabilities)
    pred.sources = sources
    return pred


def series_image(source_series: Sequence[str | os.PathLike[str]]) -> tuple[nib.Nifti1Image, str, list[Path]]:
    """A DICOM series as the NIfTI image `site-agent prepare` converts it to (HU after rescale,
    RAS affine from the headers, no interpolation), its modality and its instance files.

    Args:
        source_series: the series' instance files, any order.

    Returns:
        (image on the series' own grid, the series' Modality, instance files in slice order:
        ``image[:, :, k]`` is ``files[k]``).

    Raises:
        ValueError: naming a file or the series, for anything `series_grid` or
            `preprocessing.dicom.load_series` refuses.
    """
    grid = series_grid(source_series)
    try:
        volume = load_series(grid.series)
    except SeriesError as exc:
        raise ValueError(str(exc)) from None
    image = nib.Nifti1Image(volume.array, volume.affine_ras)  # type: ignore[no-untyped-call]
    image.set_qform(volume.affine_ras, code=1)  # type: ignore[no-untyped-call]
    image.set_sform(volume.affine_ras, code=1)  # type: ignore[no-untyped-call]
    return image, volume.modality, list(grid.sources)


def _label_on_series_grid(label: LabelInput, grid: SeriesGrid, where: str) -> np.ndarray:
    """A label given as an array on the series grid, or as an image (nibabel or
    `VolumePrediction`) of the same grid in any axis order/orientation (e.g. the canonical
    RAS+ NIfTI `site-agent prepare` writes): reoriented exactly (no interpolation)."""
    affine: np.ndarray | None
    if isinstance(label, VolumePrediction):
        data, affine = label.label, label.affine
    elif isinstance(label, nib.spatialimages.SpatialImage):
        data, affine = np.asanyarray(label.dataobj), label.affine
    else:
        data, affine = np.asarray(label), None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if affine is not None:
        transform = ornt_transform(io_orientation(affine), io_orientation(grid.affine))  # type: ignore[no-untyped-call]
        shape = data.shape
        data = apply_orientation(data, transform)  # type: ignore[no-untyped-call]
        affine = np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(transform, shape)  # type: ignore[no-untyped-call]
        if data.shape != grid.shape:
            raise ValueError(f"{where}: label grid {data.shape} (reoriented) does not match the DICOM series grid {grid.shape}")
        corners = np.array([[i, j, k, 1.0] for i in (0, grid.shape[0] - 1) for j in (0, grid.shape[1] - 1) for k in (0, grid.shape[2] - 1)])
        diff = float(np.max(np.linalg.norm((corners @ affine.T - corners @ grid.affine.T)[:, :3], axis=1)))
        if diff > GRID_TOLERANCE_MM:
            raise ValueError(
                f"{where}: the label's grid and the DICOM series' grid differ by up to {diff:.4f} mm "
                f"(tolerance {GRID_TOLERANCE_MM} mm); predict on this series (predict_dicom_series)"
            )
    elif data.shape != grid.shape:
        raise ValueError(f"{where}: label shape {data.shape} does not match the DICOM series grid {grid.shape} (columns, rows, slices sorted along the normal)")
    return np.ascontiguousarray(data)


def write_dicom_seg(
    label: LabelInput,
    source_series: Sequence[str | os.PathLike[str]],
    class_names: Mapping[int, str] | None,
    path: str | os.PathLike[str],
    schema: LabelSchema,
    *,
    algorithm_name: str = "fedimg 2D segmentation",
    algorithm_version: str = "1",
    series_number: int = 301,
    series_description: str | None = "fedimg segmentation",
) -> Path:
    """Write a label volume as a BINARY DICOM SEG of a series, atomically (`preprocessing.seg`).

    One segment per class of ``class_names``. Segments are AUTOMATIC, identified by
    ``algorithm_name``/``algorithm_version``, numbered 1..n in increasing label value;
    classes absent from the label are still described (empty segments).

    Args:
        label: an array on the series grid (``[column, row, slice]``, slices sorted along the
            normal, as `predict_dicom_series` and `preprocessing.dicom.load_series` give), or a
            nibabel image / `VolumePrediction` of the same grid in any orientation (e.g. on the
            prepared, canonical RAS+ NIfTI of this series), reoriented exactly.
        source_series: the series' instance files, any order.
        class_names: label value -> schema class name (None: every foreground class of ``schema``).
        path: the SEG file to write.
        schema: the label schema (segment descriptions).
        algorithm_name: the segmenting algorithm's name.
        algorithm_version: its version.
        series_number: the SEG's SeriesNumber.
        series_description: the SEG's SeriesDescription.

    Returns:
        ``path``.

    Raises:
        ValueError: a grid that differs from the series' by more than 0.01 mm, non-integer
            label values, or values other than 0 and those of ``class_names``.
    """
    out = Path(path)
    grid = series_grid(source_series)
    data = _label_on_series_grid(label, grid, str(out))
    local, segments = _segment_numbers(data, class_names, schema, out)
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    write_seg(
        grid.sources,
        local,
        segments,
        segments,
        out,
        schema,
        series_number=series_number,
        manufacturer="FEDIMG",
        manufacturer_model_name="fedimg adaptation",
        software_versions="fedimg",
        series_description=series_description,
        algorithm=algorithm,
    )
    return out


def write_radiograph_seg(
    label: np.ndarray,
    source: str | os.PathLike[str],
    class_names: Mapping[int, str] | None,
    path: str | os.PathLike[str],
    schema: LabelSchema,
    *,
    algorithm_name: str = "fedimg segmentation",
    algorithm_version: str = "1",
    series_number: int = 301,
    series_description: str | None = "fedimg segmentation",
) -> Path:
    """Write a radiograph's label as a BINARY DICOM SEG referencing its one image, atomically (`preprocessing.seg`).

    As `write_dicom_seg`, for a CR/DX file (no frame of reference, one frame): the label is on the image
    plane `preprocessing.radiograph.load_radiograph` gives, ``[column, row, 0]``.

    Args:
        label: (columns, rows, 1) or (columns, rows) integer label values.
        source: the radiograph's DICOM file.
        class_names: label value -> schema class name (None: every foreground class of ``schema``).
        path: the SEG file to write.
        schema: the label schema (segment descriptions).
        algorithm_name: the segmenting algorithm's name.
        algorithm_version: its version.
        series_number: the SEG's SeriesNumber.
        series_description: the SEG's SeriesDescription.

    Returns:
        ``path``.

    Raises:
        ValueError: a label whose shape is not the image's columns x rows, or values other than 0 and those of ``class_names``.
    """
    out = Path(path)
    data = np.asarray(label)
    data = data[:, :, None] if data.ndim == 2 else data
    header = pydicom.dcmread(source, stop_before_pixels=True)
    if data.shape != (int(header.Columns), int(header.Rows), 1):
        raise ValueError(f"{out}: label of shape {data.shape} is not the radiograph's columns x rows ({int(header.Columns)}, {int(header.Rows)}, 1)")
    local, segments = _segment_numbers(data, class_names, schema, out)
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    write_seg([header], local, segments, segments, out, schema, series_number=series_number, manufacturer="FEDIMG",
              manufacturer_model_name="fedimg", software_versions="fedimg", series_description=series_description, algorithm=algorithm)  # fmt: skip
    return out


def _segment_numbers(data: np.ndarray, class_names: Mapping[int, str] | None, schema: LabelSchema, out: Path) -> tuple[np.ndarray, list[str]]:
    """Label values as SEG segment numbers 1..n (increasing label value; 0: none) and the n segments' class names.

    Raises:
        ValueError: non-integer values, or values other than 0 and those of ``class_names``.
    """
    if data.dtype.kind not in "iub" and not (data.dtype.kind == "f" and np.all(data == np.round(data))):
        raise ValueError(f"{out}: label values must be integers, got dtype {data.dtype}")
    data = data.astype(np.int64)
    if class_names is None:
        class_names = {v: k for k, v in schema.classes.items() if v != 0}
    names = {int(v): str(n) for v, n in class_names.items() if int(v) != 0}
    unknown = sorted(set(np.unique(data).tolist()) - set(names) - {0})
    if unknown:
        raise ValueError(f"{out}: label values {unknown[:8]} have no class name (class_names has {sorted(names)})")
    values = sorted(names)
    lut = np.zeros(max([0, *values, int(data.max()) if data.size else 0]) + 1, dtype=np.int64)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    return lut[data], [names[v] for v in values]
