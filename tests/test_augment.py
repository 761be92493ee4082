"""Training patches (pipelines.augment.PatchSampler): shapes, crop content, padding, label
integrity under augmentation, GIN on the image only, positive/negative balance,
determinism, input checks."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipelines.augment import IGNORE_LABEL, PatchSampler, sampler_for

SHAPE = (40, 36, 20)
IGN = IGNORE_LABEL

# MONAI warns when a label has no foreground to centre positive patches on (expected here)
pytestmark = pytest.mark.filterwarnings("ignore:Num foregrounds 0")


@pytest.fixture(autouse=True)
def _seed_one_thread():
    # one intra-op thread: small tensors gain nothing from two, and on a busy 2-core box
    # OpenMP waits for a descheduled thread on every op
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def coord_image(shape=SHAPE, offset: float = 0.0) -> torch.Tensor:
    """(1, X, Y, Z) image whose voxel value is its linear index (+ offset): every value is
    unique, so a patch's position in the volume can be read off its values."""
    n = shape[0] * shape[1] * shape[2]
    return (torch.arange(n, dtype=torch.float32) + offset).reshape(1, *shape)


def blob_label(shape=SHAPE, value: int = 3, ignore_rows: int = 0) -> torch.Tensor:
    """(1, X, Y, Z) label: a 4^3 foreground blob in the middle, optionally the first
    ``ignore_rows`` x-slices set to the ignore label."""
    lab = torch.zeros(1, *shape, dtype=torch.long)
    cx, cy, cz = (s // 2 for s in shape)
    lab[0, cx - 2 : cx + 2, cy - 2 : cy + 2, cz - 2 : cz + 2] = value
    if ignore_rows:
        lab[0, :ignore_rows] = IGN
    return lab


def origin_of(patch: torch.Tensor, shape=SHAPE, offset: float = 0.0) -> tuple[int, int, int]:
    """Volume coordinates of the first voxel of a (C, ...) patch of `coord_image`."""
    idx = int(round(float(patch.reshape(-1)[0]) - offset))
    _, y_n, z_n = shape
    return idx // (y_n * z_n), (idx // z_n) % y_n, idx % z_n


def crop3d(vol: torch.Tensor, origin, roi) -> torch.Tensor:
    x, y, z = origin
    return vol[:, x : x + roi[0], y : y + roi[1], z : z + roi[2]]


# --------------------------------------------------------------------------- shapes and dtypes


def test_shapes_and_dtypes_3d():
    sampler = PatchSampler((16, 16, 8), num_samples=3, spatial_dims=3, augment=True)
    images, labels = sampler(coord_image(), blob_label())
    assert images.shape == (3, 1, 16, 16, 8)
    assert labels.shape == (3, 1, 16, 16, 8)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64


def test_shapes_and_dtypes_2d_and_multichannel():
    image = torch.cat([coord_image(), -coord_image()], dim=0).double()  # 2 channels, float64 in
    sampler = PatchSampler((16, 24), num_samples=5, spatial_dims=2, augment=True)
    images, labels = sampler(image, blob_label().int())
    assert images.shape == (5, 2, 16, 24)
    assert labels.shape == (5, 1, 16, 24)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64


def test_2d_patches_are_axial_slices_of_the_volume():
    image, label = coord_image(), blob_label(ignore_rows=6)
    roi = (16, 12)
    images, labels = PatchSampler(roi, num_samples=6, spatial_dims=2, augment=False)(image, label)
    for img, lab in zip(images, labels):
        x, y, z = origin_of(img)
        assert torch.equal(img, image[:, x : x + roi[0], y : y + roi[1], z])
        assert torch.equal(lab, label[:, x : x + roi[0], y : y + roi[1], z])


# --------------------------------------------------------------------------- content and padding


@pytest.mark.parametrize("offset", [0.0, -1000.5])
def test_without_augmentation_patches_are_exact_crops(offset):
    image, label = coord_image(offset=offset), blob_label(ignore_rows=8)
    roi = (16, 12, 8)
    images, labels = PatchSampler(roi, num_samples=8, augment=False)(image, label)
    for img, lab in zip(images, labels):
        origin = origin_of(img, offset=offset)
        assert all(0 <= o and o + r <= s for o, r, s in zip(origin, roi, SHAPE))
        assert torch.equal(img, crop3d(image, origin, roi))  # contiguous sub-block, values untouched
        assert torch.equal(lab, crop3d(label, origin, roi))  # label from the same place


def test_volume_smaller_than_roi_is_padded_with_image_minimum_and_background():
    small = (10, 12, 6)
    image = coord_image(small, offset=5.0)  # minimum 5 at voxel (0, 0, 0)
    label = torch.zeros(1, *small, dtype=torch.long)
    label[0, 2:5, 3:6, 1:4] = 7
    label[0, 8:, :, :] = IGN
    roi = (16, 16, 8)
    images, labels = PatchSampler(roi, num_samples=2, augment=False)(image, label)
    assert images.shape == (2, 1, *roi) and labels.shape == (2, 1, *roi)
    for img, lab in zip(images, labels):
        # locate the volume inside the padded patch by its voxel (1, 1, 1)
        target = float(image[0, 1, 1, 1])
        pos = (img[0] == target).nonzero()
        assert pos.shape[0] == 1
        ox, oy, oz = (int(v) - 1 for v in pos[0])
        inside = torch.zeros(roi, dtype=torch.bool)
        inside[ox : ox + small[0], oy : oy + small[1], oz : oz + small[2]] = True
        assert torch.equal(img[0][inside].reshape(small), image[0])
        assert torch.equal(lab[0][inside].reshape(small), label[0])
        assert bool((img[0][~inside] == 5.0).all()), "image padding is its minimum"
        assert bool((lab[0][~inside] == 0).all()), "label padding is background"


def test_2d_volume_smaller_than_roi_is_padded():
    small = (10, 12, 3)
    image = coord_image(small, offset=-3.0)
    label = torch.zeros(1, *small, dtype=torch.long)
    images, labels = PatchSampler((16, 16), num_samples=3, spatial_dims=2, augment=False)(image, label)
    assert images.shape == (3, 1, 16, 16) and labels.shape == (3, 1, 16, 16)
    for img in images:
        assert float(img.min()) == -3.0
        # one axial slice of the volume (10 x 12 voxels) plus padding with the minimum
        assert int((img > -3.0).sum()) >= 10 * 12 - 1


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("roi,dims", [((16, 16, 8), 3), ((16, 16), 2)])
def test_label_values_survive_augmentation(roi, dims):
    image, label = coord_image(), blob_label(value=5, ignore_rows=10)
    label[0, 30:34, 5:9, 2:6] = 1
    allowed = set(torch.unique(label).tolist())
    assert allowed == {0, 1, 5, IGN}
    sampler = PatchSampler(roi, num_samples=4, spatial_dims=dims, augment=True)
    seen: set[int] = set()
    for _ in range(15):
        _, labels = sampler(image, label)
        values = set(torch.unique(labels).tolist())
        assert values <= allowed, f"interpolated label values {sorted(values - allowed)}"
        seen |= values
    assert IGN in seen, "the ignore label is kept in patches (not merged or interpolated away)"


def _match_flipped_crop(img, image, roi):
    """(origin, flipped axes) if `img` is a flipped exact crop of `image`, else None."""
    for axes in itertools.chain.from_iterable(itertools.combinations((1, 2, 3), k) for k in range(4)):
        unflipped = torch.flip(img, axes) if axes else img
        v = float(unflipped.reshape(-1)[0])
        if v != round(v) or not 0 <= v < image.numel():
            continue
        origin = origin_of(unflipped)
        if all(o + r <= s for o, r, s in zip(origin, roi, SHAPE)) and torch.equal(unflipped, crop3d(image, origin, roi)):
            return origin, axes
    return None


def test_augmentation_changes_patches_and_moves_label_with_image():
    image, label = coord_image(), blob_label(ignore_rows=8)
    label[0, 25:30, 3:12, 2:9] = 1  # asymmetric structure so that flips show
    roi = (16, 12, 8)
    sampler = PatchSampler(roi, num_samples=4, augment=True)
    matched = flipped = unmatched = 0
    for _ in range(12):
        images, labels = sampler(image, label)
        for img, lab in zip(images, labels):
            hit = _match_flipped_crop(img, image, roi)
            if hit is None:  # zoomed or intensity-augmented
                unmatched += 1
                continue
            origin, axes = hit
            matched += 1
            flipped += bool(axes)
            expected = crop3d(label, origin, roi)
            assert torch.equal(lab, torch.flip(expected, axes) if axes else expected), "label flipped with the image"
    assert flipped > 0, "flips are applied"
    assert unmatched > 0, "intensity / zoom augmentations are applied"
    assert matched > 0


def test_augment_false_never_alters_patches():
    image, label = coord_image(), blob_label()
    sampler = PatchSampler((16, 12, 8), num_samples=4, augment=False)
    for _ in range(10):
        images, _ = sampler(image, label)
        for img in images:
            assert torch.equal(img, crop3d(image, origin_of(img), (16, 12, 8)))


# --------------------------------------------------------------------------- GIN


GIN_ON = {"prob": 1.0, "alpha": (0.5, 1.0)}


@pytest.mark.parametrize("dims,roi,augment", [(3, (16, 16, 8), True), (2, (16, 16), True), (3, (16, 12, 8), False)])
def test_gin_changes_images_not_labels(dims, roi, augment):
    """Same seed with and without GIN: the same crops, flips and labels; only the image
    intensities differ (GIN has its own random stream and never sees the label)."""
    image, label = coord_image(), blob_label(ignore_rows=8)
    plain = PatchSampler(roi, num_samples=4, spatial_dims=dims, augment=augment)
    with_gin = PatchSampler(roi, num_samples=4, spatial_dims=dims, augment=augment, gin=GIN_ON)
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        a_img, a_lab = plain(image, label)
        torch.manual_seed(seed)
        b_img, b_lab = with_gin(image, label)
        assert torch.equal(a_lab, b_lab)
        assert b_img.shape == a_img.shape and b_img.dtype == torch.float32
        for a, b in zip(a_img, b_img):
            assert not torch.allclose(a, b, atol=1e-3), "every patch goes through GIN at prob 1"
            assert float(torch.linalg.vector_norm(b)) == pytest.approx(float(torch.linalg.vector_norm(a)), rel=1e-4)


def test_gin_off_by_probability_leaves_the_sampler_unchanged():
    image, label = coord_image(), blob_label()
    plain = PatchSampler((16, 16, 8), num_samples=4)
    never = PatchSampler((16, 16, 8), num_samples=4, gin={"prob": 0.0})
    torch.manual_seed(7)
    a_img, a_lab = plain(image, label)
    torch.manual_seed(7)
    b_img, b_lab = never(image, label)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)


