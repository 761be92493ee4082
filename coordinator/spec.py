"""Experiment spec (YAML): what a researcher submits, its model (`SpecFile`), checks and loading.

`validate` reports every problem at once (file, key path, problem, what is allowed): single
keys (pydantic), ``plan_args`` (the plan's own checks) and the rules across keys (`plan_rules`);
legal but risky values become ``Spec.warnings``. JSON Schema: ``coordinator schema spec``.
An annotated example and the size bounds: docs/design/experiment-spec.md.

The evaluation protocol: ``split`` gives the shares of each site's cases held out for
validation (which selects the best global and local models) and for test (which scores the
selected models only); ``weights`` how the coordinator averages the sites' models. A spec of
the old form (``test_ratio: X``) still loads: X held out validation cases only, so it means
``split: {validation: X, test: 0}``, with a warning. ``validate_every: k`` has the sites score
the models every k rounds instead of every round (`coordinator.engine.scoring_flags`).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from coordinator.plans import FACTORY_PLANS, FEDSR_PLANS, PLANS, SEGMENTATION_PLANS, check_plan_args
from coordinator.spec_yaml import MAX_SPEC_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, read_spec_yaml
from fedimg_core.config import MAX_LISTED, PROBLEM_CHARS, SHOWN_CHARS, ConfigModel, ConfigProblem, format_problems, short, validate_config
from fedimg_core.config_types import Flag, integer, json_schema, matches, number, one_of, strings
from fedimg_core.devices import GPU_POLICIES, PRECISIONS, TRANSFER_PRECISIONS
from fedimg_core.errors import ConfigError
from pipelines.privacy import DEFAULT_DELTA, DP_TYPES
from pipelines.splits import SplitSettings

__all__ = [
    "AGGREGATORS",
    "MAX_LISTED",
    "MAX_SPEC_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "MODES",
    "SCALES",
    "SECAGG_SCHEMES",
    "SERVER_OPTIMIZERS",
    "WEIGHTS",
    "Spec",
    "SpecError",
    "SpecFile",
    "deprecations",
    "dp_network_problems",
    "load",
    "parse",
    "plan_rules",
    "risky_values",
    "scale_raw",
    "spec_json_schema",
    "validate",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
AGGREGATORS = ("fedavg", "scaffold")
MODES = ("federated", "standalone")
WEIGHTS = ("samples", "equal")
MAX_HELD_OUT = 0.9  # validation + test: at least a tenth of each site's cases trains
SERVER_OPTIMIZERS = {"momentum": {"lr", "momentum"}, "adam": {"lr", "beta_1", "beta_2"}, "yogi": {"lr", "beta_1", "beta_2"}}
SECAGG_SCHEMES = ("lom", "joye-libert")  # Fed-BioMed's SecureAggregationSchemes LOM and JOYE_LIBERT
SECAGG_CLIPPING_RANGE = 3  # Fed-BioMed's default (SAParameters.CLIPPING_RANGE)
SCHEMA_ID = "urn:fedimg:schema:experiment-spec"


class SpecError(ConfigError):
    """A spec that does not validate; ``problems`` holds every (key path, problem) found.

    Args:
        message: the whole message (``<file>: <key>: <problem>`` lines).
        problems: the (key path, problem) pairs.
        file: the spec file (or what the spec is called).
        key: the first problem's key path.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None, *, file: str | os.PathLike[str] | None = None, key: str | None = None):
        super().__init__(message, file=file, key=key)
        self.problems = list(problems or [])


# -- the file's model -------------------------------------------------------------------


class SitesSection(ConfigModel):
    """Which sites train: the datasets' tags, optionally narrowed to some nodes."""

    model_config = ConfigDict(json_schema_extra={"required": ["tags"]})

    tags: Annotated[list[str], strings()] = Field(
        default_factory=list,
        description="Dataset tags to train on (the tags sites registered their prepared datasets with). Required.",
        json_schema_extra={"minItems": 1},
    )
    ids: Annotated[list[str], strings()] | None = Field(
        default=None, description="Node ids (NODE_...) to restrict the run to (default: every node with the tags)."
    )
    min_sites: Annotated[int, integer(1)] | None = Field(default=None, description="Sites needed to start (default: the number of ids, else 1).")
    wait_s: Annotated[float, number(0)] = Field(default=120.0, description="Seconds to wait for min_sites sites to connect.")
    min_per_round: Annotated[int, integer(1)] | None = Field(
        default=None,
        description="Sites whose updates a round needs: a site that fails, disconnects or misses round_timeout_s is left out of that round's "
        "aggregate (the weights renormalised over the sites that answered) and asked again next round; the run stops when fewer answer "
        "(default: half of min_sites, rounded up).",
    )
    mandatory: Annotated[list[str], strings()] = Field(
        default_factory=list,
        description="Sites (names or node ids) without which no round is aggregated: the run stops when one of them does not answer.",
    )

    @model_validator(mode="after")
    def _tags_given(self) -> SitesSection:
        if not self.tags:  # Fed-BioMed finds training data by dataset tags; node ids can only narrow that down
            raise ConfigProblem("tags", "required: the tags of the datasets to train on (sites.ids may restrict the nodes)")
        return self


class OptimizerArgs(ConfigModel):
    """The site-side optimizer's arguments (AdamW; data_factory: Adam, lr only)."""

    model_config = ConfigDict(extra="allow")  # further AdamW arguments are passed on as they are

    lr: Annotated[float, number(positive=True)] | None = Field(default=None, description="Learning rate (default 0.001; data_factory: 0.002).")
    weight_decay: Annotated[float, number(0)] | None = Field(default=None, description="AdamW weight decay (default: AdamW's).")


class ServerOptimizer(ConfigModel):
    """FedOpt: an optimizer the coordinator applies to the averaged update."""

    name: Annotated[str, one_of(*SERVER_OPTIMIZERS)] = Field(description="momentum (lr, momentum), adam or yogi (lr, beta_1, beta_2).")
    lr: Annotated[float, number()] | None = Field(default=None, description="Server learning rate (default 1.0).")
    momentum: Annotated[float, number()] | None = Field(default=None, description="momentum only (default 0.9).")
    beta_1: Annotated[float, number()] | None = Field(default=None, description="adam and yogi only (default 0.9).")
    beta_2: Annotated[float, number()] | None = Field(default=None, description="adam and yogi only (default 0.99).")

    @model_validator(mode="after")
    def _arguments_of_name(self) -> ServerOptimizer:
        extra = sorted(k for k in ("lr", "momentum", "beta_1", "beta_2") if getattr(self, k) is not None and k not in SERVER_OPTIMIZERS[self.name])
        if extra:
            takes = ", ".join(sorted(SERVER_OPTIMIZERS[self.name]))
            raise ConfigProblem("", f"unknown argument(s) {', '.join(extra)} for {self.name} (it takes {takes})")
        return self


