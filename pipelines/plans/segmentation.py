"""Fed-BioMed training plans for multi-organ segmentation on partially labelled sites; part of the site image.

`PartialLabelSegmentationPlan` holds the Fed-BioMed plumbing (the science: `pipelines.training`); the
registered plans are thin subclasses (`pipelines.plans.condistfl`, `pipelines.plans.marginal`), the only
source shipped and hashed for approval. A site's round step by step: docs/design/segmentation-training.md.
"""

from __future__ import annotations

import os
import time

import torch
from fedbiomed.common.datamanager import DataManager
from fedbiomed.common.training_plans import TorchTrainingPlan

from pipelines.augment import PatchSampler, patch_batch
from pipelines.losses import lambda_schedule
from pipelines.networks import build_network
from pipelines.plans.datasets import PreparedSegmentationDataset
from pipelines.plans.seeding import PerRoundSeed
from pipelines.site_errors import site_boundary
from pipelines.training import (
    OptimizerStateStore,
    PartialLabelObjective,
    class_means,
    cosine_lr,
    evaluate_case,
    frozen_teacher,
    parameter_checksum,
    parse_plan_args,
    teacher_logits,
)
from preprocessing.schema import parse_schema


def settings_from_model_args(model_args: dict):
    raw = model_args.get("schema_definition")
    if not isinstance(raw, dict):
        raise ValueError("model_args.schema_definition is missing: the coordinator embeds the federation schema")
    schema = parse_schema(raw, "the experiment's label schema")
    return parse_plan_args({k: v for k, v in model_args.items() if k != "schema_definition"}, schema)


