"""Header facts of a fetched series for the index (modality, geometry, grid regularity,
transfer syntaxes, pixel data), read with pydicom."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom

from fedimg_testing.public_dicom.catalogue import REGULAR_GRID_TOLERANCE_MM


def _describe(files: list[Path]) -> dict:
    """Header facts of a series (for the index), read with pydicom."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # real-world headers: odd VRs/values are expected
        return _describe_quiet(files)


def _describe_quiet(files: list[Path]) -> dict:
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    first = dss[0]

    def floats(ds, kw):
        v = ds.get(kw)
        if v is None:
            return None
        try:
            return [float(x) for x in v]
        except (TypeError, ValueError):
            return None

    tsyntaxes = sorted({str(ds.file_meta.get("TransferSyntaxUID", "")) for ds in dss})
    ts_names = []
    for uid in tsyntaxes:
        try:
            ts_names.append(pydicom.uid.UID(uid).name)
        except Exception:  # noqa: BLE001
            ts_names.append(uid)
    iops = [floats(ds, "ImageOrientationPatient") for ds in dss]
    ipps = [floats(ds, "ImagePositionPatient") for ds in dss]
    has_geom = all(v is not None and len(v) == 6 for v in iops) and all(v is not None and len(v) == 3 for v in ipps)
    single_orientation = False
    oblique = None
    n_positions = len({tuple(round(x, 3) for x in p) for p in ipps if p})
    spacing = None
    grid_dev = None
    drift = None
    if has_geom:
        arr = np.array(iops)
        single_orientation = bool(np.allclose(arr, arr[0], atol=1e-4))
        comps = np.abs(arr[0])
        oblique = bool(not np.all(np.isclose(comps, 0, atol=1e-4) | np.isclose(comps, 1, atol=1e-4)))
        if single_orientation and len(files) > 1:
            normal = np.cross(arr[0][:3], arr[0][3:])
            pos = np.array(ipps)
            dist = pos @ normal
            order = np.argsort(dist, kind="stable")
            d = dist[order]
            spacing = float((d[-1] - d[0]) / (len(d) - 1))
            grid_dev = float(np.max(np.abs(d - (d[0] + spacing * np.arange(len(d))))))
            inplane = (pos[order] - pos[order[0]]) - np.outer(d - d[0], normal)
            drift = float(np.max(np.linalg.norm(inplane, axis=1)))
    # Pixel data: decode first, middle and last file (by name) and look for a real image.
    pixel_state = "missing"
    if "PixelData" in pydicom.dcmread(files[0]):
        pixel_state = "constant"
        for f in {files[0], files[len(files) // 2], files[-1]}:
            try:
                a = pydicom.dcmread(f).pixel_array
            except Exception:  # noqa: BLE001 - a decoder may be missing here
                pixel_state = "undecodable"
                break
            if a.size and a.max() != a.min():
                pixel_state = "real"
                break
    sop_uids = {str(ds.get("SOPInstanceUID", "")) for ds in dss}
    volume = (
        has_geom
        and single_orientation
        and n_positions == len(files)
        and pixel_state in ("real", "constant")
        and len(sop_uids) == len(files)
        and len({(ds.get("Rows"), ds.get("Columns")) for ds in dss}) == 1
    )
    return {
        "modality": str(first.get("Modality", "")),
        "sop_class_uid": str(first.get("SOPClassUID", "")),
        "series_instance_uid": str(first.get("SeriesInstanceUID", "")),
        "manufacturer": str(first.get("Manufacturer", "")),
        "transfer_syntaxes": tsyntaxes,
        "transfer_syntax_names": ts_names,
        "rows": int(first.get("Rows", 0) or 0),
        "columns": int(first.get("Columns", 0) or 0),
        "pixel_spacing": floats(first, "PixelSpacing"),
        "image_orientation": iops[0] if has_geom else None,
        "has_geometry": has_geom,
        "single_orientation": single_orientation,
        "oblique": oblique,
        "n_positions": n_positions,
        "slice_spacing": spacing,
        # Largest distance (mm, along the normal) of a slice from the regular grid through the
        # first and last slice; regular_grid: within REGULAR_GRID_TOLERANCE_MM.
        "max_grid_deviation_mm": grid_dev,
        "regular_grid": None if grid_dev is None else bool(grid_dev <= REGULAR_GRID_TOLERANCE_MM),
        # Largest in-plane offset (mm) of a slice origin from the first slice's normal line
        # (non-zero for gantry tilt / sheared stacks).
        "inplane_drift_mm": drift,
        "pixel_data": pixel_state,
        "volume": bool(volume),
        "series_uids_in_dir": len({str(ds.get("SeriesInstanceUID", "")) for ds in dss}),
    }
