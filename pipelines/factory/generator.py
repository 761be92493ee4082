"""The data factory's conditional StyleGAN2-style generator: the mapping network and the `Generator`
that ties the condition, the mapping and the synthesis network together (single channel, pure PyTorch).

Architecture, style mixing and truncation: docs/design/data-factory.md.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.factory.conditioning import ConditionEmbedding, IndexLike, KeyLike, label_onehot
from pipelines.factory.config import FactoryConfig
from pipelines.factory.layers import EqualLinear, pixel_norm
from pipelines.factory.synthesis import FeatureHook, NoiseInput, SynthesisNetwork

__all__ = ["Generator", "MappingNetwork"]


class MappingNetwork(nn.Module):
    """[PixelNorm(z) || condition] -> mapping_layers equalized linear layers (lr_mul, lrelu) -> w.

    Args:
        cfg: the factory configuration (``z_dim``, ``w_dim``, ``mapping_layers``, ``mapping_lr_mul``).
    """

    def __init__(self, cfg: FactoryConfig):
        super().__init__()
        dims = [cfg.z_dim + cfg.w_dim] + [cfg.w_dim] * cfg.mapping_layers
        self.layers = nn.ModuleList(EqualLinear(dims[i], dims[i + 1], lr_mul=cfg.mapping_lr_mul, activation="lrelu") for i in range(cfg.mapping_layers))

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Map latents to styles.

        Args:
            z: (B, z_dim) latents.
            condition: (B, w_dim) condition vectors (`ConditionEmbedding`).

        Returns:
            (B, w_dim) style vectors w.
        """
        x = torch.cat([pixel_norm(z), condition], dim=1)
        for layer in self.layers:
            x = layer(x)
        return x


# -- generator ------------------------------------------------------------------------------------


