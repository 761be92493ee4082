"""Training the data factory: losses, lazy regularisation and the alternating D/G update (no FL).

`FactoryUpdater.loss` gives the next update's loss; the optimizer's owner steps and calls `after_step`.
The method (StyleGAN2 losses, lazy R1 and path length, G_ema, key refinement): docs/design/data-factory.md.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any, Self

import torch
import torch.nn.functional as F

from pipelines.factory.config import FactoryConfig
from pipelines.factory.discriminator import Discriminator
from pipelines.factory.domain_key import DomainKey
from pipelines.factory.generator import Generator
from pipelines.factory.layers import requires_grad

# The arguments' checks import no torch (spec checks); their names stay importable from here.
from pipelines.factory.plan_args import FACTORY_ARG_KEYS as FACTORY_ARG_KEYS
from pipelines.factory.plan_args import FactorySettings as FactorySettings
from pipelines.factory.plan_args import key_dim_of as key_dim_of
from pipelines.factory.plan_args import parse_factory_args as parse_factory_args

# -- losses ------------------------------------------------------------------------------


def d_logistic_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
    """The discriminator's logistic loss: softplus(D(fake)) + softplus(-D(real)), batch means.

    Args:
        real_pred: (B,) scores of real images.
        fake_pred: (B,) scores of generated images.

    Returns:
        The scalar loss.
    """
    return F.softplus(fake_pred).mean() + F.softplus(-real_pred).mean()


def g_nonsaturating_loss(fake_pred: torch.Tensor) -> torch.Tensor:
    """The generator's non-saturating loss: mean softplus(-D(fake)).

    Args:
        fake_pred: (B,) scores of generated images.

    Returns:
        The scalar loss.
    """
    return F.softplus(-fake_pred).mean()


def r1_penalty(real_pred: torch.Tensor, real_img: torch.Tensor) -> torch.Tensor:
    """R1 penalty: mean over the batch of ||d D(x) / d x||^2 on real images.

    Args:
        real_pred: (B,) scores of ``real_img``.
        real_img: (B, 1, R, R) real images; must require grad.

    Returns:
        The scalar penalty (differentiable: its graph is kept).
    """
    (grad,) = torch.autograd.grad(real_pred.sum(), real_img, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def path_length_penalty(fake_img: torch.Tensor, ws: torch.Tensor, mean_length: float, decay: float = 0.01) -> tuple[torch.Tensor, float, float]:
    """StyleGAN2 path-length regulariser.

    Args:
        fake_img: (B, 1, R, R) generated images.
        ws: (B, num_ws, w_dim) styles; must be part of the graph that produced ``fake_img``.
        mean_length: the running mean path length so far.
        decay: the running mean's update rate.

    Returns:
        (penalty, new running mean, this batch's mean length).
    """
    noise = torch.randn_like(fake_img) / math.sqrt(fake_img.shape[2] * fake_img.shape[3])
    (grad,) = torch.autograd.grad((fake_img * noise).sum(), ws, create_graph=True)
    lengths = grad.pow(2).sum(2).mean(1).sqrt()
    new_mean = mean_length + decay * (float(lengths.mean().detach()) - mean_length)
    penalty = (lengths - new_mean).pow(2).mean()
    return penalty, new_mean, float(lengths.mean().detach())


def key_alignment_loss(centred_fake: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Mean squared angle between each fake's (centred) key embedding and the site key.

    Args:
        centred_fake: (B, dim) centred key embeddings of generated images (`DomainKey.centred`).
        key: the site's (dim,) domain key.

    Returns:
        The scalar loss.
    """
    cos = F.cosine_similarity(centred_fake, key.reshape(1, -1).expand_as(centred_fake), dim=1)
    return torch.arccos(cos.clamp(-1 + 1e-6, 1 - 1e-6)).pow(2).mean()


def diff_augment(x: torch.Tensor, translation: float = 0.0, cutout: float = 0.0, background: float = -1.0) -> torch.Tensor:
    """DiffAugment's geometric policies (Zhao et al. 2020), differentiable in ``x`` (B, C, H, W),
    for what the discriminator sees of real and fake slices alike: each image shifted by up
    to ``translation`` of its size (the uncovered part filled with ``background``) and one
    square of side ``cutout`` of its size set to ``background``. Intensities are never
    changed: the sites' contrast is what the factory has to learn.

    Args:
        x: (B, C, H, W) images.
        translation: largest shift, as a fraction of the image size (0: none).
        cutout: side of the cut-out square, as a fraction of the image size (0: none).
        background: the value of uncovered and cut-out pixels.

    Returns:
        The augmented (B, C, H, W) images.
    """
    b, _, h, w = x.shape
    if translation > 0:
        th, tw = int(h * translation + 0.5), int(w * translation + 0.5)
        dy = torch.randint(-th, th + 1, (b, 1, 1), device=x.device)
        dx = torch.randint(-tw, tw + 1, (b, 1, 1), device=x.device)
        gb, gy, gx = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(h, device=x.device),
                                    torch.arange(w, device=x.device), indexing="ij")  # fmt: skip
        # indices into the image padded by one background pixel; out-of-range reads land on the pad
        gy = (gy + dy + 1).clamp(0, h + 1)
        gx = (gx + dx + 1).clamp(0, w + 1)
        padded = F.pad(x, (1, 1, 1, 1), value=background)
        x = padded.permute(0, 2, 3, 1)[gb, gy, gx].permute(0, 3, 1, 2)
    if cutout > 0:
        ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
        cy = torch.randint(0, h, (b, 1, 1), device=x.device)
        cx = torch.randint(0, w, (b, 1, 1), device=x.device)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        inside = ((ys - cy).abs() * 2 < ch) & ((xs - cx).abs() * 2 < cw)
        x = torch.where(inside[:, None], torch.full_like(x, background), x)
    return x


