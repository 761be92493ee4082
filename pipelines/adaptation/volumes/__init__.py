"""Geometry and I/O for 2D segmentation on the data factory's axial slices (domain adaptation).

Modules: `geometry` (squaring a slice and back), `labelled` (training pairs, few-shot
choice), `inference` (2D model on a volume), `nifti` (reference in, label map out) and
`dicom` (DICOM series in, DICOM SEG out); every name is importable from this package.

Three things, all on exactly the slice geometry of `pipelines.factory.slices` (the GAN's):

* `labelled_slices` -- a prepared dataset's labelled cases as 2D training pairs: images
  identical to `dataset_slices` (same settings, same chain, same pad/resize) and the schema
  labels of the same slices (resampled nearest, padded with background 0, resized nearest).
  `few_shot_selection` picks the few target slices a few-shot experiment may use.
* `predict_volume_2d` -- whole-volume inference with a 2D model: every axial slice through
  the same chain, probabilities mapped back (resize, un-pad, then MONAI's inverse of the
  Orientation/Spacing steps) onto the input's own voxel grid, argmax there.
  `predict_dicom_series` does the same for a DICOM series (converted exactly as
  `site-agent prepare` converts it).
* `write_label_nifti` / `write_dicom_seg` -- the result as a NIfTI label map on the
  reference grid, or as a DICOM SEG of the source series; atomic writes, nothing partial.

Slice geometry (per case)::

    NIfTI -> pipelines.transforms.deterministic_transforms(keys=("image", "label"))
      (RAS+, resampled to the settings' spacing: image bilinear, label nearest)
    -> image: intensity_to_unit, slices along the last axis, pad to a square with -1,
       resize to size x size (bilinear, anti-aliased)          = `dataset_slices`
    -> label: slices along the last axis, pad with 0 (background), resize to size x size
       with nearest neighbour ("nearest-exact": sampling at pixel centres, the same
       alignment as the image's bilinear resize with align_corners=False)

Labels are schema ids. Voxels a site marked as unknown carry the schema's ignore label
(`LabelledSlices.ignore_label`, 255 by default), which the losses of `pipelines.losses`
(``ignore_index``) and `pipelines.evaluation.dice_per_class` leave out; classes a case does
not label are 0 in its label map (partial labels): `LabelledSlices.labeled_classes` says
which classes each case labels, for the marginal loss. No Fed-BioMed import.
"""

from __future__ import annotations

from pipelines.adaptation.volumes.dicom import GRID_TOLERANCE_MM, SeriesGrid, predict_dicom_series, series_grid, write_dicom_seg
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
    "square_labels",
    "unsquare",
    "write_dicom_seg",
    "write_label_nifti",
)