class Generator(nn.Module):
    """Conditional StyleGAN2-style generator: (z, client_id, slice_bin, key) -> (B, 1, R, R).

    ``client_id`` / ``slice_bin``: int or (B,) ints; ``key``: (key_dim,) or (B, key_dim), or
    None. Invalid conditions raise ValueError naming the argument.

    Args:
        cfg: the factory configuration (default: ``FactoryConfig()``).
    """

    def __init__(self, cfg: FactoryConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else FactoryConfig()
        self.embed = ConditionEmbedding(self.cfg)
        self.mapping_network = MappingNetwork(self.cfg)
        # ``w_offset``: one learned vector per client id added to w (zero at the start: the
        # factory begins as without it); it reads nothing but the id
        self.id_offset: EqualLinear | None = None
        if self.cfg.w_offset:
            self.id_offset = EqualLinear(self.cfg.n_clients, self.cfg.w_dim, bias=False, lr_mul=self.cfg.w_offset_lr_mul)
            nn.init.zeros_(self.id_offset.weight)
        self.synthesis_network = SynthesisNetwork(self.cfg)
        self.num_ws = self.synthesis_network.num_ws
        self.num_noise = self.synthesis_network.num_noise

    # conditioning / mapping

    def condition(self, client_id: IndexLike, slice_bin: IndexLike | None = None, key: KeyLike | None = None, *, batch: int | None = None) -> torch.Tensor:
        """The condition vector.

        Args:
            client_id: int or (B,) client ids.
            slice_bin: int or (B,) slice bins, or None.
            key: (key_dim,) or (B, key_dim) domain key, or None.
            batch: broadcast scalars to this batch size.

        Returns:
            (B, w_dim) condition vectors.
        """
        cond: torch.Tensor = self.embed(client_id, slice_bin, key, batch=batch)
        return cond

    def w_offset(self, client_id: IndexLike, batch: int) -> torch.Tensor | None:
        """The per-client-id offset in W space (``cfg.w_offset``), or None without one.

        Args:
            client_id: int or (B,) client ids.
            batch: B (a scalar id is broadcast to it).

        Returns:
            (B, w_dim) offsets, or None when the factory has no offset.

        Raises:
            ValueError: invalid client ids.
        """
        if self.id_offset is None:
            return None
        like = self.id_offset.weight
        onehot = label_onehot(client_id, None, batch, self.cfg.n_clients, 0, like.device).to(like.dtype)
        offset: torch.Tensor = self.id_offset(onehot)
        return offset

    def _map(self, z: torch.Tensor, cond: torch.Tensor, truncation_psi: float, w_avg: torch.Tensor | None, offset: torch.Tensor | None = None) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"z: expected shape (B, {self.cfg.z_dim}) (got {tuple(z.shape)})")
        w: torch.Tensor = self.mapping_network(z.to(cond.dtype), cond)
        if offset is not None:
            w = w + offset
        if truncation_psi != 1.0:
            assert w_avg is not None  # _w_avg gives one whenever truncation_psi != 1
            w = w_avg + truncation_psi * (w - w_avg)
        return w

    def _w_avg(
        self, cond: torch.Tensor, truncation_psi: float, w_avg: torch.Tensor | None, offset: torch.Tensor | None = None, n: int = 1024
    ) -> torch.Tensor | None:
        if truncation_psi == 1.0:
            return None
        if w_avg is not None:
            return torch.as_tensor(w_avg, device=cond.device, dtype=cond.dtype)
        return self._mean_w_for(cond, n=n, seed=0, offset=offset)

    @torch.no_grad()
    def _mean_w_for(self, cond: torch.Tensor, n: int, seed: int, offset: torch.Tensor | None = None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.cfg.z_dim, generator=gen).to(device=cond.device, dtype=cond.dtype)
        out = []
        for c in cond:  # one condition at a time keeps memory at n x w_dim
            out.append(self.mapping_network(z, c[None].expand(n, -1)).mean(0))
        mean = torch.stack(out)
        return mean if offset is None else mean + offset  # the id's offset moves its whole cloud of w

    def mean_w(
        self, client_id: IndexLike, slice_bin: IndexLike | None = None, key: KeyLike | None = None, n: int = 1024, seed: int = 0, *, batch: int | None = None
    ) -> torch.Tensor:
        """Per-condition average w over ``n`` seeded latents, for truncation.

        Args:
            client_id: int or (B,) client ids.
            slice_bin: int or (B,) slice bins, or None.
            key: (key_dim,) or (B, key_dim) domain key, or None.
            n: number of latents averaged per condition.
            seed: seed of the latents (a local generator; the global RNG is not touched).
            batch: broadcast scalars to this batch size.

        Returns:
            (B, w_dim) average styles.
        """
        cond = self.condition(client_id, slice_bin, key, batch=batch).detach()
        return self._mean_w_for(cond, n=n, seed=seed, offset=self.w_offset(client_id, cond.shape[0]))

    def mapping(
        self,
        z: torch.Tensor,
        client_id: IndexLike,
        slice_bin: IndexLike | None = None,
        key: KeyLike | None = None,
        truncation_psi: float = 1.0,
        w_avg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The style vectors of latents under a condition.

        Args:
            z: (B, z_dim) latents.
            client_id: int or (B,) client ids.
            slice_bin: int or (B,) slice bins, or None.
            key: (key_dim,) or (B, key_dim) domain key, or None.
            truncation_psi: with ``!= 1``, w is pulled towards ``w_avg``.
            w_avg: the truncation centre (default: the per-condition `mean_w`).

        Returns:
            (B, w_dim) style vectors w.

        Raises:
            ValueError: misshapen ``z`` or an invalid condition.
        """
        cond = self.condition(client_id, slice_bin, key, batch=z.shape[0])
        offset = self.w_offset(client_id, z.shape[0])
        return self._map(z, cond, truncation_psi, self._w_avg(cond, truncation_psi, w_avg, offset), offset)

    # synthesis

    def synthesis(
        self,
        ws: torch.Tensor,
        noise_mode: str = "random",
        noise: NoiseInput | None = None,
        return_features: bool = False,
        feature_hook: FeatureHook | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Images from styles (`SynthesisNetwork.forward`).

        Args:
            ws: (B, num_ws, w_dim) styles.
            noise_mode: ``"random"``, ``"const"`` (`const_noise`) or ``"none"``.
            noise: ``num_noise`` tensors (B or 1, 1, r, r); None entries fall back to ``noise_mode``.
            return_features: also return one feature map per resolution 4..R (channels ``cfg.channels``).
            feature_hook: ``callable(resolution: int, x: Tensor) -> Tensor`` applied to each
                block's output feature (after its ToRGB, before the next block); the returned
                features are the hooked ones (phase-2 encoders inject their residual features
                this way).

        Returns:
            img (B, 1, R, R), or (img, features) with ``return_features``.

        Raises:
            ValueError: misshapen ``ws`` or noise, an unknown ``noise_mode``, or a hook that
                changes a feature's shape.
        """
        out: torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]] = self.synthesis_network(
            ws, noise_mode=noise_mode, noise=noise, return_features=return_features, feature_hook=feature_hook
        )
        return out

    def noise_shapes(self, batch: int) -> list[tuple[int, int, int, int]]:
        """The shapes of the ``num_noise`` noise inputs.

        Args:
            batch: B.

        Returns:
            One (B, 1, r, r) shape per conv.
        """
        return self.synthesis_network.noise_shapes(batch)

    def const_noise(self) -> list[torch.Tensor]:
        """The fixed noise maps used by ``noise_mode='const'`` (seeded with 1234), (1, 1, r, r)."""
        return self.synthesis_network.const_noise()

    # full pass

    def forward(
        self,
        z: torch.Tensor,
        client_id: IndexLike,
        slice_bin: IndexLike | None = None,
        key: KeyLike | None = None,
        noise_mode: str = "random",
        noise: NoiseInput | None = None,
        mix_z: torch.Tensor | None = None,
        return_features: bool = False,
        return_ws: bool = False,
        truncation_psi: float = 1.0,
        w_avg: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor | list[torch.Tensor], ...]:
        """Generate images for latents under a condition.

        In training mode, with probability ``style_mixing_prob`` (one draw from torch's global
        RNG per call), the styles from a random crossover index on come from a second latent
        (``mix_z`` or fresh ``randn``) with the same condition. Never in eval mode.

        Args:
            z: (B, z_dim) latents.
            client_id: int or (B,) client ids.
            slice_bin: int or (B,) slice bins, or None.
            key: (key_dim,) or (B, key_dim) domain key, or None.
            noise_mode: ``"random"``, ``"const"`` or ``"none"`` (see `synthesis`).
            noise: explicit noise maps (see `synthesis`).
            mix_z: the second latent of style mixing (default: fresh ``randn``).
            return_features: also return the per-resolution features.
            return_ws: also return the (B, num_ws, w_dim) styles.
            truncation_psi: with ``!= 1``, w is pulled towards ``w_avg``.
            w_avg: the truncation centre (default: the per-condition `mean_w`).

        Returns:
            img (B, 1, R, R); with ``return_ws`` and/or ``return_features`` a tuple
            ``(img, ws)``, ``(img, features)`` or ``(img, ws, features)``.

        Raises:
            ValueError: misshapen inputs or an invalid condition.
        """
        cond = self.condition(client_id, slice_bin, key, batch=z.shape[0])
        offset = self.w_offset(client_id, z.shape[0])
        avg = self._w_avg(cond, truncation_psi, w_avg, offset)
        w = self._map(z, cond, truncation_psi, avg, offset)
        ws = w[:, None].expand(-1, self.num_ws, -1)
        p = self.cfg.style_mixing_prob
        if self.training and p > 0 and self.num_ws > 1 and float(torch.rand(())) < p:
            cutoff = int(torch.randint(1, self.num_ws, ()))
            z2 = mix_z if mix_z is not None else torch.randn_like(z)
            w2 = self._map(z2, cond, truncation_psi, avg, offset)
            ws = torch.cat([ws[:, :cutoff], w2[:, None].expand(-1, self.num_ws - cutoff, -1)], dim=1)
        out = self.synthesis(ws, noise_mode=noise_mode, noise=noise, return_features=return_features)
        # a tuple exactly when return_features
        img, features = out if isinstance(out, tuple) else (out, None)
        if not (return_ws or return_features):
            return img
        result: list[torch.Tensor | list[torch.Tensor]] = [img]
        if return_ws:
            result.append(ws)
        if return_features:
            assert features is not None
            result.append(features)
        return tuple(result)