def test_gin_follows_the_global_seed():
    image, label = coord_image(), blob_label()
    sampler = PatchSampler((16, 16, 8), num_samples=2, gin=GIN_ON)
    torch.manual_seed(5)
    first, _ = sampler(image, label)
    torch.manual_seed(5)
    again, _ = PatchSampler((16, 16, 8), num_samples=2, gin=GIN_ON)(image, label)
    assert torch.equal(first, again)
    torch.manual_seed(6)
    other, _ = sampler(image, label)
    assert not torch.equal(first, other)


def test_bad_gin_arguments_raise():
    with pytest.raises(ValueError, match=r"prob: must be within \[0, 1\]"):
        PatchSampler((16, 16, 8), gin={"prob": 3})
    with pytest.raises(TypeError):
        PatchSampler((16, 16, 8), gin={"strength": 0.5})


# --------------------------------------------------------------------------- pos / neg balance


def _centres(images, roi):
    return [tuple(o + r // 2 for o, r in zip(origin_of(img), roi)) for img in images]


def test_half_the_patches_are_centred_on_foreground_ignore_is_not_foreground():
    # a tiny 4^3 foreground blob and a large ignore region (25 % of the volume): if the ignore
    # label counted as foreground, almost no positive centre would land on the blob
    image, label = coord_image(), blob_label(value=3, ignore_rows=10)
    roi = (16, 16, 8)
    sampler = PatchSampler(roi, num_samples=4, augment=False)
    on_fg = contains_fg = total = 0
    for _ in range(50):
        images, labels = sampler(image, label)
        for (x, y, z), lab in zip(_centres(images, roi), labels):
            total += 1
            on_fg += int(label[0, x, y, z]) == 3
            contains_fg += bool((lab == 3).any())
    assert 0.35 <= on_fg / total <= 0.65, f"{on_fg}/{total} patches centred on foreground"
    assert contains_fg >= on_fg


def test_ignore_label_alone_gives_only_background_centres():
    image = coord_image()
    label = torch.zeros(1, *SHAPE, dtype=torch.long)
    label[0, 16:24, 14:22, 6:14] = IGN
    roi = (8, 8, 4)
    sampler = PatchSampler(roi, num_samples=4, augment=False)
    on_ignore = total = 0
    for _ in range(40):
        images, _ = sampler(image, label)
        for x, y, z in _centres(images, roi):
            total += 1
            on_ignore += int(label[0, x, y, z]) == IGN
    # the ignore cube is 512 of 28800 voxels (1.8 %): as foreground it would get half the centres
    assert on_ignore / total < 0.15


def test_the_schema_ignore_label_is_the_one_left_out():
    """A schema may pick another ignore value than 255: the sampler takes it from the plan."""
    image = coord_image()
    label = torch.zeros(1, *SHAPE, dtype=torch.long)
    label[0, 16:24, 14:22, 6:14] = 9
    roi = (8, 8, 4)
    on_cube = {}
    for ignore in (9, 255):
        sampler = PatchSampler(roi, num_samples=4, augment=False, ignore_label=ignore)
        hits = total = 0
        for _ in range(40):
            images, _ = sampler(image, label)
            for x, y, z in _centres(images, roi):
                total += 1
                hits += int(label[0, x, y, z]) == 9
        on_cube[ignore] = hits / total
    assert on_cube[9] < 0.15  # ignored: only background centres
    assert on_cube[255] > 0.35  # 9 is a class then: half the patches centre on it


def test_label_without_foreground_still_gives_patches():
    images, labels = PatchSampler((16, 16, 8), num_samples=2, augment=False)(coord_image(), torch.zeros(1, *SHAPE))
    assert images.shape == (2, 1, 16, 16, 8)
    assert int(labels.abs().sum()) == 0


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("dims,roi", [(3, (16, 16, 8)), (2, (16, 16))])
def test_same_seed_same_patches_different_seed_different(dims, roi):
    image, label = coord_image(), blob_label(ignore_rows=5)
    sampler = PatchSampler(roi, num_samples=4, spatial_dims=dims, augment=True)

    def draw(seed):
        torch.manual_seed(seed)
        return sampler(image, label)

    a_img, a_lab = draw(123)
    b_img, b_lab = draw(123)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    # a fresh sampler follows the global seed too (no hidden state of its own)
    torch.manual_seed(123)
    c_img, c_lab = PatchSampler(roi, num_samples=4, spatial_dims=dims, augment=True)(image, label)
    assert torch.equal(a_img, c_img) and torch.equal(a_lab, c_lab)
    d_img, _ = draw(124)
    assert not torch.equal(a_img, d_img)


def test_consecutive_draws_differ():
    sampler = PatchSampler((16, 16, 8), num_samples=2, augment=False)
    image, label = coord_image(), blob_label()
    first, _ = sampler(image, label)
    second, _ = sampler(image, label)
    assert not torch.equal(first, second)


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "image_shape,label_shape",
    [
        ((1, 40, 36, 20), (1, 40, 36, 21)),  # grids differ
        ((1, 40, 36, 20), (1, 36, 40, 20)),
        ((40, 36, 20), (1, 40, 36, 20)),  # image without channel
        ((1, 40, 36, 20), (40, 36, 20)),  # label without channel
        ((1, 1, 40, 36, 20), (1, 1, 40, 36, 20)),  # batched
    ],
)
def test_bad_image_label_shapes_raise(image_shape, label_shape):
    sampler = PatchSampler((16, 16, 8), num_samples=2)
    with pytest.raises(ValueError, match=r"expected image \(C, X, Y, Z\) and label \(1, X, Y, Z\) on one grid"):
        sampler(torch.zeros(image_shape), torch.zeros(label_shape, dtype=torch.long))


def test_multichannel_label_raises():
    sampler = PatchSampler((16, 16, 8), num_samples=2, augment=False)
    with pytest.raises(ValueError, match="label"):
        sampler(coord_image(), torch.zeros(2, *SHAPE, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"roi_size": (16, 16), "spatial_dims": 3}, r"roi_size must be 3 positive integers"),
        ({"roi_size": (16, 16, 8), "spatial_dims": 2}, r"roi_size must be 2 positive integers"),
        ({"roi_size": (16, 0, 8)}, r"roi_size must be 3 positive integers"),
        ({"roi_size": (16, -4, 8)}, r"roi_size must be 3 positive integers"),
        ({"roi_size": (16.0, 16, 8)}, r"roi_size must be 3 positive integers"),
        ({"roi_size": (16, 16, 8), "spatial_dims": 4}, r"spatial_dims must be 2 or 3"),
        ({"roi_size": (16, 16, 8), "num_samples": 0}, r"num_samples must be a positive integer"),
        ({"roi_size": (16, 16, 8), "num_samples": 2.0}, r"num_samples must be a positive integer"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatchSampler(**kwargs)


def test_patch_batch_concatenates_each_volumes_patches():
    from pipelines.augment import PatchSampler, patch_batch

    torch.manual_seed(0)
    sampler = PatchSampler((8, 8, 8), num_samples=2, augment=False)
    vols = [torch.rand(1, 12, 12, 12) for _ in range(3)]
    labs = [(torch.rand(1, 12, 12, 12) > 0.7).long() for _ in range(3)]
    images, labels = patch_batch(sampler, vols, labs)
    assert images.shape == (6, 1, 8, 8, 8) and labels.shape == (6, 1, 8, 8, 8) and labels.dtype == torch.int64


@pytest.mark.parametrize("mirror_axes, allowed", [((), set()), ((1,), {2}), (None, {1, 2, 3})])
def test_mirror_axes_limit_the_flips(mirror_axes, allowed):
    image, label = coord_image(), blob_label(ignore_rows=8)
    label[0, 25:30, 3:12, 2:9] = 1
    roi = (16, 12, 8)
    sampler = PatchSampler(roi, num_samples=4, augment=True, mirror_axes=mirror_axes)
    seen: set[int] = set()
    for _ in range(12):
        for img in sampler(image, label)[0]:
            hit = _match_flipped_crop(img, image, roi)
            if hit is not None:
                seen |= set(hit[1])
    assert seen <= allowed, f"flipped tensor dims {sorted(seen - allowed)} outside mirror_axes {mirror_axes}"
    assert seen == allowed or not allowed, f"mirror_axes {mirror_axes} flipped only {sorted(seen)}"  # 48 patches: each axis flips


def test_mirror_axes_are_checked():
    for bad in ((3,), (0, 0), (-1,)):
        with pytest.raises(ValueError, match="mirror_axes"):
            PatchSampler((16, 16, 8), mirror_axes=bad)
    with pytest.raises(ValueError, match="mirror_axes"):
        PatchSampler((16, 16), spatial_dims=2, mirror_axes=(2,))


def test_sampler_for_follows_the_plan_settings():
    from pipelines.plan_args import parse_plan_args
    from preprocessing.schema import load_schema

    schema = load_schema()
    s = sampler_for(parse_plan_args({"roi_size": 48, "patches_per_volume": 3, "mirror_axes": [2], "gin": {"prob": 1.0}}, schema))
    assert s.roi_size == (48, 48, 48) and s.num_samples == 3 and s.mirror_axes == (2,) and s.ignore_label == schema.ignore_label
    assert s._gin is not None and s._gin.prob == 1.0
    assert sampler_for(parse_plan_args({}, schema)).mirror_axes == (0, 1, 2)