class SplitSection(ConfigModel):
    """How each site's cases are split into training, validation and test (segmentation plans)."""

    validation: Annotated[float, number(0, MAX_HELD_OUT)] = Field(
        default=0.2, description="Share of each site's cases that score the models for selection (best global, best local). Default 0.2."
    )
    test: Annotated[float, number(0, MAX_HELD_OUT)] = Field(
        default=0.2, description="Share of each site's cases that score the selected models only: never trained on, never used to select. Default 0.2."
    )
    seed: Annotated[int, integer(0)] = Field(
        default=0, description="Seed of the split (default 0), independent of `seed`: training seeds vary the training, not the split."
    )

    @model_validator(mode="after")
    def _some_cases_train(self) -> SplitSection:
        if self.validation + self.test > MAX_HELD_OUT + 1e-9:
            raise ConfigProblem("", f"validation + test must be at most {MAX_HELD_OUT:g} so that every site trains (got {self.validation + self.test:g})")
        if self.test > 0 and self.validation == 0:
            # the sites score test cases in Fed-BioMed's testing step, which runs only with validation cases
            raise ConfigProblem("test", "the test cases are scored alongside validation; set split.validation > 0")
        return self


class ApprovalSection(ConfigModel):
    """Whether the plan is sent to the sites for review first, and how long to wait for them."""

    request: Flag = Field(default=True, description="Send the plan to the sites for approval before round 1.")
    wait_s: Annotated[float, number(0)] = Field(default=0.0, description="Seconds to wait for every site to approve.")


class DeviceSection(ConfigModel):
    """Where the sites train and in which precision (each site's own ``device`` setting applies within this)."""

    gpu: Annotated[str, one_of(*GPU_POLICIES)] = Field(
        default="optional",
        description="optional: each site trains where its device setting says (a GPU when it has one); required: a site without a GPU "
        "refuses the round; forbidden: every site trains on its CPU.",
    )
    precision: Annotated[str, one_of(*PRECISIONS)] = Field(
        default="auto",
        description="auto: bf16 on GPUs that have it, else fp16 with a loss scale, fp32 on CPUs; or fp32, bf16 (GPUs since Ampere, CPUs), "
        "fp16 (with gpu: required; not with fedprox_mu).",
    )


class TransferSection(ConfigModel):
    """How models travel between the coordinator and the sites."""

    precision: Annotated[str, one_of(*TRANSFER_PRECISIONS)] = Field(
        default="fp32",
        description="fp32 (exact), bf16 or fp16: the sites and the coordinator send every model with its floating values rounded to "
        "16 bits, half the bytes; the coordinator averages and keeps its models in float32 (the sites train from the rounded model). bf16 keeps float32's range with 8 significant bits, "
        "fp16 11 bits but cannot hold values beyond +-65504 (a model with one is sent in fp32 that round). Every model travels as one buffer with its SHA-256, checked on arrival (against corruption; the site itself is authenticated by mutual TLS).",
    )


class SecaggSection(ConfigModel):
    """Secure aggregation (Fed-BioMed's): the coordinator sees only the sum of the sites' masked, quantised models."""

    scheme: Annotated[str, one_of(*SECAGG_SCHEMES)] = Field(
        default="lom",
        description="lom (Low-Overhead Masking: pairwise Diffie-Hellman masks, fast) or joye-libert (additively homomorphic encryption, "
        "a server key shared among the sites; slower).",
    )
    clipping_range: Annotated[int, integer(1)] = Field(
        default=SECAGG_CLIPPING_RANGE,
        description="Model values are clipped to [-c, c] and quantised to 2^13 levels before encryption: the aggregate is off by up to "
        "2c/8191 per value and round (c = 3: about 7e-4); raise it only for weights beyond it.",
    )


class DPSection(ConfigModel):
    """Differential privacy at the sites (Fed-BioMed's DP through Opacus); the privacy unit is a case."""

    model_config = ConfigDict(json_schema_extra={"required": ["type", "sigma", "clip"]})

    type: Annotated[str, one_of(*DP_TYPES)] = Field(
        description="local: every step clips each patch's gradient to clip and adds Gaussian noise of standard deviation sigma * clip "
        "(DP-SGD; each site's epsilon is reported); central: the steps clip without noise and each site adds noise of standard "
        "deviation sigma * clip to the parameters it sends, once per round (no epsilon can be stated: nothing bounds one case's effect "
        "on the parameters)."
    )
    sigma: Annotated[float, number(positive=True)] = Field(
        description="Noise multiplier (Opacus's, per patch: a case's is sigma / plan_args.patches_per_volume)."
    )
    clip: Annotated[float, number(positive=True)] = Field(description="Per-sample gradient norm bound (max_grad_norm).")
    delta: Annotated[float, number(0, 1)] = Field(
        default=DEFAULT_DELTA, description=f"The delta epsilon is stated at (default {DEFAULT_DELTA:g}); below 1 / training cases."
    )

    @model_validator(mode="after")
    def _delta_inside(self) -> DPSection:
        if not 0 < self.delta < 1:
            raise ConfigProblem("delta", f"must be between 0 and 1, exclusive (got {self.delta:g})")
        return self


