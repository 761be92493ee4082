"""The model of a run's ``metrics.json``: what the engine records per run, per round and per site.

The engine fills a plain dict during a run and `coordinator.runs.write_metrics` writes it
through `RunMetrics` (so a wrong type fails where it is written); readers get it back through
the same model (`coordinator.runs.load_metrics`). Every field is optional and unknown keys are
kept (``extra="allow"``): run directories written by older versions still open, and a file
round-trips unchanged (dumped with ``exclude_unset``, NaN kept as JSON ``NaN``).

Validation rows (``val_global``, ``val_local``, ``val_final``) and test rows (``test_global``,
``test_local``, ``test_final``) are described in `coordinator.results`. Runs written before the
test split have no test rows and no ``split`` / ``weights`` / ``splits``: those fields stay None
or empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class SitePrivacy(_Record):
    """A site's differential-privacy budget after a round, composed over every round it trained in so far.

    Attributes:
        epsilon: epsilon at ``delta`` (Opacus's RDP accountant over the site's steps; None: central DP, which states none).
        delta: the delta epsilon is stated at (the spec's ``dp.delta``).
        steps: the private optimizer steps the site took so far.
        rounds: the rounds it trained in so far (a round it missed spent nothing).
        incomplete: a round of the run lost its metrics: its steps are not in epsilon, which is then too low.
    """

    epsilon: float | None = None
    delta: float | None = None
    steps: int | None = None
    rounds: int | None = None
    incomplete: bool = False


class PrivacySettings(_Record):
    """The run's differential privacy (the spec's ``dp``): how the sites trained and what epsilon is stated at.

    Attributes:
        type: ``local`` (noise at every step: epsilon per site) or ``central`` (noise once per round on the parameters sent).
        sigma: Opacus's noise multiplier (per patch).
        clip: the per-sample gradient norm bound.
        delta: the delta every epsilon is stated at.
        unit: what one privacy unit is (``case``: a volume, all its patches).
    """

    type: str | None = None
    sigma: float | None = None
    clip: float | None = None
    delta: float | None = None
    unit: str | None = None


class SiteRound(_Record):
    """One site's row of a round: training timings and scalars, its validation rows and its test rows.

    Attributes:
        name: the site's name (the key of its row is its Fed-BioMed node id).
        samples: training samples the site reported.
        train_s: local training time (s).
        request_s: the site's whole request time (s).
        train: training scalars (``loss_mean``, ``lambda``, ``step_s``, ...), merged over the round.
        val_global: the received global model on the site's validation cases, before local training.
        val_local: the site's model after local training.
        val_final: the final global model (after the last round).
        test_global: ``val_global``'s model on the site's test cases (None: no test cases, or an older run).
        test_local: ``val_local``'s model on the site's test cases.
        test_final: ``val_final``'s model on the site's test cases.
        privacy: the site's privacy budget spent so far (runs with ``dp`` only).
    """

    name: str | None = None
    samples: int | None = None
    train_s: float | None = None
    request_s: float | None = None
    train: dict[str, float] = Field(default_factory=dict)
    val_global: dict[str, float] | None = None
    val_local: dict[str, float] | None = None
    val_final: dict[str, float] | None = None
    test_global: dict[str, float] | None = None
    test_local: dict[str, float] | None = None
    test_final: dict[str, float] | None = None
    privacy: SitePrivacy | None = None


class WireBytes(_Record):
    """Bytes the coordinator sent to and received from the sites in one round."""

    to_sites: int | float | None = None  # int as counted today; a float from another counter is kept as it is
    from_sites: int | float | None = None


class SiteStatus(_Record):
    """A site's part in one round.

    Attributes:
        status: ``ok`` (its update was aggregated), ``failed`` (an error, a lost connection, not
            connected), ``timeout`` (no update within ``round_timeout_s``) or ``not_sampled``.
        reason: why, for every status but ``ok``.
    """

    status: str
    reason: str | None = None


class Quorum(_Record):
    """What a round needed to be aggregated (the spec's ``sites.min_per_round``, ``sites.mandatory``, ``round_timeout_s``)."""

    min_per_round: int | None = None
    mandatory: list[str] = Field(default_factory=list)
    round_timeout_s: float | None = None


class RoundRecord(_Record):
    """One round: its timing, the global update's norm, bytes on the wire and the sites' rows.

    Attributes:
        round: round number, from 1.
        wall_s: wall time of the round (s).
        update_norm: L2 norm of the global model's change (NaN where unknown).
        sites: node id -> the site's row; empty for a round whose metrics were lost.
        metrics_lost: the round ran (its model is in the breakpoint) but its per-site rows are gone.
        bytes: wire bytes of the round.
        sampled: names of the sites the strategy sampled.
        site_status: site name -> its part in the round (every site of the run; None for older runs).
        aggregated_from: how many sites' updates the round's aggregate holds (None for older runs).
    """

    round: int
    wall_s: float | None = None
    update_norm: float | None = None
    sites: dict[str, SiteRound] = Field(default_factory=dict)
    metrics_lost: bool = False
    bytes: WireBytes | None = None
    sampled: list[str] | None = None
    site_status: dict[str, SiteStatus] | None = None
    aggregated_from: int | None = None

    def named_sites(self) -> list[tuple[str, SiteRound]]:
        """(site name, row) of this round, sorted by name.

        Returns:
            The rows; a row without a name is named by its node id.
        """
        return sorted(((row.name or nid, row) for nid, row in self.sites.items()), key=lambda kv: kv[0])

    def rows(self, key: str) -> dict[str, dict[str, float]]:
        """site name -> row ``key`` (``val_global``, ``val_local``, ``val_final``, ``test_global``, ...) for the sites that have it.

        Args:
            key: the validation or test row's name.

        Returns:
            The non-empty rows by site name.
        """
        return {name: row for name, site in self.named_sites() if (row := getattr(site, key, None))}


class ModelSize(_Record):
    """The size of the trained model: parameter count and bytes."""

    parameters: int | None = None
    bytes: int | None = None


class BestGlobal(_Record):
    """The best global model so far, selected on the sites' validation cases only.

    Attributes:
        model_round: the round after which it was aggregated (0: the initial model).
        score: its selection score (mean Dice over all classes across sites, validation cases).
        test_score: the same score on the sites' test cases (None: no test rows, or an older run).
    """

    model_round: int | None = None
    score: float | None = None
    test_score: float | None = None


class BestLocal(_Record):
    """A site's best local model, selected on the site's validation cases only.

    Attributes:
        round: the round it was trained in.
        score: its mean Dice on the site's validation cases.
        test_score: its mean Dice on the site's test cases (None: no test cases, or an older run).
    """

    round: int | None = None
    score: float | None = None
    test_score: float | None = None


class Published(_Record):
    """Where a factory run published its factory in the coordinator's registry."""

    kind: str
    name: str
    version: str


class RunMetrics(_Record):
    """A run's ``metrics.json``.

    Attributes:
        rounds: one record per round done, in order.
        rounds_planned: rounds of the spec.
        mode: ``federated`` or ``standalone``.
        plan: the training plan's name.
        local_steps: local steps per round.
        classes: the label schema's classes (name -> id).
        model: model size.
        best_global: the best global model (selected on the sites' validation cases; its test score beside).
        best_local: site name -> its best local model.
        split: the spec's split (``{"validation", "test", "seed"}``); None for older runs.
        weights: the aggregation weights, ``samples`` or ``equal``; None for older runs.
        validate_every: the models were scored every this many rounds (the spec's ``validate_every``); None for older runs (every round).
        splits: site name -> its case counts per split (``training``, ``validation``, ``test``), as the sites reported them.
        clients: factory runs: site name -> client id.
        key_checksums32: factory runs: the key-function checksums the sites reported.
        samples: factory runs: sample grids written (paths relative to the run directory).
        published: factory runs: the published factory.
        quorum: what each round needed (None for older runs: every site).
        scoring_sites: the sites that scored a global model so far (a model scored by fewer is no candidate for best_global).
        privacy: the run's differential privacy (None: none).
    """

    rounds: list[RoundRecord] = Field(default_factory=list)
    rounds_planned: int | None = None
    mode: str | None = None
    plan: str | None = None
    local_steps: int | None = None
    classes: dict[str, int] = Field(default_factory=dict)
    model: ModelSize | None = None
    best_global: BestGlobal | None = None
    best_local: dict[str, BestLocal] = Field(default_factory=dict)
    split: dict[str, Any] | None = None
    weights: str | None = None
    validate_every: int | None = None
    splits: dict[str, dict[str, int]] = Field(default_factory=dict)
    clients: dict[str, int] = Field(default_factory=dict)
    key_checksums32: list[float] = Field(default_factory=list)
    samples: list[str] = Field(default_factory=list)
    published: Published | None = None
    quorum: Quorum | None = None
    scoring_sites: list[str] = Field(default_factory=list)
    privacy: PrivacySettings | None = None

    @classmethod
    def of(cls, metrics: RunMetrics | Mapping[str, Any]) -> RunMetrics:
        """``metrics`` as a model (a dict is validated).

        Args:
            metrics: the model or the parsed file.

        Returns:
            The model.

        Raises:
            pydantic.ValidationError: a dict that does not fit the model.
        """
        return metrics if isinstance(metrics, RunMetrics) else cls.model_validate(metrics)

    def to_json_dict(self) -> dict[str, Any]:
        """What ``metrics.json`` holds: the keys that were set, unknown keys included, NaN kept.

        Returns:
            The dict to write as JSON.
        """
        return self.model_dump(exclude_unset=True)

    def scored_rounds(self) -> list[RoundRecord]:
        """The rounds that have per-site rows (not lost)."""
        return [r for r in self.rounds if r.sites]
