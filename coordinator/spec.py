"""Experiment spec (YAML): what a researcher submits. Validated with clear messages.

Example::

    name: demo-condistfl
    plan: condistfl         # condistfl | marginal (FedAvg, FedProx, FedOpt, standalone baselines) | data_factory
    mode: federated         # or standalone: each site trains alone (same plan, no aggregation)
    sites: {tags: [fedimg-demo], min_sites: 2}     # optional ids: [NODE_...] restricts to those nodes
    rounds: 3
    local_steps: 4          # optimizer updates per site per round
    batch_size: 1           # volumes per step (segmentation plans draw plan_args.patches_per_volume patches from each)
    optimizer: {lr: 0.001}  # site-side optimizer arguments (AdamW: lr, weight_decay)
    aggregator: fedavg      # fedavg | scaffold
    server_optimizer: null  # or {name: momentum, lr: 1.0, momentum: 0.6} | {name: adam, lr: 0.01}
    fedprox_mu: null        # FedProx proximal term
    test_ratio: 0.25        # share of each site's cases held out for validation
    seed: 0                 # also seeds which sites a round samples
    clients_per_round: null # sites sampled per round (seeded, logged); null = all (data_factory default: 2)
    plan_args: {schema: abdominal-ct, network: {name: mednext, size: tiny}, roi_size: [32, 32, 32]}
    approval: {request: true, wait_s: 0}
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coordinator.plans import FACTORY_PLANS, PLANS, SEGMENTATION_PLANS, PlanArgsError, model_args_for
from site_agent.errors import UserError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
AGGREGATORS = ("fedavg", "scaffold")
MODES = ("federated", "standalone")
SERVER_OPTIMIZERS = {"momentum": {"lr", "momentum"}, "adam": {"lr", "beta_1", "beta_2"}, "yogi": {"lr", "beta_1", "beta_2"}}


class SpecError(UserError):
    pass


@dataclass
class Spec:
    name: str
    plan: str
    rounds: int
    site_tags: list[str] = field(default_factory=list)
    site_ids: list[str] = field(default_factory=list)
    min_sites: int = 1
    wait_for_sites_s: float = 120.0
    local_steps: int = 4
    batch_size: int = 2
    optimizer: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-3})
    aggregator: str = "fedavg"
    server_optimizer: dict[str, Any] | None = None
    fedprox_mu: float | None = None
    test_ratio: float = 0.25
    seed: int = 0
    plan_args: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)  # what the sites receive (schema embedded)
    mode: str = "federated"
    clients_per_round: int | None = None  # None: every site every round
    request_approval: bool = True
    approval_wait_s: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict)

    def training_args(self) -> dict[str, Any]:
        """Fed-BioMed training_args (its schema is fixed; extra values travel in model_args)."""
        args: dict[str, Any] = {
            "loader_args": {"batch_size": self.batch_size, "shuffle": True},
            "optimizer_args": dict(self.optimizer),
            "num_updates": self.local_steps,
            "test_ratio": self.test_ratio,
            "test_on_global_updates": self.test_ratio > 0,
            "test_on_local_updates": self.test_ratio > 0,
            "test_batch_size": 1 if self.plan in SEGMENTATION_PLANS else self.batch_size,  # whole volumes
            "shuffle_testing_dataset": False,
            "random_seed": self.seed,
            "log_interval": max(1, self.local_steps),
        }
        if self.fedprox_mu is not None:
            args["fedprox_mu"] = float(self.fedprox_mu)
        return args

    @property
    def is_factory(self) -> bool:
        return self.plan in FACTORY_PLANS

    def experiment_model_args(self, run_id: str | None = None, client_ids: dict[str, int] | None = None) -> dict[str, Any]:
        """model_args for Fed-BioMed: the checked plan arguments plus the run's length, which
        the plans need for their schedules, the run id, which keys what a site keeps between
        rounds (its optimizer state), and (data factory) each site's client id."""
        args = dict(self.model_args)
        if self.plan in SEGMENTATION_PLANS + FACTORY_PLANS:
            args.update({"rounds_total": self.rounds, "local_steps": self.local_steps})
            if run_id:
                args["run_id"] = run_id
        if self.is_factory:
            args["client_ids"] = dict(client_ids or {})
        return args

    def resolved_raw(self) -> dict[str, Any]:
        """The spec with a schema file inlined (what a remote coordinator needs)."""
        raw = dict(self.raw)
        if self.plan in SEGMENTATION_PLANS + FACTORY_PLANS:
            raw["plan_args"] = {**self.plan_args, "schema": self.model_args["schema_definition"]}
        return raw