class SpecFile(ConfigModel):
    """An experiment spec, as a researcher writes it (plan-dependent defaults are left None)."""

    name: Annotated[str, matches(NAME_PATTERN, "1-64 of letters, digits, _ . -")] = Field(description="Name of the experiment (runs are named after it).")
    plan: Annotated[str, one_of(*sorted(PLANS), what="plan")] = Field(
        description="Training plan: condistfl, marginal (FedAvg, FedProx, FedOpt, standalone baselines), data_factory or fedsr (unlabelled sites and one atlas)."
    )
    mode: Annotated[str, one_of(*MODES)] = Field(
        default="federated", description="federated, or standalone: each site trains alone (same plan, no aggregation)."
    )
    sites: SitesSection = Field(description="Which sites train.")
    rounds: Annotated[int, integer(1)] = Field(description="Federated rounds.")
    local_steps: Annotated[int, integer(1)] = Field(default=4, description="Optimizer updates per site per round.")
    batch_size: Annotated[int, integer(1)] | None = Field(
        default=None,
        description="Samples per step (default: 1 volume for condistfl/marginal, which draw plan_args.patches_per_volume patches from it and allow only 1; "
        "8 slices for data_factory).",
    )
    optimizer: OptimizerArgs | None = Field(
        default=None, description="Site-side optimizer arguments (default {lr: 0.001}; data_factory: {lr: 0.002}, lr only)."
    )
    aggregator: Annotated[str, one_of(*AGGREGATORS)] = Field(
        default="fedavg",
        description="How the coordinator combines the sites' updates: fedavg, or scaffold (averaging with SCAFFOLD's drift correction, declearn's modules: the segmentation plans step its client half before Adam).",
    )
    server_optimizer: ServerOptimizer | None = Field(
        default=None, description="FedOpt server optimizer (null: plain averaging), applied after SCAFFOLD's server step with aggregator scaffold."
    )
    fedprox_mu: Annotated[float, number(0)] | None = Field(default=None, description="FedProx proximal term (null: off).")
    split: SplitSection | None = Field(
        default=None,
        description="Each site's training / validation / test split (default {validation: 0.2, test: 0.2, seed: 0}; "
        "data_factory: none, {validation: 0, test: 0} the only value it takes).",
    )
    weights: Annotated[str, one_of(*WEIGHTS)] | None = Field(
        default=None,
        description="Aggregation weights: samples (Fed-BioMed's FedAvg, by training cases; the default) or equal (every site counts the same, "
        "as in the ConDistFL paper; data_factory: always equal).",
    )
    test_ratio: Annotated[float, number(0, MAX_HELD_OUT)] | None = Field(
        default=None,
        description="Deprecated: write split. The share of each site's cases held out for validation only; "
        "test_ratio: X means split: {validation: X, test: 0}.",
        json_schema_extra={"deprecated": True},  # editors strike it through
    )
    seed: Annotated[int, integer(0)] = Field(
        default=0, description="Training seed (also seeds which sites a round samples); the split has its own, split.seed."
    )
    validate_every: Annotated[int, integer(1)] = Field(
        default=1,
        description="Score the models on the sites' validation and test cases every k rounds (default 1: every round): the global model "
        "at the start of rounds 1, k+1, 2k+1, ... and of the last round, each site's local model after rounds k, 2k, ..., the final "
        "model always. Models not scored are no candidates for the best global or local model. Segmentation plans only.",
    )
    clients_per_round: Annotated[int, integer(1)] | None = Field(
        default=None, description="data_factory only: sites sampled per round (seeded, logged; default 2; null: every site)."
    )
    round_timeout_s: Annotated[float, number(1)] | None = Field(
        default=None,
        description="Seconds a round waits for the sites' updates; a site that has not answered by then is left out of the round "
        "(recorded as timeout) and asked again next round (default null: wait until every site answers or disconnects).",
    )
    plan_args: dict[str, Any] = Field(
        default_factory=dict,
        description="The plan's arguments (schema: a built-in label schema name, a schema file next to the spec, or the schema inline; "
        "network, roi_size, ...): checked by the plan's own rules, see the README.",
    )
    approval: ApprovalSection = Field(default_factory=ApprovalSection, description="Plan approval by the sites.")
    transfer: TransferSection = Field(default_factory=TransferSection, description="How models travel: {precision: fp32 | bf16 | fp16}.")
    device: DeviceSection = Field(default_factory=DeviceSection, description="GPU use and precision at the sites (segmentation plans).")
    dp: DPSection | None = Field(
        default=None,
        description="Differential privacy (null: off): {type: local | central, sigma, clip, delta}; segmentation plans with fedavg, "
        "trained in fp32; each site's epsilon at delta is reported per round (local).",
    )
    secagg: SecaggSection | None = Field(
        default=None,
        description="Secure aggregation (null: off): the coordinator only ever decrypts the weighted sum of the sites' models; every "
        "sampled site must answer each round (a site that drops stops the run, resumable). Segmentation plans, federated mode.",
    )

    @model_validator(mode="after")
    def _precision_fits(self) -> SpecFile:
        if self.device.precision == "fp16" and self.device.gpu != "required":
            raise ConfigProblem("device.precision", "fp16 runs on GPUs only: set device.gpu: required, or precision: auto (fp16 only where it fits)")
        if self.device.precision == "fp16" and self.fedprox_mu:
            # the loss scale multiplies the plan's loss, not the proximal term Fed-BioMed adds after it
            raise ConfigProblem("device.precision", "fp16 cannot be combined with fedprox_mu; set precision: bf16, fp32 or auto")
        if self.plan in FACTORY_PLANS and self.device.precision not in ("auto", "fp32"):
            raise ConfigProblem("device.precision", "the data factory trains in fp32 (StyleGAN2's regularisers are not autocast-safe); leave precision at auto")
        return self


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of an experiment spec (``coordinator schema spec``).

    Returns:
        The Draft 2020-12 schema as a dict.
    """
    return json_schema(
        SpecFile,
        schema_id=SCHEMA_ID,
        title="fedimg experiment spec",
        description="An experiment a researcher runs on a fedimg federation (`coordinator validate|run|submit SPEC`).",
    )


# -- the resolved spec ------------------------------------------------------------------


@dataclass
class Spec:
    """A validated spec with the plan's defaults filled in: what the coordinator runs.

    The attributes mirror the file's keys (``sites.tags`` -> ``site_tags``, ``approval.wait_s``
    -> ``approval_wait_s``); ``split`` is the resolved split (``{"validation", "test", "seed"}``,
    a legacy ``test_ratio`` turned into it), ``weights`` the aggregation weights (``samples`` or
    ``equal``), ``validate_every`` how often the sites score the models, ``secagg`` the secure
    aggregation settings (None: off); ``model_args`` is what the sites receive (the label schema embedded), ``raw`` the
    spec as written and ``warnings`` its risky but legal values.
    """

    name: str
    plan: str
    rounds: int
    site_tags: list[str] = field(default_factory=list)
    site_ids: list[str] = field(default_factory=list)
    min_sites: int = 1
    wait_for_sites_s: float = 120.0
    min_per_round: int = 1  # sites a round's aggregate needs (`coordinator.strategy.SampledSitesStrategy`)
    mandatory_sites: list[str] = field(default_factory=list)  # names or node ids that every round needs
    round_timeout_s: float | None = None  # None: a round waits for every site's answer or disconnection
    local_steps: int = 4
    batch_size: int = 2
    optimizer: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-3})
    aggregator: str = "fedavg"
    server_optimizer: dict[str, Any] | None = None
    fedprox_mu: float | None = None
    split: dict[str, Any] = field(default_factory=lambda: SplitSettings().to_dict())  # {"validation", "test", "seed"}, resolved
    weights: str = "samples"  # aggregation weights: "samples" | "equal"
    seed: int = 0
    validate_every: int = 1  # score the models every k rounds (`coordinator.engine.scoring_flags`)
    plan_args: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)  # what the sites receive (schema embedded)
    mode: str = "federated"
    clients_per_round: int | None = None  # None: every site every round
    request_approval: bool = True
    approval_wait_s: float = 0.0
    device: dict[str, str] = field(default_factory=lambda: DeviceSection().model_dump())  # {"gpu", "precision"}
    transfer: dict[str, str] = field(default_factory=lambda: TransferSection().model_dump())  # {"precision"}: how models travel
    secagg: dict[str, Any] | None = None  # {"scheme", "clipping_range"}; None: plain aggregation
    dp: dict[str, Any] | None = None  # {"type", "sigma", "clip", "delta"}; None: no differential privacy
    raw: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # risky but legal values, "file: key: why"

    @property
    def held_out(self) -> float:
        """The share of each site's cases that never trains: validation + test."""
        return float(self.split["validation"]) + float(self.split["test"])

    def training_args(self) -> dict[str, Any]:
        """Fed-BioMed training_args (its schema is fixed; extra values travel in model_args).

        Fed-BioMed's ``test_ratio`` is the held-out share (validation + test): it only switches
        Fed-BioMed's testing step on; the plan's data manager decides which cases are which
        (``model_args["split"]``). Testing runs on both updates when there are validation cases.

        Returns:
            The training arguments of every round.
        """
        validates = float(self.split["validation"]) > 0
        args: dict[str, Any] = {
            "loader_args": {"batch_size": self.batch_size, "shuffle": True},
            "optimizer_args": dict(self.optimizer),
            "num_updates": self.local_steps,
            "test_ratio": self.held_out,
            "test_on_global_updates": validates,
            "test_on_local_updates": validates,
            "test_batch_size": 1 if self.plan in SEGMENTATION_PLANS else self.batch_size,  # whole volumes
            "shuffle_testing_dataset": False,
            "random_seed": self.seed,
            "log_interval": max(1, self.local_steps),
            # informative: the segmentation plans place themselves (pipelines.device.plan_device, from device.gpu)
            "use_gpu": self.device["gpu"] != "forbidden",
        }
        if self.fedprox_mu is not None:
            args["fedprox_mu"] = float(self.fedprox_mu)
        if self.dp is not None:  # Fed-BioMed's DPController (Opacus); delta stays here, for the accounting
            args["dp_args"] = {"type": self.dp["type"], "sigma": float(self.dp["sigma"]), "clip": float(self.dp["clip"])}
        return args

    @property
    def is_factory(self) -> bool:
        """Whether the plan is the data factory (no labels, sampled sites, no validation split)."""
        return self.plan in FACTORY_PLANS

    @property
    def is_fedsr(self) -> bool:
        """Whether the plan is FedSR (unlabelled sites, one atlas, personal decoders; sites score themselves)."""
        return self.plan in FEDSR_PLANS

    def experiment_model_args(self, run_id: str | None = None, client_ids: dict[str, int] | None = None) -> dict[str, Any]:
        """model_args for Fed-BioMed.

        The checked plan arguments plus the run's length, which the plans need for their
        schedules, the run id, which keys what a site keeps between rounds (its optimizer
        state), (segmentation plans) the split, which the site's data manager applies to its
        cases, and (data factory) each site's client id.

        Args:
            run_id: the run's id.
            client_ids: data factory: node id -> client id.

        Returns:
            The model arguments.
        """
        args = dict(self.model_args)
        if self.plan in SEGMENTATION_PLANS + FACTORY_PLANS + FEDSR_PLANS:
            args.update({"rounds_total": self.rounds, "local_steps": self.local_steps})
            # how the sites send their updates (pipelines.plans.transfer), SCAFFOLD's states included (pipelines.wire_aux)
            args["transfer"] = {**dict(self.transfer), "states": True}
            if run_id:
                args["run_id"] = run_id
        if self.plan in SEGMENTATION_PLANS:
            args["split"] = dict(self.split)
            args["aggregator"] = self.aggregator  # scaffold: the sites step SCAFFOLD's correction (pipelines.plans.optimizers)
            args["device"] = dict(self.device)  # where the site trains, in which precision (pipelines.device)
        if self.is_factory:
            args["device"] = {"gpu": self.device["gpu"]}  # the factory trains in fp32
            args["client_ids"] = dict(client_ids or {})
        if self.is_fedsr:
            args["device"] = dict(self.device)
        return args

    def resolved_raw(self) -> dict[str, Any]:
        """The spec with a schema file inlined (what a remote coordinator needs).

        Returns:
            The spec mapping, ``plan_args.schema`` replaced by the schema's content.
        """
        raw = dict(self.raw)
        if self.plan in SEGMENTATION_PLANS + FACTORY_PLANS + FEDSR_PLANS:
            raw["plan_args"] = {**self.plan_args, "schema": self.model_args["schema_definition"]}
        return raw


