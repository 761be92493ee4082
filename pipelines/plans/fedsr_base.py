"""Fed-BioMed plumbing of the FedSR plan (the science: `pipelines.fedsr`); part of the site image.

The registered plan (`pipelines.plans.fedsr.FedSRPlan`) is a thin subclass, the only source
shipped and hashed for approval. What a site does per round:

1. the shared parts arrive (the encoder and the SA representation; everything for FedAvg);
   the site's personal parts (both decoders and the MI critics) and its Adam moments are
   read from its work folder (``cache/fedsr/<run>-personal-rNNNN.pt``, one per round, so a round
   replayed after a coordinator resume starts from the round before), so they carry over rounds
   and never leave the site: they are tagged ``local``, which Fed-BioMed never sends or
   averages;
2. the atlas named by the spec is read from the site's models folder, checked against its
   sha256 and prepared like the site's cases (`pipelines.fedsr.atlas`);
3. ``local_steps`` joint registration-segmentation updates on unlabelled volumes
   (`pipelines.fedsr.training.FedSRUpdater`); in the last ``finetune_rounds`` the encoder is
   frozen, so the site's model is then exactly the global encoder plus its own decoders;
4. the SA representation is smoothed (eq. 7) and sent with the encoder; the personal parts are
   saved, and, in the rounds that score, the personalised model (the encoder as it left the
   round: the global one in a fine-tuning round) is scored on the site's
   labelled cases (never trained on) and saved as the site's model
   (``cache/fedsr/<run>-model.pt``, `pipelines.fedsr.personal`: what `site-agent infer --model
   personal:<run>` runs). Only means over cases and case counts are sent.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from fedbiomed.common.datamanager import DataManager
from fedbiomed.common.logger import logger
from fedbiomed.common.training_plans import TorchTrainingPlan

from pipelines.device import on_device
from pipelines.fedsr.atlas import atlas_folder, load_atlas, prepared_atlas
from pipelines.fedsr.metrics import registration_case_metrics, segmentation_case_metrics, summarise
from pipelines.fedsr.networks import FEDSR_PRESETS, FedSRConfig
from pipelines.fedsr.objectives import FedSRLossWeights
from pipelines.fedsr.personal import personal_model_record
from pipelines.fedsr.plan_args import FedSRSettings, parse_fedsr_args
from pipelines.fedsr.training import FEDSR_METHODS, FedSRModel, FedSRUpdater, is_shared_parameter, register_atlas, segment_volume
from pipelines.plans.fedsr_data import PreparedVolumeDataset
from pipelines.plans.placement import DevicePlacement
from pipelines.plans.reporting import embedded_schema, report_training
from pipelines.plans.seeding import PerRoundSeed
from pipelines.plans.transfer import WireTransfer
from pipelines.site_errors import site_boundary, site_logger
from pipelines.site_state import SiteStateStore
from preprocessing.schema import LabelSchema

__all__ = ["FedSRPlanBase", "fedsr_network_config"]

_ATLASES: dict[tuple[str, str, tuple[int, ...], str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # one node process


def fedsr_network_config(settings: FedSRSettings, schema: LabelSchema) -> FedSRConfig:
    """The network's sizes: the preset's widths, the schema's classes.

    Args:
        settings: the plan's settings.
        schema: the federation schema.

    Returns:
        The configuration.
    """
    preset = FEDSR_PRESETS[settings.size]
    return FedSRConfig(
        in_channels=1,
        num_classes=schema.num_classes,
        channels=preset.channels,
        sa_dim=preset.sa_dim,
        integrate_velocity=settings.integrate_velocity,
        integration_steps=preset.integration_steps,
    )


def _loss_weights(settings: FedSRSettings) -> FedSRLossWeights:
    losses = settings.losses or {}
    mi = float(losses.get("mutual_information", 0.1))
    return FedSRLossWeights(
        smoothness=float(losses.get("smoothness", 7.5)),
        similarity=float(losses.get("similarity", 5.0)),
        registration_dice=float(losses.get("registration_dice", 1.0)),
        registration_mutual_information=mi,
        segmentation_mutual_information=mi,
        lncc_kernel_size=int(losses.get("lncc_kernel_size", 9)),
    )


class FedSRPlanBase(WireTransfer, DevicePlacement, PerRoundSeed, TorchTrainingPlan):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """FedSR's Fed-BioMed plumbing: settings, model, optimizer, site data, one round, scoring.

    Fed-BioMed calls the methods below on the node (and ``init_model`` on the coordinator too).
    """

    _settings: FedSRSettings

    def init_dependencies(self) -> list[str]:
        """The imports Fed-BioMed prepends to the shipped source of a registered subclass.

        Returns:
            Import statements: this base class comes from the site image, not from the source.
        """
        return ["from pipelines.plans.fedsr_base import FedSRPlanBase"]

    def tag_parameters(self, name: str) -> set[str]:
        """The personal parts stay at the site (decoders and critics; not for FedAvg's decoders).

        Args:
            name: a parameter's or buffer's name.

        Returns:
            ``{"local"}`` for what is never sent, else an empty set.
        """
        return set() if is_shared_parameter(name, FEDSR_METHODS[self._settings.method]) else {"local"}

    def init_model(self, model_args: dict[str, Any]) -> FedSRModel:
        """Validate the schema and plan arguments, and build the model.

        Args:
            model_args: the spec's plan arguments with the embedded schema.

        Returns:
            The FedSR model of the spec's method.

        Raises:
            ValueError: no embedded schema; `InvalidPlanArgs` (a ValueError) for bad arguments.
        """
        self._schema, self._schema_raw = embedded_schema(model_args)
        self._settings = parse_fedsr_args({k: v for k, v in model_args.items() if k != "schema_definition"})
        return FedSRModel(fedsr_network_config(self._settings, self._schema), FEDSR_METHODS[self._settings.method])

    def init_optimizer(self, optimizer_args: dict[str, Any]) -> torch.optim.Optimizer:
        """Adam over every parameter (the paper's: lr 1e-4 by default here too).

        Args:
            optimizer_args: ``lr``.

        Returns:
            The optimizer Fed-BioMed steps.
        """
        self._optimizer_obj = torch.optim.Adam(self.model().parameters(), lr=float(optimizer_args.get("lr", 1e-4)))
        return self._optimizer_obj

    def _torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The Adam whose restored moments must follow the model to the device."""
        return [self._optimizer_obj]

    @site_boundary("data")
    def training_data(self) -> DataManager:
        """The site's prepared cases as whole volumes (unlabelled ones train).

        Returns:
            Fed-BioMed's data manager over a `PreparedVolumeDataset`.
        """
        dataset = PreparedVolumeDataset()
        dataset.schema = self._schema
        dataset.spacing = self._settings.spacing
        dataset.volume_size = self._settings.volume_size
        self._dataset = dataset
        return DataManager(dataset=dataset, shuffle=True)

    # -- the site's own files -----------------------------------------------------------------

    def _store(self, name: str) -> SiteStateStore:
        store = SiteStateStore(os.environ.get("FEDIMG_CACHE_DIR"), self._settings.run_id or "no-run", name, folder="fedsr")
        if store.path is None:
            # without it the decoders would start afresh every round and no personalised model would be kept
            raise FileNotFoundError("no site work folder (FEDIMG_CACHE_DIR): FedSR keeps each site's decoders there between rounds")
        return store

    def _atlas(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The spec's atlas, verified and prepared like the site's cases (cached per process)."""
        ref = self._settings.atlas
        key = (ref["sha256"], str(self._settings.spacing), tuple(self._settings.volume_size), self._schema.name, self._schema.version)
        if key not in _ATLASES:
            models_dir = os.environ.get("FEDIMG_MODELS_DIR")
            if not models_dir:
                raise FileNotFoundError("no models folder (FEDIMG_MODELS_DIR): the site keeps pulled atlases there (site-agent atlas pull)")
            atlas = load_atlas(atlas_folder(models_dir, ref["name"], ref["version"]), sha256=ref["sha256"])
            _ATLASES.clear()
            _ATLASES[key] = prepared_atlas(atlas, self._schema, self._settings.spacing, self._settings.volume_size)
        image, label = _ATLASES[key]
        return image.to(device), label.to(device)

    def _personal_store(self, round_index: int) -> SiteStateStore:
        """This site's decoders, critics and Adam moments after round `round_index` (one file per round)."""
        return self._store(f"personal-r{round_index:04d}")

    def _restore_personal(self) -> bool:
        """This site's decoders, critics and Adam moments from its latest earlier round of this run.

        One file per round, so a round replayed after a coordinator resume (nothing of it was
        aggregated) starts again from the round before, not from a state it already trained.
        """
        r = self._round_index()
        saved = None
        for earlier in range(r - 1, -1, -1):
            saved = self._personal_store(earlier).read()
            if saved is not None:
                break
        if saved is None:
            if r > 0:
                site_logger().warning(f"no saved FedSR decoders before round {r + 1} (run {self._settings.run_id}); starting them afresh")
                logger.warning("[fedimg] no saved FedSR decoders of an earlier round: starting them afresh")
            return False
        model = self.model()
        own = {k: v for k, v in model.state_dict().items() if not is_shared_parameter(k, model.method)}
        weights = saved.get("weights") if isinstance(saved, dict) else None
        if not isinstance(weights, dict) or set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
            site_logger().warning("saved FedSR decoders do not fit this model; starting them afresh")
            logger.warning("[fedimg] saved personal FedSR parts do not fit this model; starting afresh")
            return False
        model.load_state_dict(weights, strict=False)
        optimizer = saved.get("optimizer")
        if self._settings.keep_optimizer_state and isinstance(optimizer, dict):
            try:
                self._optimizer_obj.load_state_dict(optimizer)
            except (ValueError, KeyError, RuntimeError):
                site_logger().warning("saved FedSR optimizer state does not fit; fresh Adam moments")
        return True

    def _save_personal(self, round_index: int) -> None:
        """Save this round's personal parts; drop the files a replay can no longer need (before round - 1)."""
        model = self.model()
        personal = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not is_shared_parameter(k, model.method)}
        store = self._personal_store(round_index)
        store.write({"round": round_index, "weights": personal, "optimizer": self._optimizer_obj.state_dict()})
        assert store.path is not None  # _store refuses a missing work folder
        for old in store.path.parent.glob(f"{self._settings.run_id or 'no-run'}-personal-r*.pt"):
            number = old.stem.rsplit("-r", 1)[-1]
            if number.isdigit() and int(number) < round_index - 1:
                old.unlink(missing_ok=True)

    # -- one round ------------------------------------------------------------------------------

    @site_boundary("training")
    def training_routine(self, history_monitor: Any = None, node_args: dict[str, Any] | None = None) -> int:
        """One round at the site: personal parts, atlas, JRS updates, SA smoothing, scoring, report.

        Args:
            history_monitor: Fed-BioMed's metric channel to the coordinator (None: no report).
            node_args: the node's arguments (device), passed on to Fed-BioMed.

        Returns:
            The number of samples trained on.

        Raises:
            SiteError: any failure (the text stays in the site's log).
        """
        s = self._settings
        r = self._round_index()
        self.reseed_for_round(r)
        model = self.model()
        restored = self._restore_personal()
        device = self._training_device()
        model.to(device)
        atlas_image, atlas_label = self._atlas(device)
        finetune = s.finetuning(r)
        self._updater = FedSRUpdater(model, atlas_image, atlas_label, _loss_weights(s), alpha=s.alpha, finetune=finetune)
        sa_initialised = self._updater.initialise_sa()
        model.train()
        t0 = time.perf_counter()
        samples: int = super().training_routine(history_monitor=history_monitor, node_args=node_args)
        train_s = time.perf_counter() - t0
        scores: dict[str, float] = {}
        if s.evaluates(r):
            # with the f the decoders trained with, before eq. 7 moves it: what the site deploys
            scores = self._score(atlas_image, atlas_label)
            self._store("model").write(
                personal_model_record(model, run_id=s.run_id or "no-run", round_index=r, method=s.method, size=s.size,
                                      integrate_velocity=s.integrate_velocity, volume_size=s.volume_size, spacing=s.spacing,
                                      schema_definition=self._schema_raw, atlas=s.atlas)
            )  # fmt: skip
        round_means = self._updater.finish_round()
        model.cpu()
        self._save_personal(r)
        metric = {
            **round_means,
            **scores,
            "round_index": float(r),
            "finetune": float(finetune),
            "personal_restored": float(restored),
            "sa_initialised": float(sa_initialised),
            "train_s": train_s,
            "volumes_training": float(len(self._dataset.training)),
            "cases_evaluation": float(len(self._dataset.evaluation)),
        }
        report_training(history_monitor, metric, samples, int(metric.get("steps", 0)))
        return samples

    def _score(self, atlas_image: torch.Tensor, atlas_label: torch.Tensor) -> dict[str, float]:
        """The personalised model on the site's labelled cases: means over cases, and their count."""
        if not self._dataset.evaluation:
            return {}
        # Fed-BioMed moves the model back to the CPU after training: score on the site's device
        with on_device(self.model(), atlas_image.device):
            return self._score_on_device(atlas_image, atlas_label)

    def _score_on_device(self, atlas_image: torch.Tensor, atlas_label: torch.Tensor) -> dict[str, float]:
        cases = self._dataset.evaluation
        model = self.model()
        device = atlas_image.device
        classes = {name: idx for name, idx in self._schema.classes.items() if idx != 0}
        segmentation, registration = [], []
        for image, label, spacing in cases:
            batch = image.unsqueeze(0).to(device)
            predicted = segment_volume(model, batch)[0, 0].cpu()
            reference = label[0].long()
            segmentation.append(segmentation_case_metrics(predicted, reference, classes, spacing))
            reg = register_atlas(model, batch, atlas_image, atlas_label)
            registration.append(registration_case_metrics(reg.warped_label[0, 0].cpu(), reference, reg.warped_image[0, 0].cpu(), image[0], classes))
        model.train()
        seg, reg_summary = summarise(segmentation), summarise(registration)
        out: dict[str, float] = {"eval_cases": float(len(cases)), "eval_trained_on_images": float(self._dataset.trains_on_evaluation_images)}
        for metric in ("dice", "jaccard", "hd95_mm", "asd_mm", "avd_percent"):
            out[f"eval_seg_{metric}"] = float(seg["mean_over_structures"][metric]["mean"])
        nan = float("nan")
        for name in classes:
            per, rper = seg["structures"].get(name), reg_summary["structures"].get(name)
            out[f"eval_seg_dice.{name}"] = float(per["dice"]["mean"]) if per and "dice" in per else nan
            out[f"eval_seg_hd95_mm.{name}"] = float(per["hd95_mm"]["mean"]) if per and "hd95_mm" in per else nan
            out[f"eval_reg_dice.{name}"] = float(rper["dice"]["mean"]) if rper and "dice" in rper else nan
        for metric in ("dice_mean", "ncc", "local_ncc"):
            out[f"eval_reg_{metric}"] = float(reg_summary["case"][metric]["mean"])
        return out

    def training_step(self, data: torch.Tensor, target: Any) -> torch.Tensor:
        """The loss of one joint registration-segmentation update (`FedSRUpdater.loss`).

        Args:
            data: a batch of unlabelled volumes (B, 1, X, Y, Z).
            target: not used (FedSR reads no label to train).

        Returns:
            The loss Fed-BioMed back-propagates.
        """
        return self._updater.loss(data)

    @site_boundary("testing")
    def testing_routine(self, metric: Any, metric_args: dict[str, Any], history_monitor: Any, before_train: bool) -> None:
        """Nothing: the site scores its personalised model itself (`training_routine`).

        Args:
            metric: not used.
            metric_args: not used.
            history_monitor: not used.
            before_train: not used.
        """
        return
