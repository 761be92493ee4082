"""Slice geometry and I/O for 2D segmentation on the factory's slices (pipelines.adaptation.volumes)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from fedimg_core import atomic
from fedimg_testing.phantom import PlantedIdentifiers, make_phantom, write_dicom_series
from pipelines import transforms as T
from pipelines.adaptation import volumes as V
from pipelines.adaptation.volumes import (
    few_shot_selection,
    labelled_slices,
    predict_dicom_series,
    predict_volume_2d,
    write_dicom_seg,
    write_label_nifti,
)
from pipelines.factory import slices as S
from pipelines.factory.slices import SliceSettings, dataset_slices
from preprocessing.dataset import DatasetSchemaError, write_dataset
from preprocessing.schema import load_schema

LABELS = {"background": 0, "liver": 3, "liver_tumor": 4}
HU_THRESHOLD = 125.0


@pytest.fixture(scope="module")
def schema():
    return load_schema()


@pytest.fixture(autouse=True)
def _fresh_memory_caches():
    S.clear_memory_cache()
    V.clear_memory_cache()
    yield
    S.clear_memory_cache()
    V.clear_memory_cache()


def unit_of(hu):
    """CT HU -> [-1, 1] as intensity_to_unit maps the default schema's window [-54, 258]."""
    return (hu + 54.0) / 312.0 * 2.0 - 1.0


def phantom_case(seed, ignore=False):
    v = make_phantom(seed, "portal_venous", (48, 32, 12), (1.5, 1.5, 2.5))
    label = np.where(np.isin(v.label, (3, 4)), v.label, 0).astype(np.uint8)
    if ignore:
        label[:4, :4, :] = 255  # a corner the site marked as unknown
    return v.hu.astype(np.float32), label, np.diag([*v.spacing, 1.0])


@pytest.fixture(scope="module")
def phantom_ds(tmp_path_factory):
    """Four phantom CTs, 48 x 32 in plane: cases 0, 1 and 3 labelled (liver + tumour; case 1
    with an ignore corner), case 2 without label."""
    root = tmp_path_factory.mktemp("adapt") / "ds"
    cases = [phantom_case(1), phantom_case(2, ignore=True), phantom_case(3), phantom_case(4)]
    cases[2] = (cases[2][0], None, cases[2][2])
    write_dataset(root, "phantom", "CT", LABELS, cases)
    return root


# ------------------------------------------------------------------------ labelled slices


def test_images_are_the_factory_slices(phantom_ds, schema):
    for settings in (SliceSettings(size=32, n_bins=29), SliceSettings(size=24, n_bins=7, min_foreground=0.2)):
        images, bins = dataset_slices(phantom_ds, schema, settings)
        every = labelled_slices(phantom_ds, schema, settings, only_labelled=False)
        assert torch.equal(every.images, images) and torch.equal(every.bins, bins)
        assert every.case_ids == ["case_0000", "case_0001", "case_0002", "case_0003"]
        assert every.has_label == [True, True, False, True]
        assert every.labeled_classes == [[3, 4], [3, 4], [], [3, 4]] and every.dataset_labeled_classes == [3, 4]
        assert (every.labels[every.case_index == 2] == 255).all()  # no label file: all ignored
        labelled = labelled_slices(phantom_ds, schema, settings)
        assert labelled.case_ids == ["case_0000", "case_0001", "case_0003"]
        keep = every.case_index != 2
        assert torch.equal(labelled.images, images[keep]) and torch.equal(labelled.bins, bins[keep])
        assert torch.equal(labelled.labels, every.labels[keep])
        assert labelled.case_index.tolist() == [{0: 0, 1: 1, 3: 2}[c] for c in every.case_index[keep].tolist()]


