"""The data-factory plan's arguments (``plan_args``): keys, checks, `FactorySettings`.

`parse_factory_args` validates an experiment spec's ``plan_args`` for the data-factory plan
with messages naming the key; the coordinator checks them before sending, the node again on
arrival. Checking needs no network, so this module imports neither torch nor MONAI;
`pipelines.factory.training` re-exports its names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.factory.config import FactoryConfig
from pipelines.factory.key_config import validate_key_config
from pipelines.site_state import is_plain_name


@dataclass(frozen=True)
class FactorySettings:
    config: FactoryConfig
    key: dict[str, Any] | None = field(default_factory=dict)  # key-function config; None: no key (ablation)
    r1_gamma: float = 10.0
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2
    ema_decay: float = 0.9978
    key_drop: float = 0.5
    mismatch_weight: float = 0.0  # D also scores real slices under another client id as fake
    diff_augment: dict[str, float] | None = None  # {translation, cutout}: DiffAugment for D's inputs
    key_align_weight: float = 50.0
    refine_rounds: int = 0  # the last N rounds of the run add the key-alignment loss
    spacing: Any = "schema"
    min_foreground: float = 0.05
    sample_every: int = 5  # sample grids and kept checkpoints every N rounds (coordinator side)
    keep_optimizer_state: bool = True
    rounds_total: int | None = None  # filled in by the coordinator
    local_steps: int | None = None
    run_id: str | None = None
    client_ids: dict[str, int] = field(default_factory=dict)  # node id -> client id (coordinator)

    def refining(self, round_index: int) -> bool:
        total = self.rounds_total or 1
        return self.refine_rounds > 0 and round_index >= total - self.refine_rounds


FACTORY_ARG_KEYS = (
    "schema", "schema_definition", "factory", "key", "r1_gamma", "r1_interval", "pl_weight", "pl_interval",
    "pl_decay", "pl_batch_shrink", "ema_decay", "key_drop", "mismatch_weight", "diff_augment", "key_align_weight", "refine_rounds", "spacing",
    "min_foreground", "sample_every", "keep_optimizer_state", "rounds_total", "local_steps", "run_id", "client_ids",
)  # fmt: skip


def _bad(key: str, problem: str) -> ValueError:
    return ValueError(f"plan_args.{key}: {problem}")


def _num(args, key, default, lo=None, hi=None, integer=False):
    value = args.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise _bad(key, f"must be {'an integer' if integer else 'a number'} (got {value!r})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(key, f"must be in [{lo}, {hi}] (got {value!r})")
    return value


def key_dim_of(key: dict[str, Any] | None) -> int:
    """Width of the key a key-function config produces (known without building it)."""
    if key is None:
        return 0
    cfg = validate_key_config(key, where="plan_args.key")
    kind = cfg["kind"]
    if kind == "none":
        return 0
    dim = 0
    if "random_cnn" in kind:
        dim += int(cfg.get("proj_dim", 64))
    if "histogram" in kind:
        dim += int(cfg.get("bins", 32))
    if kind == "encoder":
        if not isinstance(cfg.get("dim"), int):
            raise _bad("key.dim", "required for an encoder key: the width of the encoder's output")
        dim = int(cfg["dim"])
    return dim


def _diff_augment_arg(raw) -> dict[str, float] | None:
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise _bad("diff_augment", f"must be a mapping {{translation, cutout}}, true or null (got {raw!r})")
    unknown = sorted(set(raw) - {"translation", "cutout"})
    if unknown:
        raise _bad(f"diff_augment.{unknown[0]}", "unknown key; allowed: translation, cutout")
    out = {"translation": 0.125, "cutout": 0.5, **raw}
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise _bad(f"diff_augment.{k}", f"must be a fraction of the image size in [0, 1] (got {v!r})")
    return {k: float(v) for k, v in out.items()}


def parse_factory_args(args: dict[str, Any]) -> FactorySettings:
    """``plan_args`` of the data-factory plan, validated (messages name the key).

    Args:
        args: the spec's ``plan_args`` plus what the coordinator fills in (``client_ids``, ...).

    Returns:
        The settings, defaults filled in.

    Raises:
        ValueError: ``"plan_args.<key>: <problem>"`` for the first problem found.
    """
    if not isinstance(args, dict):
        raise _bad("", "must be a mapping")
    unknown = sorted(set(args) - set(FACTORY_ARG_KEYS))
    if unknown:
        raise _bad(unknown[0], f"unknown key; allowed: {', '.join(k for k in FACTORY_ARG_KEYS if k != 'schema_definition')}")
    key = args.get("key", {})
    if key is not None and not isinstance(key, dict):
        raise _bad("key", "must be a mapping (e.g. {kind: random_cnn+histogram}) or null for no key")
    try:
        key_dim = key_dim_of(key)
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith("plan_args.") else f"plan_args.key: {msg}") from None
    raw_cfg = args.get("factory", {"preset": "tiny"})
    if not isinstance(raw_cfg, dict):
        raise _bad("factory", "must be a mapping (e.g. {preset: tiny})")
    for filled in ("n_clients", "key_dim"):
        if filled in raw_cfg:
            raise _bad(f"factory.{filled}", "is filled in from the federation (sites) and the key function")
    client_ids = args.get("client_ids", {}) or {}
    if not isinstance(client_ids, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in client_ids.values()):
        raise _bad("client_ids", "must map node ids to client ids >= 0 (filled in by the coordinator)")
    n_clients = max(client_ids.values()) + 1 if client_ids else 1
    try:
        config = FactoryConfig.from_dict(
            {"preset": "tiny", **raw_cfg, "n_clients": n_clients, "key_dim": key_dim}, where="plan_args.factory"
        )
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    spacing = args.get("spacing", "schema")
    if not (spacing in ("schema", "native") or (isinstance(spacing, list) and len(spacing) == 3 and all(isinstance(v, (int, float)) and v > 0 for v in spacing))):
        raise _bad("spacing", f"must be 'schema', 'native' or three positive numbers in mm (got {spacing!r})")
    keep = args.get("keep_optimizer_state", True)
    if not isinstance(keep, bool):
        raise _bad("keep_optimizer_state", f"must be true or false (got {keep!r})")
    run_id = args.get("run_id")
    if run_id is not None and not is_plain_name(run_id):  # it names the site's state files
        raise _bad("run_id", f"must be a plain name: letters, digits, '-', '_', '.' (got {run_id!r})")
    return FactorySettings(
        config=config,
        key=key,
        r1_gamma=float(_num(args, "r1_gamma", 10.0, lo=0)),
        r1_interval=_num(args, "r1_interval", 16, lo=1, integer=True),
        pl_weight=float(_num(args, "pl_weight", 2.0, lo=0)),
        pl_interval=_num(args, "pl_interval", 4, lo=1, integer=True),
        pl_decay=float(_num(args, "pl_decay", 0.01, lo=0, hi=1)),
        pl_batch_shrink=_num(args, "pl_batch_shrink", 2, lo=1, integer=True),
        ema_decay=float(_num(args, "ema_decay", 0.9978, lo=0, hi=1)),
        key_drop=float(_num(args, "key_drop", 0.5, lo=0, hi=1)),
        mismatch_weight=float(_num(args, "mismatch_weight", 0.0, lo=0)),
        diff_augment=_diff_augment_arg(args.get("diff_augment")),
        key_align_weight=float(_num(args, "key_align_weight", 50.0, lo=0)),
        refine_rounds=_num(args, "refine_rounds", 0, lo=0, integer=True),
        spacing=None if spacing == "native" else (tuple(float(v) for v in spacing) if isinstance(spacing, list) else spacing),
        min_foreground=float(_num(args, "min_foreground", 0.05, lo=0, hi=1)),
        sample_every=_num(args, "sample_every", 5, lo=1, integer=True),
        keep_optimizer_state=keep,
        rounds_total=args.get("rounds_total"),
        local_steps=args.get("local_steps"),
        run_id=run_id,
        client_ids={str(k): int(v) for k, v in client_ids.items()},
    )
