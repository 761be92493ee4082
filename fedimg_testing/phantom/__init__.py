"""A deterministic abdominal-CT phantom that writes real DICOM series (for tests and demos).

The package's modules: `tissues` (tissues, HU per contrast phase, the default sites),
`volume` (anatomy, CT volume, `mr_like`), `identifiers` (planted PHI), `dicom_series`
(writing a series, its affines) and `site` (a whole site with labels and label map); every
name is importable from ``fedimg_testing.phantom`` itself.

The phantom stands in for a hospital's data: a contrast-enhanced abdominal CT with the
organs and lesions of the federation schema, written the way a PACS export looks
(one CT Image Storage file per slice, random file names, compressed transfer syntaxes,
identifying data in every usual header place) plus a site's labels (NIfTI like ITK or
3D Slicer writes them, or a DICOM SEG) and the site's label map. What it offers:

* :func:`make_phantom` -- HU volume + schema label volume. Anatomy (shapes, positions,
  lesions) depends only on the seed, intensities only on the contrast phase, so the
  same patient can be "scanned" in several phases (a real intensity domain shift).
* :func:`write_dicom_series` -- one series per volume, any orthonormal orientation,
  native or lossless-compressed pixel data, planted identifiers
  (:class:`PlantedIdentifiers`) that a byte scan of any derived output can look for.
* :func:`write_phantom_site` -- a whole site: ``dicom/<case>/``, ``labels/<case>``,
  ``site-labels.yaml``, labelling only the site's classes with site-local values.

The `brain` module is a second phantom, T1 brain MRI for atlas-registration federations
(FedSR): a template head, subjects as smooth random deformations of it, per-site scanner
profiles (:data:`BRAIN_SITES`), MR DICOM sites labelled for none, some or all cases
(:func:`write_brain_site`) and the federation's atlas (:func:`write_brain_atlas`).

Geometry conventions (the same as DICOM/ITK): the volume is indexed ``[x, y, z]`` =
``[column, row, slice]``; voxel ``(i, j, k)`` sits at ``origin + i*dx*r + j*dy*c +
k*dz*n`` in patient LPS, where ``r`` (first three values of ImageOrientationPatient)
is the direction of increasing column index, ``c`` that of increasing row index and
``n = r x c``. With the default orientation +x is the patient's left, +y posterior and
+z superior; the liver therefore lies at low x.
"""

from __future__ import annotations

from fedimg_testing.phantom.brain import (
    ATLAS_CONTRAST,
    BRAIN_FOV_MM,
    BRAIN_SITES,
    BRAIN_TISSUES,
    FREESURFER_VALUES,
    BrainAtlas,
    BrainScan,
    BrainSite,
    BrainSiteProfile,
    BrainVolume,
    brain_schema,
    make_brain_atlas,
    make_brain_scan,
    make_brain_subject,
    make_brain_template,
    t1_intensities,
    warp_nearest,
    write_brain_atlas,
    write_brain_site,
)
from fedimg_testing.phantom.chest import (
    CHEST_CLASSES,
    ChestRadiograph,
    ChestScanner,
    ChestSite,
    make_chest_radiograph,
    write_chest_radiograph,
    write_chest_site,
)
from fedimg_testing.phantom.chest import SCANNERS as CHEST_SCANNERS
from fedimg_testing.phantom.dicom_series import PRIVATE_CREATOR, PRIVATE_GROUP, volume_affine_lps, volume_affine_ras, write_dicom_series
from fedimg_testing.phantom.identifiers import PlantedIdentifiers
from fedimg_testing.phantom.site import PhantomSite, site_label_volume, write_phantom_site
from fedimg_testing.phantom.tissues import HU_MAX, HU_MIN, PHASES, SITES, TISSUES
from fedimg_testing.phantom.volume import PhantomVolume, make_phantom, mr_like
from preprocessing.seg import segment_codes as _seg_codes  # noqa: F401 (former homes)
from preprocessing.seg import write_seg  # noqa: F401 (former home)

__all__ = [
    "CHEST_CLASSES",
    "CHEST_SCANNERS",
    "ChestRadiograph",
    "ChestScanner",
    "ChestSite",
    "make_chest_radiograph",
    "write_chest_radiograph",
    "write_chest_site",
    "PHASES",
    "TISSUES",
    "SITES",
    "HU_MIN",
    "HU_MAX",
    "PRIVATE_GROUP",
    "PRIVATE_CREATOR",
    "PhantomVolume",
    "PlantedIdentifiers",
    "PhantomSite",
    "make_phantom",
    "mr_like",
    "write_dicom_series",
    "volume_affine_lps",
    "volume_affine_ras",
    "write_phantom_site",
    "site_label_volume",
    "ATLAS_CONTRAST",
    "BRAIN_FOV_MM",
    "BRAIN_SITES",
    "BRAIN_TISSUES",
    "FREESURFER_VALUES",
    "BrainAtlas",
    "BrainScan",
    "BrainSite",
    "BrainSiteProfile",
    "BrainVolume",
    "brain_schema",
    "make_brain_atlas",
    "make_brain_scan",
    "make_brain_subject",
    "make_brain_template",
    "t1_intensities",
    "warp_nearest",
    "write_brain_atlas",
    "write_brain_site",
]