def _clip(problem: str) -> str:
    problem = " ".join(str(problem).split())
    return problem if len(problem) <= PROBLEM_CHARS else problem[: PROBLEM_CHARS - 3] + "..."


def plan_rules(values: dict[str, Any]) -> list[tuple[str, str]]:
    """The rules across keys of a spec: what the plan, mode and aggregator allow together.

    Args:
        values: the spec's top-level values that validated (a key missing here is absent
            from the spec or invalid; every rule fires only on a value given, so an invalid
            key keeps the rules that read it quiet).

    Returns:
        (key path, problem) for each rule broken.
    """
    out: list[tuple[str, str]] = []
    plan = values.get("plan")
    factory = plan in FACTORY_PLANS
    mode = values.get("mode", "federated")
    aggregator = values.get("aggregator", "fedavg")
    server_opt = values.get("server_optimizer")
    plan_args = values.get("plan_args")
    if aggregator == "scaffold" and isinstance(plan_args, dict) and plan_args.get("keep_optimizer_state") is False:
        # SCAFFOLD's c_i lives in the optimizer state Fed-BioMed keeps between a site's rounds
        out.append(("plan_args.keep_optimizer_state", "false cannot be used with aggregator scaffold: SCAFFOLD's state is the optimizer's, "
                                                      "which Fed-BioMed keeps between rounds; drop keep_optimizer_state"))  # fmt: skip
    if aggregator == "scaffold" and values.get("weights") == "samples":
        # declearn's SCAFFOLD server averages the sites' correction states equally; the model average must match them
        out.append(("weights", "scaffold averages the sites' correction states equally, and the model updates with them: drop weights or write weights: equal"))
    if plan in SEGMENTATION_PLANS and values.get("batch_size", 1) != 1:
        out.append(("batch_size", f"must be 1 for {plan}: a step takes one whole volume and draws plan_args.patches_per_volume patches from it "
                                  f"(got {values['batch_size']})"))  # fmt: skip
    if mode == "standalone" and (server_opt is not None or aggregator != "fedavg"):
        out.append(("mode", "standalone runs have no aggregation: drop server_optimizer / aggregator"))
    if values.get("split") is not None and values.get("test_ratio") is not None:
        out.append(("test_ratio", "is deprecated and cannot be combined with split: drop it (test_ratio: X meant split: {validation: X, test: 0})"))
    sites = values.get("sites")
    quorum = sites.get("min_per_round") if isinstance(sites, dict) else None
    sampled = values.get("clients_per_round", 2 if factory else None)
    if isinstance(sites, dict) and isinstance(quorum, int):
        start = _start_sites(sites)
        if quorum > start:
            out.append(("sites.min_per_round", f"must be at most min_sites ({start}): a run may start with min_sites sites (got {quorum})"))
    if isinstance(quorum, int) and isinstance(sampled, int) and quorum > sampled:
        out.append(("sites.min_per_round", f"must be at most clients_per_round ({sampled}): a round asks only that many sites (got {quorum})"))
    if values.get("mode") == "standalone" and isinstance(sites, dict) and (quorum is not None or sites.get("mandatory")):
        out.append(("sites", "standalone sites train alone: drop min_per_round and mandatory (a failing site stops the run)"))
    if values.get("clients_per_round") is not None and plan is not None and not factory:
        # segmentation runs select the best model on every site's validation each round
        out.append(("clients_per_round", f"is only for the data_factory plan; {plan} trains and validates every site every round"))
    if isinstance(values.get("secagg"), dict):
        out.extend(_secagg_rules(values, factory))
    if isinstance(values.get("dp"), dict):
        out.extend(_dp_rules(values, factory))
    if plan in FEDSR_PLANS:
        return out + _fedsr_rules(values)
    if not factory:
        return out
    if values.get("validate_every") is not None:
        out.append(("validate_every", f"{plan} scores no models during training (it holds out no cases): drop validate_every"))
    optimizer = values.get("optimizer")
    if isinstance(optimizer, dict) and set(optimizer) - {"lr"}:
        out.append(("optimizer", f"{plan} takes only {{lr: <positive number>}} (Adam, corrected per network for lazy regularisation); got {short(optimizer)}"))
    plan_args, rounds = values.get("plan_args"), values.get("rounds")
    refine = plan_args.get("refine_rounds", 0) if isinstance(plan_args, dict) else 0
    if isinstance(refine, int) and not isinstance(refine, bool) and isinstance(rounds, int) and refine > rounds:
        out.append(("plan_args.refine_rounds", f"must be at most rounds ({rounds}); got {refine}"))
    test_ratio, split = values.get("test_ratio"), values.get("split")
    if test_ratio:
        out.append(("test_ratio", f"must be 0 for {plan}: the data factory holds out no cases (got {test_ratio:g})"))
    if isinstance(split, dict) and any(_split_of(split)[k] for k in ("validation", "test")):
        out.append(("split", f"{plan} holds out no cases: drop split (or write split: {{validation: 0, test: 0}}); got {short(split)}"))
    if values.get("weights") == "samples":
        out.append(("weights", f"{plan} weights every site equally (each client's generator counts the same): drop weights or write weights: equal"))
    if mode != "federated" or aggregator != "fedavg" or server_opt is not None or values.get("fedprox_mu") is not None:
        out.append(("plan", f"{plan} runs federated with uniform FedAvg: drop mode, aggregator, server_optimizer and fedprox_mu"))
    return out