def lazy_adam_settings(lr: float, interval: int, beta2: float = 0.99) -> tuple[float, tuple[float, float]]:
    """Adam lr and betas corrected for a regulariser applied every ``interval`` updates.

    Args:
        lr: the uncorrected learning rate.
        interval: updates between two regulariser steps (0: no correction).
        beta2: Adam's uncorrected beta2 (beta1 is 0).

    Returns:
        (lr, (beta1, beta2)).
    """
    ratio = interval / (interval + 1) if interval > 0 else 1.0
    return lr * ratio, (0.0, beta2**ratio)


@torch.no_grad()
def accumulate(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move ``ema``'s parameters towards ``model``'s: ema = decay * ema + (1 - decay) * model.

    Args:
        ema: the moving average (updated in place).
        model: the network it follows (same parameter layout).
        decay: weight of the old average.
    """
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.mul_(decay).add_(p.detach(), alpha=1 - decay)


# -- the model Fed-BioMed aggregates and its optimizer -------------------------------------


class FactoryModel(torch.nn.Module):
    """G, D and G_ema in one module: the federation averages all their parameters (there
    are no persistent buffers). G_ema never receives gradients.

    Args:
        config: the factory configuration.
    """

    def __init__(self, config: FactoryConfig):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        self.g_ema = copy.deepcopy(self.generator).eval()
        requires_grad(self.g_ema, False)

    def train(self, mode: bool = True) -> Self:
        """Set training mode of G and D; G_ema stays in eval mode.

        Args:
            mode: training (True) or eval (False).

        Returns:
            This module.
        """
        super().train(mode)
        self.g_ema.eval()  # G_ema is only ever sampled
        return self


# The layers that read the domain key. A site's key is constant, so the gradient of the
# first of them is outer(delta, key): its update would show the coordinator the key's sign
# pattern (Adam with beta1 = 0 makes it exact). These layers are therefore site-local: never
# sent, never averaged, initialised from site-secret randomness and kept in the site's work
# folder. Everything downstream only ever sees the key through them.
KEY_PATHWAY = ("generator.embed.key_embed.", "g_ema.embed.key_embed.", "discriminator.key_embed.")


# The client-id (and slice-bin) embeddings: the conditional pathway a site meets its objective
# through. The proximal term (``prox_mu``) spares them, so that a site pulled back towards the
# global synthesis weights has to express its domain through its id's embedding instead.
CONDITIONAL_PATHWAY = (
    "generator.embed.label_embed.",
    "g_ema.embed.label_embed.",
    "generator.id_offset.",  # the W-space offset per client id (``factory.w_offset``)
    "g_ema.id_offset.",
    "discriminator.label_embed.",
)

# What ``local_discriminator`` keeps at the site besides the key layers: D's projection
# embedding of the client id, or all of D. Such a D only ever sees its own site's slices and
# is never averaged with the others, so it stays sharp on its site's contrast; only G (and
# G_ema) are averaged, and phase 2 uses only G_ema.
LOCAL_DISCRIMINATOR_PARTS = {"none": (), "projection": ("discriminator.label_embed.",), "all": ("discriminator.",)}


def site_local_predicate(settings: FactorySettings | None = None) -> Callable[[str], bool]:
    """Which parameters of `FactoryModel` stay at the site: the key layers, and the
    discriminator parts ``settings.local_discriminator`` names.

    Args:
        settings: the training settings (None: the key layers only).

    Returns:
        ``is_local(name) -> bool``.
    """
    parts = KEY_PATHWAY + LOCAL_DISCRIMINATOR_PARTS[settings.local_discriminator if settings is not None else "none"]

    def is_local(name: str) -> bool:
        return name.startswith(parts)

    return is_local


def is_key_pathway(name: str) -> bool:
    """Whether a parameter of `FactoryModel` belongs to the site-local key layers (`KEY_PATHWAY`).

    Args:
        name: a parameter name of `FactoryModel`.

    Returns:
        True for the key layers' parameters.
    """
    return name.startswith(KEY_PATHWAY)


def is_conditional_pathway(name: str) -> bool:
    """Whether a parameter of `FactoryModel` embeds the client id and slice bin (`CONDITIONAL_PATHWAY`).

    Args:
        name: a parameter name of `FactoryModel`.

    Returns:
        True for the label embeddings' parameters.
    """
    return name.startswith(CONDITIONAL_PATHWAY)


def proximal_anchor(model: FactoryModel, is_local: Callable[[str], bool] = is_key_pathway) -> dict[str, torch.Tensor]:
    """The round's starting point of the weights the proximal term holds a site near.

    G's and D's shared weights as received (G_ema has no gradient; the site-local layers
    and the conditional pathway are left free).

    Args:
        model: the site's model, the global weights just loaded.
        is_local: which parameters stay at the site (`site_local_predicate`; default: the key layers).

    Returns:
        ``{parameter name: detached copy}``.
    """
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.startswith(("generator.", "discriminator.")) and not is_local(n) and not is_conditional_pathway(n)
    }


def proximal_term(model: FactoryModel, anchor: dict[str, torch.Tensor], network: str) -> torch.Tensor:
    """FedProx's term on one network: 0.5 * sum of squared distances to the anchor.

    Args:
        model: the site's model.
        anchor: `proximal_anchor` of the round.
        network: ``"generator"`` or ``"discriminator"``: the network this update trains.

    Returns:
        The scalar term (0 at the anchor; its gradient never reaches the conditional pathway or the key layers).
    """
    prefix = f"{network}."
    terms = [((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n.startswith(prefix) and n in anchor]
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return 0.5 * torch.stack(terms).sum()


def key_pathway_state(model: FactoryModel, is_local: Callable[[str], bool] = is_key_pathway) -> dict[str, torch.Tensor]:
    """A detached copy of the site-local parameters (the key layers, and a local discriminator's).

    Args:
        model: the site's model.
        is_local: which parameters stay at the site (`site_local_predicate`; default: the key layers).

    Returns:
        ``{parameter name: tensor}`` for every site-local parameter.
    """
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_local(n)}


@torch.no_grad()
def load_key_pathway(model: FactoryModel, state: dict[str, torch.Tensor], is_local: Callable[[str], bool] = is_key_pathway) -> bool:
    """Load a site's local parameters (`key_pathway_state`).

    Args:
        model: the site's model (changed in place).
        state: the saved parameters.
        is_local: which parameters stay at the site (`site_local_predicate`; default: the key layers).

    Returns:
        True when loaded; False (nothing changed) when they do not fit this model.
    """
    params = dict(model.named_parameters())
    mine = {n for n in params if is_local(n)}
    if set(state) != mine or any(params[n].shape != state[n].shape for n in mine):
        return False
    for n in mine:
        params[n].copy_(state[n])
    return True


@torch.no_grad()
def reinit_key_pathway(model: FactoryModel, generator: torch.Generator) -> None:
    """Fresh key layers from ``generator`` (equalized-lr init: standard normal); G_ema's
    start as a copy of G's.

    Args:
        model: the site's model (changed in place).
        generator: the site-secret source of randomness.
    """
    params = dict(model.named_parameters())
    for n, p in params.items():
        if is_key_pathway(n) and not n.startswith("g_ema."):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    for n, p in params.items():
        if n.startswith("g_ema.") and is_key_pathway(n):
            p.copy_(params["generator." + n[len("g_ema.") :]])


def make_optimizer(model: FactoryModel, lr: float = 0.002, r1_interval: int = 16, pl_interval: int = 4) -> torch.optim.Adam:
    """One Adam with a G group and a D group, each with its lazy-regularisation corrected lr
    and betas. Adam keeps per-parameter state, so this is exactly two Adams; a frozen
    network has no gradients in an update and Adam skips it (no moment decay, no step).

    Args:
        model: the factory.
        lr: the uncorrected learning rate.
        r1_interval: D updates between R1 steps.
        pl_interval: G updates between path-length steps.

    Returns:
        The optimizer (groups named ``generator`` and ``discriminator``).
    """
    g_lr, g_betas = lazy_adam_settings(lr, pl_interval)
    d_lr, d_betas = lazy_adam_settings(lr, r1_interval)
    return torch.optim.Adam(
        [
            {"params": list(model.generator.parameters()), "lr": g_lr, "betas": g_betas, "name": "generator"},
            {"params": list(model.discriminator.parameters()), "lr": d_lr, "betas": d_betas, "name": "discriminator"},
        ],
        eps=1e-8,
    )


# -- the alternating update ----------------------------------------------------------------


class FactoryUpdater:
    """The site's training state and its next update.

    Args:
        model: the site's factory.
        settings: the training settings.
        client_id: the site's client id.
        key: the site's domain key (dim,), or None.
        domain_key: the key function (needed only for the key-alignment loss of the
            refinement stage).
        refine: the refinement stage (key alignment; needs ``key`` and ``domain_key``).
    """

    def __init__(self, model: FactoryModel, settings: FactorySettings, client_id: int, key: torch.Tensor | None = None,
                 domain_key: DomainKey | None = None, refine: bool = False):  # fmt: skip
        self.model = model
        self.s = settings
        self.client_id = int(client_id)
        self.key = key
        self.domain_key = domain_key
        self.refine = bool(refine and key is not None and domain_key is not None and settings.key_align_weight > 0)
        self.updates = 0
        self.d_steps = 0
        self.g_steps = 0
        self.pl_mean = 0.0
        self._ema_pending = False
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        # FedProx-style pull towards the weights this round started from (the global ones)
        self.anchor = proximal_anchor(model, site_local_predicate(settings)) if settings.prox_mu > 0 else None

    # state that a long-lived client would keep across rounds (with the optimizer's)
    def state_dict(self) -> dict[str, Any]:
        """The update counters and the path-length mean (JSON-serialisable)."""
        return {"updates": self.updates, "d_steps": self.d_steps, "g_steps": self.g_steps, "pl_mean": self.pl_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` gave.

        Args:
            state: a `state_dict` result.
        """
        self.updates = int(state["updates"])
        self.d_steps = int(state["d_steps"])
        self.g_steps = int(state["g_steps"])
        self.pl_mean = float(state["pl_mean"])

    @property
    def next_phase(self) -> str:
        """``"D"`` or ``"G"``: which network the next update trains (they alternate)."""
        return "D" if self.updates % 2 == 0 else "G"

    def _track(self, **values: float | torch.Tensor) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        """The mean of every tracked value (losses, penalties, timings) since this updater was made."""
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def _ids(self, n: int, ids: torch.Tensor | None) -> torch.Tensor:
        return ids if ids is not None else torch.full((n,), self.client_id, dtype=torch.long, device=self._device)

    def _key(self, use_key: bool) -> torch.Tensor | None:
        return self.key.to(self._device) if (use_key and self.key is not None) else None

    def _aug(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees of a real or fake batch (the same augmentation for both)."""
        return diff_augment(x, **self.s.diff_augment) if self.s.diff_augment else x

    def _fake_condition(self, n: int, bins: torch.Tensor | None, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditions for ``n`` fakes drawn from the real batch's (the site's own slice
        positions; with per-sample client ids, their ids too)."""
        pick = torch.randint(self._batch, (n,), device=self._device)
        return self._ids(n, None if ids is None else ids[pick]), None if bins is None else bins[pick]

    def loss(self, real: torch.Tensor, bins: torch.Tensor | None = None, client_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of the next update; the other network is frozen (requires_grad False).

        Args:
            real: (B, 1, R, R) real slices.
            bins: (B,) their slice bins, or None.
            client_ids: (B,) per-sample client ids of a pooled batch (the centralised
                baseline); a site's own updates leave it None (every slice is its own id).

        Returns:
            The scalar loss; call ``backward``, step the optimizer, then `after_step`.
        """
        if self._ema_pending:
            self.after_step()
        self._device = real.device
        self._batch = real.shape[0]
        G, D = self.model.generator, self.model.discriminator
        use_key = self.key is not None and float(torch.rand(())) >= self.s.key_drop
        batch = real.shape[0]
        z_dim = self.model.config.z_dim
        t0 = time.perf_counter()
        loss: torch.Tensor
        if self.next_phase == "D":
            requires_grad(G, False)
            requires_grad(D, True)
            if self.s.r1_gamma > 0 and self.d_steps % self.s.r1_interval == 0:
                real = real.detach().requires_grad_(True)
                key = self._key(use_key)
                pred = D(self._aug(real), self._ids(batch, client_ids), bins, key)  # R1 w.r.t. the slice itself
                r1 = r1_penalty(pred, real)
                loss = self.s.r1_gamma / 2 * r1 * self.s.r1_interval + 0 * pred.sum()
                self._track(r1=r1.detach())
            else:
                key = self._key(use_key)
                fc, fb = self._fake_condition(batch, bins, client_ids)
                with torch.no_grad():
                    fake = G(torch.randn(batch, z_dim, device=self._device), fc, fb, key)
                own = self._ids(batch, client_ids)
                real_phi = D.features(self._aug(real))
                real_pred, fake_pred = D.score(real_phi, own, bins, key), D(self._aug(fake), fc, fb, key)
                loss = d_logistic_loss(real_pred, fake_pred)
                self._track(d_loss=loss.detach(), d_real=real_pred.detach().mean(), d_fake=fake_pred.detach().mean())
                n_clients = self.model.config.n_clients
                if self.s.mismatch_weight > 0 and n_clients > 1:
                    # matching-aware D (GAN-CLS): a real slice under another client id is a
                    # negative, so D learns what the other ids must NOT look like from data
                    # the site holds (a site only ever has its own id's real slices)
                    wrong = (own + torch.randint(1, n_clients, (batch,), device=self._device)) % n_clients
                    mis_pred = D.score(real_phi, wrong, bins, None)
                    mismatch = F.softplus(mis_pred).mean()
                    loss = loss + self.s.mismatch_weight * mismatch
                    self._track(d_mismatch=mismatch.detach())
            self.d_steps += 1
        else:
            requires_grad(G, True)
            requires_grad(D, False)
            if self.s.pl_weight > 0 and self.g_steps % self.s.pl_interval == 0:
                n = max(1, batch // self.s.pl_batch_shrink)
                key = self._key(use_key)
                fc, fb = self._fake_condition(n, bins, client_ids)
                fake, ws = G(torch.randn(n, z_dim, device=self._device), fc, fb, key, return_ws=True)
                penalty, self.pl_mean, length = path_length_penalty(fake, ws, self.pl_mean, self.s.pl_decay)
                loss = self.s.pl_weight * self.s.pl_interval * penalty + 0 * fake[:, 0, 0, 0].sum()
                self._track(pl_penalty=penalty.detach(), path_length=length)
            else:
                key = self._key(use_key)
                fc, fb = self._fake_condition(batch, bins, client_ids)
                fake = G(torch.randn(batch, z_dim, device=self._device), fc, fb, key)
                loss = g_nonsaturating_loss(D(self._aug(fake), fc, fb, key))
                self._track(g_loss=loss.detach())
                if self.refine and key is not None and self.domain_key is not None:  # refine implies a domain_key
                    align = key_alignment_loss(self.domain_key.centred(fake), key)
                    loss = loss + self.s.key_align_weight * align
                    self._track(key_align=align.detach())
            self.g_steps += 1
            self._ema_pending = True
        if self.anchor is not None:
            prox = proximal_term(self.model, self.anchor, "discriminator" if self.next_phase == "D" else "generator")
            loss = loss + self.s.prox_mu * prox
            self._track(prox=prox.detach())
        self.updates += 1
        self._track(key_used=float(use_key), update_s=time.perf_counter() - t0)
        return loss

    def after_step(self) -> None:
        """After the optimizer step of a G update: move G_ema towards G."""
        if self._ema_pending:
            accumulate(self.model.g_ema, self.model.generator, self.s.ema_decay)
            self._ema_pending = False

    def train_step(self, optimizer: torch.optim.Optimizer, real: torch.Tensor, bins: torch.Tensor | None = None,
                   client_ids: torch.Tensor | None = None) -> float:  # fmt: skip
        """One whole update outside Fed-BioMed (benchmarks, tests).

        Args:
            optimizer: the model's optimizer (`make_optimizer`).
            real: (B, 1, R, R) real slices.
            bins: (B,) their slice bins, or None.
            client_ids: (B,) per-sample client ids of a pooled batch, or None.

        Returns:
            The update's loss.
        """
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(real, bins, client_ids)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        optimizer.step()
        self.after_step()
        return float(loss.detach())