class PartialLabelSegmentationPlan(PerRoundSeed, TorchTrainingPlan):
    """Marginal loss on the classes the site labels; with `distill = True`, ConDistFL."""

    distill = False

    def init_dependencies(self):
        return [
            "from pipelines.plans.segmentation import PartialLabelSegmentationPlan",
        ]

    # -- model, optimizer, data ----------------------------------------------------------

    def init_model(self, model_args):
        self._settings = settings_from_model_args(model_args)
        net = dict(self._settings.network)
        return build_network(out_channels=self._settings.num_classes, **net)

    def init_optimizer(self, optimizer_args):
        self._base_lr = float(optimizer_args.get("lr", 1e-3))
        self._adamw = torch.optim.AdamW(self.model().parameters(), lr=self._base_lr, weight_decay=float(optimizer_args.get("weight_decay", 1e-5)))
        s = self._settings
        self._opt_store = OptimizerStateStore(os.environ.get("FEDIMG_CACHE_DIR") if s.keep_optimizer_state else None, s.run_id, type(self).__name__)
        self._opt_restored = False
        return self._adamw

    @site_boundary("data")
    def training_data(self):
        dataset = PreparedSegmentationDataset()
        dataset.schema = self._settings.schema
        dataset.spacing = self._settings.spacing
        self._dataset = dataset
        return DataManager(dataset=dataset, shuffle=True)

    # -- training ------------------------------------------------------------------------

    @site_boundary("training")
    def training_routine(self, history_monitor=None, node_args=None):
        s = self._settings
        self.reseed_for_round(self._round_index())
        self._objective = PartialLabelObjective(s.schema, self._dataset.labeled_classes, s.temperature, s.spatial_dims)
        self._sampler = PatchSampler(s.roi_size, s.patches_per_volume, s.spatial_dims, augment=s.augment, ignore_label=s.schema.ignore_label, gin=s.gin)
        self._lambda = lambda_schedule(self._round_index(), s.rounds_total or 1, *s.lambda_range)
        self._step_in_round = 0
        self._sums = {"loss": 0.0, "sup_loss": 0.0, "condist_loss": 0.0, "step_s": 0.0, "teacher_s": 0.0}
        # The model as the node set it from the researcher's message; Fed-BioMed takes its own
        # snapshot (initial_parameters()) only once training starts, and both are compared below.
        received = {k: v.detach().clone() for k, v in self.model().named_parameters()}
        self._teacher = frozen_teacher(self.model()) if self.distill else None
        self.model().train()
        # moments from this site's previous round of the same run (lr is set per step below)
        self._opt_restored = self._round_index() > 0 and self._opt_store.load_into(self._adamw)
        samples = super().training_routine(history_monitor=history_monitor, node_args=node_args)
        self._opt_store.save(self._adamw)
        self._report_round(history_monitor, received, samples)
        self._teacher = None
        return samples

    def training_step(self, data, target):
        t0 = time.perf_counter()
        s = self._settings
        if s.lr_schedule == "cosine" and s.local_steps and s.rounds_total:
            step = self._round_index() * s.local_steps + self._step_in_round
            for group in self._adamw.param_groups:
                group["lr"] = cosine_lr(self._base_lr, step, s.rounds_total * s.local_steps)
        images, labels = patch_batch(self._sampler, data, target)  # loader batch: whole volumes, patches drawn here
        outputs = self.model()(images)
        teacher = None
        if self._teacher is not None:
            t1 = time.perf_counter()
            teacher = teacher_logits(self._teacher, images, s.spatial_dims)
            self._sums["teacher_s"] += time.perf_counter() - t1
        loss, parts = self._objective(outputs, labels, teacher, self._lambda)
        self._step_in_round += 1
        self._sums["loss"] += float(loss.detach())
        for k, v in parts.items():
            self._sums[k] += v
        self._sums["step_s"] += time.perf_counter() - t0
        return loss

    def _report_round(self, history_monitor, received, samples) -> None:
        n = max(self._step_in_round, 1)
        metric = {
            "loss_mean": self._sums["loss"] / n,
            "sup_loss": self._sums["sup_loss"] / n,
            "lambda": self._lambda,
            "round_index": float(self._round_index()),
            "steps": float(self._step_in_round),
            "step_s": self._sums["step_s"] / n,
            "lr_last": float(self._adamw.param_groups[0]["lr"]),
            "optimizer_state_restored": float(self._opt_restored),
            "gin_prob": float(self._settings.gin["prob"]) if self._settings.gin else 0.0,  # GIN on (its probability) or off
        }
        if self.distill:
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
        if history_monitor is not None:
            history_monitor.add_scalar(
                metric=metric, iteration=self._step_in_round, epoch=None, total_samples=samples,
                batch_samples=samples, num_batches=self._step_in_round, num_samples_trained=samples, train=True,
            )  # fmt: skip

    # -- validation ----------------------------------------------------------------------

    @site_boundary("testing")
    def testing_routine(self, metric, metric_args, history_monitor, before_train):
        """Whole-volume validation of the current model on the site's validation cases."""
        if self.testing_data_loader is None:
            return
        s = self._settings
        classes = self._dataset.labeled_classes
        names = {v: k for k, v in s.schema.classes.items()}
        per_case = []
        for data, target in self.testing_data_loader:
            for volume, label in zip(data, target):
                per_case.append(evaluate_case(self.model(), volume, label, s, classes))
        means = class_means(per_case, classes)
        result = {f"dice_{names[c]}": v for c, v in means.items()}
        if means:
            result["dice_mean"] = sum(means.values()) / len(means)
        result["cases"] = float(len(per_case))
        for j, case in enumerate(per_case):  # case order only: no identifiers leave the site
            result.update({f"case{j}_dice_{names[c]}": v for c, v in case.items() if v == v})
        if history_monitor is not None:
            history_monitor.add_scalar(
                metric=result, iteration=1, epoch=None, test=True, test_on_local_updates=not before_train,
                test_on_global_updates=before_train, total_samples=len(per_case), batch_samples=len(per_case),
                num_batches=max(1, len(per_case)),
            )  # fmt: skip