def _fedsr_rules(values: dict[str, Any]) -> list[tuple[str, str]]:
    """What the FedSR plan takes (`plan_rules`, ``plan: fedsr``).

    Args:
        values: the spec's top-level values that validated.

    Returns:
        (key path, problem) for each rule broken.
    """
    out: list[tuple[str, str]] = []
    plan = values["plan"]
    split = values.get("split")
    if isinstance(split, dict) and any(_split_of(split)[k] for k in ("validation", "test")):
        out.append(("split", f"{plan} splits nothing: a site's labelled cases are its evaluation cases, never trained on; drop split"))
    if values.get("test_ratio"):
        out.append(("test_ratio", f"must be 0 for {plan}: a site's labelled cases are its evaluation cases; drop test_ratio"))
    if values.get("validate_every") is not None:
        out.append(("validate_every", f"{plan} sites score their personalised model themselves: use plan_args.evaluate_every"))
    if values.get("aggregator", "fedavg") != "fedavg" or values.get("server_optimizer") is not None or values.get("fedprox_mu") is not None:
        out.append(("aggregator", f"{plan} averages its shared parts with FedAvg: drop aggregator, server_optimizer and fedprox_mu"))
    if values.get("secagg") is not None:
        out.append(("secagg", f"{plan} is not run with secure aggregation yet: drop secagg"))
    if values.get("dp") is not None:
        out.append(("dp", f"{plan} trains registration with per-volume losses Opacus does not make private yet: drop dp"))
    optimizer = values.get("optimizer")
    if isinstance(optimizer, dict) and set(optimizer) - {"lr"}:
        out.append(("optimizer", f"{plan} takes only {{lr: <positive number>}} (Adam, as in the paper); got {short(optimizer)}"))
    plan_args, rounds = values.get("plan_args"), values.get("rounds")
    finetune = plan_args.get("finetune_rounds", 0) if isinstance(plan_args, dict) else 0
    if isinstance(finetune, int) and not isinstance(finetune, bool) and isinstance(rounds, int) and finetune >= rounds:
        out.append(("plan_args.finetune_rounds", f"must be below rounds ({rounds}): some rounds must train the shared encoder; got {finetune}"))
    return out


def _start_sites(sites: dict[str, Any]) -> int:
    """The sites a run needs to start, from a written ``sites`` mapping: ``min_sites``, else the number of ``ids``, else 1."""
    ids, given = sites.get("ids"), sites.get("min_sites")
    return given if isinstance(given, int) else (len(ids) if isinstance(ids, list) and ids else 1)


