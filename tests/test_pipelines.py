import numpy as np
import pytest
import torch

from fedimg_testing.synthetic import make_case
from pipelines.networks import build_network, count_parameters


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
