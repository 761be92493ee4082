"""Schema-driven training transforms (pipelines.transforms) on tiny NIfTI volumes."""

import dataclasses
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, LoadImage, RandFlipd, ScaleIntensityd

from pipelines import transforms as T
from pipelines.transforms import cached_dataset, deterministic_transforms, intensity_transform
from preprocessing.schema import ModalityRule, load_schema


@pytest.fixture(scope="module")
def schema():
    s = load_schema()
    # an extra modality with no intensity change, so geometry tests can compare raw values
    return dataclasses.replace(s, modalities={**s.modalities, "RAW": ModalityRule(normalisation="none")})


def write_nifti(path, data, affine):
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return str(path)


def ct_formula(x):
    return (np.clip(x, -54.0, 258.0) - 100.0) / 50.0


# ---------------------------------------------------------------- intensity


def test_ct_window_is_clip_then_centre_and_scale(tmp_path, schema):
    values = np.array([-1000, -55, -54, -53.5, 0, 99.25, 100, 150, 257, 258, 258.5, 3000], dtype=np.float32)
    data = np.resize(values, (4, 3, 2)).astype(np.float32)
    item = {"image": write_nifti(tmp_path / "ct.nii.gz", data, np.eye(4))}
    out = deterministic_transforms(schema, "CT", spacing=None)(item)
    assert out["image"].dtype == torch.float32
    got = out["image"].as_tensor().numpy()[0]
    np.testing.assert_allclose(got, ct_formula(data), rtol=0, atol=1e-5)
    assert got.min() == pytest.approx(-3.08, abs=1e-6) and got.max() == pytest.approx(3.16, abs=1e-6)
    # the same rule object straight on a tensor
    direct = intensity_transform(schema.modalities["CT"])({"image": torch.as_tensor(data)[None]})["image"]
    np.testing.assert_allclose(np.asarray(direct)[0], ct_formula(data), rtol=0, atol=1e-5)


def test_ct_rule_comes_from_the_schema(schema):
    rule = ModalityRule(normalisation="ct_window", clip=(0.0, 1000.0), centre=500.0, scale=250.0)
    x = torch.tensor([[-10.0, 0.0, 250.0, 500.0, 1000.0, 1200.0]])
    out = intensity_transform(rule)({"image": x})["image"]
    np.testing.assert_allclose(np.asarray(out), [[-2, -2, -1, 0, 2, 2]], atol=1e-6)


def test_mr_zscore_over_nonzero_voxels(tmp_path, schema):
    rng = np.random.default_rng(0)
    data = np.zeros((10, 10, 6), dtype=np.float32)  # air
    data[2:8, 2:8, 1:5] = rng.normal(500.0, 80.0, (6, 6, 4))  # body
    item = {"image": write_nifti(tmp_path / "mr.nii.gz", data, np.eye(4))}
    got = deterministic_transforms(schema, "MR", spacing=None)(item)["image"].as_tensor()[0].numpy()
    body = data != 0
    assert got[body].mean() == pytest.approx(0.0, abs=1e-5)
    assert got[body].std() == pytest.approx(1.0, abs=1e-4)
    assert np.all(got[~body] == 0)  # background untouched
    # the alternative: statistics over the whole volume (depends on how much air is in view)
    whole = deterministic_transforms(schema, "MR", spacing=None, zscore_nonzero=False)(item)["image"].as_tensor()[0].numpy()
    assert whole.mean() == pytest.approx(0.0, abs=1e-5) and whole.std() == pytest.approx(1.0, abs=1e-4)
    assert not np.allclose(whole, got)


def test_unknown_modality_and_normalisation_are_clear_errors(schema):
    with pytest.raises(ValueError, match="no rule for modality 'PET'"):
        deterministic_transforms(schema, "PET")
    with pytest.raises(ValueError, match="unknown normalisation"):
        intensity_transform(ModalityRule(normalisation="minmax"))


# ---------------------------------------------------------------- geometry


def test_anisotropic_volume_resampled_to_schema_spacing(tmp_path, schema):
    assert schema.target_spacing == (1.5, 1.5, 1.5)
    shape, spacing, origin = (13, 10, 5), (1.0, 1.0, 3.0), (-20.0, 7.0, 30.0)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    z_mm = np.arange(shape[2]) * spacing[2]
    data = np.broadcast_to(10.0 * z_mm, shape).astype(np.float32)  # a ramp of 10 HU/mm along S, inside the window
    item = {"image": write_nifti(tmp_path / "img.nii.gz", data, affine)}
    out = deterministic_transforms(schema, "CT")(item)["image"]  # spacing="schema"
    # MONAI keeps the extent between first and last voxel centres: (n - 1) * sp / 1.5 + 1 voxels
    assert tuple(out.shape) == (1, 9, 7, 9)
    np.testing.assert_allclose(out.affine[:3, :3].numpy(), np.diag([1.5, 1.5, 1.5]), atol=1e-6)
    np.testing.assert_allclose(out.affine[:3, 3].numpy(), origin, atol=1e-6)  # first voxel centre stays put
    assert out.pixdim.tolist() == pytest.approx([1.5, 1.5, 1.5])
    # linear interpolation reproduces a linear ramp exactly
    expected_z = ct_formula(10.0 * 1.5 * np.arange(9))
    np.testing.assert_allclose(out.as_tensor()[0].numpy(), np.broadcast_to(expected_z, (9, 7, 9)), atol=1e-4)