def _secagg_rules(values: dict[str, Any], factory: bool) -> list[tuple[str, str]]:
    """What Fed-BioMed's secure aggregation cannot be combined with (`plan_rules`, ``secagg`` given).

    Args:
        values: the spec's top-level values that validated.
        factory: the plan is the data factory.

    Returns:
        (key path, problem) for each rule broken.
    """
    out: list[tuple[str, str]] = []
    if factory:
        out.append(("secagg", f"{values['plan']} weights its sites equally and samples them per round; secure aggregation weights by "
                              "training cases and needs every site: drop secagg"))  # fmt: skip
    elif values.get("mode") == "standalone":
        out.append(("secagg", "standalone sites train alone: there is nothing to aggregate securely; drop secagg"))
    elif values.get("aggregator") == "scaffold":
        # Fed-BioMed averages the encrypted correction updates by training cases; declearn's SCAFFOLD server needs their sum
        out.append(("aggregator", "scaffold cannot be combined with secagg (Fed-BioMed's secure aggregation averages SCAFFOLD's "
                                  "correction updates where it needs their sum): use aggregator: fedavg or drop secagg"))  # fmt: skip
    if values.get("weights") == "equal" and not factory:
        # each site multiplies its quantised model by its training cases before masking: the weights are the sites' own
        out.append(("weights", "equal cannot be combined with secagg: secure aggregation weights the sites by training cases; "
                               "drop weights (or write weights: samples)"))  # fmt: skip
    transfer = values.get("transfer")
    if isinstance(transfer, dict) and transfer.get("precision", "fp32") != "fp32":
        # the sites send secure aggregation's masked integers as they are; only the coordinator's models would be rounded
        out.append(("transfer.precision", f"{transfer['precision']} cannot be combined with secagg: the sites send masked integers, which "
                                          "cannot be rounded; drop transfer.precision or secagg"))  # fmt: skip
    sites = values.get("sites")
    if isinstance(sites, dict) and not factory and values.get("mode", "federated") == "federated":
        start = _start_sites(sites)
        if start < 2:
            out.append(("sites.min_sites", f"must be at least 2 with secagg: secure aggregation needs 2 or more sites a round (got {start})"))
    return out


def _dp_rules(values: dict[str, Any], factory: bool) -> list[tuple[str, str]]:
    """What Fed-BioMed's differential privacy (Opacus) cannot be combined with (`plan_rules`, ``dp`` given).

    Args:
        values: the spec's top-level values that validated.
        factory: the plan is the data factory.

    Returns:
        (key path, problem) for each rule broken.
    """
    out: list[tuple[str, str]] = []
    if factory:
        out.append(("dp", f"{values['plan']} trains two networks with their own optimizers and regularisers, which Opacus cannot make private: drop dp"))
        return out
    if values.get("aggregator") == "scaffold":
        # Fed-BioMed's DPController needs a torch optimizer; SCAFFOLD's client is a declearn optimizer
        out.append(("aggregator", "scaffold cannot be combined with dp (Fed-BioMed's differential privacy needs a torch optimizer, "
                                  "SCAFFOLD's client is declearn's): use aggregator: fedavg or drop dp"))  # fmt: skip
    if values.get("fedprox_mu") is not None:
        # Opacus steps with the clipped per-sample gradients of the plan's loss: the proximal term's gradient is dropped
        out.append(("fedprox_mu", "cannot be combined with dp: Opacus builds each step from the per-sample gradients of the plan's loss, "
                                  "which the proximal term is not part of; drop fedprox_mu or dp"))  # fmt: skip
    plan_args = values.get("plan_args")
    if isinstance(plan_args, dict) and plan_args.get("presence_head") is not None:
        out.append(("plan_args.presence_head", "cannot be combined with dp: the head's hooks carry features between modules, which "
                                                "Opacus's per-sample clipping does not follow; drop presence_head or dp"))  # fmt: skip
    device = values.get("device")
    precision = device.get("precision") if isinstance(device, dict) else None
    if precision in ("bf16", "fp16"):
        out.append(("device.precision", f"{precision} cannot be combined with dp: per-sample gradients are clipped in fp32; "
                                        "set precision: fp32 or auto (auto trains in fp32 under dp)"))  # fmt: skip
    return out


def dp_network_problems(model_args: dict[str, Any]) -> list[tuple[str, str]]:
    """Whether Opacus can train the spec's network (``dp`` given): built at its ``tiny`` size, probed (`pipelines.privacy`).

    Imports torch and MONAI: only specs with ``dp`` pay for it.

    Args:
        model_args: the checked plan arguments (`check_plan_args`).

    Returns:
        (``plan_args.network``, problem) when it cannot.
    """
    from pipelines.network_config import network_config_from_spec
    from pipelines.privacy import spec_network_dp_problem

    try:
        network = network_config_from_spec(model_args.get("network"))
    except ValueError:  # reported by the plan's own checks
        return []
    problem = spec_network_dp_problem(network)
    return [("plan_args.network", _clip(problem))] if problem else []


def _split_of(given: dict[str, Any]) -> dict[str, Any]:
    """A written ``split`` with the defaults of its missing keys."""
    return {**SplitSettings().to_dict(), **given}


def deprecations(raw: dict[str, Any], plan: str) -> list[tuple[str, str]]:
    """Keys of an older spec form that still load, and what to write instead.

    Args:
        raw: the spec as written.
        plan: its plan.

    Returns:
        (key path, warning) pairs.
    """
    if raw.get("test_ratio") is None or raw.get("split") is not None:
        return []
    x = raw["test_ratio"]
    if plan in FACTORY_PLANS:
        return [("test_ratio", "is deprecated: drop it (the data factory holds out no cases)")]
    test = min(0.2, round(0.9 - x, 2)) if x else 0  # a suggestion that itself validates (validation + test <= 0.9; test needs validation)
    return [("test_ratio", f"is deprecated: write split: {{validation: {x:g}, test: {test:g}}} (test_ratio held out validation cases only; no test split)")]


