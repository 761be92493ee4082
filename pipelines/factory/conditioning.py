"""The data factory's condition: client id and slice-position bin (one-hot) and the optional
domain key, checked and broadcast to a batch, and the generator's condition embedding.

Shared by the generator and the discriminator; design: docs/design/data-factory.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipelines.factory.config import FactoryConfig
from pipelines.factory.layers import EqualLinear, pixel_norm

__all__ = ["ConditionEmbedding", "IndexLike", "KeyLike", "as_key", "batch_of", "label_onehot"]

# A client id or slice bin: one int for the whole batch, or one per sample.
IndexLike = int | Sequence[int] | torch.Tensor
# A domain key: (key_dim,) for the whole batch or (B, key_dim); None: no key.
KeyLike = torch.Tensor | Sequence[float] | Sequence[Sequence[float]]


def _as_index(value: IndexLike, name: str, batch: int, n: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name}: must be integer(s) (got dtype {t.dtype})")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected an int or shape ({batch},) (got {tuple(t.shape)})")
    elif t.shape[0] == 1:
        t = t.expand(batch)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"{name}: values must be in [0, {n - 1}] (got {t.tolist()})")
    return t


def batch_of(client_id: IndexLike, slice_bin: IndexLike | None, key: KeyLike | None, batch: int | None) -> int:
    """The batch size the condition inputs agree on.

    Args:
        client_id: int or (B,) client ids.
        slice_bin: int, (B,) slice bins or None.
        key: (key_dim,) or (B, key_dim) key, or None.
        batch: an explicit batch size, or None.

    Returns:
        B; 1 when every input is a scalar (or of length 1) and ``batch`` is None.

    Raises:
        ValueError: the inputs give different batch sizes.
    """
    sizes = set()
    for v in (client_id, slice_bin):
        if isinstance(v, torch.Tensor) and v.ndim == 1 and v.shape[0] != 1:
            sizes.add(int(v.shape[0]))
        elif isinstance(v, (list, tuple)) and len(v) != 1:
            sizes.add(len(v))
    if isinstance(key, torch.Tensor) and key.ndim == 2 and key.shape[0] != 1:
        sizes.add(int(key.shape[0]))
    if batch is not None:
        sizes.add(int(batch))
    if len(sizes) > 1:
        raise ValueError(f"inconsistent batch sizes in client_id / slice_bin / key / z: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def label_onehot(client_id: IndexLike, slice_bin: IndexLike | None, batch: int, n_clients: int, n_bins: int, device: torch.device) -> torch.Tensor:
    """onehot(client_id, n_clients) || onehot(slice_bin, n_bins) as (B, n_clients + n_bins) float.

    Args:
        client_id: int or (B,) client ids in [0, n_clients).
        slice_bin: int or (B,) slice bins in [0, n_bins), or None.
        batch: B (scalars are broadcast to it).
        n_clients: number of client ids.
        n_bins: number of slice bins (0: no bin part).
        device: where the result lives.

    Returns:
        (B, n_clients + n_bins) float; the bin part is zeros when ``n_bins == 0`` or
        ``slice_bin is None``.

    Raises:
        ValueError: non-integer, misshapen or out-of-range ids or bins.
    """
    ids = _as_index(client_id, "client_id", batch, n_clients, device)
    out = torch.zeros(batch, n_clients + n_bins, device=device)
    out[torch.arange(batch, device=device), ids] = 1.0
    if n_bins > 0 and slice_bin is not None:
        bins = _as_index(slice_bin, "slice_bin", batch, n_bins, device)
        out[torch.arange(batch, device=device), n_clients + bins] = 1.0
    return out


def as_key(key: KeyLike | None, batch: int, key_dim: int, like: torch.Tensor) -> torch.Tensor | None:
    """The domain key as a (B, key_dim) tensor on ``like``'s device and dtype.

    Args:
        key: (key_dim,) or (B or 1, key_dim) key, or None.
        batch: B.
        key_dim: the factory's key dimension (0: no key conditioning).
        like: a tensor whose device and dtype the key takes.

    Returns:
        (B, key_dim), or None when ``key`` is None.

    Raises:
        ValueError: a key for a factory without key conditioning, or a misshapen key.
    """
    if key is None:
        return None
    if key_dim == 0:
        raise ValueError("key: this factory has no key conditioning (key_dim = 0); pass key=None")
    k = torch.as_tensor(key).to(device=like.device, dtype=like.dtype)
    given = tuple(k.shape)
    if k.ndim == 1:
        k = k[None]
    if k.ndim != 2 or k.shape[1] != key_dim or k.shape[0] not in (1, batch):
        raise ValueError(f"key: expected shape ({key_dim},) or ({batch}, {key_dim}) (got {given})")
    return k.expand(batch, key_dim)


class ConditionEmbedding(nn.Module):
    """condition = PixelNorm(key_mix * PixelNorm(MLP_no_bias(key)) + (1 - key_mix) * PixelNorm(Linear(label))).

    Args:
        cfg: the factory configuration (label and key sizes, ``w_dim``, ``key_mix``).
    """

    def __init__(self, cfg: FactoryConfig):
        super().__init__()
        self.cfg = cfg
        self.label_embed = EqualLinear(cfg.label_dim, cfg.w_dim, lr_mul=cfg.label_lr_mul)
        self.key_embed: nn.Sequential | None
        if cfg.key_dim > 0:
            self.key_embed = nn.Sequential(
                EqualLinear(cfg.key_dim, cfg.w_dim, bias=False, activation="lrelu"),
                EqualLinear(cfg.w_dim, cfg.w_dim, bias=False),
            )
        else:
            self.key_embed = None

    def forward(self, client_id: IndexLike, slice_bin: IndexLike | None = None, key: KeyLike | None = None, batch: int | None = None) -> torch.Tensor:
        """Embed a condition.

        Args:
            client_id: int or (B,) client ids.
            slice_bin: int or (B,) slice bins, or None.
            key: (key_dim,) or (B, key_dim) domain key, or None (the key part is then zero).
            batch: broadcast scalars to this batch size.

        Returns:
            (B, w_dim) condition vectors.

        Raises:
            ValueError: inconsistent batch sizes or invalid ids, bins or key.
        """
        cfg = self.cfg
        like = self.label_embed.weight
        b = batch_of(client_id, slice_bin, key, batch)
        label = label_onehot(client_id, slice_bin, b, cfg.n_clients, cfg.n_bins, like.device).to(like.dtype)
        label_emb = pixel_norm(self.label_embed(label))
        k = as_key(key, b, cfg.key_dim, like)
        # as_key refuses a key when key_dim == 0, so k is None whenever key_embed is
        key_emb = pixel_norm(self.key_embed(k)) if k is not None and self.key_embed is not None else torch.zeros_like(label_emb)
        return pixel_norm(cfg.key_mix * key_emb + (1.0 - cfg.key_mix) * label_emb)
