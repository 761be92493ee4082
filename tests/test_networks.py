"""Backbones (pipelines.networks): sizes, deep supervision outputs, patch and spec checks."""

import copy

import pytest
import torch

from pipelines.networks import (
    NETWORK_SIZES,
    NETWORKS,
    SIZES,
    all_heads,
    build_network,
    check_patch_size,
    count_parameters,
    deep_supervision_weights,
    main_output,
    network_config_from_spec,
)

DS_NETWORKS = ("mednext", "dynunet")
UNET_NETWORKS = ("mednext", "dynunet", "basic_unet")  # scalable to a few thousand parameters; flexible_unet's encoder is a classifier's


@pytest.fixture(autouse=True)
def _seed_and_plain_cpu_kernels():
    # oneDNN compiles kernels on the first call per shape (seconds each on a shared 2-core box);
    # the plain CPU kernels are as fast for these tiny networks and have no warm-up.
    torch.manual_seed(0)
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def test_every_network_has_every_size():
    assert set(NETWORK_SIZES) == set(NETWORKS) == {"mednext", "dynunet", "basic_unet", "flexible_unet"}
    for name in NETWORKS:
        assert tuple(NETWORK_SIZES[name]) == SIZES


@pytest.mark.parametrize("name", UNET_NETWORKS)
@pytest.mark.parametrize("dims", [2, 3])
def test_tiny_builds_forwards_and_backwards(name, dims):
    net = build_network(name, spatial_dims=dims, in_channels=1, out_channels=3, size="tiny")
    x = torch.randn((2, 1) + (32,) * dims)
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3) + (32,) * dims
    out.float().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert 0 < count_parameters(net) < 200_000  # "tiny" really is tiny


