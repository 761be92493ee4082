"""Fed-BioMed training plans for multi-organ segmentation on partially labelled sites; part of the site image.

`PartialLabelSegmentationPlan` holds the Fed-BioMed plumbing (the science: `pipelines.training`); the
registered plans are thin subclasses (`pipelines.plans.condistfl`, `pipelines.plans.marginal`), the only
source shipped and hashed for approval. The site's cases are split into training, validation and test
(`pipelines.plans.split_data`): training batches come from the training cases only, and every scoring of a
model covers validation (selection) and test (reporting); a site that holds test-only reference labels of
classes it does not train on is also scored on those, on its test cases (forgetting). A site's round step by step:
docs/design/segmentation-training.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from fedbiomed.common.training_plans import TorchTrainingPlan

from pipelines.augment import patch_batch, sampler_for
from pipelines.device import LossScale, Precision, autocast, on_device, precision_for
from pipelines.evaluation import dice_per_class
from pipelines.losses import lambda_schedule
from pipelines.metrics import case_metrics, summarise_metrics
from pipelines.networks import set_background_prior
from pipelines.plan_args import SegmentationSettings, parse_plan_args
from pipelines.plans.datasets import PreparedSegmentationDataset
from pipelines.plans.placement import DevicePlacement
from pipelines.plans.reporting import embedded_schema, report_training
from pipelines.plans.seeding import PerRoundSeed
from pipelines.plans.split_data import CaseSplitDataManager
from pipelines.plans.transfer import WireTransfer
from pipelines.presence import presence_logits, presence_loss, presence_report
from pipelines.privacy import (
    TRAINING_LOSSES,
    WithoutTrainingLoss,
    case_noise_multiplier,
    disable_inplace,
    is_empty_batch,
    network_dp_problem,
    probe_patch,
    volume_list_collate,
)
from pipelines.site_errors import site_boundary
from pipelines.training import (
    OptimizerStateStore,
    PartialLabelObjective,
    build_model,
    class_means,
    cosine_lr,
    frozen_teacher,
    parameter_checksum,
    predict_with_presence,
    teacher_logits,
)
from pipelines.wire import transfer_precision, transfer_states

__all__ = ["PartialLabelSegmentationPlan", "settings_from_model_args"]

log = logging.getLogger(__name__)

_LOSS_SCALES: dict[tuple[str, str], LossScale] = {}  # fp16: (run id, plan) -> the site's loss scale, kept between rounds


def settings_from_model_args(model_args: Mapping[str, Any]) -> SegmentationSettings:
    """The plan's settings from Fed-BioMed's ``model_args`` (the spec's plan arguments and the embedded schema).

    Args:
        model_args: ``plan_args`` as the coordinator sent them, with ``schema_definition``.

    Returns:
        The validated settings.

    Raises:
        ValueError: no embedded schema; `InvalidPlanArgs` (a ValueError) for bad arguments.
    """
    schema, _ = embedded_schema(model_args)
    return parse_plan_args({k: v for k, v in model_args.items() if k != "schema_definition"}, schema)


class PartialLabelSegmentationPlan(WireTransfer, DevicePlacement, PerRoundSeed, TorchTrainingPlan):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """Marginal loss on the classes the site labels; with `distill = True`, ConDistFL.

    Fed-BioMed calls the methods below on the node (and ``init_model`` on the coordinator too).
    """

    distill = False
    _settings: SegmentationSettings

    def init_dependencies(self) -> list[str]:
        """The imports Fed-BioMed prepends to the shipped source of a registered subclass.

        Returns:
            Import statements: this base class comes from the site image, not from the source.
        """
        return [
            "from pipelines.plans.segmentation import PartialLabelSegmentationPlan",
        ]

    # -- model, optimizer, data ----------------------------------------------------------

    def init_model(self, model_args: dict[str, Any]) -> torch.nn.Module:
        """Validate the plan arguments and build the network.

        Args:
            model_args: the spec's plan arguments with the embedded schema.

        Returns:
            The MONAI network (``out_channels`` from the schema), its output biases set to
            ``plan_args.background_prior`` when given.
        """
        self._settings = settings_from_model_args(model_args)
        net = dict(self._settings.network)
        model = build_model(self._settings)  # the network, and the presence head when plan_args asks for one
        if self._settings.background_prior is not None:  # the initial global model is built here, at the coordinator
            set_background_prior(model, self._settings.num_classes, self._settings.background_prior)
        if self._dp() is not None:  # Opacus: no in-place activations, no layer that mixes a batch's samples
            if self._settings.presence_classes:  # its hooks keep features between modules: not per-sample clipping Opacus can check
                raise ValueError("differential privacy: plan_args.presence_head is not supported with privacy; remove one of them")
            disable_inplace(model)
            problem = network_dp_problem(model, str(net.get("name")), int(net.get("in_channels", 1)), self._settings.spatial_dims, probe_patch(net))
            if problem:
                raise ValueError(f"differential privacy: {problem}")
        return model

    def _dp(self) -> dict[str, Any] | None:
        """Fed-BioMed's DP arguments of this experiment (``type``, ``clip``, ``sigma``; central: ``sigma_CDP``), None without DP."""
        controller = getattr(self, "_dp_controller", None)  # set by Fed-BioMed's post_init before the model is built
        return dict(controller._dp_args) if controller is not None and controller._is_active else None

    def init_optimizer(self, optimizer_args: dict[str, Any]) -> Any:
        """AdamW and the store of its moments between this site's rounds (``keep_optimizer_state``);
        under ``aggregator: scaffold``, declearn's SCAFFOLD client before Adam (`pipelines.plans.optimizers`),
        whose state Fed-BioMed keeps between rounds itself.

        Args:
            optimizer_args: ``lr`` and ``weight_decay``.

        Returns:
            The optimizer Fed-BioMed steps: a torch AdamW, or a Fed-BioMed (declearn) optimizer.
        """
        s = self._settings
        self._base_lr = float(optimizer_args.get("lr", 1e-3))
        weight_decay = float(optimizer_args.get("weight_decay", 1e-5))
        self._opt_store = OptimizerStateStore(os.environ.get("FEDIMG_CACHE_DIR") if s.keep_optimizer_state else None, s.run_id, type(self).__name__)
        self._opt_restored = False
        self._adamw: torch.optim.AdamW | None = None
        if s.aggregator == "scaffold":
            from pipelines.plans.optimizers import scaffold_adam  # imports declearn: only runs that use it

            total = s.rounds_total * s.local_steps if s.lr_schedule == "cosine" and s.rounds_total and s.local_steps else 0
            states_in_wire_form = transfer_states(self.model_args())  # False in a run an earlier coordinator started
            return scaffold_adam(self._base_lr, weight_decay, total, transfer_precision(self.model_args()) if states_in_wire_form else None)
        self._adamw = torch.optim.AdamW(self.model().parameters(), lr=self._base_lr, weight_decay=weight_decay)
        return self._adamw

    @site_boundary("data")
    def training_data(self) -> CaseSplitDataManager:
        """The site's prepared dataset as whole volumes (patches are drawn per step), split by case.

        Returns:
            Fed-BioMed's data manager over a `PreparedSegmentationDataset`, with the training /
            validation / test split of ``plan_args.split`` (`pipelines.plans.split_data`).
        """
        dataset = PreparedSegmentationDataset()
        dataset.schema = self._settings.schema
        dataset.spacing = self._settings.spacing
        self._dataset = dataset
        self._data = CaseSplitDataManager(dataset, self._settings.split, self._settings.run_id, shuffle=True)
        return self._data

    # -- training ------------------------------------------------------------------------

    @site_boundary("training")
    def training_routine(self, history_monitor: Any = None, node_args: dict[str, Any] | None = None) -> int:
        """One round at the site: reseed, set up the objective, sampler and teacher, train, report.

        Args:
            history_monitor: Fed-BioMed's metric channel to the coordinator (None: no report).
            node_args: the node's arguments (device), passed on to Fed-BioMed.

        Returns:
            The number of samples trained on.
        """
        s = self._settings
        self.reseed_for_round(self._round_index())
        self._objective = PartialLabelObjective(s.schema, self._dataset.labeled_classes, s.temperature, s.spatial_dims)
        self._sampler = sampler_for(s)
        self._lambda = lambda_schedule(self._round_index(), s.rounds_total or 1, *s.lambda_range)
        self._step_in_round = 0
        self._empty_steps = 0
        self._sums = {"loss": 0.0, "sup_loss": 0.0, "condist_loss": 0.0, "presence_loss": 0.0, "step_s": 0.0, "teacher_s": 0.0}
        # The model as the node set it from the researcher's message; Fed-BioMed takes its own
        # snapshot (initial_parameters()) only once training starts, and both are compared below.
        received = {k: v.detach().clone() for k, v in self.model().named_parameters()}
        self._teacher = frozen_teacher(self.model()) if self.distill else None
        self._precision: Precision | None = None  # known at the first step, on the step's device
        self._loss_scale: LossScale | None = None
        self._scale_optimizer_steps()
        if self._dp() is not None:  # Poisson sampling draws any number of cases, each of its own shape (Opacus keeps this collate)
            self.training_data_loader.collate_fn = volume_list_collate
        self.model().train()
        # moments from this site's previous round of the same run (lr is set per step below)
        self._opt_restored = self._restore_optimizer_state()
        try:
            # dp: Fed-BioMed's own per-batch "Loss" is computed on training cases outside the private mechanism: not sent
            monitor = history_monitor if self._dp() is None or history_monitor is None else WithoutTrainingLoss(history_monitor)
            samples: int = super().training_routine(history_monitor=monitor, node_args=node_args)
        finally:
            if self._teacher is not None:
                self._teacher.to("cpu")  # Fed-BioMed moved the model back; the report compares them on the CPU
        if self._adamw is not None:
            self._opt_store.save(self._adamw)
        self._report_round(history_monitor, received, samples)
        self._teacher = None
        return samples

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one step: patches of the loader's volumes, student forward, teacher logits.

        Args:
            data: the loader's batch of preprocessed volumes.
            target: their label maps.

        Returns:
            The loss Fed-BioMed back-propagates.
        """
        t0 = time.perf_counter()
        s = self._settings
        if self._adamw is not None and s.lr_schedule == "cosine" and s.local_steps and s.rounds_total:  # declearn: its schedule module
            step = self._round_index() * s.local_steps + self._step_in_round
            for group in self._adamw.param_groups:
                group["lr"] = cosine_lr(self._base_lr, step, s.rounds_total * s.local_steps)
        if self._dp() is not None and is_empty_batch(data):
            return self._empty_private_step()
        images, labels = patch_batch(self._sampler, data, target)  # loader batch: whole volumes, patches drawn here
        device = images.device  # Fed-BioMed moved the batch and the model there (`_set_device`)
        precision = self._step_precision(device)
        if self._teacher is not None and next(self._teacher.parameters()).device != device:
            self._teacher.to(device)  # built from the received model before Fed-BioMed moved the model
        with autocast(device, precision):
            outputs = self.model()(images)
            presence = presence_logits(self.model())  # None without a presence head
            teacher: torch.Tensor | None = None
            if self._teacher is not None:
                t1 = time.perf_counter()
                teacher = teacher_logits(self._teacher, images, s.spatial_dims)
                self._sums["teacher_s"] += time.perf_counter() - t1
            if self._dp() is not None:
                loss, parts = self._per_case_objective(outputs, labels, teacher, len(data))
            else:
                loss, parts = self._objective(outputs, labels, teacher, self._lambda)
            if presence is not None:  # the image-level head: whether each patch shows each headed class the site labels
                p_loss = presence_loss(presence, labels, s.presence_classes, self._dataset.labeled_classes)
                loss = loss + s.presence_weight * p_loss
                parts = {**parts, "presence_loss": float(p_loss.detach())}
        loss = loss.float()
        self._step_in_round += 1
        self._sums["loss"] += float(loss.detach())
        for k, v in parts.items():
            self._sums[k] += v
        self._sums["step_s"] += time.perf_counter() - t0
        if self._loss_scale is not None:  # fp16: gradients are unscaled before the optimizer steps (`_scale_optimizer_steps`)
            return self._loss_scale.scale_backward(loss)
        return loss

    # -- differential privacy (Fed-BioMed's DPController: Opacus) ------------------------

    def _per_case_objective(self, outputs: Any, labels: torch.Tensor, teacher: torch.Tensor | None, cases: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective of each case's patches on their own, averaged: no case's loss depends on another's (batch Dice would mix them).

        Args:
            outputs: the student's outputs of the step's patches (deep supervision: a tuple of heads), case by case.
            labels: their labels.
            teacher: the teacher's logits of the patches (None: no teacher).
            cases: how many cases the patches come from (each gave the same number of patches).

        Returns:
            The mean loss and the mean of each part.
        """
        per = labels.shape[0] // max(1, cases)
        losses: list[torch.Tensor] = []
        sums: dict[str, float] = {}
        for j in range(max(1, cases)):
            rows = slice(j * per, (j + 1) * per)
            out = tuple(o[rows] for o in outputs) if isinstance(outputs, (tuple, list)) else outputs[rows]
            loss, parts = self._objective(out, labels[rows], teacher[rows] if teacher is not None else None, self._lambda)
            losses.append(loss.float())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / max(1, cases)
        return torch.stack(losses).mean(), sums

    def _empty_private_step(self) -> torch.Tensor:
        """A step whose Poisson batch drew no case: Opacus's optimizer then adds noise alone (the sampling is what the accountant assumes).

        The networks cannot run on zero samples; the per-sample gradients of an empty batch are set
        here (zero rows), and the returned loss gives every parameter a zero gradient.

        Returns:
            A zero loss connected to the parameters.
        """
        params = [p for p in self.model().parameters() if p.requires_grad]
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        self._step_in_round += 1
        self._empty_steps += 1
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def _dp_report(self) -> dict[str, float]:
        """The round's DP scalars: type, clip, the steps Opacus took, its sample rate and (local) the noise multiplier per case.

        The coordinator composes ``dp_noise_multiplier``, ``dp_sample_rate`` and ``dp_steps`` over the site's
        rounds into epsilon (`pipelines.privacy.epsilon_spent`); these are Opacus's own accounting of the round
        (its accountant's history), the noise multiplier divided by ``patches_per_volume`` (the unit is a case).
        """
        dp = self._dp() or {}
        engine = getattr(self._dp_controller, "_privacy_engine", None)
        history = list(getattr(getattr(engine, "accountant", None), "history", None) or [])
        out = {
            "dp_local": float(dp.get("type") == "local"),
            "dp_clip": float(dp.get("clip", 0.0)),
            "dp_steps": float(sum(int(n) for _, _, n in history)),
            "dp_empty_batches": float(self._empty_steps),
        }
        if history:
            out["dp_sample_rate"] = float(history[-1][1])
        if dp.get("type") == "local" and history:
            out["dp_noise_multiplier"] = case_noise_multiplier(float(history[-1][0]), self._settings.patches_per_volume)
        return out

    # -- device and precision ------------------------------------------------------------

    def _torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW, whose restored moments must follow the model to the device (SCAFFOLD's declearn optimizer moves itself)."""
        return [self._adamw] if self._adamw is not None else []

    def _step_precision(self, device: torch.device) -> Precision:
        """The round's precision on the step's device, fixed at its first step; fp16 brings a loss scale."""
        if self._precision is None:
            precision = precision_for(device, self._settings.precision)
            if self._dp() is not None:  # Opacus clips per-sample gradients in fp32 (the spec refuses bf16 and fp16 with dp)
                precision = Precision(None)
            if precision.loss_scale and self._fedprox_mu is not None:  # only under auto: the spec refuses fp16 with fedprox_mu
                log.warning("precision auto means fp16 on %s, which cannot scale FedProx's term: training in fp32", device)
                precision = Precision(None)
            self._precision = precision
            if precision.loss_scale:
                # the node process lives across rounds: the scale goes on from where this site's last round left it
                key = (self._settings.run_id or "no-run", type(self).__name__)
                self._loss_scale = _LOSS_SCALES.setdefault(key, LossScale())
            else:
                self._loss_scale = None
            log.info("training precision %s on %s", precision.name, device)
        return self._precision

    def _scale_optimizer_steps(self) -> None:
        """Under fp16, unscale the gradients before the optimizer steps and skip steps whose gradients overflowed.

        Fed-BioMed back-propagates the plan's (scaled) loss and then calls ``self._optimizer.step()`` (a
        torch or a declearn optimizer behind Fed-BioMed's wrapper); the wrapper's step is wrapped once per
        plan instance, and does nothing more than the original while there is no loss scale.
        """
        optimizer = self._optimizer
        if getattr(optimizer, "_fedimg_scaled", False):
            return
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if self._loss_scale is not None and not self._loss_scale.unscale(self.model().parameters()):
                log.debug("fp16 step skipped: gradients overflowed (loss scale now %g)", self._loss_scale.scale)
                return None
            return original(*args, **kwargs)

        optimizer.step = step
        optimizer._fedimg_scaled = True

    def _restore_optimizer_state(self) -> bool:
        """AdamW: load the moments of this site's previous round (``keep_optimizer_state``). SCAFFOLD: Fed-BioMed
        restored the declearn optimizer's state (Adam's moments, ``c_i`` and ``c``, the schedule's step) before the
        round, when the coordinator held one for this site; say so when it did not.

        A SCAFFOLD site without a previous state after round 1 joins as a new SCAFFOLD client (``c_i = 0``, a new
        client id in declearn's server module). That is right when none of its earlier updates reached the
        coordinator (its first rounds timed out or failed: the coordinator counted no state of it, and Fed-BioMed
        sends it no state id). When an earlier update was aggregated, the state was lost at the site, and the
        coordinator's ``c`` averages over one client too many from then on: the coordinator, which knows which
        updates it aggregated, warns and records it (`coordinator.engine.scaffold_state_lost`) from the
        ``optimizer_state_restored`` this round reports.

        Returns:
            Whether a previous round's state is in the optimizer.
        """
        if self._adamw is not None:
            return self._round_index() > 0 and self._opt_store.load_into(self._adamw)
        from pipelines.plans.optimizers import scaffold_state_kept

        # Adam's moments and SCAFFOLD's c_i, both: Fed-BioMed could keep one and drop the other (a renamed module)
        restored = self._optimizer_report().get("adam_steps", 0.0) > 0 and scaffold_state_kept(self.optimizer())
        if self._round_index() > 0 and not restored:
            log.warning(
                "round %d: no SCAFFOLD optimizer state from an earlier round of this site: it joins as a new SCAFFOLD client "
                "(expected when its earlier updates never reached the coordinator)",
                self._round_index() + 1,
            )
        return restored

    def _optimizer_report(self) -> dict[str, float]:
        """SCAFFOLD's correction norm and the optimizer's step counts (empty for AdamW)."""
        if self._adamw is not None:
            return {}
        from pipelines.plans.optimizers import scaffold_state

        return scaffold_state(self.optimizer())

    def _last_lr(self) -> float:
        """The learning rate of the round's last step."""
        if self._adamw is not None:
            return float(self._adamw.param_groups[0]["lr"])
        s = self._settings
        if s.lr_schedule == "cosine" and s.local_steps and s.rounds_total:
            return cosine_lr(self._base_lr, self._round_index() * s.local_steps + max(self._step_in_round - 1, 0), s.rounds_total * s.local_steps)
        return self._base_lr

    def _report_round(self, history_monitor: Any, received: dict[str, torch.Tensor], samples: int) -> None:
        drawn = self._step_in_round - self._empty_steps  # dp: a step whose Poisson batch drew no case has no loss
        n = max(drawn, 1)
        metric = {
            "loss_mean": self._sums["loss"] / n if drawn else float("nan"),
            "sup_loss": self._sums["sup_loss"] / n if drawn else float("nan"),
            **({"presence_loss": self._sums["presence_loss"] / n} if self._settings.presence_classes else {}),
            "lambda": self._lambda,
            "round_index": float(self._round_index()),
            "steps": float(self._step_in_round),
            "step_s": self._sums["step_s"] / n,
            "lr_last": self._last_lr(),
            "optimizer_state_restored": float(self._opt_restored),
            "gin_prob": float(self._settings.gin["prob"]) if self._settings.gin else 0.0,  # GIN on (its probability) or off
        }
        metric.update(self._optimizer_report())  # SCAFFOLD: the correction this round applied
        if self._dp() is not None:
            metric.update(self._dp_report())
        data = getattr(self, "_data", None)
        indices = data.indices if data is not None else None
        if indices is not None:  # the site's split sizes (counts only: no case ids leave the site)
            metric.update({f"cases_{name}": float(n) for name, n in indices.counts().items()})
        if self._teacher is not None:  # distill: the round's frozen teacher
            teacher = dict(self._teacher.named_parameters())
            fbm_initial = self.initial_parameters()
            names = [k for k in received if k in teacher]
            diff = max(float((teacher[k] - received[k]).abs().max()) for k in names) if names else float("nan")
            diff_fbm = max(float((teacher[k] - fbm_initial[k]).abs().max()) for k in names if k in fbm_initial) if fbm_initial else float("nan")
            t_sum, t_sq = parameter_checksum({k: teacher[k] for k in names})
            metric.update(
                {
                    "condist_loss": self._sums["condist_loss"] / n,
                    "teacher_s": self._sums["teacher_s"] / n,
                    "teacher_max_abs_diff": diff,  # teacher vs received parameters, at the end of the round
                    "teacher_vs_fedbiomed_initial": diff_fbm,  # vs Fed-BioMed's own snapshot of the round's start
                    "teacher_sum": t_sum,
                    "teacher_sumsq": t_sq,
                    "teacher_params": float(len(names)),
                }
            )
        if self._dp() is not None:  # losses are computed on training cases outside the private mechanism: they stay at the site
            for key in TRAINING_LOSSES:
                metric.pop(key, None)
        report_training(history_monitor, metric, samples, self._step_in_round)

    # -- validation ----------------------------------------------------------------------

    @site_boundary("testing")
    def testing_routine(self, metric: Any, metric_args: dict[str, Any], history_monitor: Any, before_train: bool) -> None:
        """Whole-volume scoring of the current model on the site's validation and test cases.

        Validation (Fed-BioMed's testing loader) gives ``dice_<class>``, ``dice_mean``, ``cases``
        and ``case<j>_dice_<class>``; the test cases (the data manager's test loader) the same keys
        prefixed ``test_``, absent when the site has no test case; where the dataset holds test-only
        reference labels of classes the site does not train on, the test cases also give the same keys
        on those classes prefixed ``test_ref_`` (`_test_report`; validation never does); ``eval_s`` the
        seconds this scoring took (all of it). One message per evaluation;
        per-case values in case order only (no identifiers leave the site).

        Args:
            metric: Fed-BioMed's metric choice (not used: Dice per class is reported).
            metric_args: not used.
            history_monitor: Fed-BioMed's metric channel (None: no report).
            before_train: whether this runs on the received global model (else on the local update).
        """
        if self.testing_data_loader is None:
            return
        t0 = time.perf_counter()
        with on_device(self.model(), self._training_device()):  # Fed-BioMed scores on the CPU; the windows run on the site's device
            result, n_validation = self._dice_report(self.testing_data_loader, "")
            data = getattr(self, "_data", None)
            if data is not None and data.test_loader() is not None:
                # the final global model (Fed-BioMed's validation-only request after the last round, numbered rounds_total)
                # also gets the boundary and volume metrics on the test cases: once per run, not every round
                total = self._settings.rounds_total
                final = before_train and total is not None and int(self.round() or 0) >= total
                result.update(self._test_report(data, clinical=final))
        result["eval_s"] = time.perf_counter() - t0  # scoring cost (validation + test + reference): what a round spends besides training
        result["round_index"] = float(int(self.round() or 0))  # the request's round: the coordinator drops a late message of an earlier one
        if history_monitor is not None:
            history_monitor.add_scalar(
                metric=result, iteration=1, epoch=None, test=True, test_on_local_updates=not before_train,
                test_on_global_updates=before_train, total_samples=n_validation, batch_samples=n_validation,
                num_batches=max(1, n_validation),
            )  # fmt: skip

    def _dice_report(self, loader: Any, prefix: str) -> tuple[dict[str, float], int]:
        """Dice per class (mean over cases), their mean, the case count and per-case values, keys prefixed; with a presence
        head, its scores on the headed classes the site labels (`pipelines.presence.presence_report`)."""
        s = self._settings
        classes = self._dataset.labeled_classes
        headed = [c for c in s.presence_classes if c in classes]
        per_case: list[dict[int, float]] = []
        presence: list[tuple[dict[int, float], torch.Tensor]] = []
        for data, target in loader:
            for volume, label in zip(data, target):
                pred, probabilities = predict_with_presence(self.model(), volume, s)
                per_case.append(_case_dice(pred, label, classes, s))  # what evaluate_case computes
                if headed:
                    presence.append((probabilities, label))
        result = self._summary(per_case, classes, prefix)
        result.update(self._presence_keys(presence, headed, prefix))
        return result, len(per_case)

    def _presence_keys(self, presence: list[tuple[dict[int, float], torch.Tensor]], headed: list[int], prefix: str) -> dict[str, float]:
        """`pipelines.presence.presence_report` of the scored cases, keys prefixed (none without headed classes)."""
        if not presence:
            return {}
        s = self._settings
        names = {v: k for k, v in s.schema.classes.items()}
        return {f"{prefix}{k}": v for k, v in presence_report(presence, headed, names, s.presence_threshold).items()}

    def _test_report(self, data: CaseSplitDataManager, clinical: bool = False) -> dict[str, float]:
        """The test cases' keys: Dice on the classes the site labels (``test_``) and on its reference classes (``test_ref_``).

        Reference labels (`PreparedSegmentationDataset.reference_classes` / ``reference_label(index)``) hold
        classes the site does not train on, for testing only: Dice on them, on the site's own test cases,
        measures how much of those classes a model keeps (forgetting). ``test_ref_cases`` counts the test
        cases that have one; without reference classes, or no test case with a reference label, there are
        no ``test_ref_`` keys. Each case is predicted once for both.

        With `clinical` (the final global model), also per class the mean over the test cases of HD95, ASSD, NSD
        and RVD (`pipelines.metrics`, on the scoring grid's spacing; NaN-excluded) and how many cases each mean
        has: ``test_<metric>_<class>`` and ``test_<metric>_n_<class>``. Per class and metric only, no per-case
        values or volumes.

        Args:
            data: the site's data manager, split.
            clinical: also the boundary and volume metrics.

        Returns:
            ``test_dice_<class>``, ``test_dice_mean``, ``test_cases``, ``test_case<j>_dice_<class>`` and the
            same with ``test_ref_`` on the reference classes.
        """
        s = self._settings
        classes = self._dataset.labeled_classes
        held = [int(c) for c in getattr(self._dataset, "reference_classes", None) or []]  # a dataset without the accessor: none
        # schema classes only, never one the site trains on (those are scored above, on the training labels)
        ref_classes = [c for c in held if c in s.schema.classes.values() and c != 0 and c not in classes]
        reference_label = getattr(self._dataset, "reference_label", None) if ref_classes else None
        per_case: list[dict[int, float]] = []
        per_ref: list[dict[int, float]] = []
        ref_positions: list[int] = []  # each reference score's test case position: test_ref_case<j> is test_case<j>'s volume
        per_metrics: list[dict[int, dict[str, float]]] = []
        headed = [c for c in s.presence_classes if c in classes]
        presence: list[tuple[dict[int, float], torch.Tensor]] = []
        for position, (index, volume, label) in enumerate(data.test_cases()):
            pred, probabilities = predict_with_presence(self.model(), volume, s)
            if headed:
                presence.append((probabilities, label))
            per_case.append(_case_dice(pred, label, classes, s))  # what evaluate_case computes, on the shared prediction
            if clinical:
                per_metrics.append(_case_clinical(pred, label, self._dataset.voxel_spacing(index), classes, s))
            ref = _reference_of(reference_label, index) if reference_label is not None else None
            if ref is not None:
                per_ref.append(_case_dice(pred, ref, ref_classes, s))
                ref_positions.append(position)
        result = self._summary(per_case, classes, "test_")
        result.update(self._presence_keys(presence, headed, "test_"))
        names = {v: k for k, v in s.schema.classes.items()}
        if per_metrics:
            for c, row in summarise_metrics(per_metrics, classes, CLINICAL_METRICS).items():
                for metric, summary in row.items():
                    if summary["n"]:
                        result[f"test_{metric}_{names[c]}"] = summary["mean"]
                    result[f"test_{metric}_n_{names[c]}"] = float(summary["n"])
        if per_ref:
            result.update(self._summary(per_ref, ref_classes, "test_ref_", ref_positions))
        return result

    def _summary(self, per_case: list[dict[int, float]], classes: list[int], prefix: str, positions: list[int] | None = None) -> dict[str, float]:
        """Per-case Dice as report keys: per class (mean over cases), their mean, the case count, per case (numbered by
        ``positions``, the cases' places in the split, default 0..n-1); prefixed."""
        names = {v: k for k, v in self._settings.schema.classes.items()}
        means = class_means(per_case, classes)
        result = {f"{prefix}dice_{names[c]}": v for c, v in means.items()}
        if means:
            result[f"{prefix}dice_mean"] = sum(means.values()) / len(means)
        result[f"{prefix}cases"] = float(len(per_case))
        for j, case in zip(positions if positions is not None else range(len(per_case)), per_case):  # case order only: no identifiers leave the site
            result.update({f"{prefix}case{j}_dice_{names[c]}": v for c, v in case.items() if v == v})
        return result


def _reference_of(reference_label: Any, index: int) -> torch.Tensor | None:
    """A test case's reference label, None when it has none or it cannot be read.

    A reference label only measures forgetting: one that fails to read is left out of
    ``test_ref_cases`` (and logged at the site) rather than failing the round's scoring.
    """
    try:
        ref = reference_label(index)
    except Exception as exc:  # noqa: BLE001  # any reading failure: the scores on the training labels stand
        log.warning("test case %d: its reference label is left out of the scores: %s", index, exc)
        return None
    return ref if isinstance(ref, torch.Tensor) else None


CLINICAL_METRICS = ("hd95", "assd", "nsd", "rvd")  # what the final model's test rows add to Dice (volumes stay at the site)


def _case_clinical(
    pred: torch.Tensor, label: torch.Tensor, spacing: list[float], classes: list[int], settings: SegmentationSettings
) -> dict[int, dict[str, float]]:
    """`pipelines.metrics.case_metrics` of one predicted test volume, on the scoring grid's spacing."""
    ref = label.reshape(pred.shape) if label.numel() == pred.numel() else label[0]
    names = {v: k for k, v in settings.schema.classes.items()}
    tolerances = {c: settings.schema.surface_tolerance(names[c]) for c in classes}
    return case_metrics(pred, ref, classes, spacing, tolerances, settings.schema.ignore_label, settings.schema.empty_mask_one)


def _case_dice(pred: torch.Tensor, label: torch.Tensor, classes: list[int], settings: SegmentationSettings) -> dict[int, float]:
    """Dice per class of one predicted volume against a label map, (1, X, Y, Z) or (X, Y, Z), as `evaluate_case` scores it."""
    ref = label.reshape(pred.shape) if label.numel() == pred.numel() else label[0]
    return dice_per_class(pred, ref, classes, settings.schema.ignore_label, settings.schema.empty_mask_one)
