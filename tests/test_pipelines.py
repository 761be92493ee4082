import numpy as np
import pytest
import torch

from pipelines.networks import build_network, count_parameters
from pipelines.segmentation import dice_per_class, preprocess_case, random_flip_batch
from pipelines.synthetic import make_case
from preprocessing.synthetic import write_synthetic_dataset


def test_synthetic_cases_are_deterministic_and_labelled():
    a, b, c = make_case(7), make_case(7), make_case(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)
    assert set(np.unique(a.label)) == {0, 1, 2}
    # each structure is brighter than the background on average
    for cls in (1, 2):
        assert a.image[a.label == cls].mean() > a.image[a.label == 0].mean() + 30


@pytest.mark.parametrize("name", ["basic_unet", "dynunet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_networks_build_in_2d_and_3d(name, dims):
    net = build_network(name, spatial_dims=dims, out_channels=3)
    x = torch.zeros((1, 1) + (32,) * dims)  # BasicUNet halves 4 times
    assert net(x).shape == (1, 3) + (32,) * dims
    assert count_parameters(net) > 0


def test_unknown_network_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown network 'vnet'"):
        build_network("vnet")


def test_dice_per_class_hand_case():
    label = torch.zeros((1, 1, 4, 4), dtype=torch.long)
    label[0, 0, :2, :2] = 1  # 4 voxels of class 1
    label[0, 0, 2:, 2:] = 2  # 4 voxels of class 2
    logits = torch.zeros((1, 3, 4, 4))
    logits[0, 1, :2, :2] = 5  # class 1 exactly right
    logits[0, 2, 2:, 2:3] = 5  # class 2: 2 of 4 voxels
    dice = dice_per_class(logits, label, 3)
    assert dice[0].item() == pytest.approx(1.0)
    assert dice[1].item() == pytest.approx(2 * 2 / (2 + 4))


def test_dice_ignores_classes_absent_from_the_reference():
    label = torch.zeros((1, 1, 4, 4), dtype=torch.long)
    label[0, 0, :2, :2] = 1
    logits = torch.zeros((1, 3, 4, 4))
    logits[0, 1, :2, :2] = 5
    dice = dice_per_class(logits, label, 3)
    assert dice[0].item() == pytest.approx(1.0)
    assert torch.isnan(dice[1])  # class 2 absent: left out, not counted as 0 or 1


def test_flip_moves_image_and_label_together():
    g = torch.Generator().manual_seed(0)
    img = torch.arange(2 * 1 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4, 4)
    lab = img.clone().long()
    for _ in range(5):
        i2, l2 = random_flip_batch(img, lab, generator=g)
        assert torch.equal(i2.long(), l2)


def test_preprocess_case_normalises_ct(tmp_path):
    ds = write_synthetic_dataset(tmp_path / "ds", seed=1, n_cases=1, shape=(16, 16, 16))
    image, label = preprocess_case(str(ds.cases[0].image), str(ds.cases[0].label))
    assert image.shape == label.shape == (1, 16, 16, 16)
    assert label.dtype == torch.long and image.dtype == torch.float32
    # clip to [-54, 258] HU, then (x - 100) / 50
    assert image.min() >= (-54 - 100) / 50 - 1e-5 and image.max() <= (258 - 100) / 50 + 1e-5


def test_random_patch_gives_fixed_size_aligned_patches():
    from pipelines.segmentation import random_patch

    torch.manual_seed(0)
    case = make_case(3, shape=(40, 24, 20))
    label = torch.as_tensor(case.label)[None].long()
    image = label.float() * 10 + 1  # the image is the label in disguise: a misaligned crop shows
    for _ in range(6):
        img, lab = random_patch(image, label, (16, 16, 16))
        assert img.shape == lab.shape == (1, 16, 16, 16)
        assert torch.equal(img, lab.float() * 10 + 1)
    img, lab = random_patch(image, label, (48, 32, 32))  # larger than the case: padded
    assert img.shape == (1, 48, 32, 32) and lab.shape == (1, 48, 32, 32)