def test_labelled_slices_fields(phantom_ds, schema):
    settings = SliceSettings(size=32, n_bins=29)
    ls = labelled_slices(phantom_ds, schema, settings)
    n = len(ls)
    assert ls.images.shape == (n, 1, 32, 32) and ls.images.dtype == torch.float32
    assert ls.labels.shape == (n, 32, 32) and ls.labels.dtype == torch.int64
    assert ls.ignore_label == 255 and ls.num_classes == 8
    assert set(torch.unique(ls.labels).tolist()) == {0, 3, 4, 255}  # schema ids, ignore kept (case 1 only)
    assert (ls.labels[ls.case_index != 1] != 255).all()
    for c, depth in enumerate(ls.depth.tolist()):
        mine = ls.case_index == c
        assert ls.slice_index[mine].tolist() == list(range(depth))  # min_foreground 0: every slice
        assert ls.bins[mine].tolist() == [i * 29 // depth for i in range(depth)]
    assert sum(ls.depth.tolist()) == n
    # 48 x 32 in plane padded to 48 x 48 with background: 8 of 48 columns each side
    assert (ls.labels[..., :5] == 0).all() and (ls.labels[..., -5:] == 0).all()


def cube_dataset(root, affine, shape=(40, 28, 10)):
    hu = np.full(shape, -54.0, np.float32)  # the window's lower end: exactly -1
    label = np.zeros(shape, np.uint8)
    hu[9:31, 6:20, 2:8] = 258.0  # upper end: exactly 1
    label[9:31, 6:20, 2:8] = 3
    return write_dataset(root, "cube", "CT", LABELS, [(hu, label, affine)])


def test_labels_align_with_images(tmp_path, schema):
    # In-plane resampling (1.1 x 0.9 mm -> 1.5 mm), padding and resizing; z already at 1.5 mm,
    # where bilinear (image) and nearest (label) resampling would disagree on the end slices.
    cube_dataset(tmp_path / "a", np.diag([1.1, 0.9, 1.5, 1.0]))
    for size in (8, 17, 40, 101):  # downsampled, about the padded side, upsampled
        ls = labelled_slices(tmp_path / "a", schema, SliceSettings(size=size, n_bins=4))
        image_mask = ls.images[:, 0] > 0
        label_mask = ls.labels == 3
        dice = 2 * (image_mask & label_mask).sum() / (image_mask.sum() + label_mask.sum())
        assert dice > 0.98, (size, float(dice))
        # no half-pixel shift between the bilinear image and the nearest-neighbour label
        shift = torch.nonzero(image_mask).float().mean(0) - torch.nonzero(label_mask).float().mean(0)
        assert shift.abs().max() < 0.25 * max(1.0, size / 30), (size, shift)  # in input pixels (padded side 30)


def test_native_grid_labels_are_the_label_slices(tmp_path, schema):
    cube_dataset(tmp_path / "b", np.diag([1.0, 1.0, 2.0, 1.0]))
    ls = labelled_slices(tmp_path / "b", schema, SliceSettings(size=40, n_bins=0, spacing=None))
    raw = torch.zeros((10, 40, 28), dtype=torch.long)
    raw[2:8, 9:31, 6:20] = 3
    assert torch.equal(ls.labels[:, :, 6:34], raw)  # 40 x 28 padded by 6 columns each side, no resize
    assert (ls.labels[:, :, :6] == 0).all() and (ls.labels[:, :, 34:] == 0).all()


def test_per_case_labelled_classes_from_the_manifest(tmp_path, schema):
    root = tmp_path / "c"
    write_dataset(root, "c", "CT", LABELS, [phantom_case(5), phantom_case(6)])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["cases"][0]["labeled_classes"] = [3]  # what `site-agent prepare` records per case
    atomic.write_json(root / "manifest.json", manifest)
    ls = labelled_slices(root, schema, SliceSettings(size=16))
    assert ls.labeled_classes == [[3], [3, 4]]
    manifest["cases"][1]["labeled_classes"] = [3, 9]
    atomic.write_json(root / "manifest.json", manifest)
    with pytest.raises(DatasetSchemaError, match=r"case_0001: labelled classes \[9\]"):
        labelled_slices(root, schema, SliceSettings(size=16))


def test_refusals(tmp_path, schema):
    hu, label, affine = phantom_case(7)
    write_dataset(tmp_path / "none", "n", "CT", LABELS, [(hu, None, affine)])
    with pytest.raises(ValueError, match=r"none: no case has a label"):
        labelled_slices(tmp_path / "none", schema, SliceSettings(size=16))
    assert len(labelled_slices(tmp_path / "none", schema, SliceSettings(size=16), only_labelled=False)) > 0
    bad = label.copy()
    bad[10:12, 10:12, 5] = 9  # not a schema id, not the ignore label
    write_dataset(tmp_path / "bad", "b", "CT", LABELS, [(hu, bad, affine)])
    with pytest.raises(ValueError, match=r"labelsTr/case_0000.nii.gz: label values \[9\]"):
        labelled_slices(tmp_path / "bad", schema, SliceSettings(size=16))


def test_cache(phantom_ds, schema, tmp_path, monkeypatch):
    settings = SliceSettings(size=16, n_bins=5)
    first = labelled_slices(phantom_ds, schema, settings, cache_dir=tmp_path)
    files = list((tmp_path / "adaptation-slices").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"

    def boom(*args, **kwargs):
        raise AssertionError("transforms ran on a cache hit")

    monkeypatch.setattr(T, "deterministic_transforms", boom)
    again = labelled_slices(phantom_ds, schema, settings, cache_dir=tmp_path)  # memory
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    again.labels.fill_(0)  # callers get copies
    V.clear_memory_cache()
    disk = labelled_slices(phantom_ds, schema, settings, cache_dir=tmp_path)
    for name in ("images", "labels", "bins", "case_index", "slice_index", "depth"):
        assert torch.equal(getattr(disk, name), getattr(first, name)), name
    with pytest.raises(AssertionError, match="transforms ran"):
        labelled_slices(phantom_ds, schema, settings, cache_dir=tmp_path, only_labelled=False)  # another key
    monkeypatch.undo()
    V.clear_memory_cache()
    files[0].write_bytes(b"damaged")
    assert torch.equal(labelled_slices(phantom_ds, schema, settings, cache_dir=tmp_path).labels, first.labels)
    assert not [p for p in (tmp_path / "adaptation-slices").iterdir() if p.name.startswith(".")]


def test_few_shot_selection(phantom_ds, schema):
    ls = labelled_slices(phantom_ds, schema, SliceSettings(size=16, n_bins=5), only_labelled=False)
    fg = ls.foreground()
    picked = few_shot_selection(ls)
    assert picked.dtype == torch.int64 and len(picked) == 3
    assert ls.case_index[picked].tolist() == [0, 1, 3]  # the first three labelled cases (2 has no label)
    for i in picked.tolist():
        c = int(ls.case_index[i])
        positions = sorted(ls.slice_index[fg & (ls.case_index == c)].tolist())
        assert int(ls.slice_index[i]) == positions[len(positions) // 2]  # the middle labelled slice
    assert torch.equal(few_shot_selection(ls, per_volume=1), picked)
    two = few_shot_selection(ls, n_volumes=2, per_volume=2)
    assert len(two) == 4 and ls.case_index[two].tolist() == [0, 0, 1, 1] and fg[two].all()
    assert len(few_shot_selection(ls, n_volumes=1, per_volume=10_000)) == int((fg & (ls.case_index == 0)).sum())
    seeded = few_shot_selection(ls, n_volumes=2, seed=3)
    assert torch.equal(seeded, few_shot_selection(ls, n_volumes=2, seed=3))
    assert set(ls.case_index[seeded].tolist()) <= {0, 1, 3}
    with pytest.raises(ValueError, match="needs 4 labelled volumes with foreground, the dataset has 3"):
        few_shot_selection(ls, n_volumes=4)
    with pytest.raises(ValueError, match="per_volume"):
        few_shot_selection(ls, per_volume="first")


def test_few_shot_random_slice_is_one_seeded_foreground_slice_per_volume(phantom_ds, schema):
    # the settings and the CLI offered "random"; the selection refused it after the factory had loaded
    ls = labelled_slices(phantom_ds, schema, SliceSettings(size=16, n_bins=5), only_labelled=False)
    fg = ls.foreground()
    picked = few_shot_selection(ls, per_volume="random", seed=5)
    assert ls.case_index[picked].tolist() == sorted(set(ls.case_index[picked].tolist())) and len(picked) == 3 and fg[picked].all()
    assert torch.equal(picked, few_shot_selection(ls, per_volume="random", seed=5))
    draws = {tuple(few_shot_selection(ls, n_volumes=1, per_volume="random", seed=s).tolist()) for s in range(8)}
    assert len(draws) > 1  # not always the same slice (the phantom's volumes have several foreground slices)


# ------------------------------------------------------------------------------ inference


def oriented_affine(codes, spacing, origin=(10.0, -20.0, 30.0)):
    """A NIfTI (RAS world) affine whose voxel axes point along `codes` (e.g. "LPS")."""
    directions = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    affine = np.eye(4)
    for axis, (code, step) in enumerate(zip(codes, spacing)):
        world, sign = directions[code]
        affine[:3, axis] = 0.0
        affine[world, axis] = sign * step
    affine[:3, 3] = origin
    return affine


def blob_volume(affine, shape):
    """CT HU: air, an elliptic body of 40 HU and an ellipsoidal 'organ' of 200 HU, all defined
    in world millimetres around the volume's centre (so any axis order sees the same anatomy)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = (np.array(shape) - 1) / 2 @ affine[:3, :3].T + affine[:3, 3]
    d = world - centre
    hu = np.full(len(d), -1000.0)
    hu[(d[:, 0] / 25) ** 2 + (d[:, 1] / 16) ** 2 < 1] = 40.0
    hu[(d[:, 0] / 13) ** 2 + ((d[:, 1] - 2) / 9) ** 2 + (d[:, 2] / 14) ** 2 < 1] = 200.0
    return hu.reshape(shape).astype(np.float32)


def threshold_predict(num_classes, calls=None):
    t = unit_of(HU_THRESHOLD)

    def predict(slices, bins):
        assert slices.dtype == torch.float32 and slices.ndim == 4 and slices.shape[1] == 1
        assert bins.dtype == torch.int64 and bins.shape == (slices.shape[0],)
        if calls is not None:
            calls.append(slices.shape[0])
        fg = torch.sigmoid((slices[:, 0] - t) * 40.0)
        probs = torch.zeros(slices.shape[0], num_classes, *slices.shape[2:])
        probs[:, 0], probs[:, 3] = 1 - fg, fg
        return probs

    return predict


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize(
    "codes, spacing, shape, size",
    [
        ("LPS", (0.9, 0.7, 3.0), (60, 50, 16), 64),  # LPS, anisotropic; upsampled slices
        ("SLP", (3.0, 0.9, 0.7), (16, 60, 50), 24),  # axes permuted; downsampled slices
    ],
)
def test_predict_volume_returns_to_the_input_grid(tmp_path, schema, codes, spacing, shape, size):
    affine = oriented_affine(codes, spacing)
    hu = blob_volume(affine, shape)
    assert nib.aff2axcodes(affine) == tuple(codes)
    path = tmp_path / "input.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), path)
    calls = []
    pred = predict_volume_2d(path, "CT", schema, SliceSettings(size=size, n_bins=29), threshold_predict(8, calls), batch=5, return_probabilities=True)
    assert pred.label.shape == shape and pred.label.dtype == np.uint8
    assert np.allclose(pred.affine, nib.load(path).affine)
    assert set(np.unique(pred.label).tolist()) <= {0, 3}
    truth = hu > HU_THRESHOLD
    assert dice(pred.label == 3, truth) > 0.9
    assert pred.probabilities.shape == (8, *shape) and pred.probabilities.dtype == np.float32
    assert np.allclose(pred.probabilities.sum(0), 1.0, atol=1e-4)
    assert np.array_equal(pred.label, pred.probabilities.argmax(0))
    assert max(calls) == 5 and sum(calls) >= 16  # batches of at most 5, every resampled slice once


def test_predict_volume_from_an_image_object(tmp_path, schema):
    affine = oriented_affine("LPS", (0.9, 0.7, 3.0))
    hu = blob_volume(affine, (60, 50, 16))
    img = nib.Nifti1Image(hu, affine)
    settings = SliceSettings(size=32, n_bins=29)
    from_object = predict_volume_2d(img, "CT", schema, settings, threshold_predict(8), channel_chunk=3)
    nib.save(img, tmp_path / "x.nii")
    from_file = predict_volume_2d(tmp_path / "x.nii", "CT", schema, settings, threshold_predict(8))
    assert np.array_equal(from_object.label, from_file.label) and from_object.probabilities is None
    with pytest.raises(ValueError, match=r"predict_fn returned 2 channels, schema abdominal-ct 1.0.0 has 8"):
        predict_volume_2d(img, "CT", schema, settings, lambda x, b: torch.zeros(len(x), 2, 32, 32))
    with pytest.raises(ValueError, match=r"predict_fn returned shape \(\d+, 8, 16, 16\), expected \(\d+, C, 32, 32\)"):
        predict_volume_2d(img, "CT", schema, settings, lambda x, b: torch.zeros(len(x), 8, 16, 16))
    with pytest.raises(ValueError, match=r"image: modality 'PET' has no intensity rule in schema abdominal-ct"):
        predict_volume_2d(img, "PET", schema, settings, threshold_predict(8))
    with pytest.raises(ValueError, match=r"missing.nii.gz: no such file"):
        predict_volume_2d(tmp_path / "missing.nii.gz", "CT", schema, settings, threshold_predict(8))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(ValueError, match=r"4d.nii.gz: expected a 3D volume, got shape \(4, 4, 4, 2\)"):
        predict_volume_2d(tmp_path / "4d.nii.gz", "CT", schema, settings, threshold_predict(8))


def test_inference_slices_are_the_training_slices(phantom_ds, schema):
    settings = SliceSettings(size=32, n_bins=29)
    ls = labelled_slices(phantom_ds, schema, settings)
    seen_slices, seen_bins = [], []

    def record(slices, bins):
        seen_slices.append(slices)
        seen_bins.append(bins)
        return threshold_predict(8)(slices, bins)

    pred = predict_volume_2d(phantom_ds / "imagesTr" / "case_0001.nii.gz", "CT", schema, settings, record, batch=7)
    assert torch.equal(torch.cat(seen_slices), ls.images[ls.case_index == 1])
    assert torch.equal(torch.cat(seen_bins), ls.bins[ls.case_index == 1])
    assert pred.label.shape == (48, 32, 12)


# ------------------------------------------------------------------------------ NIfTI out


def test_write_label_nifti(tmp_path):
    affine = oriented_affine("LPS", (0.9, 0.7, 3.0))
    ref = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), affine)
    ref.set_qform(affine, code=1)
    ref.set_sform(affine, code=2)
    ref.header["descrip"] = b"Patient Jane Doe"
    ref.header["db_name"] = b"ACC123"
    label = np.zeros((6, 5, 4), np.int64)
    label[1:3, 1:3, 1:3] = 3
    out = tmp_path / "pred.nii.gz"
    digest = write_label_nifti(label, ref, out)
    assert len(digest) == 64
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8 and np.array_equal(np.asanyarray(img.dataobj), label)
    assert np.allclose(img.affine, affine) and int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
    assert bytes(img.header["descrip"]).strip(b"\0") == b"" and bytes(img.header["db_name"]).strip(b"\0") == b""
    assert b"Jane" not in out.read_bytes() and not list(img.header.extensions)
    label[0, 0, 0] = 300
    write_label_nifti(label, ref, tmp_path / "wide.nii")
    assert nib.load(tmp_path / "wide.nii").get_data_dtype() == np.uint16
    with pytest.raises(ValueError, match=r"bad.nii.gz: label shape \(6, 5, 3\) differs from the reference grid \(6, 5, 4\)"):
        write_label_nifti(label[..., :3], ref, tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="must be named"):
        write_label_nifti(label, ref, tmp_path / "bad.nrrd")
    with pytest.raises(ValueError, match=r"\[0, 65535\]"):
        write_label_nifti(label - 1, ref, tmp_path / "neg.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz", "wide.nii"]  # nothing partial


# ------------------------------------------------------------------------------ DICOM SEG


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
    vol = make_phantom(11, "portal_venous", (40, 36, 10), (1.2, 1.0, 3.0))
    out = tmp_path_factory.mktemp("dicom") / "series"
    paths = write_dicom_series(vol, out, PlantedIdentifiers.for_case(11, 0), origin=(-30.0, -20.0, -100.0), seed=11)
    return vol, paths


def test_predict_dicom_series_and_seg_round_trip(phantom_series, schema, tmp_path):
    import highdicom as hd
    import pydicom

    vol, paths = phantom_series
    shuffled = list(reversed(paths))  # any file order: slices are sorted by position
    settings = SliceSettings(size=32, n_bins=29)

    def predict(slices, bins):
        probs = threshold_predict(8)(slices, bins)
        bright = slices[:, 0] > unit_of(200.0)  # a second class: the brightest tissue
        probs[:, 7] = torch.where(bright, 2.0, 0.0)
        return probs

    pred = predict_dicom_series(shuffled, schema, settings, predict)
    assert pred.label.shape == vol.shape and pred.sources == list(paths)  # the phantom's slice order
    assert set(np.unique(pred.label).tolist()) == {0, 3, 7}
    truth = vol.hu > HU_THRESHOLD  # thin, noisy structures, resampled there and back: a loose bound
    score = dice(pred.label > 0, truth)
    assert score > 0.6
    assert all(score > dice(pred.label > 0, np.flip(truth, axis)) + 0.2 for axis in range(3))  # no axis flipped
    out = tmp_path / "pred.dcm"
    write_dicom_seg(pred.label, shuffled, {3: "liver", 7: "spleen"}, out, schema, algorithm_name="test model")
    seg = hd.seg.segread(out)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "spleen"]
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    expected = np.select([pred.label == 3, pred.label == 7], [1, 2], 0).transpose(2, 1, 0)  # [slice, row, column]
    assert np.array_equal(pixels, expected)
    for number, value in ((1, 3), (2, 7)):
        mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[number], combine_segments=True, assert_missing_frames_are_empty=True)
        assert np.array_equal(mask > 0, (pred.label == value).transpose(2, 1, 0))

    # The same label on the prepared (canonical RAS+) grid lands on the same SEG pixels.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(pred.label, pred.affine))
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S") and nib.aff2axcodes(pred.affine) != ("R", "A", "S")
    write_dicom_seg(canonical, paths, {3: "liver", 7: "spleen"}, tmp_path / "canonical.dcm", schema)
    again = hd.seg.segread(tmp_path / "canonical.dcm").get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(again, expected)

    with pytest.raises(ValueError, match=r"label values \[7\] have no class name"):
        write_dicom_seg(pred.label, paths, {3: "liver"}, tmp_path / "x.dcm", schema)
    with pytest.raises(ValueError, match=r"does not match the DICOM series grid"):
        write_dicom_seg(pred.label[:, :, :-1], paths, None, tmp_path / "x.dcm", schema)
    shifted = nib.Nifti1Image(pred.label, pred.affine @ np.array([[1, 0, 0, 1.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    with pytest.raises(ValueError, match=r"grid differ by up to 1.2000 mm"):
        write_dicom_seg(shifted, paths, None, tmp_path / "x.dcm", schema)
    assert not (tmp_path / "x.dcm").exists()
