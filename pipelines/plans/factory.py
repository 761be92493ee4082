"""Fed-BioMed plumbing of the data-factory plan (the science: `pipelines.factory`); part of the site image.

The registered plan (`pipelines.plans.data_factory.DataFactoryPlan`) is a thin subclass, the only source
shipped and hashed for approval. What a sampled site does per round: docs/design/data-factory.md.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from fedbiomed.common.datamanager import DataManager
from fedbiomed.common.logger import logger
from fedbiomed.common.training_plans import TorchTrainingPlan

from pipelines.factory.domain_key import DomainKey, build_domain_key
from pipelines.factory.plan_args import FactorySettings, parse_factory_args
from pipelines.factory.training import (
    FactoryModel,
    FactoryUpdater,
    key_pathway_state,
    load_key_pathway,
    make_optimizer,
    reinit_key_pathway,
    site_local_predicate,
)
from pipelines.plans.datasets import PreparedSliceDataset
from pipelines.plans.placement import DevicePlacement
from pipelines.plans.reporting import embedded_schema, plan_origin, report_training
from pipelines.plans.seeding import PerRoundSeed
from pipelines.plans.transfer import WireTransfer
from pipelines.site_errors import site_boundary, site_logger
from pipelines.site_state import SiteStateStore

__all__ = ["DataFactoryPlanBase"]

_KEYS: dict[tuple[str, str], tuple[DomainKey, torch.Tensor]] = {}  # (dataset fingerprint, key checksum) -> (DomainKey, key); one node process


def _checksum_float(hexdigest: str) -> float:
    """The first 32 bits of a sha256 as a float (metrics are floats), to compare sites."""
    return float(int(hexdigest[:8], 16))


class DataFactoryPlanBase(WireTransfer, DevicePlacement, PerRoundSeed, TorchTrainingPlan):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """The data factory's Fed-BioMed plumbing: settings, model, optimizer, site data, one round, the domain key.

    Fed-BioMed calls the methods below on the node (and ``init_model`` on the coordinator too).
    """

    _settings: FactorySettings

    def init_dependencies(self) -> list[str]:
        """The imports Fed-BioMed prepends to the shipped source of a registered subclass.

        Returns:
            Import statements: this base class comes from the site image, not from the source.
        """
        return ["from pipelines.plans.factory import DataFactoryPlanBase"]

    def tag_parameters(self, name: str) -> set[str]:
        """The layers that read the domain key stay at the site (see KEY_PATHWAY), and the
        discriminator parts ``local_discriminator`` names.

        Args:
            name: a parameter's name.

        Returns:
            ``{"local"}`` for a site-local parameter, else an empty set.
        """
        return {"local"} if site_local_predicate(self._settings)(name) else set()

    def init_model(self, model_args: dict[str, Any]) -> FactoryModel:
        """Validate the schema and plan arguments, and build the generator/discriminator pair.

        Args:
            model_args: the spec's plan arguments with the embedded schema.

        Returns:
            The factory model (G, D and G_ema).

        Raises:
            ValueError: no embedded schema; `InvalidPlanArgs` (a ValueError) for bad arguments.
        """
        self._schema, _ = embedded_schema(model_args)
        self._settings = parse_factory_args({k: v for k, v in model_args.items() if k != "schema_definition"})
        return FactoryModel(self._settings.config)

    def init_optimizer(self, optimizer_args: dict[str, Any]) -> torch.optim.Optimizer:
        """The lazy-regularisation Adam of G and D, and the store of its state between this site's rounds.

        Args:
            optimizer_args: ``lr``.

        Returns:
            The optimizer Fed-BioMed steps.
        """
        s = self._settings
        self._optimizer_obj = make_optimizer(self.model(), float(optimizer_args.get("lr", 0.002)), s.r1_interval, s.pl_interval)
        root = os.environ.get("FEDIMG_CACHE_DIR") if s.keep_optimizer_state else None
        self._state_store = SiteStateStore(root, s.run_id, type(self).__name__)
        return self._optimizer_obj

    def _torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The G/D Adam, whose restored moments must follow the model to the device."""
        return [self._optimizer_obj]

    @site_boundary("data")
    def training_data(self) -> DataManager:
        """The site's prepared dataset as axial slices with their position bins.

        Returns:
            Fed-BioMed's data manager over a `PreparedSliceDataset`.
        """
        dataset = PreparedSliceDataset()
        dataset.schema = self._schema
        dataset.size = self._settings.config.resolution
        dataset.n_bins = self._settings.config.n_bins
        dataset.spacing = self._settings.spacing
        dataset.min_foreground = self._settings.min_foreground
        self._dataset = dataset
        return DataManager(dataset=dataset, shuffle=True)

    # -- training ------------------------------------------------------------------------

    def _site_key(self) -> tuple[DomainKey | None, torch.Tensor | None]:
        """The site's domain key from all its slices (this process caches it per dataset)."""
        s = self._settings
        domain_key = build_domain_key(s.key, s.config.resolution, models_dir=os.environ.get("FEDIMG_MODELS_DIR"),
                                      origin=plan_origin(self, "plan_args.key.file"))  # fmt: skip
        if domain_key is None:
            return None, None
        cache_id = (self._dataset.fingerprint, domain_key.checksum())
        if cache_id not in _KEYS:
            images = self._dataset.images
            key = domain_key.site_key(images[i : i + 64].float() for i in range(0, len(images), 64))
            _KEYS.clear()
            _KEYS[cache_id] = (domain_key, key)
        domain_key, key = _KEYS[cache_id]
        # The key stays at the site: its work folder keeps it for local jobs (adaptation).
        store = SiteStateStore(os.environ.get("FEDIMG_CACHE_DIR"), self._settings.run_id or "no-run", "domain-key", folder="factory-keys")
        if store.path is not None and not store.path.is_file():
            store.write({"key": key, "key_checksum": domain_key.checksum(), "describe": domain_key.describe()})
        return domain_key, key

    @site_boundary("training")
    def training_routine(self, history_monitor: Any = None, node_args: dict[str, Any] | None = None) -> int:
        """One round at the site: domain key, saved state, alternating D/G updates, report.

        Args:
            history_monitor: Fed-BioMed's metric channel to the coordinator (None: no report).
            node_args: the node's arguments (device), passed on to Fed-BioMed.

        Returns:
            The number of samples trained on.

        Raises:
            SiteError: any failure, e.g. a site with no client id in the experiment.
        """
        s = self._settings
        node = self.node_id()
        if node not in s.client_ids:
            raise ValueError(f"this site ({node}) has no client id in the experiment (client_ids: {sorted(s.client_ids)})")
        self.reseed_for_round(self._round_index())
        t0 = time.perf_counter()
        domain_key, key = self._site_key()
        key_s = time.perf_counter() - t0
        refine = s.refining(self._round_index())
        self._updater = FactoryUpdater(self.model(), s, s.client_ids[node], key=key, domain_key=domain_key, refine=refine)
        restored = self._restore_site_state()
        key_layers = self._restore_key_pathway()
        self.model().train()
        samples: int = super().training_routine(history_monitor=history_monitor, node_args=node_args)
        self._updater.after_step()  # G_ema follows the last G update before the weights are sent
        self._state_store.write({"round": self._round_index(), "optimizer": self._optimizer_obj.state_dict(), "updater": self._updater.state_dict()})
        self._save_key_pathway()
        metric = {
            **self._updater.means(),
            "updates": float(self._updater.updates),
            "d_steps": float(self._updater.d_steps),
            "g_steps": float(self._updater.g_steps),
            "pl_mean": float(self._updater.pl_mean),
            "client_id": float(s.client_ids[node]),
            "round_index": float(self._round_index()),
            "refine": float(refine),
            "state_restored": float(restored),
            "key_s": key_s,
            "key_layers_restored": float(key_layers),
            "key_checksum32": _checksum_float(domain_key.checksum()) if domain_key is not None else -1.0,
        }
        report_training(history_monitor, metric, samples, int(metric.get("updates", 0)))
        return samples

    def _restore_site_state(self) -> bool:
        """Adam moments, step counters and path-length mean from this site's last round of
        this run. A state from this round or later (a round replayed after a coordinator
        restart) or one that does not fit is not used, and the reason is logged."""
        state = self._state_store.read()
        if state is None:
            return False
        # Paths and exception text stay in the site's log; the coordinator gets a fixed line.
        where = self._state_store.path
        if not isinstance(state, dict) or not isinstance(state.get("round"), int) or state["round"] >= self._round_index():
            site_logger().warning(f"{where}: not from an earlier round of this run; starting with fresh optimizer state")
            logger.warning("[fedimg] saved site state is not from an earlier round of this run; starting with fresh optimizer state")
            return False
        updater = FactoryUpdater(self.model(), self._settings, 0)
        try:
            updater.load_state_dict(state["updater"])
            optimizer = make_optimizer(self.model())
            optimizer.load_state_dict(state["optimizer"])  # checked on a scratch optimizer first
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            site_logger().warning(f"{where}: does not fit this model ({exc}); starting with fresh optimizer state")
            logger.warning("[fedimg] saved site state does not fit this model; starting with fresh optimizer state")
            return False
        self._optimizer_obj.load_state_dict(state["optimizer"])
        self._updater.load_state_dict(state["updater"])
        return True

    def _key_layer_store(self) -> SiteStateStore:
        return SiteStateStore(os.environ.get("FEDIMG_CACHE_DIR"), self._settings.run_id or "no-run", "key-layers", folder="factory-keys")

    def _save_key_pathway(self) -> None:
        """Keep this site's key layers (and local discriminator parts) in its work folder:
        Fed-BioMed neither sends them nor keeps them between rounds."""
        self._key_layer_store().write(key_pathway_state(self.model(), site_local_predicate(self._settings)))

    def _restore_key_pathway(self) -> bool:
        """This site's own key layers (and local discriminator parts) from its work folder;
        the first time in a run, fresh key layers from site-secret randomness (nobody else can
        know their starting point) and the discriminator as initialised."""
        saved = self._key_layer_store().read()
        if isinstance(saved, dict) and load_key_pathway(self.model(), saved, site_local_predicate(self._settings)):
            return True
        reinit_key_pathway(self.model(), torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little")))
        return False

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one update (a D or a G step, alternating; `FactoryUpdater.loss`).

        Args:
            data: a batch of slices.
            target: their slice-position bins.

        Returns:
            The loss Fed-BioMed back-propagates.
        """
        return self._updater.loss(data, target)

    @site_boundary("testing")
    def testing_routine(self, metric: Any, metric_args: dict[str, Any], history_monitor: Any, before_train: bool) -> None:
        """Nothing: the factory holds out no cases (its spec split is {validation: 0, test: 0}).

        Args:
            metric: not used.
            metric_args: not used.
            history_monitor: not used.
            before_train: not used.
        """
        return