def validate(raw: Any, where: str, base_dir: Path | None = None, scale: str = "full") -> Spec:
    """Check a spec's mapping and return the Spec; every problem is reported at once.

    The keys are checked by the model (`SpecFile`), ``plan_args`` by the plan's own checks
    once ``plan`` and ``plan_args`` are valid, and the rules across keys (`plan_rules`) on the
    keys that validated.

    Args:
        raw: the spec as loaded from YAML.
        where: what to call the spec in messages (its file name).
        base_dir: folder that ``plan_args.schema`` file paths are relative to. None (a spec
            that came over the network) refuses schema files: only built-in names or an
            inline schema, so a submitted spec cannot make the coordinator read its files.
        scale: ``tiny`` for a spec `scale_raw` shrank: its few updates are meant, not warned about.

    Returns:
        The validated Spec; ``Spec.warnings`` lists risky but legal values.

    Raises:
        SpecError: listing every problem (file, key path, problem and what is allowed).
    """
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping at the top level (got {type(raw).__name__})", file=where)
    problems: list[tuple[str, str]] = []
    model: SpecFile | None = None
    try:
        model = validate_config(SpecFile, raw, where=where, error=SpecError)
    except SpecError as exc:
        problems.extend(exc.problems)
    invalid = {key.partition(".")[0].partition("[")[0] for key, _ in problems}
    values = {k: raw[k] for k in SpecFile.model_fields if k in raw and k not in invalid}
    model_args: dict[str, Any] = {}
    if "plan" in values and "plan_args" not in invalid:
        model_args, plan_problems = check_plan_args(values["plan"], values.get("plan_args", {}), base_dir, allow_files=base_dir is not None)
        for found in plan_problems:
            key = found.key or ""
            key = key if len(key) <= SHOWN_CHARS else short(key)
            problems.append((f"plan_args.{key}", _clip(found.problem)))
    problems.extend(plan_rules(values))
    if isinstance(values.get("dp"), dict) and values.get("plan") in SEGMENTATION_PLANS and model_args and not problems:
        problems.extend(dp_network_problems(model_args))  # builds the network: only once everything else holds
    if problems or model is None:
        order = list(SpecFile.model_fields)
        rank = {key: i for i, key in enumerate(order)}
        problems.sort(key=lambda kp: rank.get(kp[0].partition(".")[0].partition("[")[0], len(order)))
        raise SpecError(format_problems(where, problems), problems, file=where, key=problems[0][0] if problems else None)
    spec = _resolve(model, model_args, raw)
    spec.warnings = [f"{where}: {key}: {problem}" for key, problem in deprecations(raw, spec.plan) + risky_values(spec, scaled=scale != "full")]
    return spec


def _resolve(m: SpecFile, model_args: dict[str, Any], raw: dict[str, Any]) -> Spec:
    """The Spec of a valid SpecFile: the plan's defaults filled in."""
    segmentation, factory, fedsr = m.plan in SEGMENTATION_PLANS, m.plan in FACTORY_PLANS, m.plan in FEDSR_PLANS
    ids = list(m.sites.ids or [])
    given = m.optimizer.model_dump(exclude_none=True) if m.optimizer is not None else None
    if factory:
        optimizer = {"lr": 0.002, **(given or {})}
    elif fedsr:
        optimizer = {"lr": 1e-4, **(given or {})}  # the paper's Adam learning rate
    else:
        optimizer = given if given is not None else {"lr": 1e-3}
    if factory or fedsr:
        split = SplitSettings(validation=0.0, test=0.0).to_dict()
    elif m.split is not None:
        split = SplitSettings.from_mapping(m.split.model_dump()).to_dict()
    elif m.test_ratio is not None:  # the old form: test_ratio held out validation cases only
        split = SplitSettings(validation=float(m.test_ratio), test=0.0).to_dict()
    else:
        split = SplitSettings().to_dict()
    min_sites = m.sites.min_sites if m.sites.min_sites is not None else (len(ids) or 1)
    # data_factory samples 2 sites a round unless told otherwise; `clients_per_round: null` means all of them
    clients_per_round = m.clients_per_round if "clients_per_round" in m.model_fields_set else (2 if factory else None)
    return Spec(
        name=m.name,
        plan=m.plan,
        rounds=m.rounds,
        site_tags=list(m.sites.tags),
        site_ids=ids,
        min_sites=min_sites,
        wait_for_sites_s=m.sites.wait_s,
        min_per_round=m.sites.min_per_round if m.sites.min_per_round is not None else default_min_per_round(min_sites, clients_per_round),
        mandatory_sites=list(m.sites.mandatory),
        round_timeout_s=m.round_timeout_s,
        local_steps=m.local_steps,
        batch_size=m.batch_size if m.batch_size is not None else (1 if segmentation or fedsr else 8 if factory else 2),
        optimizer=optimizer,
        aggregator=m.aggregator,
        server_optimizer=m.server_optimizer.model_dump(exclude_none=True) if m.server_optimizer is not None else None,
        fedprox_mu=m.fedprox_mu,
        split=split,
        weights="equal" if factory or m.aggregator == "scaffold" else (m.weights or "samples"),
        seed=m.seed,
        validate_every=m.validate_every,
        plan_args=dict(m.plan_args),
        model_args=model_args,
        mode=m.mode,
        clients_per_round=clients_per_round,
        request_approval=m.approval.request,
        approval_wait_s=m.approval.wait_s,
        device=m.device.model_dump(),
        transfer=m.transfer.model_dump(),
        secagg=m.secagg.model_dump() if m.secagg is not None else None,
        dp=m.dp.model_dump() if m.dp is not None else None,
        raw=raw,
    )


def default_min_per_round(min_sites: int, clients_per_round: int | None = None) -> int:
    """The quorum of a round when the spec sets none: half of the sites needed to start, rounded up.

    A federation keeps training through one failing site of two, two of four; it stops when most
    of it is gone (then `coordinator serve` resumes it once the sites are back).

    Args:
        min_sites: the sites the run needs to start.
        clients_per_round: sites sampled per round (None: every site).

    Returns:
        At least 1, at most the sites a round samples.
    """
    quorum = max(1, math.ceil(min_sites / 2))
    return min(quorum, clients_per_round) if clients_per_round else quorum


# Below / above these a run is legal but most likely not what was meant.
MIN_UPDATES = 50  # rounds x local_steps of a segmentation run
LR_RANGE = (1e-5, 0.1)


