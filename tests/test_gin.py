"""GIN augmentation (pipelines.gin): types, shapes and dtypes kept, norm kept, randomness
and reproducibility, non-linear and possibly inverting intensity maps, spatial locality,
labels untouched in the dictionary form, argument checks and the spec parser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from pipelines.gin import DEFAULTS, GINAugmentation, GINAugmentationd, parse_gin_args


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors gain nothing from two intra-op threads on a busy 2-core box
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ramp(shape=(1, 32, 32), lo: float = -3.0, hi: float = 3.0) -> torch.Tensor:
    """Channel-first image whose values rise linearly along the flattened index."""
    return torch.linspace(lo, hi, int(np.prod(shape))).reshape(shape)


def gin(seed: int = 0, **kwargs) -> GINAugmentation:
    t = GINAugmentation(**{"prob": 1.0, **kwargs})
    t.set_random_state(seed)
    return t


def corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


def linear_fit_residual(x: torch.Tensor, y: torch.Tensor) -> float:
    """RMS residual of the least-squares fit y ~ a x + b, relative to y's standard deviation."""
    xs, ys = x.double().ravel(), y.double().ravel()
    design = torch.stack([xs, torch.ones_like(xs)], dim=1)
    coef = torch.linalg.lstsq(design, ys[:, None]).solution
    res = ys - (design @ coef)[:, 0]
    return float(res.pow(2).mean().sqrt() / ys.std())


# --------------------------------------------------------------------------- types, shapes, dtypes


