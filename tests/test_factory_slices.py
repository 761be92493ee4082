"""2D slices of prepared datasets for the data factory (pipelines.factory.slices)."""

import dataclasses

import numpy as np
import pytest
import torch

from fedimg_testing.phantom import make_phantom
from pipelines import transforms as T
from pipelines.factory import slices as S
from pipelines.factory.slices import SliceSettings, dataset_slices, intensity_to_unit, volume_slices
from preprocessing.dataset import write_dataset
from preprocessing.schema import ModalityRule, load_schema

CT_LABELS = {"background": 0, "liver": 3}


@pytest.fixture(scope="module")
def schema():
    s = load_schema()
    return dataclasses.replace(s, modalities={**s.modalities, "RAW": ModalityRule(normalisation="none")})


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    S.clear_memory_cache()
    yield
    S.clear_memory_cache()


def ct_unit(hu):
    """The expected [-1, 1] value of a CT voxel: the schema window [-54, 258] HU onto [-1, 1]."""
    return np.clip((np.asarray(hu, dtype=np.float64) + 54.0) / 312.0 * 2.0 - 1.0, -1.0, 1.0)


def image_depths(path, schema, modality, spacing):
    chain = T.deterministic_transforms(schema, modality, spacing=spacing, keys=("image",))
    from preprocessing.dataset import load_dataset

    return [chain({"image": str(c.image)})["image"].shape[-1] for c in load_dataset(path).cases]


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory):
    """Two phantom CTs, non-square in plane (48 x 32 voxels of 1.5 mm, 12 slices of 2.5 mm), labelled."""
    root = tmp_path_factory.mktemp("ct") / "ds"
    vols = [make_phantom(seed, "portal_venous", (48, 32, 12), (1.5, 1.5, 2.5)) for seed in (1, 2)]
    write_dataset(
        root,
        "phantom",
        "CT",
        CT_LABELS,
        [(v.hu.astype(np.float32), (v.label == 3).astype(np.uint8) * 3, np.diag([*v.spacing, 1.0])) for v in vols],
    )
    return root


# ------------------------------------------------------------------------ intensity


def test_ct_window_endpoints_map_exactly(schema):
    rule = schema.modalities["CT"]
    lo, hi = ((c - rule.centre) / rule.scale for c in rule.clip)
    x = torch.tensor([lo - 5.0, lo, (lo + hi) / 2, hi, hi + 5.0], dtype=torch.float32)
    out = intensity_to_unit(x, rule)
    assert out.dtype == torch.float32
    assert out[0] == -1.0 and out[1] == -1.0 and out[3] == 1.0 and out[4] == 1.0
    assert abs(float(out[2])) < 1e-6


def test_zscore_and_none_rules():
    z = intensity_to_unit(torch.tensor([0.0, 1.5, -4.0, 6.0, -0.3]), ModalityRule(normalisation="zscore"))
    # the zero background the non-zero z-score leaves behind becomes -1 like the padding
    assert torch.allclose(z, torch.tensor([-1.0, 0.5, -1.0, 1.0, -0.1]))
    x = torch.arange(1001, dtype=torch.float32)
    n = intensity_to_unit(x, ModalityRule(normalisation="none"))
    assert n.min() == -1.0 and n.max() == 1.0 and abs(float(n[500])) < 1e-4
    assert (intensity_to_unit(torch.full((5,), 7.0), ModalityRule(normalisation="none")) == -1).all()


# ------------------------------------------------------------------------ one volume


def test_non_square_slices_are_padded_not_stretched(schema):
    rule = schema.modalities["CT"]
    hu = 100.0
    vol = torch.full((1, 48, 32, 6), (hu - 100.0) / 50.0)  # uniform bright tissue, 48 x 32 in plane
    images, bins = volume_slices(vol, rule, SliceSettings(size=64, n_bins=3))
    assert images.shape == (6, 1, 64, 64) and images.dtype == torch.float32
    assert bins.tolist() == [0, 0, 1, 1, 2, 2]
    # 8 columns of padding each side of 32 become 64 * 8 / 48 = 10.7 output columns
    assert (images[:, :, :, :10] == -1).all() and (images[:, :, :, -10:] == -1).all()
    inside = torch.tensor(ct_unit(hu), dtype=torch.float32)
    assert torch.allclose(images[:, :, :, 12:52], inside, atol=1e-3)  # rows not stretched either: full height
    width = (images[0, 0, 32] > -0.5).sum().item()
    assert abs(width - 64 * 32 / 48) <= 1.5


