"""Round bookkeeping shared by the training plans: the round index within the run and
per-round, per-site seeding (see `pipelines.site_state.round_seed`); initialisation
failures leave as `pipelines.site_errors.SiteError` (code and allowlisted fields only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from pipelines.site_errors import site_boundary
from pipelines.site_state import round_seed

__all__ = ["PerRoundSeed"]


class _RunSettings(Protocol):
    """What the mixin reads of a plan's settings (`SegmentationSettings`, `FactorySettings`)."""

    @property
    def rounds_total(self) -> int | None: ...


class PerRoundSeed:
    """Mixin for a TorchTrainingPlan: keeps the experiment's random_seed (Fed-BioMed uses it
    only to seed torch identically at every round) and reseeds torch per round and site.

    The plan sets ``_settings`` (with ``rounds_total``) in ``init_model``.
    """

    _random_seed: int | None = None
    _settings: _RunSettings

    if TYPE_CHECKING:  # Fed-BioMed's TorchTrainingPlan provides these; it follows this mixin in a plan's bases

        def round(self) -> int | None: ...

        def node_id(self) -> str | None: ...

    @site_boundary("init")  # model, optimizer and settings: Fed-BioMed would send the exception text
    def post_init(self, model_args: dict[str, Any], training_args: Any, *args: Any, **kwargs: Any) -> Any:
        """Keep the experiment's ``random_seed``, then Fed-BioMed's own initialisation.

        Args:
            model_args: the spec's plan arguments (as Fed-BioMed passes them).
            training_args: Fed-BioMed's training arguments (a mapping-like ``TrainingArgs``).
            args: passed on to Fed-BioMed.
            kwargs: passed on to Fed-BioMed.

        Returns:
            What Fed-BioMed's ``post_init`` returns.

        Raises:
            SiteError: any failure, reported by code (see `pipelines.site_errors`).
        """
        self._random_seed = training_args.get("random_seed") if hasattr(training_args, "get") else None
        return super().post_init(model_args, training_args, *args, **kwargs)  # type: ignore[misc]  # TorchTrainingPlan's, next in the MRO

    def _round_index(self) -> int:
        """0-based round of the run, clamped to the run's length (plans' settings carry it)."""
        total = self._settings.rounds_total or 1
        return min(max(int(self.round() or 0), 0), total - 1)

    def reseed_for_round(self, round_index: int) -> None:
        """Seed torch for this site's round (`pipelines.site_state.round_seed`).

        Args:
            round_index: 0-based round of the run.
        """
        torch.manual_seed(round_seed(self._random_seed, round_index, str(self.node_id())))