@pytest.mark.parametrize("shape", [(1, 24, 20), (2, 24, 20), (1, 12, 10, 8), (3, 12, 10, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_tensor_shape_and_dtype_kept(shape, dtype):
    x = ramp(shape).to(dtype)
    out = gin()(x)
    assert type(out) is torch.Tensor
    assert out.shape == x.shape and out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    assert not torch.equal(out, x)


@pytest.mark.parametrize("shape", [(1, 24, 20), (2, 12, 10, 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_numpy_in_numpy_out(shape, dtype):
    x = ramp(shape).numpy().astype(dtype)
    out = gin()(x)
    assert isinstance(out, np.ndarray)
    assert out.shape == x.shape and out.dtype == dtype
    assert not np.array_equal(out, x)


def test_metatensor_keeps_affine_and_meta():
    affine = torch.tensor([[0.8, 0, 0, -10], [0, 0.8, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]], dtype=torch.float64)
    x = MetaTensor(ramp((1, 12, 10, 8)), affine=affine, meta={"filename_or_obj": "case_001.nii.gz"})
    out = gin()(x)
    assert isinstance(out, MetaTensor)
    assert torch.equal(out.affine, affine)
    assert out.meta["filename_or_obj"] == "case_001.nii.gz"
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out.as_tensor(), x.as_tensor())


def test_input_is_not_modified_in_place():
    x = ramp((2, 12, 10, 8))
    before = x.clone()
    gin()(x)
    assert torch.equal(x, before)


# --------------------------------------------------------------------------- blend and norm


@pytest.mark.parametrize("shape", [(1, 32, 32), (2, 12, 10, 8)])
def test_frobenius_norm_preserved(shape):
    x = ramp(shape, lo=0.0, hi=500.0)  # CT-like range
    t = gin()
    for _ in range(10):
        out = t(x)
        assert float(torch.linalg.vector_norm(out)) == pytest.approx(float(torch.linalg.vector_norm(x)), rel=1e-4)


def test_float16_norm_preserved_and_no_overflow():
    x = ramp((1, 16, 16, 16), lo=-1000.0, hi=3000.0).half()
    out = gin(n_layers=6, channels=8)(x)
    assert bool(torch.isfinite(out).all())
    assert float(torch.linalg.vector_norm(out.float())) == pytest.approx(float(torch.linalg.vector_norm(x.float())), rel=1e-2)


def test_alpha_zero_returns_the_input():
    x = ramp((1, 32, 32))
    out = gin(alpha=(0.0, 0.0))(x)
    assert torch.allclose(out, x, atol=1e-5)


def test_zero_image_comes_back_unchanged():
    for x in (torch.zeros(1, 8, 8), torch.zeros(2, 4, 4, 4, dtype=torch.float16), np.zeros((1, 8, 8), np.float32)):
        out = gin()(x)
        assert type(out) is type(x) and out.dtype == x.dtype
        assert not np.asarray(out).any()


# --------------------------------------------------------------------------- randomness


def test_consecutive_calls_draw_different_mappings():
    x = ramp((1, 32, 32))
    t = gin(seed=3)
    outs = [t(x) for _ in range(5)]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j], atol=1e-3)


def test_same_seed_same_output_and_torch_rng_untouched():
    x = ramp((2, 12, 10, 8))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = [gin(seed=42)(x) for _ in range(2)]  # two fresh instances, same seed
    assert torch.equal(a[0], a[1])
    t = gin(seed=42)
    first = t(x)
    t.set_random_state(42)  # re-seeding replays the sequence
    assert torch.equal(t(x), first)
    assert torch.equal(first, a[0])
    assert not torch.equal(gin(seed=43)(x), first)
    assert torch.equal(torch.get_rng_state(), state), "torch's global generator is neither read nor advanced"


def test_randomize_false_reuses_the_last_draw():
    x = ramp((1, 32, 32))
    t = gin(seed=5)
    first = t(x)
    assert torch.equal(t(x, randomize=False), first)
    assert not torch.allclose(t(x), first, atol=1e-3)
    with pytest.raises(RuntimeError, match="randomize=False before any network was drawn"):
        gin()(x, randomize=False)


def test_prob_zero_is_the_identity():
    t = gin(prob=0.0)
    for x in (ramp((1, 16, 16)), ramp((1, 6, 6, 6)).numpy(), MetaTensor(ramp((1, 8, 8)))):
        for _ in range(5):
            assert t(x) is x


def test_prob_draws_respected():
    x = ramp((1, 4, 4), lo=1.0, hi=2.0)
    t = GINAugmentation(prob=0.3)
    t.set_random_state(11)
    changed = sum(not torch.equal(t(x), x) for _ in range(400))
    assert 0.22 <= changed / 400 <= 0.38


def test_n_layers_range_draws_within_bounds():
    t = gin(seed=1, n_layers=(2, 5))
    x = ramp((1, 8, 8))
    seen = set()
    for _ in range(60):
        t(x)
        seen.add(len(t._kernels))
    assert seen == {2, 3, 4, 5}


# --------------------------------------------------------------------------- what the mapping does


def test_intensity_order_can_invert_but_not_always():
    x = ramp((1, 32, 32))
    correlations = [corr(gin(seed=s, alpha=(1.0, 1.0))(x), x) for s in range(20)]
    assert any(c < -0.5 for c in correlations), f"no inverting draw: {correlations}"
    assert any(c > 0.5 for c in correlations), f"every draw inverts: {correlations}"


def test_mapping_is_nonlinear():
    # 1x1 kernels: the output is a pure function of the voxel's intensity, so any residual
    # of a linear fit is non-linearity (not spatial mixing)
    x = ramp((1, 32, 32))
    residuals = [linear_fit_residual(x, gin(seed=s, alpha=(1.0, 1.0), kernel_sizes=(1,))(x)) for s in range(20)]
    assert max(residuals) > 0.3, f"no clearly non-linear draw: {residuals}"
    # the measure itself: one layer is a random affine map, residual ~0
    linear = [linear_fit_residual(x, gin(seed=s, alpha=(1.0, 1.0), kernel_sizes=(1,), n_layers=1)(x)) for s in range(5)]
    assert max(linear) < 1e-3


def test_1x1_kernels_map_each_intensity_to_one_value():
    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor([-2.0, -0.5, 0.3, 1.0, 2.5])
    x = levels[torch.randint(0, 5, (1, 12, 10, 8), generator=gen)]
    out = gin(seed=2, kernel_sizes=(1,))(x)
    for v in levels:
        vals = out[x == v]
        assert float(vals.max() - vals.min()) < 1e-4, "same intensity, same output (no spatial mixing)"


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("shape,centre", [((1, 25, 25), (12, 12)), ((1, 13, 13, 13), (6, 6, 6))])
def test_spatially_local(n_layers, shape, centre):
    """Changing one voxel changes the network output within radius n_layers only (3x3 kernels).
    The global norm rescaling multiplies everything else by one common factor."""
    x = ramp(shape)
    y = x.clone()
    y[(0, *centre)] += 5.0
    out_x = gin(seed=9, alpha=(1.0, 1.0), kernel_sizes=(3,), n_layers=n_layers)(x)
    out_y = gin(seed=9, alpha=(1.0, 1.0), kernel_sizes=(3,), n_layers=n_layers)(y)
    grids = torch.meshgrid(*[torch.arange(s) for s in shape[1:]], indexing="ij")
    chebyshev = torch.stack([(g - c).abs() for g, c in zip(grids, centre)]).amax(0)[None]
    far = chebyshev > n_layers
    ratio = torch.linalg.vector_norm(out_y[far]) / torch.linalg.vector_norm(out_x[far])
    assert torch.allclose(out_y[far], ratio * out_x[far], rtol=1e-4, atol=1e-4 * float(out_x.abs().max()))
    near = ~far
    assert not torch.allclose(out_y[near], ratio * out_x[near], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- dictionary form


def test_dict_form_leaves_label_untouched():
    image = ramp((1, 12, 10, 8))
    label = torch.zeros(1, 12, 10, 8, dtype=torch.long)
    label[0, 3:7, 2:6, 1:5] = 2
    label_before = label.clone()
    t = GINAugmentationd(keys="image", prob=1.0)
    t.set_random_state(0)
    data = {"image": image, "label": label, "name": "case_7"}
    out = t(data)
    assert out["label"] is label and torch.equal(out["label"], label_before)
    assert out["name"] is data["name"]
    assert not torch.equal(out["image"], image)
    assert data["image"] is image, "the input dict is not modified"


def test_dict_form_same_mapping_for_every_key():
    image = ramp((1, 12, 10, 8))
    t = GINAugmentationd(keys=["t1", "t1_copy"], prob=1.0)
    t.set_random_state(4)
    outs = [t({"t1": image, "t1_copy": image.clone()}) for _ in range(3)]
    for out in outs:
        assert torch.equal(out["t1"], out["t1_copy"])
    assert not torch.allclose(outs[0]["t1"], outs[1]["t1"], atol=1e-3), "a fresh network per call"


def test_dict_form_seeding_and_prob():
    image = ramp((1, 16, 16))
    a, b = GINAugmentationd(keys="image", prob=0.5), GINAugmentationd(keys="image", prob=0.5)
    a.set_random_state(21)
    b.set_random_state(21)
    outs_a = [a({"image": image})["image"] for _ in range(20)]
    outs_b = [b({"image": image})["image"] for _ in range(20)]
    assert all(torch.equal(u, v) for u, v in zip(outs_a, outs_b))
    unchanged = [o is image for o in outs_a]
    assert any(unchanged) and not all(unchanged)
    off = GINAugmentationd(keys="image", prob=0.0)
    assert all(off({"image": image})["image"] is image for _ in range(5))


def test_dict_form_seeded_through_compose():
    image = ramp((1, 12, 10, 8))

    def run(seed):
        pipeline = Compose([GINAugmentationd(keys="image", prob=1.0)]).set_random_state(seed)
        return [pipeline({"image": image})["image"] for _ in range(2)]

    a, b = run(8), run(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(run(9)[0], a[0])


def test_dict_form_missing_keys():
    image = ramp((1, 8, 8))
    t = GINAugmentationd(keys=["image", "flair"], prob=1.0, allow_missing_keys=True)
    out = t({"image": image})
    assert set(out) == {"image"} and out["image"].shape == image.shape
    with pytest.raises(KeyError):
        GINAugmentationd(keys=["image", "flair"], prob=1.0)({"image": image})


def test_integer_image_refused():
    # catches a label listed by mistake
    with pytest.raises(ValueError, match="needs a floating-point image"):
        GINAugmentationd(keys="label", prob=1.0)({"label": torch.zeros(1, 8, 8, dtype=torch.long)})
    with pytest.raises(ValueError, match="needs a floating-point image"):
        gin()(np.zeros((1, 8, 8), np.int16))


@pytest.mark.parametrize("shape", [(8, 8), (1, 8), (1, 1, 4, 4, 4), (1, 2, 2, 2, 2, 2)])
def test_wrong_number_of_dims_refused(shape):
    with pytest.raises(ValueError, match=r"expected a channel-first image \(C, X, Y\) or \(C, X, Y, Z\)"):
        gin()(torch.ones(shape))


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prob": 1.5}, r"^prob: must be within \[0, 1\] \(got 1.5\)"),
        ({"prob": -0.1}, r"^prob: must be within \[0, 1\]"),
        ({"prob": "0.5"}, r"^prob: must be a number"),
        ({"prob": True}, r"^prob: must be a number"),
        ({"alpha": 0.5}, r"^alpha: must be \[low, high\] with 0 <= low <= high <= 1"),
        ({"alpha": (0.8, 0.2)}, r"^alpha: must be \[low, high\]"),
        ({"alpha": (0.0, 1.5)}, r"^alpha: must be \[low, high\]"),
        ({"alpha": (0.0, float("nan"))}, r"^alpha: must be \[low, high\]"),
        ({"n_layers": 0}, r"^n_layers: must be a positive integer or \[min, max\]"),
        ({"n_layers": 2.0}, r"^n_layers: must be a positive integer or \[min, max\]"),
        ({"n_layers": (4, 2)}, r"^n_layers: must be a positive integer or \[min, max\] with 1 <= min <= max"),
        ({"n_layers": (0, 2)}, r"^n_layers: must be a positive integer or \[min, max\]"),
        ({"channels": 0}, r"^channels: must be a positive integer"),
        ({"channels": True}, r"^channels: must be a positive integer"),
        ({"kernel_sizes": ()}, r"^kernel_sizes: must be a non-empty list of positive odd integers"),
        ({"kernel_sizes": (1, 2)}, r"^kernel_sizes: must be a non-empty list of positive odd integers"),
        ({"kernel_sizes": (-1,)}, r"^kernel_sizes: must be a non-empty list of positive odd integers"),
        ({"negative_slope": -0.2}, r"^negative_slope: must be a number within \[0, 1\]"),
        ({"negative_slope": 2}, r"^negative_slope: must be a number within \[0, 1\]"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GINAugmentation(**kwargs)
    with pytest.raises(ValueError, match=match):
        GINAugmentationd(keys="image", **kwargs)


def test_accepted_argument_forms():
    t = GINAugmentation(prob=1, alpha=[0, 1], n_layers=[2, 3], channels=4, kernel_sizes=3, negative_slope=0)
    assert t.n_layers == (2, 3) and t.kernel_sizes == (3,) and t.alpha == (0.0, 1.0)
    assert GINAugmentation().prob == DEFAULTS["prob"]


# --------------------------------------------------------------------------- spec parser


def test_parse_off_and_defaults():
    assert parse_gin_args(None, "plan_args.gin") is None
    assert parse_gin_args(False, "plan_args.gin") is None
    assert parse_gin_args(True, "plan_args.gin") == DEFAULTS
    assert parse_gin_args({}, "plan_args.gin") == DEFAULTS


def test_parse_spec_form_gives_constructor_kwargs():
    raw = {"prob": 0.7, "alpha": [0.2, 0.9], "n_layers": [2, 5], "channels": 3, "kernel_sizes": [1, 3, 5]}
    kwargs = parse_gin_args(raw, "plan_args.gin")
    assert kwargs == {
        "prob": 0.7, "alpha": (0.2, 0.9), "n_layers": (2, 5), "channels": 3, "kernel_sizes": (1, 3, 5), "negative_slope": 0.2,
    }  # fmt: skip
    t = GINAugmentation(**kwargs)
    t.set_random_state(0)
    assert t(ramp((1, 8, 8))).shape == (1, 8, 8)
    assert raw["alpha"] == [0.2, 0.9], "the spec is not modified"


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"prob": 2}, "plan_args.gin.prob: must be within [0, 1] (got 2)"),
        ({"alpha": [0.5]}, "plan_args.gin.alpha: must be [low, high] with 0 <= low <= high <= 1 (got [0.5])"),
        ({"n_layers": -1}, "plan_args.gin.n_layers: must be a positive integer or [min, max] (got -1)"),
        ({"channels": "2"}, "plan_args.gin.channels: must be a positive integer (got '2')"),
        ({"kernel_sizes": [2, 4]}, "plan_args.gin.kernel_sizes: must be a non-empty list of positive odd integers, e.g. [1, 3] (got [2, 4])"),
        ({"kernel_size": [3]}, "plan_args.gin.kernel_size: unknown key; did you mean 'kernel_sizes'?"),
        ({"sigma": 1}, "plan_args.gin.sigma: unknown key (allowed: prob, alpha, n_layers, channels, kernel_sizes, negative_slope)"),
        ("yes", "plan_args.gin: must be a mapping (prob, alpha, n_layers, channels, kernel_sizes, negative_slope), true or false (got 'yes')"),
        (1, "plan_args.gin: must be a mapping"),
    ],
)
def test_parse_errors_name_the_key(raw, message):
    with pytest.raises(ValueError) as info:
        parse_gin_args(raw, "plan_args.gin")
    assert str(info.value).startswith(message)
