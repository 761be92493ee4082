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

Validation reports every problem at once (file, key path, problem, what is allowed) and
lists legal but risky values as ``Spec.warnings``. A spec is at most MAX_SPEC_BYTES, its YAML
aliases may expand to MAX_YAML_NODES values, and messages quote at most a few dozen
characters of a value. A spec parsed without ``base_dir`` (one submitted over the network)
may name only built-in schemas or carry one inline, never a file.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coordinator.plans import FACTORY_PLANS, PLANS, SEGMENTATION_PLANS, check_plan_args
from fedimg_core.errors import UserError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
AGGREGATORS = ("fedavg", "scaffold")
MODES = ("federated", "standalone")
SERVER_OPTIMIZERS = {"momentum": {"lr", "momentum"}, "adam": {"lr", "beta_1", "beta_2"}, "yogi": {"lr", "beta_1", "beta_2"}}


class SpecError(UserError):
    """A spec that does not validate; ``problems`` holds every (key path, problem) found."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


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
    warnings: list[str] = field(default_factory=list)  # risky but legal values, "file: key: why"

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
# A spec is a few hundred bytes (a few kB with an inline schema). The limits bound what a
# submitted spec can cost the process hosting the federation: its size, how far YAML aliases
# may expand it, and how much of it an error message repeats.
MAX_SPEC_BYTES = 64 * 1024
MAX_YAML_NODES = 20_000  # after alias expansion
MAX_YAML_DEPTH = 32  # nested mappings/lists (a spec needs 4-5)
MAX_LISTED = 20  # problems listed in one error
_SHOWN_CHARS = 60  # of a bad value quoted in a message
_PROBLEM_CHARS = 300


def _short(value: Any) -> str:
    """repr of a value from the spec, cut so an error never repeats the input whole."""
    text = repr(value) if not isinstance(value, (dict, list)) or len(value) < 50 else f"<{type(value).__name__} of {len(value)}>"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


class _Problems:
    """Every problem found in one spec (validation goes on after the first)."""

    def __init__(self, where: str):
        self.where = where
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, problem: str) -> None:
        problem = " ".join(str(problem).split())
        if len(problem) > _PROBLEM_CHARS:
            problem = problem[: _PROBLEM_CHARS - 3] + "..."
        self.items.append((key if isinstance(key, str) and len(key) <= _SHOWN_CHARS else _short(key), problem))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        lines = [f"{self.where}: {key}: {problem}" for key, problem in self.items[:MAX_LISTED]]
        if len(self.items) > MAX_LISTED:
            lines.append(f"{self.where}: ... and {len(self.items) - MAX_LISTED} more")
        message = lines[0] if len(self.items) == 1 else f"{self.where}: {len(self.items)} problems:\n  " + "\n  ".join(lines)
        raise SpecError(message, self.items)


def _pos_int(p: _Problems, mapping: dict, key: str, default=None, minimum=1, path: str | None = None):
    value = mapping.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        p.add(path or key, f"must be an integer >= {minimum} (got {_short(value)})")
        return None
    return value


def _number(p: _Problems, mapping: dict, key: str, default=None, lo=None, hi=None, allow_none=False, path: str | None = None):
    value = mapping.get(key, default)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        p.add(path or key, f"must be a number (got {_short(value)})")
        return None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        p.add(path or key, f"must be in [{lo}, {hi}] (got {_short(value)})")
        return None
    return float(value)


def _unknown_key(p: _Problems, key: Any, allowed, path: str = "") -> str | None:
    """Report an unknown key; return the key it most likely meant (None: no close one)."""
    close = difflib.get_close_matches(str(key)[:100], sorted(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(sorted(allowed))}"
    p.add(f"{path}{_short(key) if not isinstance(key, str) else key}", f"unknown key{hint}")
    return close[0] if close else None


def validate(raw: Any, where: str, base_dir: Path | None = None) -> Spec:
    """Check a spec's mapping and return the Spec; every problem is reported at once.

    Args:
        raw: the spec as loaded from YAML.
        where: what to call the spec in messages (its file name).
        base_dir: folder that ``plan_args.schema`` file paths are relative to. None (a spec
            that came over the network) refuses schema files: only built-in names or an
            inline schema, so a submitted spec cannot make the coordinator read its files.

    Returns:
        The validated Spec; ``Spec.warnings`` lists risky but legal values.

    Raises:
        SpecError: listing every problem (file, key path, problem and what is allowed).
    """
    p = _Problems(where)
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping at the top level (got {type(raw).__name__})")
    suggested = {_unknown_key(p, key, _TOP_KEYS) for key in raw if key not in _TOP_KEYS}
    for key in ("name", "plan", "sites", "rounds"):
        if key not in raw and key not in suggested:  # a misspelt required key is reported once, as a typo
            p.add(key, "required")
    name = raw.get("name")
    if "name" in raw and (not isinstance(name, str) or not _NAME_RE.match(name)):
        p.add("name", f"must be 1-64 of letters, digits, _ . - (got {_short(name)})")
    plan = raw.get("plan")
    if "plan" in raw and (not isinstance(plan, str) or plan not in PLANS):
        close = difflib.get_close_matches(str(plan)[:100], sorted(PLANS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        p.add("plan", f"unknown plan {_short(plan)}{hint} (known: {', '.join(sorted(PLANS))})")
        plan = None
    rounds = _pos_int(p, raw, "rounds") if "rounds" in raw else None

    sites = raw.get("sites", {})
    tags: list = []
    ids: list = []
    min_sites = wait_s = None
    if not isinstance(sites, dict):
        p.add("sites", "must be a mapping with 'tags' (and optional ids, min_sites, wait_s)")
    else:
        for key in sites:
            if key not in ("tags", "ids", "min_sites", "wait_s"):
                _unknown_key(p, key, ("tags", "ids", "min_sites", "wait_s"), "sites.")
        tags, ids = sites.get("tags") or [], sites.get("ids") or []
        for key, values in (("sites.tags", tags), ("sites.ids", ids)):
            if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
                p.add(key, "must be a list of non-empty strings")
        if not tags and "sites" in raw:
            # Fed-BioMed finds training data by dataset tags; node ids can only narrow that down.
            p.add("sites.tags", "required: the tags of the datasets to train on (sites.ids may restrict the nodes)")
        min_sites = _pos_int(p, sites, "min_sites", default=len(ids) if isinstance(ids, list) and ids else 1, path="sites.min_sites")
        wait_s = _number(p, sites, "wait_s", default=120.0, lo=0, path="sites.wait_s")

    aggregator = raw.get("aggregator", "fedavg")
    if aggregator not in AGGREGATORS:
        p.add("aggregator", f"must be one of {', '.join(AGGREGATORS)} (got {_short(aggregator)})")
    server_opt = raw.get("server_optimizer")
    if server_opt is not None:
        if not isinstance(server_opt, dict) or server_opt.get("name") not in SERVER_OPTIMIZERS:
            p.add("server_optimizer", f"must be null or a mapping with name one of {', '.join(SERVER_OPTIMIZERS)}")
        else:
            extra = set(map(str, server_opt)) - {"name"} - SERVER_OPTIMIZERS[server_opt["name"]]
            if extra:
                p.add("server_optimizer", f"unknown argument(s) {', '.join(sorted(extra))} for {server_opt['name']}")
            for k, v in server_opt.items():
                if k != "name" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    p.add(f"server_optimizer.{k}", f"must be a number (got {_short(v)})")
        if aggregator == "scaffold":
            p.add("server_optimizer", "cannot be combined with the scaffold aggregator")
    optimizer = raw.get("optimizer", {"lr": 1e-3})
    if not isinstance(optimizer, dict):
        p.add("optimizer", "must be a mapping (e.g. {lr: 0.001})")
        optimizer = {}
    plan_args = raw.get("plan_args", {})
    if not isinstance(plan_args, dict):
        p.add("plan_args", "must be a mapping")
        plan_args = {}
    model_args: dict[str, Any] = {}
    if plan is not None:
        model_args, plan_problems = check_plan_args(plan, plan_args, base_dir, allow_files=base_dir is not None)
        for exc in plan_problems:
            p.add(f"plan_args.{exc.key}", exc.problem)
    mode = raw.get("mode", "federated")
    if mode not in MODES:
        p.add("mode", f"must be one of {', '.join(MODES)} (got {_short(mode)})")
    segmentation = plan in SEGMENTATION_PLANS
    factory = plan in FACTORY_PLANS
    batch_size = _pos_int(p, raw, "batch_size", default=1 if segmentation else (8 if factory else 2))
    if segmentation and batch_size not in (None, 1):
        p.add("batch_size", f"must be 1 for {plan}: a step takes one whole volume and draws plan_args.patches_per_volume patches from it (got {batch_size})")
    if mode == "standalone" and (server_opt or aggregator != "fedavg"):
        p.add("mode", "standalone runs have no aggregation: drop server_optimizer / aggregator")
    clients_per_round = raw.get("clients_per_round", 2 if factory else None)
    if clients_per_round is not None:
        if plan is not None and not factory:
            # segmentation runs select the best model on every site's validation each round
            p.add("clients_per_round", f"is only for the data_factory plan; {plan} trains and validates every site every round")
        clients_per_round = _pos_int(p, raw, "clients_per_round", default=clients_per_round)
    if factory:
        optimizer = {"lr": 0.002, **(raw["optimizer"] if isinstance(raw.get("optimizer"), dict) else {})}
        if set(optimizer) != {"lr"} or isinstance(optimizer["lr"], bool) or not isinstance(optimizer["lr"], (int, float)) or optimizer["lr"] <= 0:
            p.add("optimizer", f"{plan} takes only {{lr: <positive number>}} (Adam, corrected per network for lazy regularisation); got {_short(raw.get('optimizer'))}")
        refine = plan_args.get("refine_rounds", 0)
        if isinstance(refine, int) and isinstance(rounds, int) and refine > rounds:
            p.add("plan_args.refine_rounds", f"must be at most rounds ({rounds}); got {refine}")
    test_ratio = _number(p, raw, "test_ratio", default=0.0 if factory else 0.25, lo=0, hi=0.9)
    if factory:
        if test_ratio:
            p.add("test_ratio", f"must be 0 for {plan}: the data factory has no validation split (got {test_ratio:g})")
        if mode != "federated" or aggregator != "fedavg" or server_opt or raw.get("fedprox_mu") is not None:
            p.add("plan", f"{plan} runs federated with uniform FedAvg: drop mode, aggregator, server_optimizer and fedprox_mu")
    local_steps = _pos_int(p, raw, "local_steps", default=4)
    fedprox_mu = _number(p, raw, "fedprox_mu", default=None, lo=0, allow_none=True)
    seed = _pos_int(p, raw, "seed", default=0, minimum=0)
    approval = raw.get("approval", {})
    approval_wait = 0.0
    if not isinstance(approval, dict) or set(approval) - {"request", "wait_s"}:
        p.add("approval", "must be a mapping with 'request' (bool) and 'wait_s' (seconds)")
        approval = {}
    if not isinstance(approval.get("request", True), bool):
        p.add("approval.request", "must be true or false")
    approval_wait = _number(p, approval, "wait_s", default=0.0, lo=0, path="approval.wait_s")
    p.raise_if_any()

    spec = Spec(
        name=name,
        plan=plan,
        rounds=rounds,
        site_tags=list(tags),
        site_ids=list(ids),
        min_sites=min_sites,
        wait_for_sites_s=wait_s,
        local_steps=local_steps,
        batch_size=batch_size,
        optimizer=dict(optimizer),
        aggregator=aggregator,
        server_optimizer=dict(server_opt) if server_opt else None,
        fedprox_mu=fedprox_mu,
        test_ratio=test_ratio,
        seed=seed,
        plan_args=dict(plan_args),
        model_args=model_args,
        mode=mode,
        clients_per_round=clients_per_round,
        request_approval=approval.get("request", True),
        approval_wait_s=approval_wait,
        raw=raw,
    )
    spec.warnings = [f"{where}: {key}: {problem}" for key, problem in risky_values(spec)]
    return spec


# Below / above these a run is legal but most likely not what was meant.
MIN_UPDATES = 50  # rounds x local_steps of a segmentation run
LR_RANGE = (1e-5, 0.1)


def risky_values(spec: Spec) -> list[tuple[str, str]]:
    """(key, warning) for legal values that most likely spoil a run (printed, not refused)."""
    out = []
    if spec.plan in SEGMENTATION_PLANS:
        if spec.test_ratio == 0:
            out.append(("test_ratio", "0 holds out no validation cases: no Dice per round and no best-model selection "
                                      "(the last round's model is kept); use e.g. 0.25"))  # fmt: skip
        elif spec.test_ratio > 0.5:
            out.append(("test_ratio", f"{spec.test_ratio:g} trains on less than half of each site's cases"))
        updates = spec.rounds * spec.local_steps
        if updates < MIN_UPDATES:
            out.append(("rounds", f"{spec.rounds} rounds x {spec.local_steps} local_steps = {updates} updates per site: "
                                  f"too few to learn much (the examples use >= {MIN_UPDATES}; raise rounds or local_steps)"))  # fmt: skip
    lr = spec.optimizer.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and not LR_RANGE[0] <= lr <= LR_RANGE[1]:
        out.append(("optimizer.lr", f"{lr:g} is outside the usual [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}] for AdamW/Adam"))
    if spec.mode == "federated" and spec.min_sites == 1 and not spec.is_factory:
        out.append(("sites.min_sites", "1: a federated run may start with a single site (no federation); "
                                       "set it to the number of sites you expect"))  # fmt: skip
    return out


class _TooLarge(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents whose aliases expand past MAX_YAML_NODES nodes
    (a "billion laughs" spec is a few hundred bytes and expands to gigabytes)."""

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root) -> None:
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node, depth: int = 1) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise yaml.YAMLError("a YAML alias refers to a node that contains it (recursive document)")
        if depth > MAX_YAML_DEPTH:
            raise _TooLarge(f"is nested more than {MAX_YAML_DEPTH} levels deep (a spec needs a few)")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        if total > MAX_YAML_NODES:
            raise _TooLarge(f"has more than {MAX_YAML_NODES} values once YAML aliases are expanded (a spec has a few hundred)")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def parse(text: str, where: str, base_dir: Path | None = None) -> Spec:
    """Parse and validate spec text.

    Args:
        text: the YAML text (at most MAX_SPEC_BYTES; aliases may expand to MAX_YAML_NODES values).
        where: what to call the spec in messages.
        base_dir: folder schema file paths are relative to; None refuses schema files
            (see ``validate``).

    Raises:
        SpecError: too large, not YAML, or listing every problem of the spec.
    """
    size = len(text.encode("utf-8", "replace"))
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{where}: {size} bytes; a spec is at most {MAX_SPEC_BYTES} bytes (a schema inlined in it is a few kB)")
    try:
        raw = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except _TooLarge as exc:
        raise SpecError(f"{where}: {exc}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise SpecError(f"{where}: is nested more than {MAX_YAML_DEPTH} levels deep (a spec needs a few)") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        if len(detail) > _PROBLEM_CHARS:
            detail = detail[: _PROBLEM_CHARS - 3] + "..."
        raise SpecError(f"{where}: not valid YAML ({detail})") from None
    return validate(raw, where, base_dir)


def load(path: str | os.PathLike) -> Spec:
    """Read and validate a spec file; schema paths in it are relative to its folder."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: spec file not found")
    try:
        if p.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{p}: {p.stat().st_size} bytes; a spec is at most {MAX_SPEC_BYTES} bytes")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{p}: cannot read ({exc})") from None
    return parse(text, str(p), base_dir=p.resolve().parent)
