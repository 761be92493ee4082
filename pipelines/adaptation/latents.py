"""The per-domain mean latents of the inversion encoder: the mean w of the frozen generator's mapping per client id.

`InversionEncoder` offsets its W+ codes by one such mean per domain (its ``latent_avg`` buffer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedimg_core.config import short
from pipelines.config_fields import is_int
from pipelines.factory.networks import Generator

__all__ = ["domain_latent_avg", "latent_avgs"]


def _middle_bins(n_bins: int) -> list[int]:
    q = n_bins // 4
    return list(range(q, n_bins - q))


@torch.no_grad()
def domain_latent_avg(
    generator: Generator,
    client_id: int | None,
    n: int = 4096,
    bins: Sequence[int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Mean w of the generator's mapping for one client id, key None, over seeded z and slice bins.

    The same z serve every condition.

    Args:
        generator: the factory generator.
        client_id: the client id; None averages the per-client means over all client ids
            equally (a target site that was not a factory member).
        n: the number of z.
        bins: the slice bins (default: the middle half, n_bins//4 .. n_bins - n_bins//4 - 1;
            no bin when the factory has none).
        seed: the seed of the z.

    Returns:
        ``(w_dim,)``.

    Raises:
        ValueError: naming the argument, for a bad ``n``, ``client_id`` or ``bins``.
    """
    cfg = generator.cfg
    if not is_int(n) or n < 1:
        raise ValueError(f"domain_latent_avg.n: must be an integer >= 1 (got {short(n)})")
    if client_id is None:
        clients = list(range(cfg.n_clients))
    elif not is_int(client_id) or not 0 <= client_id < cfg.n_clients:
        raise ValueError(f"domain_latent_avg.client_id: must be an integer in [0, {cfg.n_clients - 1}] (got {short(client_id)})")
    else:
        clients = [int(client_id)]
    if cfg.n_bins == 0:
        if bins:
            raise ValueError("domain_latent_avg.bins: this factory has no slice bins (n_bins = 0)")
        bin_list: list[int | None] = [None]
    else:
        chosen = _middle_bins(cfg.n_bins) if bins is None else list(bins)
        if not chosen:
            raise ValueError("domain_latent_avg.bins: must not be empty")
        if not all(is_int(b) and 0 <= b < cfg.n_bins for b in chosen):
            raise ValueError(f"domain_latent_avg.bins: must be a list of integers in [0, {cfg.n_bins - 1}] (got {short(bins)})")
        bin_list = list(chosen)
    param = next(generator.parameters())
    z = torch.randn(n, cfg.z_dim, generator=torch.Generator().manual_seed(int(seed))).to(param.device, param.dtype)
    total = torch.zeros(cfg.w_dim, device=param.device, dtype=torch.float64)
    for c in clients:
        for b in bin_list:
            total += generator.mapping(z, c, b, None).double().mean(0)
    return (total / (len(clients) * len(bin_list))).to(param.dtype)


def latent_avgs(
    generator: Generator,
    client_ids: Sequence[int | None],
    n: int = 4096,
    bins: Sequence[int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """`domain_latent_avg` per domain.

    Args:
        generator: the factory generator.
        client_ids: one client id (or None) per domain, e.g. ``[source_id, None]``.
        n: the number of z.
        bins: the slice bins (see `domain_latent_avg`).
        seed: the seed of the z.

    Returns:
        ``(len(client_ids), w_dim)``.
    """
    return torch.stack([domain_latent_avg(generator, c, n=n, bins=bins, seed=seed) for c in client_ids])