def test_downsampling_keeps_background_border_exact(schema):
    rule = schema.modalities["CT"]
    vol = torch.full((1, 128, 96, 3), 5.0)  # above the window (3.16): 1 after mapping
    images, _ = volume_slices(vol, rule, SliceSettings(size=32))
    assert images.shape == (3, 1, 32, 32)
    # anti-aliasing blurs with a zero-padded filter: run on x + 1 so the border stays -1
    assert (images[:, 0, :, 0] == -1).all() and (images[:, 0, :, -1] == -1).all()
    # no padding along rows: content reaches the top row, darkened there only by the blur
    # (the frame's outside counts as background), full value inside
    assert (images[:, 0, 0, 10:22] > 0).all() and (images[:, 0, 1:-1, 10:22] > 0.99).all()
    assert images.min() >= -1 and images.max() <= 1


def test_min_foreground_drops_empty_slices(schema):
    rule = schema.modalities["CT"]
    vol = torch.full((1, 20, 20, 10), -10.0)  # air everywhere
    vol[0, 5:15, 5:15, 3:7] = 0.0  # tissue: 25 % of four slices
    vol[0, 9:11, 9:11, 8] = 0.0  # 1 % of one slice
    images, bins = volume_slices(vol, rule, SliceSettings(size=16, n_bins=10, min_foreground=0.05))
    assert images.shape == (4, 1, 16, 16) and bins.tolist() == [3, 4, 5, 6]
    assert volume_slices(vol, rule, SliceSettings(size=16, min_foreground=0.0))[0].shape[0] == 10
    assert volume_slices(vol, rule, SliceSettings(size=16, min_foreground=0.5))[0].shape[0] == 0


# ------------------------------------------------------------------------ datasets


