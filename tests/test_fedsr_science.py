"""FedSR science (pipelines.fedsr): warping, losses, MI estimator, SA arithmetic, shapes, frozen encoder."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipelines.fedsr.networks import (
    FEDSR_PRESETS,
    FedSRDecoder,
    FedSRNetwork,
    SharedEncoder,
    SiteCommonInformationEnhancer,
    fedsr_config,
    set_encoder_frozen,
    warp_image,
    warp_label,
    warp_label_soft,
)
from pipelines.fedsr.objectives import (
    FedSRLossWeights,
    MutualInformationCritic,
    aggregate_sa_representations,
    jensen_shannon_mutual_information,
    pseudo_label_dice_loss,
    registration_loss,
    segmentation_loss,
    smooth_sa_representation,
    smoothness_loss,
)

SIZE = 32


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _label_map(num_classes: int = 3) -> torch.Tensor:
    return torch.randint(0, num_classes, (2, 1, SIZE, SIZE, SIZE))


def test_zero_field_leaves_image_unchanged() -> None:
    image = torch.rand(2, 1, SIZE, SIZE, SIZE)
    zero_field = torch.zeros(2, 3, SIZE, SIZE, SIZE)
    assert torch.allclose(warp_image(image, zero_field), image, atol=1e-5)


def test_warped_label_stays_integer_and_zero_field_keeps_it() -> None:
    label = _label_map()
    assert torch.equal(warp_label(label, torch.zeros(2, 3, SIZE, SIZE, SIZE), 3), label)
    moved = warp_label(label, 1.7 * torch.randn(2, 3, SIZE, SIZE, SIZE), 3)
    assert moved.dtype == torch.int64 and moved.shape == label.shape
    assert set(moved.unique().tolist()) <= {0, 1, 2}


def test_soft_warped_label_is_a_distribution() -> None:
    soft = warp_label_soft(_label_map(), torch.randn(2, 3, SIZE, SIZE, SIZE), 3)
    assert soft.shape == (2, 3, SIZE, SIZE, SIZE)
    assert torch.allclose(soft.sum(dim=1), torch.ones(2, SIZE, SIZE, SIZE), atol=1e-5)
    with pytest.raises(ValueError):
        warp_label_soft(torch.zeros(2, 3, SIZE, SIZE, SIZE, dtype=torch.long), torch.zeros(2, 3, SIZE, SIZE, SIZE), 3)


def test_smoothness_zero_for_constant_field_positive_otherwise() -> None:
    constant = torch.ones(1, 3, 16, 16, 16) * torch.tensor([0.5, -2.0, 3.0]).reshape(1, 3, 1, 1, 1)
    assert float(smoothness_loss(constant)) == pytest.approx(0.0, abs=1e-8)
    assert float(smoothness_loss(torch.randn(1, 3, 16, 16, 16))) > 0.0


def _mi_after_training(dependent: bool) -> float:
    generator = torch.Generator().manual_seed(1)
    critic = MutualInformationCritic(feature_dim=4, representation_dim=4, hidden_dim=32)
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-2)
    mixing = torch.randn(4, 4, generator=generator)

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.randn(64, 4, generator=generator)
        if dependent:
            return features, features @ mixing + 0.1 * torch.randn(64, 4, generator=generator)
        return features, torch.randn(64, 4, generator=generator)

    for _ in range(60):
        features, representations = sample()
        loss = -jensen_shannon_mutual_information(critic, features, representations)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        features, representations = sample()
        return float(jensen_shannon_mutual_information(critic, features, representations))


def test_mutual_information_higher_for_dependent_inputs() -> None:
    dependent = _mi_after_training(dependent=True)
    independent = _mi_after_training(dependent=False)
    assert dependent > independent + 0.2, (dependent, independent)


def test_mutual_information_needs_two_pairs() -> None:
    critic = MutualInformationCritic(2, 2)
    with pytest.raises(ValueError):
        jensen_shannon_mutual_information(critic, torch.zeros(1, 2), torch.zeros(1, 2))


def test_sa_smoothing_arithmetic() -> None:
    previous, current = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.allclose(smooth_sa_representation(previous, current, 0.25), torch.tensor([1.5, 3.0]))
    assert torch.equal(smooth_sa_representation(previous, current, 0.0), previous)
    assert torch.equal(smooth_sa_representation(previous, current, 1.0), current)
    with pytest.raises(ValueError):
        smooth_sa_representation(previous, current, 1.5)
    with pytest.raises(ValueError):
        smooth_sa_representation(previous, torch.zeros(3), 0.5)


def test_sa_aggregation_is_weighted_mean() -> None:
    sites = [torch.tensor([0.0, 4.0]), torch.tensor([2.0, 0.0]), torch.tensor([4.0, 8.0])]
    assert torch.allclose(aggregate_sa_representations(sites), torch.tensor([2.0, 4.0]))
    assert torch.allclose(aggregate_sa_representations(sites, [147, 102, 86]), (147 * sites[0] + 102 * sites[1] + 86 * sites[2]) / 335)
    assert torch.allclose(aggregate_sa_representations(sites, [0, 1, 0]), sites[1])
    for bad_weights in ([1.0, 1.0], [-1.0, 1.0, 1.0], [0.0, 0.0, 0.0]):
        with pytest.raises(ValueError):
            aggregate_sa_representations(sites, bad_weights)
    with pytest.raises(ValueError):
        aggregate_sa_representations([])


def test_tiny_shapes() -> None:
    config = fedsr_config("tiny")
    assert config is FEDSR_PRESETS["tiny"]
    image = torch.rand(2, 1, SIZE, SIZE, SIZE)
    features = SharedEncoder(config)(image)
    assert [tuple(f.shape) for f in features] == [(2, c, SIZE // 2**i, SIZE // 2**i, SIZE // 2**i) for i, c in enumerate(config.channels)]
    sa = torch.randn(config.sa_dim)
    segmentation = FedSRDecoder(config.channels, config.num_classes, config.sa_dim)(features, sa)
    assert segmentation.output.shape == (2, config.num_classes, SIZE, SIZE, SIZE)
    assert segmentation.pooled_feature.shape == (2, config.channels[2])
    network = FedSRNetwork(config)
    output = network(image, torch.rand(1, 1, SIZE, SIZE, SIZE), sa)
    assert output.ddf.shape == (2, 3, SIZE, SIZE, SIZE)
    assert torch.count_nonzero(output.ddf) == 0  # the zero-initialised head starts at the identity
    assert output.segmentation_logits.shape == (2, config.num_classes, SIZE, SIZE, SIZE)
    assert output.registration_feature.shape == output.segmentation_feature.shape == (2, config.channels[2])
    with pytest.raises(ValueError):
        SharedEncoder(config)(torch.rand(1, 1, 30, 32, 32))
    with pytest.raises(ValueError):
        fedsr_config("huge")


def test_velocity_integration_shapes() -> None:
    network = FedSRNetwork(replace(fedsr_config("tiny"), integrate_velocity=True, integration_steps=3))
    output = network(torch.rand(1, 1, SIZE, SIZE, SIZE), torch.rand(1, 1, SIZE, SIZE, SIZE), torch.zeros(8))
    assert output.ddf.shape == (1, 3, SIZE, SIZE, SIZE)


def test_scie_starts_as_identity_and_uses_representation() -> None:
    scie = SiteCommonInformationEnhancer(sa_dim=4, channels=3)
    feature = torch.randn(2, 3, 4, 4, 4)
    assert torch.equal(scie(feature, torch.randn(2, 4)), feature)
    torch.nn.init.normal_(scie.to_scale_and_shift.weight)
    assert not torch.allclose(scie(feature, torch.ones(4)), scie(feature, -torch.ones(4)))


def test_frozen_encoder_gets_no_gradient_decoders_do() -> None:
    config = fedsr_config("tiny")
    network = FedSRNetwork(config)
    set_encoder_frozen(network, frozen=True)
    critic = MutualInformationCritic(config.channels[2], config.sa_dim, hidden_dim=8)
    sa = torch.randn(config.sa_dim, requires_grad=True)
    unlabelled, atlas = torch.rand(2, 1, SIZE, SIZE, SIZE), torch.rand(1, 1, SIZE, SIZE, SIZE)
    atlas_label = torch.randint(0, config.num_classes, (2, 1, SIZE, SIZE, SIZE))
    output = network(unlabelled, atlas, sa)
    weights = FedSRLossWeights(lncc_kernel_size=5)
    sa_rows = sa.unsqueeze(0).expand(2, -1)
    registration = registration_loss(
        output.ddf,
        warp_image(atlas.expand(2, -1, -1, -1, -1), output.ddf),
        unlabelled,
        warp_label_soft(atlas_label, output.ddf, config.num_classes),
        output.segmentation_logits.detach(),
        jensen_shannon_mutual_information(critic, output.registration_feature, sa_rows),
        weights,
    )
    pseudo_label = warp_label(atlas_label, output.ddf.detach(), config.num_classes)
    segmentation = segmentation_loss(
        output.segmentation_logits, pseudo_label, jensen_shannon_mutual_information(critic, output.segmentation_feature, sa_rows), weights
    )
    (registration + segmentation).backward()
    assert all(p.grad is None for p in network.encoder.parameters())
    for decoder in (network.registration_decoder, network.segmentation_decoder):
        assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in decoder.parameters())
    assert sa.grad is not None
    set_encoder_frozen(network, frozen=False)
    assert all(p.requires_grad for p in network.encoder.parameters())


def test_pseudo_label_dice_is_low_for_matching_prediction() -> None:
    label = _label_map()
    perfect_logits = 20.0 * torch.nn.functional.one_hot(label[:, 0], 3).permute(0, 4, 1, 2, 3).float()
    assert float(pseudo_label_dice_loss(perfect_logits, label)) < 1e-3
