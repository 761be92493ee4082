"""Asynchronous local domain adaptation on the data factory (phase 2; no FL code).

Both jobs run on the device they are given (the CPU by default): the networks live there,
the dataset's slices and the synthetic pool stay on the CPU and each batch moves per step.
Random draws (batch sampling, the synthetic pool, latent means, initial weights) come from
CPU generators and are moved afterwards, so a seed gives the same draws on any device; what
a job saves (checkpoints, models, branches) is CPU tensors, so any machine resumes or loads it.

Details: docs/design/adaptation.md, "The adaptation training loops".
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipelines.adaptation.branch import SegmentationBranch
from pipelines.adaptation.classes import PartialLabelLoss, branch_classes, case_branch_sets, label_table, schema_class_ids
from pipelines.adaptation.factory import Factory
from pipelines.adaptation.jobs import JobDir, rng_state, set_rng_state
from pipelines.adaptation.losses import ReconstructionLoss, cycle_consistency, segmentation_loss
from pipelines.adaptation.model import MODEL_FORMAT, SOURCE, TARGET, AdaptedModel, module_device
from pipelines.adaptation.networks import InversionEncoder, invert, latent_avgs, requires_grad
from pipelines.adaptation.settings import AdaptSettings, AdaptSettingsError
from pipelines.adaptation.volumes import LabelledSlices, few_shot_selection
from pipelines.evaluation import dice_per_class
from pipelines.factory.networks import Generator
from pipelines.losses import IGNORE_INDEX

__all__ = [
    "MODEL_FORMAT",
    "SOURCE",
    "TARGET",
    "AdaptSettings",
    "AdaptSettingsError",
    "AdaptedModel",
    "PartialLabelLoss",
    "Progress",
    "branch_classes",
    "case_branch_sets",
    "evaluate_cases",
    "label_table",
    "schema_class_ids",
    "source_batch_indices",
    "split_cases",
    "synthetic_source",
    "target_split",
    "train_source",
    "train_target",
]

log = logging.getLogger(__name__)
Progress = Callable[[int, int, dict[str, Any]], None]
"""``progress(steps done, steps in all, the metric row just logged)``."""
CPU = torch.device("cpu")


def _as_device(device: torch.device | str) -> torch.device:
    """A torch device with its index: ``cuda`` means the current GPU (as `pipelines.device.resolve_device` spells it)."""
    device = torch.device(device)
    index: int | None = device.index  # None for a bare "cuda" (torch's stubs say int)
    if device.type == "cuda" and index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _generator_on(generator: Generator, device: torch.device) -> Generator:
    """The frozen factory generator on ``device``: itself when it is there, else a copy there.

    A copy, not a move: the caller's `Factory` keeps its generator where it was (a job on a
    GPU does not leave a factory loaded for the CPU half on the GPU).
    """
    if module_device(generator) == device:
        return generator
    return copy.deepcopy(generator).to(device)


def _to_cpu(obj: Any) -> Any:
    """Tensors of a (nested) checkpoint entry on the CPU: a checkpoint written on a GPU resumes anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# -- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_cases(predict: Callable[[torch.Tensor], torch.Tensor], data: LabelledSlices, cases: list[int], table: torch.Tensor,
                   n_classes: int, batch: int = 16) -> dict[str, Any]:  # fmt: skip
    """Per-case Dice of each branch class, pooled over all slices of the case (a 3D Dice in the factory's slice space).

    Args:
        predict: slices ``(B, 1, R, R)`` (the dataset's, on the CPU) -> probabilities
            ``(B, n_classes, R, R)`` on any device (an `AdaptedModel` moves the slices to its own).
        data: the dataset's slices.
        cases: the cases to evaluate (indices into ``data``'s cases).
        table: schema id -> branch index (`label_table`).
        n_classes: the branch's classes, background included.
        batch: slices per ``predict`` call.

    Returns:
        ``{"per_case": [{class_index: dice}], "mean": {class_index: mean dice (NaN: never present)}}``.
    """
    per_case: list[dict[int, float]] = []
    for c in cases:
        idx = torch.nonzero(data.case_index == c).flatten()
        if idx.numel() == 0:
            continue
        preds = []
        for i in range(0, idx.numel(), batch):
            chunk = data.images[idx[i : i + batch]]
            if chunk.shape[0] == 1:  # batch statistics need two samples: pad with a copy
                p = predict(torch.cat([chunk, chunk]))[:1]
            else:
                p = predict(chunk)
            preds.append(p.argmax(1).cpu())  # the Dice is counted on the CPU, beside the labels
        pred = torch.cat(preds)
        ref = table[data.labels[idx]]
        per_case.append(dice_per_class(pred, ref, range(1, n_classes), ignore_label=IGNORE_INDEX))
    mean: dict[int, float] = {}
    for k in range(1, n_classes):
        vals = [d[k] for d in per_case if not math.isnan(d[k])]
        mean[k] = float(np.mean(vals)) if vals else float("nan")
    return {"per_case": per_case, "mean": mean}


