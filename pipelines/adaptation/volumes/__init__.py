"""Geometry and I/O for 2D segmentation on the data factory's axial slices (domain adaptation).

Modules: `geometry` (squaring a slice and back), `labelled` (training pairs, few-shot
choice), `inference` (2D model on a volume), `nifti` (reference in, label map out) and
`dicom` (DICOM series in, DICOM SEG out); every name is importable from this package.

Details: docs/design/adaptation.md, "Slice geometry and I/O".
"""

from __future__ import annotations

from pipelines.adaptation.volumes.dicom import (
    GRID_TOLERANCE_MM,
    SeriesGrid,
    predict_dicom_series,
    series_grid,
    series_image,
    write_dicom_seg,
    write_radiograph_seg,
)
from pipelines.adaptation.volumes.geometry import pad_widths, square_labels, unsquare
from pipelines.adaptation.volumes.inference import PredictFn, VolumePrediction, predict_volume_2d
from pipelines.adaptation.volumes.labelled import VOLUMES_VERSION, LabelledSlices, clear_memory_cache, few_shot_selection, labelled_slices
from pipelines.adaptation.volumes.nifti import output_stem, write_label_nifti

__all__ = (
    "GRID_TOLERANCE_MM",
    "VOLUMES_VERSION",
    "LabelledSlices",
    "PredictFn",
    "SeriesGrid",
    "VolumePrediction",
    "clear_memory_cache",
    "few_shot_selection",
    "labelled_slices",
    "output_stem",
    "pad_widths",
    "predict_dicom_series",
    "predict_volume_2d",
    "series_grid",
    "series_image",
    "square_labels",
    "unsquare",
    "write_dicom_seg",
    "write_radiograph_seg",
    "write_label_nifti",
)