def risky_values(spec: Spec, scaled: bool = False) -> list[tuple[str, str]]:
    """Legal values that most likely spoil a run (printed as warnings, not refused).

    Args:
        spec: the validated spec.
        scaled: the spec was shrunk on purpose (``--scale tiny``): too few updates is what was asked for.

    Returns:
        (key path, warning) pairs.
    """
    out = []
    if spec.plan in SEGMENTATION_PLANS:
        # a spec of the old form has no split key: name the key it wrote
        key = "test_ratio" if spec.raw.get("test_ratio") is not None and spec.raw.get("split") is None else "split"
        validation, test = float(spec.split["validation"]), float(spec.split["test"])
        if validation == 0:
            out.append((f"{key}.validation" if key == "split" else key,
                        "no validation cases: no Dice per round and no best-model selection (the last round's model is kept); "
                        "use e.g. split: {validation: 0.2, test: 0.2}"))  # fmt: skip
        elif test == 0:
            out.append((f"{key}.test" if key == "split" else key,
                        "no test cases: the in-federation numbers are on the validation cases that selected the model, which is optimistic; "
                        "use e.g. split: {validation: 0.2, test: 0.2}"))  # fmt: skip
        if validation + test > 0.5:
            out.append((key, f"{validation + test:g} held out: trains on less than half of each site's cases"))
        if spec.validate_every > 1 and validation == 0:
            out.append(("validate_every", f"{spec.validate_every} has no effect: without validation cases no model is scored"))
        elif spec.validate_every > spec.rounds:
            out.append(("validate_every", f"{spec.validate_every} > rounds ({spec.rounds}): only the initial model, the model before the last round "
                                          "and the final model are scored, and no local model (no best local model is selected)"))  # fmt: skip
        updates = spec.rounds * spec.local_steps
        if updates < MIN_UPDATES and not scaled:
            out.append(("rounds", f"{spec.rounds} rounds x {spec.local_steps} local_steps = {updates} updates per site: "
                                  f"too few to learn much (the examples use >= {MIN_UPDATES}; raise rounds or local_steps)"))  # fmt: skip
    patches = spec.model_args.get("patches_per_volume", 2) if spec.plan in SEGMENTATION_PLANS else 1
    if spec.dp is not None and spec.dp["type"] == "local" and isinstance(patches, int) and patches > 1:
        out.append(("dp.sigma", f"each case gives plan_args.patches_per_volume ({patches}) patches, each clipped to clip: the noise per case is "
                                f"sigma / {patches} = {spec.dp['sigma'] / patches:g}, which spends the budget faster; "
                                "plan_args.patches_per_volume: 1 keeps it at sigma"))  # fmt: skip
    lr = spec.optimizer.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and not LR_RANGE[0] <= lr <= LR_RANGE[1]:
        out.append(("optimizer.lr", f"{lr:g} is outside the usual [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}] for AdamW/Adam"))
    if spec.mode == "federated" and spec.min_sites == 1 and not spec.is_factory:
        out.append(("sites.min_sites", "1: a federated run may start with a single site (no federation); "
                                       "set it to the number of sites you expect"))  # fmt: skip
    given = spec.raw.get("sites")
    sites: dict[str, Any] = given if isinstance(given, dict) else {}
    for key in ("min_per_round", "mandatory"):
        if spec.secagg is not None and sites.get(key):
            out.append((f"sites.{key}", "has no effect with secagg: the sites' masks cancel only in the sum of all of them, so every "
                                        "sampled site must answer each round (a missing one stops the run; it resumes once the site is back)"))  # fmt: skip
    return out


SCALES = ("full", "tiny")
TINY_ROUNDS, TINY_STEPS, TINY_ROI = 2, 2, 32


def scale_raw(raw: Any, scale: str = "full") -> Any:
    """A spec scaled down to run anywhere through the same code path (``--scale tiny``).

    ``tiny`` keeps the plan, method, sites, split, schema, optimizer and aggregation, and
    shrinks what costs: at most 2 rounds of 2 steps (batch at most 2), the network's ``tiny``
    size with 32-voxel patches and one window at a time, the data factory's ``tiny`` preset,
    ``device.gpu: required`` relaxed to ``optional``; the name gets ``-tiny``. A paper
    configuration (`coordinator/examples/paper_*.yaml`) then runs on a laptop's CPU.

    Args:
        raw: the parsed spec (anything else is returned as it is, for validation to report).
        scale: ``full`` (unchanged) or ``tiny``.

    Returns:
        The spec to validate.
    """
    if scale == "full" or not isinstance(raw, dict):
        return raw
    out = copy.deepcopy(raw)
    out["name"] = f"{str(out.get('name', 'spec'))[:59]}-tiny"  # names are at most 64 characters
    for key, limit in (("rounds", TINY_ROUNDS), ("local_steps", TINY_STEPS), ("batch_size", 2)):
        if isinstance(out.get(key), int):
            out[key] = min(out[key], limit)
    out.setdefault("local_steps", TINY_STEPS)
    device = out.get("device")
    if isinstance(device, dict) and device.get("gpu") == "required":
        out["device"] = {**device, "gpu": "optional"}
        if device.get("precision") == "fp16":
            out["device"]["precision"] = "auto"  # fp16 where a site has a GPU, fp32 on CPUs
    args = out.get("plan_args")
    if isinstance(args, dict):
        if out.get("plan") in FEDSR_PLANS:
            network = args.get("network")
            args["network"] = {**(network if isinstance(network, dict) else {}), "size": "tiny"}
            args["volume_size"] = [TINY_ROI] * 3
            if isinstance(args.get("finetune_rounds"), int) and isinstance(out.get("rounds"), int):
                args["finetune_rounds"] = min(args["finetune_rounds"], out["rounds"] - 1)  # the encoder still trains
        elif out.get("plan") in FACTORY_PLANS:
            args["factory"] = {"preset": "tiny"}
            if isinstance(args.get("refine_rounds"), int):
                args["refine_rounds"] = min(args["refine_rounds"], 1)  # the refinement stage still runs (the last round)
        else:
            network = args.get("network")
            dims = network.get("spatial_dims", 3) if isinstance(network, dict) else 3
            if isinstance(network, dict):
                args["network"] = {k: v for k, v in network.items() if k not in ("features", "filters")} | {"size": "tiny"}
            args["roi_size"] = [TINY_ROI] * (dims if dims in (2, 3) else 3)
            args["inference"] = {**(args.get("inference") or {}), "sw_batch_size": 1}
    return out


def parse(text: str, where: str, base_dir: Path | None = None, scale: str = "full") -> Spec:
    """Parse and validate spec text.

    Args:
        text: the YAML text (at most MAX_SPEC_BYTES; aliases may expand to MAX_YAML_NODES values).
        where: what to call the spec in messages.
        base_dir: folder schema file paths are relative to; None refuses schema files
            (see ``validate``).
        scale: ``full``, or ``tiny`` (`scale_raw`).

    Returns:
        The validated Spec.

    Raises:
        SpecError: too large, not YAML, or listing every problem of the spec.
    """
    raw = read_spec_yaml(text, where, error=SpecError)
    return validate(scale_raw(raw, scale), where, base_dir, scale=scale)


def load(path: str | os.PathLike[str], scale: str = "full") -> Spec:
    """Read and validate a spec file; schema paths in it are relative to its folder.

    Args:
        path: the spec file.
        scale: ``full``, or ``tiny`` (`scale_raw`).

    Returns:
        The validated Spec.

    Raises:
        SpecError: the file is missing, unreadable, too large, not YAML, or has problems.
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: spec file not found", file=p)
    try:
        if p.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{p}: {p.stat().st_size} bytes; a spec is at most {MAX_SPEC_BYTES} bytes", file=p)
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{p}: cannot read ({exc})", file=p) from None
    return parse(text, str(p), base_dir=p.resolve().parent, scale=scale)
