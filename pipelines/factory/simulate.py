"""The data-factory federation replayed in one process (no FL engine), to study the method at larger budgets.

Same updates, seeded 2-of-K draw and uniform averaging as the Fed-BioMed plan, without transport; what it
does per round and leaves out: docs/design/data-factory.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.factory.training import FactoryModel, FactorySettings, FactoryUpdater, is_key_pathway, make_optimizer, reinit_key_pathway, site_local_predicate
from pipelines.sampling import sample_sites


@dataclass
class SimulatedSite:
    """One site's private state: its slices, model copy (with its own key layers),
    optimizer and updater counters.

    Args:
        name: the site's name.
        client_id: its client id (the factory's condition).
        images: (N, 1, R, R) slices in [-1, 1], on the training device.
        bins: (N,) long slice-position bins.
        key: the site's (dim,) domain key, or None.
        model: its model copy (`simulate_federation` makes it).
        optimizer: its optimizer (made at the site's first round).
        updater_state: its `FactoryUpdater.state_dict` between rounds.
    """

    name: str
    client_id: int
    images: torch.Tensor  # (N, 1, R, R) in [-1, 1], on the training device
    bins: torch.Tensor  # (N,) long
    key: torch.Tensor | None = None
    model: FactoryModel | None = None
    optimizer: torch.optim.Optimizer | None = None
    updater_state: dict[str, Any] | None = None

    def require_model(self) -> FactoryModel:
        """The site's model copy.

        Raises:
            ValueError: `simulate_federation` has not made it yet.
        """
        if self.model is None:
            raise ValueError(f"site {self.name}: no model yet (simulate_federation makes it)")
        return self.model


@torch.no_grad()
def load_shared(dst: FactoryModel, src: FactoryModel, is_local: Callable[[str], bool] = is_key_pathway) -> None:
    """Copy every parameter the federation exchanges (all but the site-local ones) from ``src``.

    Args:
        dst: the model that changes (in place).
        src: the model copied.
        is_local: which parameters stay at the site (`site_local_predicate`; default: the key layers).
    """
    src_params = dict(src.named_parameters())
    for name, p in dst.named_parameters():
        if not is_local(name):
            p.copy_(src_params[name])


@torch.no_grad()
def average_into(dst: FactoryModel, sources: list[FactoryModel], is_local: Callable[[str], bool] = is_key_pathway) -> None:
    """dst's exchanged parameters := uniform mean of the sources' (the factory's weighting:
    every sampled site counts the same, whatever its number of slices).

    Args:
        dst: the model that changes (in place).
        sources: the models averaged (same layout).
        is_local: which parameters stay at the site (`site_local_predicate`; default: the key layers).
    """
    params = [dict(m.named_parameters()) for m in sources]
    for name, p in dst.named_parameters():
        if not is_local(name):
            p.copy_(torch.stack([ps[name] for ps in params]).mean(0))


def simulate_federation(
    sites: list[SimulatedSite],
    settings: FactorySettings,
    rounds: int | None,
    local_steps: int,
    batch_size: int,
    clients_per_round: int | None = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    budget_s: float | None = None,
    lr: float = 0.002,
    on_round: Callable[[int, list[str], dict[str, Any], FactoryModel], None] | None = None,
) -> tuple[FactoryModel, list[dict[str, Any]]]:
    """Train the factory over ``rounds`` rounds (or until ``budget_s`` seconds have passed,
    checked between rounds: a round is never partial, as in Fed-BioMed).

    Args:
        sites: the sites (distinct client ids); their model, optimizer and updater state are set here.
        settings: the training settings.
        rounds: number of rounds, or None to run until ``budget_s``.
        local_steps: updates per sampled site per round.
        batch_size: slices per update.
        clients_per_round: sites sampled per round (None: all), seeded as in the plan.
        seed: seed of the initial model, the site sampling and the key layers.
        device: the training device.
        budget_s: wall-clock budget in seconds, or None.
        lr: Adam's learning rate.
        on_round: ``on_round(round, sampled, row, global_model)``, run after each round's aggregation.

    Returns:
        The global model and one history row per round:
        ``{"round", "sampled", "updates", "updates_per_s", "<site>": mean losses}``.

    Raises:
        ValueError: neither ``rounds`` nor ``budget_s``, no sites or repeated client ids, or a
            refinement stage with keys (not modelled).
    """
    if rounds is None and budget_s is None:
        raise ValueError("give rounds or budget_s")
    if not sites or len({s.client_id for s in sites}) != len(sites):
        raise ValueError("sites: need at least one, with distinct client ids")
    if settings.refine_rounds > 0 and any(s.key is not None for s in sites):
        # the refinement stage needs each site's key function; the replay does not model it
        raise ValueError("refine_rounds: the in-process replay has no refinement stage (set refine_rounds 0)")
    device = torch.device(device)
    is_local = site_local_predicate(settings)
    torch.manual_seed(seed)
    global_model = FactoryModel(settings.config).to(device)
    for site in sites:
        site.model = FactoryModel(settings.config).to(device)
        site.model.load_state_dict(global_model.state_dict())
        # each site's own key layers, as the plan draws them (there from site-secret randomness)
        reinit_key_pathway(site.model, torch.Generator().manual_seed(seed * 1009 + site.client_id))
        site.optimizer, site.updater_state = None, None  # made at the site's first round
    by_name = {s.name: s for s in sites}
    history: list[dict[str, Any]] = []
    t_start = time.monotonic()
    round_i = 0
    while (rounds is None or round_i < rounds) and (budget_s is None or time.monotonic() - t_start < budget_s):
        sampled = sample_sites(list(by_name), clients_per_round, seed, round_i)
        t0 = time.monotonic()
        row: dict[str, Any] = {"round": round_i, "sampled": sampled, "updates": 0}
        for name in sampled:
            site = by_name[name]
            model = site.require_model()
            load_shared(model, global_model, is_local)
            if not settings.keep_optimizer_state or site.updater_state is None or site.optimizer is None:
                site.optimizer = make_optimizer(model, lr, settings.r1_interval, settings.pl_interval)
            optimizer = site.optimizer
            updater = FactoryUpdater(model, settings, site.client_id, key=site.key)
            if settings.keep_optimizer_state and site.updater_state is not None:
                updater.load_state_dict(site.updater_state)
            model.train()
            for _ in range(local_steps):
                idx = torch.randint(len(site.images), (batch_size,), device=site.images.device)
                updater.train_step(optimizer, site.images[idx], site.bins[idx])
                row["updates"] += 1
            site.updater_state = updater.state_dict()
            row[name] = {k: v for k, v in updater.means().items() if k != "update_s"}
        average_into(global_model, [by_name[n].require_model() for n in sampled], is_local)
        row["updates_per_s"] = row["updates"] / max(time.monotonic() - t0, 1e-9)
        history.append(row)
        if on_round is not None:
            on_round(round_i, sampled, row, global_model)
        round_i += 1
    return global_model, history


def train_pooled(
    images: torch.Tensor,
    bins: torch.Tensor,
    client_ids: torch.Tensor,
    settings: FactorySettings,
    updates: int | None,
    batch_size: int,
    seed: int = 0,
    budget_s: float | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[FactoryModel, int]:
    """The centralised reference: the same factory and updates on every site's slices
    pooled in one place, each batch mixing client ids.

    Args:
        images: (N, 1, R, R) every site's slices.
        bins: (N,) their slice bins.
        client_ids: (N,) their sites' client ids.
        settings: the training settings.
        updates: number of updates, or None to run until ``budget_s``.
        batch_size: slices per update.
        seed: seed of the model and the batches.
        budget_s: wall-clock budget in seconds, or None.
        on_progress: called with the number of updates done every 500 updates.

    Returns:
        (model, updates done).

    Raises:
        ValueError: neither ``updates`` nor ``budget_s``.
    """
    if updates is None and budget_s is None:
        raise ValueError("give updates or budget_s")
    torch.manual_seed(seed)
    model = FactoryModel(settings.config).to(images.device)
    opt = make_optimizer(model, r1_interval=settings.r1_interval, pl_interval=settings.pl_interval)
    up = FactoryUpdater(model, settings, 0)
    model.train()
    t0, done = time.monotonic(), 0
    while (updates is None or done < updates) and (budget_s is None or time.monotonic() - t0 < budget_s):
        idx = torch.randint(len(images), (batch_size,), device=images.device)
        up.train_step(opt, images[idx], bins[idx], client_ids[idx])
        done += 1
        if on_progress is not None and done % 500 == 0:
            on_progress(done)
    return model, done


def sites_from_slices(per_site: Mapping[str, tuple[int, torch.Tensor, torch.Tensor]], device: str | torch.device = "cpu") -> list[SimulatedSite]:
    """Sites for `simulate_federation` from their slices.

    Args:
        per_site: ``{name: (client_id, images, bins)}``.
        device: where the slices go.

    Returns:
        One `SimulatedSite` per entry, images float and bins long on ``device``.
    """
    return [SimulatedSite(name, int(cid), x.float().to(device), b.long().to(device)) for name, (cid, x, b) in per_site.items()]