@pytest.mark.parametrize("label_dtype", [torch.long, torch.uint8])
def test_labels_resampled_nearest_keep_ignore_and_stay_integer(tmp_path, schema, label_dtype):
    shape = (13, 10, 5)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    label = np.zeros(shape, dtype=np.uint8)
    label[1:7, 1:6, 1:4] = 3
    label[6:12, 5:9, 2:5] = 1
    label[0:5, 6:10, 0:2] = 255  # a site's "ignore" voxels
    image = label.astype(np.float32) * 7.0 - 40.0  # any image; only its grid matters here
    item = {
        "image": write_nifti(tmp_path / "img.nii.gz", image, affine),
        "label": write_nifti(tmp_path / "lab.nii.gz", label, affine),
    }
    out = deterministic_transforms(schema, "CT", label_dtype=label_dtype)(item)
    lab = out["label"]
    assert lab.dtype == label_dtype and lab.shape == out["image"].shape == (1, 9, 7, 9)
    values = set(torch.unique(lab.as_tensor()).tolist())
    assert values <= {0, 1, 3, schema.ignore_label} and schema.ignore_label in values and {1, 3} <= values
    # where an output voxel centre falls on an input voxel centre, nearest gives exactly that voxel
    src = np.linalg.inv(affine)
    for idx in np.ndindex(*lab.shape[1:]):
        p = src @ (lab.affine.numpy() @ np.array([*idx, 1.0]))
        if np.allclose(p, np.round(p), atol=1e-6):
            assert lab[0][idx].item() == label[tuple(np.round(p[:3]).astype(int))]


def test_lps_input_comes_out_ras_with_the_same_value_at_each_world_point(tmp_path, schema):
    shape = (5, 4, 3)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # voxel axes point to L, P, S (LPS+)
    affine[:3, 3] = (10.0, 20.0, -5.0)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    labels = (data % 4).astype(np.uint8)
    item = {
        "image": write_nifti(tmp_path / "img.nii.gz", data, affine),
        "label": write_nifti(tmp_path / "lab.nii.gz", labels, affine),
    }
    out = deterministic_transforms(schema, "RAW", spacing=None)(item)
    img, lab = out["image"], out["label"]
    ras = img.affine.numpy()
    assert nib.aff2axcodes(ras) == ("R", "A", "S")
    assert np.all(np.diag(ras)[:3] > 0) and np.allclose(ras, lab.affine.numpy())
    assert not np.array_equal(img.as_tensor()[0].numpy(), data)  # really flipped
    to_out = np.linalg.inv(ras)
    for idx in np.ndindex(*shape):
        world = affine @ np.array([*idx, 1.0])
        j = to_out @ world
        assert np.allclose(j, np.round(j), atol=1e-6)
        j = tuple(np.round(j[:3]).astype(int))
        assert img[0][j].item() == data[idx] and lab[0][j].item() == labels[idx]


def test_image_only_item_for_inference(tmp_path, schema):
    item = {"image": write_nifti(tmp_path / "img.nii.gz", np.zeros((7, 7, 3), np.float32), np.diag([1, 1, 3, 1.0]))}
    out = deterministic_transforms(schema, "CT")(item)
    assert "label" not in out and tuple(out["image"].shape) == (1, 5, 5, 5)


# ---------------------------------------------------------------- persistent cache


@pytest.fixture
def case_items(tmp_path):
    rng = np.random.default_rng(1)
    items = []
    for i in range(2):
        affine = np.diag([1.0, 1.0, 3.0, 1.0])
        img = rng.normal(60, 100, (8, 7, 4)).astype(np.float32)
        lab = rng.integers(0, 3, (8, 7, 4)).astype(np.uint8)
        items.append(
            {
                "image": write_nifti(tmp_path / f"img{i}.nii.gz", img, affine),
                "label": write_nifti(tmp_path / f"lab{i}.nii.gz", lab, affine),
            }
        )
    return items