# -- sampling ---------------------------------------------------------------------------------


def _draw(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return pool[torch.randint(0, pool.numel(), (n,), generator=gen)]


def source_batch_indices(train_idx: torch.Tensor, fg_idx: torch.Tensor, batch: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Draw a source batch, ``round(batch * fraction)`` of it from the slices showing a labelled class.

    Args:
        train_idx: the training slices.
        fg_idx: the training slices showing a labelled class (none: all drawn from ``train_idx``).
        batch: the batch size.
        fraction: the foreground share.
        gen: the sampler's random generator.

    Returns:
        ``(batch,)`` slice indices, foreground draws first.
    """
    n_fg = int(round(batch * fraction)) if fg_idx.numel() else 0
    parts = [_draw(fg_idx, n_fg, gen)] if n_fg else []
    parts.append(_draw(train_idx, batch - n_fg, gen))
    return torch.cat(parts)


def split_cases(n_cases: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split cases into training and validation, seeded.

    Validation gets round(n * fraction) cases, at least one when the fraction is positive and
    there are two or more cases, never all of them.

    Args:
        n_cases: the number of cases.
        val_fraction: the share held out.
        seed: the seed of the permutation.

    Returns:
        ``(train, validation)`` case indices, ascending.
    """
    if n_cases < 2 or val_fraction <= 0:
        return list(range(n_cases)), []
    n_val = min(n_cases - 1, max(1, int(round(n_cases * val_fraction))))
    order = torch.randperm(n_cases, generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:n_val])
    return [i for i in range(n_cases) if i not in val], val


# -- source job -------------------------------------------------------------------------------


def _optimizer(encoder: torch.nn.Module, branches: list[torch.nn.Module], s: AdaptSettings) -> torch.optim.Adam:
    groups = [{"params": [p for p in encoder.parameters() if p.requires_grad], "lr": s.lr_encoder}]
    groups += [{"params": list(b.parameters()), "lr": s.lr_branch} for b in branches]
    return torch.optim.Adam(groups, betas=(0.9, 0.999))


class _TrainingLoop:
    """The bookkeeping both training loops share: resume from and write checkpoints (the
    named modules, the optimizer, the batch sampler, the RNG and any ``extra`` tensors, all as
    CPU tensors), the optimizer step, loss averaging, and a metric row every ``log_every`` steps."""

    def __init__(self, s: AdaptSettings, job: JobDir, progress: Progress | None, modules: dict[str, torch.nn.Module],
                 opt: torch.optim.Optimizer, sampler: torch.Generator) -> None:  # fmt: skip
        self.s, self.job, self.progress = s, job, progress
        self.modules, self.opt, self.sampler = modules, opt, sampler
        self.extra: Callable[[], dict[str, Any]] = dict
        self.t0 = time.perf_counter()
        self.acc: dict[str, list[torch.Tensor]] = {}

    def resume(self) -> tuple[int, dict[str, Any]]:
        """Load the job's checkpoint; returns (step to continue from, the checkpoint)."""
        ck = self.job.load_checkpoint()  # CPU tensors, whatever device wrote them
        for name, module in self.modules.items():
            module.load_state_dict(ck[name])  # copied into the parameters, on their device
        self.opt.load_state_dict(ck["optimizer"])  # torch moves the moments to their parameters' device
        self.sampler.set_state(ck["sampler"])
        set_rng_state(ck["rng"])
        start = int(ck["step"])
        self.job.truncate_metrics(start)
        log.info("resuming %s at step %d/%d", self.job.root.name, start, self.s.steps)
        return start, ck

    def checkpoint(self, step: int) -> None:
        state: dict[str, Any] = {name: _to_cpu(module.state_dict()) for name, module in self.modules.items()}
        state.update(optimizer=_to_cpu(self.opt.state_dict()), sampler=self.sampler.get_state(), rng=rng_state(), **_to_cpu(self.extra()))
        self.job.save_checkpoint(state, step)

    def step(self, step: int, feature_scale: float, losses: dict[str, torch.Tensor]) -> None:
        self.opt.zero_grad(set_to_none=True)
        torch.autograd.backward(losses["loss"])
        self.opt.step()
        for k, v in losses.items():  # kept as tensors: reading a GPU value every step would wait for the GPU every step
            self.acc.setdefault(k, []).append(v.detach())
        done, s = step + 1, self.s
        if done % s.log_every == 0 or done == s.steps:
            means = {k: float(np.mean([float(t) for t in v])) for k, v in self.acc.items()}
            row = {"step": done, "feature_scale": feature_scale, "step_s": (time.perf_counter() - self.t0) / len(self.acc["loss"]), **means}
            self.job.log_metrics(row)
            if self.progress:
                self.progress(done, s.steps, row)
            self.t0, self.acc = time.perf_counter(), {}
        if done % s.checkpoint_every == 0 and done < s.steps:
            self.checkpoint(done)


def train_source(factory: Factory, data: LabelledSlices, settings: AdaptSettings, job: JobDir, site_client: int | None,
                 resume: bool = False, progress: Progress | None = None,
                 device: torch.device | str = CPU) -> tuple[AdaptedModel, dict[str, Any]]:  # fmt: skip
    """Train E_s and S_s on a labelled dataset's slices.

    Args:
        factory: the published factory (frozen).
        data: the labelled dataset's slices.
        settings: the training settings.
        job: the job folder (checkpoints, metrics).
        site_client: the client id the site trained the factory under (None: not a member).
        resume: continue from the job's checkpoint (written on any device).
        progress: called after every logged step.
        device: where the networks train and the validation runs (the factory's own
            generator is not moved: a copy of it runs there).

    Returns:
        ``(model, summary)``: the source model (E_s + S_s), on ``device`` (its `state` and
        `branch_files` are CPU tensors), and what the job did (classes, cases, slices,
        validation Dice).

    Raises:
        ValueError: naming the job, when the dataset labels no class or has no training slice.
    """
    s = settings
    cfg = s.adapt_config()
    schema_ids = schema_class_ids(factory.schema)
    class_ids = data.dataset_labeled_classes
    if not class_ids:
        raise ValueError(f"{job.root}: the dataset labels no class; a source branch needs labels")
    names = branch_classes(factory.schema, class_ids)
    table = label_table(schema_ids, names, data.ignore_label, data.num_classes)
    train_cases, val_cases = split_cases(len(data.case_ids), s.val_fraction, s.seed)
    in_train = torch.isin(data.case_index, torch.tensor(train_cases, dtype=torch.long))
    train_idx = torch.nonzero(in_train).flatten()
    labels = table[data.labels]
    fg = ((labels > 0) & (labels != IGNORE_INDEX)).flatten(1).any(1)
    fg_idx = torch.nonzero(in_train & fg).flatten()
    if train_idx.numel() == 0:
        raise ValueError(f"{job.root}: no training slices")

    device = _as_device(device)
    torch.manual_seed(s.seed)  # the initial weights: drawn on the CPU, then moved, so the same on every device
    g = _generator_on(factory.generator, device)
    src_id = site_client
    encoder = InversionEncoder(factory.config, cfg, latent_avgs(g, [src_id, src_id], n=s.latent_samples, seed=s.seed)).to(device)
    identity = {k: factory.identity.get(k, "") for k in ("name", "version", "sha256")}
    branch = SegmentationBranch.for_factory(factory.config, names, cfg, identity).to(device)
    opt = _optimizer(encoder, [branch], s)
    rec = ReconstructionLoss(s.mse, s.ms_ssim, s.perceptual).to(device)
    seg = PartialLabelLoss(len(names))
    case_sets = case_branch_sets(data, names, schema_ids)
    gen = torch.Generator().manual_seed(s.seed + 1)
    loop = _TrainingLoop(s, job, progress, {"encoder": encoder, "branch": branch}, opt, gen)
    start = loop.resume()[0] if resume else 0
    encoder.train()
    branch.train()
    for step in range(start, s.steps):
        idx = source_batch_indices(train_idx, fg_idx, s.batch, s.foreground_fraction, gen)
        x, y = data.images[idx].to(device), labels[idx].to(device)
        fs = s.feature_scale(step)
        img, feats, _ = invert(g, encoder, x, SOURCE, fs)
        l_rec = rec(img, x)
        l_seg = seg(branch(feats), y, [case_sets[int(c)] for c in data.case_index[idx]])
        loop.step(step, fs, {"loss": l_rec + l_seg, "loss_rec": l_rec, "loss_seg": l_seg})
    loop.checkpoint(s.steps)

    meta = {"factory": identity, "schema_definition": factory.meta.get("schema_definition"), "slices": factory.slices.key(),
            "class_ids": [0] + sorted(class_ids), "domains": {"source_client_id": src_id}}  # fmt: skip
    model = AdaptedModel("source", g, encoder, branch, None, s.feature_scale(s.steps - 1), meta).eval()
    summary: dict[str, Any] = {"classes": names, "train_cases": len(train_cases), "val_cases": len(val_cases), "train_slices": int(train_idx.numel())}
    if val_cases:
        summary["validation"] = evaluate_cases(model.predict, data, val_cases, table, len(names))
    return model, summary


# -- target job -------------------------------------------------------------------------------


@torch.no_grad()
def synthetic_source(generator: Generator, branch: SegmentationBranch, source_client: int | None, n: int, seed: int,
                     chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Synthetic source slices labelled by the source branch S_s on their own generation features.

    Seeded z, the source's client id (random client ids when the source was not a factory
    member), uniform slice bins, no key, constant noise. It runs on the generator's device
    (the branch must be there too); the draws are made on the CPU, so a seed gives the same
    pool on any device up to the device's float rounding.

    Args:
        generator: the factory generator (frozen).
        branch: S_s.
        source_client: the source site's client id (None: not a factory member).
        n: the number of slices.
        seed: the seed (the pool does not depend on ``chunk``).
        chunk: slices generated at a time.

    Returns:
        ``(images (n, 1, R, R) in [-1, 1], labels (n, R, R) branch indices)``, on the CPU (the
        pool a target job keeps and checkpoints).
    """
    cfg = generator.cfg
    device = module_device(generator)
    gen = torch.Generator().manual_seed(seed)
    z_all = torch.randn(n, cfg.z_dim, generator=gen)  # drawn up front: the pool does not depend on `chunk`
    ids_all = torch.full((n,), source_client, dtype=torch.long) if source_client is not None else torch.randint(0, cfg.n_clients, (n,), generator=gen)
    bins_all = torch.randint(0, cfg.n_bins, (n,), generator=gen) if cfg.n_bins else None
    was = branch.training
    branch.eval()
    images, labels = [], []
    for i in range(0, n, chunk):
        part = slice(i, min(i + chunk, n))
        bins = bins_all[part].to(device) if bins_all is not None else None
        img, feats = generator(z_all[part].to(device), ids_all[part].to(device), bins, None, noise_mode="const", return_features=True)
        images.append(img.clamp(-1, 1).cpu())
        labels.append(branch(feats).argmax(1).cpu())
    branch.train(was)
    return torch.cat(images), torch.cat(labels)


def target_split(data: LabelledSlices, settings: AdaptSettings) -> tuple[torch.Tensor, list[int], list[int]]:
    """Split a target dataset: the few-shot volumes train (their labels only on the chosen slices),
    other labelled cases are held out entirely for evaluation, unlabelled cases train (images only).

    Args:
        data: the target dataset's slices.
        settings: the few-shot settings (volumes, slices per volume, seed).

    Returns:
        ``(few-shot slice indices, training cases, evaluation cases)``.

    Raises:
        ValueError: fewer labelled volumes with foreground than ``few_shot_volumes``.
    """
    few = few_shot_selection(data, n_volumes=settings.few_shot_volumes, per_volume=settings.few_shot_slice, seed=settings.few_shot_seed)
    few_cases = sorted({int(c) for c in data.case_index[few].tolist()})
    eval_cases = [i for i, has in enumerate(data.has_label) if has and i not in few_cases]
    train_cases = [i for i in range(len(data.case_ids)) if i not in eval_cases]
    return few, train_cases, eval_cases


def train_target(factory: Factory, source_branch: SegmentationBranch, source_client: int | None, target_client: int | None,
                 data: LabelledSlices, settings: AdaptSettings, job: JobDir, resume: bool = False,
                 progress: Progress | None = None, device: torch.device | str = CPU) -> tuple[AdaptedModel, dict[str, Any]]:  # fmt: skip
    """Train E_t and S_t with the frozen G and S_s (see the module docstring).

    Args:
        factory: the published factory (frozen).
        source_branch: S_s, the source site's published branch (frozen).
        source_client: the source site's client id (None: not a factory member).
        target_client: this site's client id (None: not a factory member).
        data: the target dataset's slices (unlabelled cases included).
        settings: the training settings.
        job: the job folder (checkpoints, metrics).
        resume: continue from the job's checkpoint (written on any device).
        progress: called after every logged step.
        device: where the networks train and the evaluation runs (``source_branch`` and the
            factory's own generator are not moved: copies of them run there).

    Returns:
        ``(model, summary)``: the target model (E_t + S_t + S_s), on ``device`` (its `state`
        is CPU tensors), and what the job did (few-shot slices, classes, cases, evaluation
        Dice per inference mode).

    Raises:
        ValueError: naming the problem, when the branch's classes are not the schema's or the
            few target labels show none of them.
    """
    s = settings
    cfg = s.adapt_config()
    schema_ids = schema_class_ids(factory.schema)
    names = list(source_branch.class_names)
    unknown = [n for n in names[1:] if n not in schema_ids]
    if unknown:
        raise ValueError(f"the source branch segments {', '.join(unknown)}, which the factory's label schema does not have")
    table = label_table(schema_ids, names, data.ignore_label, data.num_classes)
    few, train_cases, eval_cases = target_split(data, s)
    if few.numel() == 0:
        raise ValueError(f"{job.root}: the target dataset has no labelled slice showing a class; few-shot adaptation needs some")
    few_labels = table[data.labels[few]]
    labelled_here = sorted({int(v) for v in torch.unique(few_labels).tolist() if 0 < v < len(names)})
    missing = [names[i] for i in range(1, len(names)) if i not in labelled_here]
    if not labelled_here:
        raise ValueError(f"{job.root}: the few target labels show none of the branch's classes ({', '.join(names[1:])})")
    in_train = torch.isin(data.case_index, torch.tensor(train_cases, dtype=torch.long))
    train_idx = torch.nonzero(in_train).flatten()
    # losses against S_s's labels of synthetic source slices: every branch class; against
    # the few target labels: the classes the labelled slice's case marks (the others merged)
    seg_full = segmentation_loss(len(names))
    seg_few = PartialLabelLoss(len(names))
    case_sets = case_branch_sets(data, names, schema_ids)

    device = _as_device(device)
    torch.manual_seed(s.seed)  # the initial weights: drawn on the CPU, then moved, so the same on every device
    g = _generator_on(factory.generator, device)
    encoder = InversionEncoder(factory.config, cfg, latent_avgs(g, [source_client, target_client], n=s.latent_samples, seed=s.seed)).to(device)
    s_src = copy.deepcopy(source_branch).to(device).eval()  # frozen: eval-mode batch norm, no gradient
    requires_grad(s_src, False)
    s_tgt = copy.deepcopy(source_branch).to(device).train()
    requires_grad(s_tgt, True)
    opt = _optimizer(encoder, [s_tgt], s)
    rec = ReconstructionLoss(s.mse, s.ms_ssim, s.perceptual).to(device)
    gen = torch.Generator().manual_seed(s.seed + 1)
    loop = _TrainingLoop(s, job, progress, {"encoder": encoder, "branch_target": s_tgt}, opt, gen)
    if resume:
        start, ck = loop.resume()
        syn_x, syn_y = ck["synthetic_images"], ck["synthetic_labels"]
    else:
        start = 0
        log.info("labelling %d synthetic source slices with the source branch", s.n_synthetic)
        syn_x, syn_y = synthetic_source(g, s_src, source_client, s.n_synthetic, s.seed)
    syn_x = syn_x.half().float()  # what a checkpoint holds (float16), so a resumed job sees the same pool
    syn_y = syn_y.long()

    def synthetic_pool() -> dict[str, Any]:  # what a checkpoint holds besides the networks
        return {"synthetic_images": syn_x.half(), "synthetic_labels": syn_y.to(torch.uint8)}

    loop.extra = synthetic_pool
    syn_idx = torch.arange(syn_x.shape[0])
    n_t = max(1, s.batch - 1)
    encoder.train()
    s_tgt.train()
    for step in range(start, s.steps):
        si = _draw(syn_idx, s.batch, gen)
        ti = _draw(train_idx, n_t, gen)
        li = _draw(few, 1, gen)
        xs, ys = syn_x[si].to(device), syn_y[si].to(device)
        xt = torch.cat([data.images[ti], data.images[li]]).to(device)
        yt = table[data.labels[li]].to(device)
        sl = slice(n_t, n_t + 1)  # the labelled target slice's position in the target batch
        fsc = s.feature_scale(step)

        few_set = [case_sets[int(data.case_index[li[0]])]]

        rs, fs_, _ = invert(g, encoder, xs, SOURCE, fsc)
        rt, ft, _ = invert(g, encoder, xt, TARGET, fsc)
        l_rec = rec(rs, xs) + rec(rt, xt)

        ts, fts, _ = invert(g, encoder, xs, TARGET, fsc)  # source -> target
        tt, ftt, _ = invert(g, encoder, xt, SOURCE, fsc)  # target -> source

        cs, fcs, _ = invert(g, encoder, ts.clamp(-1, 1), SOURCE, fsc)  # and back
        ct, fct, _ = invert(g, encoder, tt.clamp(-1, 1), TARGET, fsc)
        l_cyc = cycle_consistency(rec, [(xs, cs), (xt, ct)])

        # S_t (training) reads detached features, in ONE batch so its batch norm never sees
        # a single slice: [target recon (labelled slice), source -> target, cycled target]
        st_in = [torch.cat([a[sl], b, c[sl]]).detach() for a, b, c in zip(ft, fts, fct)]
        st_out = s_tgt(st_in)
        b = xs.shape[0]
        l_seg = seg_full(s_src(fs_), ys) + seg_few(st_out[:1], yt, few_set)
        l_tr = seg_full(st_out[1 : 1 + b], ys) + seg_few(s_src([f[sl] for f in ftt]), yt, few_set)
        l_cs = seg_full(s_src(fcs), ys) + seg_few(st_out[1 + b :], yt, few_set)

        losses = {"loss": l_rec + l_cyc + l_seg + l_tr + l_cs, "loss_rec": l_rec, "loss_cycle": l_cyc, "loss_seg": l_seg,
                  "loss_translate_seg": l_tr, "loss_cycle_seg": l_cs}  # fmt: skip
        loop.step(step, fsc, losses)
    loop.checkpoint(s.steps)

    identity = {k: factory.identity.get(k, "") for k in ("name", "version", "sha256")}
    class_ids = [0] + [schema_ids[n] for n in names[1:]]
    meta = {"factory": identity, "schema_definition": factory.meta.get("schema_definition"), "slices": factory.slices.key(),
            "class_ids": class_ids, "domains": {"source_client_id": source_client, "target_client_id": target_client},
            "source_branch": source_branch.config()}  # fmt: skip
    model = AdaptedModel("target", g, encoder, s_src, s_tgt, s.feature_scale(s.steps - 1), meta).eval()
    summary: dict[str, Any] = {"classes": names, "few_shot_slices": int(few.numel()), "few_shot_cases": sorted({int(c) for c in data.case_index[few]}),
               "classes_in_few_labels": [names[i] for i in labelled_here], "classes_missing_in_few_labels": missing,
               "train_cases": len(train_cases), "eval_cases": len(eval_cases), "train_slices": int(train_idx.numel()),
               "synthetic": int(syn_x.shape[0])}  # fmt: skip
    if eval_cases:
        summary["evaluation"] = {
            mode: evaluate_cases(functools.partial(model.predict, mode=mode), data, eval_cases, table, len(names)) for mode in ("average", "target", "source")
        }
    return model, summary
