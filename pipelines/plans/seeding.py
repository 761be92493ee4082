"""Round bookkeeping shared by the training plans: the round index within the run and
per-round, per-site seeding (see `pipelines.site_state.round_seed`); initialisation
failures leave as `pipelines.site_errors.SiteError` (code and allowlisted fields only)."""

from __future__ import annotations

import torch

from pipelines.site_errors import site_boundary
from pipelines.site_state import round_seed


class PerRoundSeed:
    """Mixin for a TorchTrainingPlan: keeps the experiment's random_seed (Fed-BioMed uses it
    only to seed torch identically at every round) and reseeds torch per round and site."""

    _random_seed = None

    @site_boundary("init")  # model, optimizer and settings: Fed-BioMed would send the exception text
    def post_init(self, model_args, training_args, *args, **kwargs):
        self._random_seed = training_args.get("random_seed") if hasattr(training_args, "get") else None
        return super().post_init(model_args, training_args, *args, **kwargs)

    def _round_index(self) -> int:
        """0-based round of the run, clamped to the run's length (plans' settings carry it)."""
        total = self._settings.rounds_total or 1
        return min(max(int(self.round() or 0), 0), total - 1)

    def reseed_for_round(self, round_index: int) -> None:
        torch.manual_seed(round_seed(self._random_seed, round_index, str(self.node_id())))