@pytest.fixture
def load_count(monkeypatch):
    calls = []
    original = LoadImage.__call__

    def counting(self, filename, *args, **kwargs):
        calls.append(str(filename))
        return original(self, filename, *args, **kwargs)

    monkeypatch.setattr(LoadImage, "__call__", counting)
    return calls


def test_persistent_cache_written_once_then_read(tmp_path, schema, case_items, load_count):
    cache = tmp_path / "cache"
    chain = deterministic_transforms(schema, "CT")
    first = cached_dataset(case_items, chain, cache)
    assert first.cache_dir == cache / chain.fingerprint and chain.fingerprint.startswith("abdominal-ct-1.0.0-CT-")
    a = [first[i] for i in range(len(first))]
    assert len(load_count) == 4  # 2 cases x (image, label)
    files = sorted(first.cache_dir.glob("*.pt"))
    assert len(files) == 2

    second = cached_dataset(case_items, deterministic_transforms(schema, "CT"), cache)  # a new process would do this
    b = [second[i] for i in range(len(second))]
    assert len(load_count) == 4  # nothing loaded again
    assert sorted(second.cache_dir.glob("*.pt")) == files
    for x, y in zip(a, b):
        assert set(x) == set(y) == {"image", "label", "image_affine", "label_affine"}
        for k in x:  # same values and the same plain-tensor types on a miss and on a hit
            assert type(x[k]) is type(y[k]) is torch.Tensor and x[k].dtype == y[k].dtype and torch.equal(x[k], y[k])
    assert b[0]["label"].dtype == torch.long and b[0]["image_affine"][2, 2].item() == pytest.approx(1.5)

    other = cached_dataset(case_items, deterministic_transforms(schema, "CT", spacing=(2.0, 2.0, 2.0)), cache)
    assert other.cache_dir != first.cache_dir
    other[0]
    assert len(load_count) == 6 and len(list(other.cache_dir.glob("*.pt"))) == 1


def test_cache_recomputes_a_case_rewritten_in_place(tmp_path, schema, case_items, load_count):
    ds = cached_dataset(case_items, deterministic_transforms(schema, "CT"), tmp_path / "cache")
    before = ds[0]["image"]
    arr = nib.load(case_items[0]["image"]).get_fdata().astype(np.float32) + 50.0
    write_nifti(case_items[0]["image"], arr, np.diag([1.0, 1.0, 3.0, 1.0]))
    st = os.stat(case_items[0]["image"])
    os.utime(case_items[0]["image"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    n = len(load_count)
    after = cached_dataset(case_items, deterministic_transforms(schema, "CT"), tmp_path / "cache")[0]["image"]
    assert len(load_count) == n + 2 and not torch.equal(before, after)


def test_cache_caches_the_deterministic_part_before_random_steps(tmp_path, schema, case_items, load_count):
    chain = deterministic_transforms(schema, "CT")
    train = Compose([chain, RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0)])
    ds = cached_dataset(case_items, train, tmp_path / "cache")
    assert ds.cache_dir.name == chain.fingerprint
    ds[0]
    cached = torch.load(next(ds.cache_dir.glob("*.pt")), weights_only=True)
    assert isinstance(cached["image"], torch.Tensor)  # the processed volume, not the file paths
    n = len(load_count)
    for _ in range(3):
        out = ds[0]
    assert len(load_count) == n and out["image"].shape == cached["image"].shape


def test_cache_key_covers_the_transform_chain(tmp_path, schema, monkeypatch):
    fp = deterministic_transforms(schema, "CT").fingerprint
    assert deterministic_transforms(schema, "CT").fingerprint == fp  # stable
    assert deterministic_transforms(schema, "CT", spacing=schema.target_spacing).fingerprint == fp
    assert deterministic_transforms(schema, "MR").fingerprint != fp
    assert deterministic_transforms(schema, "CT", spacing=None).fingerprint != fp
    assert deterministic_transforms(dataclasses.replace(schema, version="1.1.0"), "CT").fingerprint != fp
    wider = {**schema.modalities, "CT": dataclasses.replace(schema.modalities["CT"], clip=(-100.0, 300.0))}
    assert deterministic_transforms(dataclasses.replace(schema, modalities=wider), "CT").fingerprint != fp
    monkeypatch.setattr(T, "TRANSFORMS_VERSION", T.TRANSFORMS_VERSION + 1)
    assert deterministic_transforms(schema, "CT").fingerprint != fp
    with pytest.raises(ValueError, match="needs a fingerprint"):
        cached_dataset([], Compose([ScaleIntensityd(keys="image")]), tmp_path / "cache")
    with pytest.raises(ValueError, match="needs a fingerprint"):  # deterministic steps the key would not cover
        cached_dataset([], Compose([deterministic_transforms(schema, "CT"), ScaleIntensityd(keys="image")]), tmp_path)