@pytest.mark.parametrize("name", DS_NETWORKS)
@pytest.mark.parametrize("dims", [2, 3])
def test_deep_supervision_heads_train_and_eval(name, dims):
    net = build_network(name, spatial_dims=dims, out_channels=3, size="tiny", deep_supervision=True)
    x = torch.randn((1, 1) + (32,) * dims)
    net.train()
    out = net(x)
    heads = all_heads(out)
    assert len(heads) > 1
    sizes = [h.shape[2:] for h in heads]
    assert sizes[0] == x.shape[2:]
    for h in heads:
        assert h.shape[:2] == (1, 3) and h.ndim == dims + 2
    for finer, coarser in zip(sizes, sizes[1:]):  # full resolution first, then coarser or equal
        assert all(c <= f for f, c in zip(finer, coarser))
    assert sizes[1] == tuple(s // 2 for s in x.shape[2:])  # our builders keep heads at their own resolution
    assert main_output(out) is heads[0]
    # the supervised loss over every head backpropagates into every parameter
    weights = deep_supervision_weights(len(heads))
    sum(w * h.mean() for w, h in zip(weights, heads)).backward()
    assert all(p.grad is not None for p in net.parameters())

    net.eval()
    with torch.no_grad():
        plain = net(x)
    assert isinstance(plain, torch.Tensor) and plain.shape == (1, 3) + (32,) * dims
    assert main_output(plain) is plain and all_heads(plain) == [plain]


@pytest.mark.parametrize("name", DS_NETWORKS)
def test_model_with_deep_supervision_can_be_copied_as_teacher_after_training(name):
    net = build_network(name, spatial_dims=2, out_channels=3, size="tiny", deep_supervision=True)
    net(torch.randn(1, 1, 32, 32))[0].mean().backward()
    teacher = copy.deepcopy(net).eval()  # MONAI's DynUNet keeps non-leaf head tensors: would fail
    with torch.no_grad():
        assert teacher(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_monai_stacked_dynunet_output_is_understood():
    from monai.networks.nets import DynUNet

    for dims in (2, 3):
        raw = DynUNet(dims, 1, 3, [3] * 4, [1, 2, 2, 2], [2, 2, 2], filters=[4, 8, 16, 32], deep_supervision=True, deep_supr_num=2)
        x = torch.randn((1, 1) + (16,) * dims)
        stacked = raw(x)
        assert stacked.shape == (1, 3, 3) + (16,) * dims  # (B, heads, C, *spatial), all at full resolution
        heads = all_heads(stacked, spatial_dims=dims)
        assert len(heads) == 3 and all(h.shape == (1, 3) + (16,) * dims for h in heads)
        assert torch.equal(main_output(stacked, spatial_dims=dims), stacked[:, 0])
    assert main_output(stacked).shape == (1, 3, 16, 16, 16)  # 6-D is unambiguous without spatial_dims


def test_deep_supervision_weights_halve_and_sum_to_one():
    w = deep_supervision_weights(4)
    assert w == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    assert deep_supervision_weights(1) == [1.0]


def test_paper_size_mednext_base_parameter_count():
    net = build_network("mednext", spatial_dims=3, in_channels=1, out_channels=8, size="base")
    n = count_parameters(net)
    print(f"MedNeXt-B (3D, k3, 1 in, 8 out): {n:,} parameters")
    assert n == 10_511_048  # MONAI 1.6.1; the MedNeXt paper reports ~10.5 M for MedNeXt-B (k3)
    assert 5_000_000 < n < 20_000_000
    # same network as MONAI's own MedNeXtB
    from monai.networks.nets import MedNeXtB

    ref = MedNeXtB(spatial_dims=3, in_channels=1, out_channels=8, kernel_size=3)
    assert count_parameters(ref) == n
    assert [tuple(p.shape) for p in ref.parameters()] == [tuple(p.shape) for p in net.parameters()]


def test_sizes_grow():
    counts = [count_parameters(build_network("mednext", 3, 1, 8, size=s)) for s in ("tiny", "small", "base", "medium")]
    assert counts == sorted(counts) and counts[0] < 100_000


def test_dynunet_base_is_nnunet_like():
    net = build_network("dynunet", spatial_dims=3, out_channels=8, size="base")
    assert list(net.filters) == [32, 64, 128, 256, 320, 320]
    assert 20_000_000 < count_parameters(net) < 40_000_000
    net2d = build_network("dynunet", spatial_dims=2, out_channels=8, size="base")
    assert list(net2d.filters) == [32, 64, 128, 256, 512, 512]


def test_existing_callers_keep_working():
    net = build_network("dynunet", spatial_dims=3, out_channels=2, features=[8, 16, 32, 64])
    assert list(net.filters) == [8, 16, 32, 64]
    net = build_network("basic_unet", spatial_dims=3, features=[4, 4, 8, 16, 32, 4])
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    net = build_network("mednext", spatial_dims=2, out_channels=2, features=[8, 16, 32])  # 3 levels
    assert net(torch.zeros(1, 1, 16, 16)).shape == (1, 2, 16, 16)
    with pytest.raises(ValueError, match=r"\(f, 2f, 4f"):
        build_network("mednext", features=[8, 12, 32])


def test_patch_size_check_refuses_30_cubed_for_five_levels():
    with pytest.raises(ValueError, match=r"roi_size \[30, 30, 30\] does not fit mednext .*5 levels.*divisible by 16"):
        check_patch_size("mednext", "base", [30, 30, 30])
    with pytest.raises(ValueError, match=r"divisible by 16.*nearest valid roi_size: \[32, 32, 32\]"):
        check_patch_size("dynunet", "small", (30, 30, 30))
    with pytest.raises(ValueError, match="single voxel"):
        check_patch_size("mednext", "tiny", [16, 16, 16])
    with pytest.raises(ValueError, match="roi_size must be 2 positive integers"):
        check_patch_size("mednext", "tiny", [32, 32, 32], spatial_dims=2)
    with pytest.raises(ValueError, match="does not fit"):
        build_network("mednext", size="tiny", roi_size=[30, 32, 32])
    for name in NETWORKS:  # the paper's patch fits every size
        for size in SIZES:
            check_patch_size(name, size, [128, 128, 128])
    check_patch_size("mednext", "tiny", [32, 32])
    check_patch_size("dynunet", "tiny", [12, 12, 12])  # 3 levels: divisible by 4


def test_spec_validation_is_clear():
    ok = network_config_from_spec({"name": "mednext", "size": "base", "deep_supervision": True}, roi_size=[128] * 3)
    assert ok == {"name": "mednext", "spatial_dims": 3, "size": "base", "in_channels": 1, "deep_supervision": True}
    assert network_config_from_spec(None)["name"] == "basic_unet"
    assert network_config_from_spec({"name": "dynunet", "res_block": True})["res_block"] is True
    bad = [
        ({"name": "medneXt"}, r"network\.name: unknown network 'medneXt'.*did you mean 'mednext'"),
        ({"name": "vnet"}, r"unknown network 'vnet'; choose one of"),
        ({"name": "mednext", "size": "bse"}, r"unknown size 'bse' for network 'mednext'.*did you mean 'base'"),
        ({"name": "dynunet", "spatial_dims": 4}, r"network\.spatial_dims: must be 2 or 3 \(got 4\)"),
        ({"name": "dynunet", "spatial_dims": True}, r"network\.spatial_dims: must be 2 or 3"),
        ({"name": "basic_unet", "deep_supervision": True}, r"basic_unet has no deep supervision"),
        ({"name": "mednext", "deep_supervision": "yes"}, r"network\.deep_supervision: must be true or false"),
        ({"name": "mednext", "kernal_size": 5}, r"unknown network option 'kernal_size'.*did you mean 'kernel_size'"),
        ({"name": "mednext", "out_channels": 3}, r"network\.out_channels: not allowed.*num_classes"),
        ({"name": "basic_unet", "features": [4, 4, 8]}, r"network\.features: basic_unet needs 6 feature sizes"),
        ({"name": "dynunet", "features": [8, -16, 32]}, r"network\.features: must be a list of positive integers"),
        ("mednext", r"network must be a mapping"),
    ]
    for spec, message in bad:
        with pytest.raises(ValueError, match=message):
            network_config_from_spec(spec)
    with pytest.raises(ValueError, match=r"roi_size \[30, 30, 30\] does not fit mednext size 'tiny'"):
        network_config_from_spec({"name": "mednext"}, roi_size=[30, 30, 30])
    with pytest.raises(ValueError, match=r"roi_size must be 2 positive integers"):
        network_config_from_spec({"name": "mednext", "spatial_dims": 2}, roi_size=[32, 32, 32])


def test_spec_config_builds_in_2d():
    spec = {"name": "mednext", "spatial_dims": 2, "deep_supervision": True}
    kwargs = network_config_from_spec(spec, roi_size=[64, 64])
    net = build_network(out_channels=4, **kwargs)
    heads = all_heads(net(torch.randn(1, 1, 64, 64)))
    assert [h.shape[-1] for h in heads] == [64, 32, 16, 8, 4]


def test_flexible_unet_an_offline_encoder_in_2d_and_3d():
    """MONAI's FlexibleUNet: EfficientNet/ResNet encoder (random init: pretrained weights are a download), U-Net decoder, /32."""
    from monai.networks.nets import FlexibleUNet

    from pipelines.networks import output_biases

    torch.backends.mkldnn.enabled = True  # EfficientNet's depthwise convolutions take seconds per pass on the plain kernels (the fixture restores it)
    net = build_network("flexible_unet", spatial_dims=2, out_channels=5, size="tiny", roi_size=[64, 64])
    assert isinstance(net, FlexibleUNet)
    net.eval()
    x = torch.randn(1, 1, 64, 96)
    assert torch.equal(net(x), FlexibleUNet.forward(net, x))  # MONAI's output, exactly
    net.train()
    out = net(x)
    assert out.shape == (1, 5, 64, 96)
    out.mean().backward()
    # every weight has a gradient: EfficientNet's unused classifier a zero one (an optimizer stepping every weight needs one)
    assert all(p.grad is not None for p in net.parameters())
    classifier = {n: p.grad for n, p in net.named_parameters() if n.startswith(("encoder._conv_head.", "encoder._bn1.", "encoder._fc."))}
    assert len(classifier) == 5 and all(float(g.abs().sum()) == 0.0 for g in classifier.values())
    assert set(net.state_dict()) == set(FlexibleUNet(1, 5, "efficientnet-b0", spatial_dims=2, decoder_channels=(32, 16, 16, 8, 8)).state_dict())
    assert len(output_biases(net, 5)) == 1
    resnet = build_network("flexible_unet", spatial_dims=2, out_channels=3, size={"backbone": "resnet18"}, features=16)
    assert resnet(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    conv3d = build_network("flexible_unet", spatial_dims=3, out_channels=2, size="tiny").segmentation_head[0]
    assert isinstance(conv3d, torch.nn.Conv3d) and conv3d.out_channels == 2  # 3D too (not run here: slow on plain CPU kernels)
    for kwargs, message in (
        ({"roi_size": [48, 48]}, r"divisible by 32.*nearest valid roi_size: \[64, 64\]"),
        ({"size": {"backbone": "efficientnet-b0", "pretrained": True}}, "downloads ImageNet weights"),
        ({"size": {"backbone": "efficentnet-b0"}}, "did you mean 'efficientnet-b0'"),
        ({"deep_supervision": True}, "no deep supervision heads"),
        ({"features": [8, 8]}, "needs 5 decoder channel sizes"),
    ):
        with pytest.raises(ValueError, match=message):
            build_network("flexible_unet", spatial_dims=2, **kwargs)


def test_flexible_unet_spec_errors_name_their_key():
    from fedimg_core.errors import ConfigError
    from pipelines.network_config import network_config_from_spec

    assert network_config_from_spec({"name": "flexible_unet", "spatial_dims": 2, "backbone": "resnet34"}, roi_size=[64, 64])["backbone"] == "resnet34"
    for network, key in (
        ({"name": "flexible_unet", "spatial_dims": 2, "backbone": "resnet19"}, "backbone"),
        ({"name": "flexible_unet", "spatial_dims": 2, "pretrained": True}, "pretrained"),
        ({"name": "flexible_unet", "spatial_dims": 2, "deep_supervision": True}, "deep_supervision"),
    ):
        with pytest.raises((ConfigError, ValueError), match=key):
            network_config_from_spec(network, roi_size=[64, 64])