_TOP_KEYS = {
    "name", "plan", "mode", "sites", "rounds", "local_steps", "batch_size", "optimizer", "aggregator",
    "server_optimizer", "fedprox_mu", "test_ratio", "seed", "plan_args", "approval", "clients_per_round",
}


def _fail(where: str, key: str, problem: str) -> None:
    raise SpecError(f"{where}: {key}: {problem}")


def _pos_int(where, raw, key, default=None, minimum=1):
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(where, key, f"must be an integer >= {minimum} (got {value!r})")
    return value


def _number(where, raw, key, default=None, lo=None, hi=None, allow_none=False):
    value = raw.get(key, default)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, key, f"must be a number (got {value!r})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(where, key, f"must be in [{lo}, {hi}] (got {value!r})")
    return float(value)


def validate(raw: Any, where: str, base_dir: Path | None = None) -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping at the top level")
    for key in raw:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), sorted(_TOP_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(sorted(_TOP_KEYS))}"
            _fail(where, str(key), f"unknown key{hint}")
    for key in ("name", "plan", "sites", "rounds"):
        if key not in raw:
            _fail(where, key, "required")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        _fail(where, "name", f"must be 1-64 of letters, digits, _ . - (got {name!r})")
    plan = raw["plan"]
    if plan not in PLANS:
        close = difflib.get_close_matches(str(plan), sorted(PLANS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        _fail(where, "plan", f"unknown plan {plan!r}{hint} (known: {', '.join(sorted(PLANS))})")

    sites = raw["sites"]
    if not isinstance(sites, dict) or set(sites) - {"tags", "ids", "min_sites", "wait_s"}:
        _fail(where, "sites", "must be a mapping with 'tags' (and optional ids, min_sites, wait_s)")
    tags, ids = sites.get("tags") or [], sites.get("ids") or []
    for key, values in (("sites.tags", tags), ("sites.ids", ids)):
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            _fail(where, key, "must be a list of non-empty strings")
    if not tags:
        # Fed-BioMed finds training data by dataset tags; node ids can only narrow that down.
        _fail(where, "sites.tags", "required: the tags of the datasets to train on (sites.ids may restrict the nodes)")
    min_sites = _pos_int(where, sites, "min_sites", default=len(ids) or 1)

    aggregator = raw.get("aggregator", "fedavg")
    if aggregator not in AGGREGATORS:
        _fail(where, "aggregator", f"must be one of {', '.join(AGGREGATORS)} (got {aggregator!r})")
    server_opt = raw.get("server_optimizer")
    if server_opt is not None:
        if not isinstance(server_opt, dict) or server_opt.get("name") not in SERVER_OPTIMIZERS:
            _fail(where, "server_optimizer", f"must be null or a mapping with name one of {', '.join(SERVER_OPTIMIZERS)}")
        extra = set(server_opt) - {"name"} - SERVER_OPTIMIZERS[server_opt["name"]]
        if extra:
            _fail(where, "server_optimizer", f"unknown argument(s) {', '.join(sorted(extra))} for {server_opt['name']}")
        for k, v in server_opt.items():
            if k != "name" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                _fail(where, f"server_optimizer.{k}", f"must be a number (got {v!r})")
        if aggregator == "scaffold":
            _fail(where, "server_optimizer", "cannot be combined with the scaffold aggregator")
    optimizer = raw.get("optimizer", {"lr": 1e-3})
    if not isinstance(optimizer, dict):
        _fail(where, "optimizer", "must be a mapping (e.g. {lr: 0.001})")
    plan_args = raw.get("plan_args", {})
    if not isinstance(plan_args, dict):
        _fail(where, "plan_args", "must be a mapping")
    try:
        model_args = model_args_for(plan, plan_args, base_dir)
    except PlanArgsError as exc:
        _fail(where, f"plan_args.{exc.key}", exc.problem)
    mode = raw.get("mode", "federated")
    if mode not in MODES:
        _fail(where, "mode", f"must be one of {', '.join(MODES)} (got {mode!r})")
    segmentation = plan in SEGMENTATION_PLANS
    factory = plan in FACTORY_PLANS
    batch_size = _pos_int(where, raw, "batch_size", default=1 if segmentation else (8 if factory else 2))
    if segmentation and batch_size != 1:
        _fail(where, "batch_size", f"must be 1 for {plan}: a step takes one whole volume and draws plan_args.patches_per_volume patches from it (got {batch_size})")
    if mode == "standalone" and (server_opt or aggregator != "fedavg"):
        _fail(where, "mode", "standalone runs have no aggregation: drop server_optimizer / aggregator")
    clients_per_round = raw.get("clients_per_round", 2 if factory else None)
    if clients_per_round is not None:
        if not factory:
            # segmentation runs select the best model on every site's validation each round
            _fail(where, "clients_per_round", f"is only for the data_factory plan; {plan} trains and validates every site every round")
        clients_per_round = _pos_int(where, raw, "clients_per_round", default=clients_per_round)
    if factory:
        optimizer = {"lr": 0.002, **(raw.get("optimizer") or {})}
        if set(optimizer) != {"lr"} or isinstance(optimizer["lr"], bool) or not isinstance(optimizer["lr"], (int, float)) or optimizer["lr"] <= 0:
            _fail(where, "optimizer", f"{plan} takes only {{lr: <positive number>}} (Adam, corrected per network for lazy regularisation); got {raw.get('optimizer')!r}")
        refine = plan_args.get("refine_rounds", 0)
        if isinstance(refine, int) and isinstance(raw.get("rounds"), int) and refine > raw["rounds"]:
            _fail(where, "plan_args.refine_rounds", f"must be at most rounds ({raw['rounds']}); got {refine}")
    test_ratio = _number(where, raw, "test_ratio", default=0.0 if factory else 0.25, lo=0, hi=0.9)
    if factory:
        if test_ratio:
            _fail(where, "test_ratio", f"must be 0 for {plan}: the data factory has no validation split (got {test_ratio:g})")
        if mode != "federated" or aggregator != "fedavg" or server_opt or raw.get("fedprox_mu") is not None:
            _fail(where, "plan", f"{plan} runs federated with uniform FedAvg: drop mode, aggregator, server_optimizer and fedprox_mu")
    approval = raw.get("approval", {})
    if not isinstance(approval, dict) or set(approval) - {"request", "wait_s"}:
        _fail(where, "approval", "must be a mapping with 'request' (bool) and 'wait_s' (seconds)")
    if not isinstance(approval.get("request", True), bool):
        _fail(where, "approval.request", "must be true or false")

    return Spec(
        name=name,
        plan=plan,
        rounds=_pos_int(where, raw, "rounds"),
        site_tags=list(tags),
        site_ids=list(ids),
        min_sites=min_sites,
        wait_for_sites_s=_number(where, sites, "wait_s", default=120.0, lo=0),
        local_steps=_pos_int(where, raw, "local_steps", default=4),
        batch_size=batch_size,
        optimizer=dict(optimizer),
        aggregator=aggregator,
        server_optimizer=dict(server_opt) if server_opt else None,
        fedprox_mu=_number(where, raw, "fedprox_mu", default=None, lo=0, allow_none=True),
        test_ratio=test_ratio,
        seed=_pos_int(where, raw, "seed", default=0, minimum=0),
        plan_args=dict(plan_args),
        model_args=model_args,
        mode=mode,
        clients_per_round=clients_per_round,
        request_approval=approval.get("request", True),
        approval_wait_s=_number(where, approval, "wait_s", default=0.0, lo=0),
        raw=raw,
    )


def parse(text: str, where: str, base_dir: Path | None = None) -> Spec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from None
    return validate(raw, where, base_dir)


def load(path: str | os.PathLike) -> Spec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: spec file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{p}: cannot read ({exc})") from None
    return parse(text, str(p), base_dir=p.resolve().parent)
