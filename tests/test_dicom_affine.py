"""DICOM geometry: the affine of a converted series (preprocessing.dicom, built with nibabel) and
the phantom writer's (fedimg_testing.phantom, highdicom's `create_affine_matrix_from_attributes`)
are bit for bit the matrix written out by hand, and each other's."""

import numpy as np
import pytest

from fedimg_testing.phantom import make_phantom, volume_affine_lps


def _by_hand(origin, row_dir, col_dir, spacing_cols, spacing_rows, dz):
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing_cols
    lps[:3, 1] = col_dir * spacing_rows
    lps[:3, 2] = np.cross(row_dir, col_dir) * dz
    lps[:3, 3] = origin
    return lps


@pytest.mark.parametrize("seed", range(5))
def test_series_geometry_affine_is_the_hand_written_one(seed, tmp_path):
    from fedimg_testing.phantom import PlantedIdentifiers, write_dicom_series
    from preprocessing.dicom import Series, read_header, series_geometry, slice_headers

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    orientation = np.round(np.concatenate([q[:, 0], q[:, 1]]), 6)  # what a header holds
    vol = make_phantom(seed, shape=(32, 32, 8), spacing=tuple(rng.uniform(0.5, 3.0, 3)))
    origin = rng.uniform(-300, 300, 3)
    files = write_dicom_series(vol, tmp_path / "s", PlantedIdentifiers.for_case(seed, 0), origin=origin, orientation=orientation)
    headers = [h for f in files for h in slice_headers(f, read_header(f))]
    geometry = series_geometry(Series(headers, "series_uid"))
    first = headers[geometry.order[0]]
    iop = first.orientation
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    positions = np.stack([h.position for h in headers])[geometry.order]
    d = positions @ np.cross(row_dir, col_dir)
    dz = float((d[-1] - d[0]) / (len(d) - 1))
    ps_row, ps_col = first.pixel_spacing
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _by_hand(positions[0], row_dir, col_dir, ps_col, ps_row, dz)
    assert np.array_equal(geometry.affine_ras, expected)
    # and highdicom's matrix for the same attributes
    from highdicom.spatial import create_affine_matrix_from_attributes

    hd_lps = create_affine_matrix_from_attributes(positions[0], [*row_dir, *col_dir], (ps_row, ps_col), dz)
    assert np.array_equal(geometry.affine_ras, np.diag([-1.0, -1.0, 1.0, 1.0]) @ hd_lps)


def test_phantom_affine_is_the_hand_written_one():
    from fedimg_testing.phantom.dicom_series import _directions

    vol = make_phantom(3, shape=(32, 32, 8), spacing=(1.2, 1.6, 3.0))
    for orientation in [(1, 0, 0, 0, 1, 0), (0.8, 0.6, 0, -0.6, 0.8, 0), (1, 0, 0, 0, 0.6, -0.8)]:
        r, c, _ = _directions(orientation)
        origin = np.array([-150.0, -180.0, -300.0])
        assert np.array_equal(volume_affine_lps(vol, origin, orientation), _by_hand(origin, r, c, 1.2, 1.6, 3.0))