def test_ct_phantom_dataset(phantom_ct, schema):
    settings = SliceSettings(size=64, n_bins=29)
    images, bins = dataset_slices(phantom_ct, schema, settings)
    depths = image_depths(phantom_ct, schema, "CT", "schema")
    assert all(18 <= d <= 21 for d in depths)  # 12 slices of 2.5 mm resampled to 1.5 mm
    assert images.shape == (sum(depths), 1, 64, 64) and images.dtype == torch.float32
    assert bins.shape == (sum(depths),) and bins.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1 and images.max() > 0
    start = 0
    for depth in depths:
        b = bins[start : start + depth]
        assert (b[1:] >= b[:-1]).all() and b[0] == 0 and b[-1] == (depth - 1) * 29 // depth
        assert b.tolist() == [i * 29 // depth for i in range(depth)]
        start += depth
    # 48 x 32 in plane: the padded columns are background, exactly
    assert (images[..., :10] == -1).all() and (images[..., -10:] == -1).all()


def test_native_spacing_window_values_and_full_bin_range(tmp_path, schema):
    hu = np.full((64, 64, 40), 100.0, np.float32)
    hu[:8] = -1000.0  # air: below the window
    hu[8:16] = -54.0  # lower window end
    hu[16:24] = 258.0  # upper window end
    hu[24:32] = 3000.0  # metal: above the window
    write_dataset(tmp_path / "ds", "ct", "CT", CT_LABELS, [(hu, None, np.diag([0.8, 0.8, 3.0, 1.0]))])
    images, bins = dataset_slices(tmp_path / "ds", schema, SliceSettings(size=64, n_bins=29, spacing=None))
    assert images.shape == (40, 1, 64, 64)  # native grid, no resize: values as mapped
    assert (images[:, 0, :8] == -1).all() and (images[:, 0, 24:32] == 1).all()
    assert torch.allclose(images[:, 0, 8:16], torch.tensor(-1.0), atol=1e-6)
    assert torch.allclose(images[:, 0, 16:24], torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(images[:, 0, 32:], torch.tensor(ct_unit(100.0), dtype=torch.float32), atol=1e-3)
    assert (bins[1:] >= bins[:-1]).all() and sorted(set(bins.tolist())) == list(range(29))
    assert bins.tolist() == [i * 29 // 40 for i in range(40)]


def test_mr_zscore_dataset_without_labels(tmp_path, schema):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(2):
        img = np.zeros((24, 20, 10), np.float32)
        img[4:20, 3:17] = rng.normal(300 + 50 * i, 40, size=(16, 14, 10)).astype(np.float32)
        cases.append((img, None, np.diag([1.0, 1.0, 2.0, 1.0])))
    ds = write_dataset(tmp_path / "mr", "mr-site", "MR", {"background": 0}, cases)
    assert all(c.label is None for c in ds.cases)
    images, bins = dataset_slices(tmp_path / "mr", schema, SliceSettings(size=24, n_bins=5, spacing=None))
    assert images.shape == (20, 1, 24, 24) and bins.tolist() == [i * 5 // 10 for i in range(10)] * 2
    # 24 x 20 padded to 24 x 24: same size, so slices are exactly the mapped voxels
    chain = T.deterministic_transforms(schema, "MR", spacing=None, keys=("image",))
    z = chain({"image": str(ds.cases[0].image)})["image"][0]  # (24, 20, 10), non-zero z-score
    expected = torch.where(z == 0, torch.tensor(-1.0), z.clamp(-3, 3) / 3).permute(2, 0, 1)
    assert torch.allclose(images[:10, 0, :, 2:22], expected, atol=1e-3)
    assert (images[:, 0, :, :2] == -1).all() and (images[:, 0, :4] == -1).all()  # padding and air
    body = images[:10, 0, 4:20, 5:19]
    assert (body > -1).float().mean() > 0.99 and abs(float(body.mean())) < 0.05 and body.std() > 0.2


def test_min_foreground_on_a_dataset(phantom_ct, schema):
    settings = SliceSettings(size=32, n_bins=29, min_foreground=0.15)
    images, bins = dataset_slices(phantom_ct, schema, settings)
    chain = T.deterministic_transforms(schema, "CT", keys=("image",))
    from preprocessing.dataset import load_dataset

    expected = 0
    for case in load_dataset(phantom_ct).cases:
        unit = intensity_to_unit(chain({"image": str(case.image)})["image"][0], schema.modalities["CT"])
        expected += int(((unit > -0.95).float().mean(dim=(0, 1)) >= 0.15).sum())
    total = sum(image_depths(phantom_ct, schema, "CT", "schema"))
    assert 0 < expected < total
    assert images.shape == (expected, 1, 32, 32) and bins.shape == (expected,)


def test_disk_and_memory_cache(phantom_ct, schema, tmp_path, monkeypatch):
    settings = SliceSettings(size=32, n_bins=8)
    # the cache key is computed without building the chain; it must be the chain's fingerprint
    assert (
        S._chain_fingerprint(schema, "CT", "schema")
        == T.deterministic_transforms(schema, "CT", spacing="schema", keys=("image",), **S._CHAIN_OPTIONS).fingerprint
    )
    first = dataset_slices(phantom_ct, schema, settings, cache_dir=tmp_path)
    files = list((tmp_path / "factory-slices").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt" and len(files[0].stem) == 64
    stored = torch.load(files[0], weights_only=True)
    assert stored["images"].dtype == torch.float16 and stored["bins"].dtype == torch.long

    def boom(*args, **kwargs):
        raise AssertionError("transforms ran on a cache hit")

    monkeypatch.setattr(T, "deterministic_transforms", boom)
    again = dataset_slices(phantom_ct, schema, settings, cache_dir=tmp_path)  # memory
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    again[0].fill_(0)  # callers get copies
    S.clear_memory_cache()
    from_disk = dataset_slices(phantom_ct, schema, settings, cache_dir=tmp_path)  # disk
    assert torch.equal(from_disk[0], first[0]) and torch.equal(from_disk[1], first[1])
    # other settings: another entry, computed
    with pytest.raises(AssertionError, match="transforms ran"):
        dataset_slices(phantom_ct, schema, SliceSettings(size=16, n_bins=8), cache_dir=tmp_path)
    monkeypatch.undo()
    # a damaged file is recomputed and rewritten
    S.clear_memory_cache()
    files[0].write_bytes(b"not a torch file")
    repaired = dataset_slices(phantom_ct, schema, settings, cache_dir=tmp_path)
    assert torch.equal(repaired[0], first[0])
    assert torch.load(files[0], weights_only=True)["images"].shape[0] == first[0].shape[0]
    assert not [p for p in (tmp_path / "factory-slices").iterdir() if p.name.startswith(".")]  # no temp files left


def test_modality_without_rule_is_refused(tmp_path, schema):
    write_dataset(tmp_path / "pet", "pet", "PET", {"background": 0}, [(np.ones((8, 8, 4), np.float32), None, np.eye(4))])
    with pytest.raises(ValueError, match=r"pet.*modality 'PET' has no intensity rule in schema abdominal-ct"):
        dataset_slices(tmp_path / "pet", schema, SliceSettings(size=8))


def test_settings_are_validated():
    with pytest.raises(ValueError, match="size"):
        SliceSettings(size=2)
    with pytest.raises(ValueError, match="n_bins"):
        SliceSettings(n_bins=-1)
    with pytest.raises(ValueError, match="min_foreground"):
        SliceSettings(min_foreground=1.5)
    assert SliceSettings(spacing=[1, 2, 3]).spacing == (1.0, 2.0, 3.0)
    assert volume_slices(torch.zeros(1, 8, 8, 5), ModalityRule("zscore"), SliceSettings(size=8, n_bins=0))[1].tolist() == [0] * 5
