"""Asynchronous local domain adaptation on the data factory (phase 2; no FL code).

Method: ../shared/notes/data-factory-method.md "Phase 2" and the paper's section 3.2; the
details below follow the authors' code where the paper is silent, and say where we differ.

Source site s (has labels), `train_source`:
    w = E_s(x, source)  ->  x~, features = G(w) with E_s's residual features injected
    loss = Lr(x, x~) + Ls(S_s(features), y)          (G frozen; E_s and S_s train)
    S_s is what the site publishes (weights + config, nothing else).

Target site t (few labels), `train_target`, with G and S_s frozen:
    synthetic source samples x_s = G(z, client id of s, slice bin), labelled by S_s on their
    own generation features (y_s = argmax S_s), generated once per job;
    one step, for x_s and a target batch x_t holding one of the few labelled target slices:
      reconstruction  x~ = G(E_t(x, own domain))             Lr(x, x~) for both domains
                      Ls(S_s(feat(x_s~)), y_s) + Ls(S_t(feat(x_t~) detached), y_t)
      translation     x^ = G(E_t(x, other domain))
                      Ls(S_t(feat(x_s->t) detached), y_s) + Ls(S_s(feat(x_t->s)), y_t)
      cycle           x^^ = G(E_t(x^, own domain))            Lr(x, x^^) for both domains
                      Ls(S_s(feat(x_s^^)), y_s) + Ls(S_t(feat(x_t^^) detached), y_t)
    E_t reconstructs and translates: flipping the domain index switches its domain-specific
    batch norms, style modulation and per-domain mean latent (`InversionEncoder`).
    Differences from the authors' code: the translated image is not detached before the
    cycle pass (the paper's cycle loss then trains the translation, which the code's
    detach prevented); the three passes run in one step rather than alternating steps; S_t
    starts as a copy of S_s instead of untrained; Adam replaces Ranger.

Inference (`AdaptedModel.predict`): 0.5 * softmax(S_t(features of E_t(x, target))) +
0.5 * softmax(S_s(features of E_t(x, source))), i.e. the target branch on the image's own
reconstruction and the source branch on its translation to the source domain.

Every loop is resumable through `pipelines.adaptation.jobs.JobDir`: networks, optimizers,
RNG, step and the synthetic pool are checkpointed atomically every ``checkpoint_every``
steps and at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from pipelines.adaptation.factory import Factory
from pipelines.adaptation.jobs import JobDir, rng_state, set_rng_state
from pipelines.adaptation.losses import ReconstructionLoss, cycle_consistency, segmentation_loss
from pipelines.adaptation.networks import AdaptConfig, InversionEncoder, SegmentationBranch, invert, latent_avgs, load_branch, requires_grad
from pipelines.adaptation.volumes import LabelledSlices, few_shot_selection
from pipelines.evaluation import dice_per_class
from pipelines.factory.networks import FactoryConfig, Generator
from pipelines.losses import IGNORE_INDEX

log = logging.getLogger(__name__)
SOURCE, TARGET = 0, 1
MODEL_FORMAT = "fedimg-adapted-model"
Progress = Callable[[int, int, dict], None]


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptSettings:
    """One adaptation job's training settings (validated; errors name the key)."""

    steps: int = 1000
    batch: int = 8
    lr_encoder: float = 5e-4  # authors: Ranger 1e-4 over 15-20k steps; CPU budgets are ~100x shorter
    lr_branch: float = 1e-3
    feature_ramp: float = 0.25  # fraction of the steps over which the injection strength s goes 0 -> 1
    foreground_fraction: float = 0.5  # share of each source batch drawn from slices showing a labelled class
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    mse: float = 1.0
    ms_ssim: float = 0.8
    perceptual: str | None = None  # TorchScript perceptual distance on disk (LPIPS-like), else none
    val_fraction: float = 0.2  # source jobs: share of labelled cases held out for validation
    n_synthetic: int = 512  # target jobs: synthetic source samples labelled by S_s
    few_shot_volumes: int = 3
    few_shot_slice: str | int = "middle"  # per volume: "middle", "random" or a number of slices
    few_shot_seed: int | None = None  # None: the first volumes in dataset order
    latent_samples: int = 4096  # z per domain for the mean latents
    network: dict = dataclasses.field(default_factory=dict)  # AdaptConfig.from_dict input

    def __post_init__(self) -> None:
        def num(key, lo=None, hi=None, integer=False, allow_none=False):
            v = getattr(self, key)
            if v is None and allow_none:
                return
            ok = not isinstance(v, bool) and isinstance(v, (int,) if integer else (int, float)) and math.isfinite(v)
            if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
                rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
                raise ValueError(f"{key}: must be {'an integer' if integer else 'a number'}{rng} (got {v!r})")

        for key in ("steps", "batch", "checkpoint_every", "log_every", "few_shot_volumes", "latent_samples"):
            num(key, 1, None, integer=True)
        num("batch", 2, None, integer=True)  # batch statistics of the encoder's batch norms need 2
        num("n_synthetic", 1, None, integer=True)
        num("seed", 0, None, integer=True)
        num("few_shot_seed", 0, None, integer=True, allow_none=True)
        for key in ("lr_encoder", "lr_branch"):
            num(key, 1e-8, 1.0)
        for key in ("feature_ramp", "foreground_fraction", "val_fraction"):
            num(key, 0.0, 1.0)
        num("val_fraction", 0.0, 0.9)
        for key in ("mse", "ms_ssim"):
            num(key, 0.0, 100.0)
        fs = self.few_shot_slice
        if not (fs in ("middle", "random") or (isinstance(fs, int) and not isinstance(fs, bool) and fs >= 1)):
            raise ValueError(f"few_shot_slice: must be 'middle', 'random' or a positive integer (got {fs!r})")
        AdaptConfig.from_dict(self.network, "network")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str = "adaptation settings") -> "AdaptSettings":
        raw = dict(raw or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def adapt_config(self) -> AdaptConfig:
        return AdaptConfig.from_dict(self.network, "network")

    def feature_scale(self, step: int) -> float:
        """Injection strength at ``step`` (0-based): linear 0 -> 1 over ``feature_ramp * steps``."""
        ramp = self.feature_ramp * self.steps
        return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)


# -- class tables -----------------------------------------------------------------------------


def schema_class_ids(schema) -> dict[str, int]:
    """{class name: id} of a `LabelSchema` (background included)."""
    return {str(k): int(v) for k, v in schema.classes.items()}


def branch_classes(schema, class_ids: list[int]) -> list[str]:
    """Branch class names for schema ids: background first, then the ids in ascending order."""
    by_id = {v: k for k, v in schema_class_ids(schema).items()}
    unknown = [c for c in class_ids if c not in by_id]
    if unknown:
        raise ValueError(f"class id(s) {unknown} not in label schema {schema.name}")
    return ["background"] + [by_id[c] for c in sorted(class_ids) if c != 0]


def label_table(schema_ids: Mapping[str, int], class_names: list[str], ignore_label: int, size: int) -> torch.Tensor:
    """Lookup table schema id -> branch index (classes not in the branch -> 0, ignore -> IGNORE_INDEX)."""
    table = torch.zeros(max(size, ignore_label + 1), dtype=torch.long)
    for i, name in enumerate(class_names[1:], start=1):
        table[schema_ids[name]] = i
    table[ignore_label] = IGNORE_INDEX
    return table


class PartialLabelLoss:
    """Dice + CE where each sample carries the branch classes its labels mark: samples are
    grouped by that set and each group gets the marginal loss over its own classes (the
    others merged with the background, not taught as background); groups are weighted by
    size. A sample whose set is empty gives no supervision."""

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self._losses: dict[tuple[int, ...], torch.nn.Module] = {}

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, sets: list[tuple[int, ...]]) -> torch.Tensor:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, key in enumerate(sets):
            if key:
                groups.setdefault(key, []).append(i)
        total = logits.new_zeros((), dtype=torch.float32)
        for key, idx in groups.items():
            if key not in self._losses:
                self._losses[key] = segmentation_loss(self.n_classes, list(key))
            ix = torch.tensor(idx, dtype=torch.long)
            total = total + self._losses[key](logits[ix], labels[ix]) * (len(idx) / len(sets))
        return total


def case_branch_sets(data: LabelledSlices, names: list[str], schema_ids: Mapping[str, int]) -> list[tuple[int, ...]]:
    """Per case of ``data``: the branch class indices its labels mark."""
    index = {schema_ids[n]: i for i, n in enumerate(names) if i}
    return [tuple(sorted(index[c] for c in classes if c in index)) for classes in data.labeled_classes]


# -- models -----------------------------------------------------------------------------------


def _generator_from(cfg_dict: dict, state: dict) -> Generator:
    g = Generator(FactoryConfig.from_dict(cfg_dict, "model.factory"))
    g.load_state_dict(state, strict=True)
    g.eval()
    requires_grad(g, False)
    return g


class AdaptedModel:
    """What a finished job leaves in ``model.pt``: the frozen generator, the encoder and the
    branch(es), with everything `predict` needs. ``kind`` "source" (E_s + S_s) or "target"
    (E_t + S_t + S_s)."""

    def __init__(self, kind: str, generator: Generator, encoder: InversionEncoder, branch_source: SegmentationBranch,
                 branch_target: SegmentationBranch | None, feature_scale: float, meta: dict):  # fmt: skip
        self.kind = kind
        self.generator = generator
        self.encoder = encoder
        self.branch_source = branch_source
        self.branch_target = branch_target
        self.feature_scale = float(feature_scale)
        self.meta = meta  # factory identity, schema_definition, slices, class ids, domains

    @property
    def class_names(self) -> list[str]:
        return list(self.branch_source.class_names)

    @property
    def class_ids(self) -> list[int]:
        """Schema id of each branch class (background 0 first)."""
        return [int(c) for c in self.meta["class_ids"]]

    def eval(self) -> "AdaptedModel":
        for m in (self.generator, self.encoder, self.branch_source, self.branch_target):
            if m is not None:
                m.eval()
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mode: str = "average") -> torch.Tensor:
        """Branch-class probabilities (B, n_classes, R, R) of slices ``x`` (B, 1, R, R).

        ``mode``: "average" (target models: S_t on the reconstruction + S_s on the translation
        to the source domain; source models: S_s), "target" (S_t only), "source" (S_s on the
        translation only)."""
        g, e, s = self.generator, self.encoder, self.feature_scale
        if self.kind == "source":  # E_s + S_s on the image's own reconstruction
            _, feats, _ = invert(g, e, x, SOURCE, s)
            return torch.softmax(self.branch_source(feats), 1)
        out = []
        if mode in ("average", "target"):
            _, ft, _ = invert(g, e, x, TARGET, s)
            out.append(torch.softmax(self.branch_target(ft), 1))
        if mode in ("average", "source"):
            _, fs, _ = invert(g, e, x, SOURCE, s)
            out.append(torch.softmax(self.branch_source(fs), 1))
        if not out:
            raise ValueError(f"mode must be average, target or source (got {mode!r})")
        return sum(out) / len(out)

    def state(self) -> dict:
        return {
            "format": MODEL_FORMAT,
            "kind": self.kind,
            "factory_config": self.generator.cfg.to_dict(),
            "generator": {k: v.detach().clone() for k, v in self.generator.state_dict().items()},
            "adapt_config": self.encoder.cfg.to_dict(),
            "encoder": {k: v.detach().clone() for k, v in self.encoder.state_dict().items()},
            "branch_source": {"config": self.branch_source.config(), "state": self.branch_source.state_dict()},
            "branch_target": None if self.branch_target is None else {"config": self.branch_target.config(), "state": self.branch_target.state_dict()},
            "feature_scale": self.feature_scale,
            "meta": self.meta,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], where: str = "model") -> "AdaptedModel":
        if not isinstance(state, Mapping) or state.get("format") != MODEL_FORMAT:
            raise ValueError(f"{where}: not an adapted model (format {state.get('format') if isinstance(state, Mapping) else None!r})")
        generator = _generator_from(state["factory_config"], state["generator"])
        encoder = InversionEncoder(generator.cfg, AdaptConfig.from_dict(state["adapt_config"], f"{where}: adapt_config"))
        encoder.load_state_dict(state["encoder"], strict=True)
        bs = load_branch(state["branch_source"]["config"], state["branch_source"]["state"])
        bt = None if state.get("branch_target") is None else load_branch(state["branch_target"]["config"], state["branch_target"]["state"])
        model = cls(state["kind"], generator, encoder, bs, bt, state["feature_scale"], dict(state["meta"]))
        return model.eval()

    @classmethod
    def load(cls, path) -> "AdaptedModel":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{path}: no such model file") from None
        except Exception as exc:
            raise ValueError(f"{path}: not a model file ({exc})") from None
        return cls.from_state(state, str(path))


# -- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_cases(predict: Callable[[torch.Tensor], torch.Tensor], data: LabelledSlices, cases: list[int], table: torch.Tensor,
                   n_classes: int, batch: int = 16) -> dict:  # fmt: skip
    """Per-case Dice of each branch class, pooled over all slices of the case (a 3D Dice in
    the factory's slice space). Returns {"per_case": [{class_index: dice}], "mean": {...}}."""
    per_case = []
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
            preds.append(p.argmax(1))
        pred = torch.cat(preds)
        ref = table[data.labels[idx]]
        per_case.append(dice_per_class(pred, ref, range(1, n_classes), ignore_label=IGNORE_INDEX))
    mean = {}
    for k in range(1, n_classes):
        vals = [d[k] for d in per_case if not math.isnan(d[k])]
        mean[k] = float(np.mean(vals)) if vals else float("nan")
    return {"per_case": per_case, "mean": mean}


# -- sampling ---------------------------------------------------------------------------------


def _draw(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return pool[torch.randint(0, pool.numel(), (n,), generator=gen)]


def source_batch_indices(train_idx: torch.Tensor, fg_idx: torch.Tensor, batch: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    n_fg = int(round(batch * fraction)) if fg_idx.numel() else 0
    parts = [_draw(fg_idx, n_fg, gen)] if n_fg else []
    parts.append(_draw(train_idx, batch - n_fg, gen))
    return torch.cat(parts)


def split_cases(n_cases: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) case indices; validation gets round(n * fraction) cases, at least
    one when the fraction is positive and there are two or more cases, never all of them."""
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
    named modules, the optimizer, the batch sampler, the RNG and any ``extra`` tensors), the
    optimizer step, loss averaging, and a metric row every ``log_every`` steps."""

    def __init__(self, s: AdaptSettings, job: JobDir, progress: Progress | None, modules: dict[str, torch.nn.Module],
                 opt: torch.optim.Optimizer, sampler: torch.Generator):  # fmt: skip
        self.s, self.job, self.progress = s, job, progress
        self.modules, self.opt, self.sampler = modules, opt, sampler
        self.extra: Callable[[], dict] = dict
        self.t0, self.acc = time.perf_counter(), {}

    def resume(self) -> tuple[int, dict]:
        """Load the job's checkpoint; returns (step to continue from, the checkpoint)."""
        ck = self.job.load_checkpoint()
        for name, module in self.modules.items():
            module.load_state_dict(ck[name])
        self.opt.load_state_dict(ck["optimizer"])
        self.sampler.set_state(ck["sampler"])
        set_rng_state(ck["rng"])
        start = int(ck["step"])
        self.job.truncate_metrics(start)
        log.info("resuming %s at step %d/%d", self.job.root.name, start, self.s.steps)
        return start, ck

    def checkpoint(self, step: int) -> None:
        state = {name: module.state_dict() for name, module in self.modules.items()}
        state.update(optimizer=self.opt.state_dict(), sampler=self.sampler.get_state(), rng=rng_state(), **self.extra())
        self.job.save_checkpoint(state, step)

    def step(self, step: int, feature_scale: float, losses: dict[str, torch.Tensor]) -> None:
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.opt.step()
        for k, v in losses.items():
            self.acc.setdefault(k, []).append(float(v.detach()))
        done, s = step + 1, self.s
        if done % s.log_every == 0 or done == s.steps:
            row = {"step": done, "feature_scale": feature_scale, "step_s": (time.perf_counter() - self.t0) / len(self.acc["loss"]),
                   **{k: float(np.mean(v)) for k, v in self.acc.items()}}  # fmt: skip
            self.job.log_metrics(row)
            if self.progress:
                self.progress(done, s.steps, row)
            self.t0, self.acc = time.perf_counter(), {}
        if done % s.checkpoint_every == 0 and done < s.steps:
            self.checkpoint(done)


def train_source(factory: Factory, data: LabelledSlices, settings: AdaptSettings, job: JobDir, site_client: int | None,
                 resume: bool = False, progress: Progress | None = None) -> tuple[AdaptedModel, dict]:  # fmt: skip
    """Train E_s and S_s on a labelled dataset's slices. Returns (model, summary)."""
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

    torch.manual_seed(s.seed)
    g = factory.generator
    src_id = site_client
    encoder = InversionEncoder(factory.config, cfg, latent_avgs(g, [src_id, src_id], n=s.latent_samples, seed=s.seed))
    identity = {k: factory.identity.get(k, "") for k in ("name", "version", "sha256")}
    branch = SegmentationBranch.for_factory(factory.config, names, cfg, identity)
    opt = _optimizer(encoder, [branch], s)
    rec = ReconstructionLoss(s.mse, s.ms_ssim, s.perceptual)
    seg = PartialLabelLoss(len(names))
    case_sets = case_branch_sets(data, names, schema_ids)
    gen = torch.Generator().manual_seed(s.seed + 1)
    loop = _TrainingLoop(s, job, progress, {"encoder": encoder, "branch": branch}, opt, gen)
    start = loop.resume()[0] if resume else 0
    encoder.train()
    branch.train()
    for step in range(start, s.steps):
        idx = source_batch_indices(train_idx, fg_idx, s.batch, s.foreground_fraction, gen)
        x, y = data.images[idx], labels[idx]
        fs = s.feature_scale(step)
        img, feats, _ = invert(g, encoder, x, SOURCE, fs)
        l_rec = rec(img, x)
        l_seg = seg(branch(feats), y, [case_sets[int(c)] for c in data.case_index[idx]])
        loop.step(step, fs, {"loss": l_rec + l_seg, "loss_rec": l_rec, "loss_seg": l_seg})
    loop.checkpoint(s.steps)

    meta = {"factory": identity, "schema_definition": factory.meta.get("schema_definition"), "slices": factory.slices.key(),
            "class_ids": [0] + sorted(class_ids), "domains": {"source_client_id": src_id}}  # fmt: skip
    model = AdaptedModel("source", g, encoder, branch, None, s.feature_scale(s.steps - 1), meta).eval()
    summary = {"classes": names, "train_cases": len(train_cases), "val_cases": len(val_cases), "train_slices": int(train_idx.numel())}
    if val_cases:
        summary["validation"] = evaluate_cases(model.predict, data, val_cases, table, len(names))
    return model, summary


# -- target job -------------------------------------------------------------------------------


@torch.no_grad()
def synthetic_source(generator: Generator, branch: SegmentationBranch, source_client: int | None, n: int, seed: int,
                     chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``n`` synthetic source slices and S_s's labels: seeded z, the source's client id (all
    client ids in turn when the source was not a factory member), uniform slice bins, no key,
    constant noise. Returns (images (n,1,R,R) in [-1,1], labels (n,R,R) branch indices)."""
    cfg = generator.cfg
    gen = torch.Generator().manual_seed(seed)
    z_all = torch.randn(n, cfg.z_dim, generator=gen)  # drawn up front: the pool does not depend on `chunk`
    ids_all = torch.full((n,), source_client, dtype=torch.long) if source_client is not None else torch.randint(0, cfg.n_clients, (n,), generator=gen)
    bins_all = torch.randint(0, cfg.n_bins, (n,), generator=gen) if cfg.n_bins else None
    was = branch.training
    branch.eval()
    images, labels = [], []
    for i in range(0, n, chunk):
        part = slice(i, min(i + chunk, n))
        bins = bins_all[part] if bins_all is not None else None
        img, feats = generator(z_all[part], ids_all[part], bins, None, noise_mode="const", return_features=True)
        images.append(img.clamp(-1, 1))
        labels.append(branch(feats).argmax(1))
    branch.train(was)
    return torch.cat(images), torch.cat(labels)


def target_split(data: LabelledSlices, settings: AdaptSettings) -> tuple[torch.Tensor, list[int], list[int]]:
    """(few-shot slice indices, training cases, evaluation cases) of a target dataset: the
    few-shot volumes train (their labels only on the chosen slices); other labelled cases
    are held out entirely for evaluation; unlabelled cases train (images only)."""
    few = few_shot_selection(data, n_volumes=settings.few_shot_volumes, per_volume=settings.few_shot_slice, seed=settings.few_shot_seed)
    few_cases = sorted({int(c) for c in data.case_index[few].tolist()})
    eval_cases = [i for i, has in enumerate(data.has_label) if has and i not in few_cases]
    train_cases = [i for i in range(len(data.case_ids)) if i not in eval_cases]
    return few, train_cases, eval_cases


def train_target(factory: Factory, source_branch: SegmentationBranch, source_client: int | None, target_client: int | None,
                 data: LabelledSlices, settings: AdaptSettings, job: JobDir, resume: bool = False,
                 progress: Progress | None = None) -> tuple[AdaptedModel, dict]:  # fmt: skip
    """Train E_t and S_t with the frozen G and S_s (see the module docstring)."""
    s = settings
    cfg = s.adapt_config()
    g = factory.generator
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
    labelled_here = sorted({int(v) for v in few_labels.unique().tolist() if 0 < v < len(names)})
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

    torch.manual_seed(s.seed)
    encoder = InversionEncoder(factory.config, cfg, latent_avgs(g, [source_client, target_client], n=s.latent_samples, seed=s.seed))
    s_src = copy.deepcopy(source_branch).eval()  # frozen: eval-mode batch norm, no gradient
    requires_grad(s_src, False)
    s_tgt = copy.deepcopy(source_branch).train()
    requires_grad(s_tgt, True)
    opt = _optimizer(encoder, [s_tgt], s)
    rec = ReconstructionLoss(s.mse, s.ms_ssim, s.perceptual)
    gen = torch.Generator().manual_seed(s.seed + 1)
    loop = _TrainingLoop(s, job, progress, {"encoder": encoder, "branch_target": s_tgt}, opt, gen)
    if resume:
        start, ck = loop.resume()
        syn_x, syn_y = ck["synthetic_images"], ck["synthetic_labels"]
    else:
        start = 0
        log.info("labelling %d synthetic source slices with the source branch", s.n_synthetic)
        syn_x, syn_y = synthetic_source(g, s_src, source_client, s.n_synthetic, s.seed)
    loop.extra = lambda: {"synthetic_images": syn_x.half(), "synthetic_labels": syn_y.to(torch.uint8)}
    syn_x = syn_x.half().float()  # what a checkpoint holds (float16), so a resumed job sees the same pool
    syn_y = syn_y.long()
    syn_idx = torch.arange(syn_x.shape[0])
    n_t = max(1, s.batch - 1)
    encoder.train()
    s_tgt.train()
    for step in range(start, s.steps):
        si = _draw(syn_idx, s.batch, gen)
        ti = _draw(train_idx, n_t, gen)
        li = _draw(few, 1, gen)
        xs, ys = syn_x[si], syn_y[si]
        xt = torch.cat([data.images[ti], data.images[li]])
        yt = table[data.labels[li]]
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
    summary = {"classes": names, "few_shot_slices": int(few.numel()), "few_shot_cases": sorted({int(c) for c in data.case_index[few]}),
               "classes_in_few_labels": [names[i] for i in labelled_here], "classes_missing_in_few_labels": missing,
               "train_cases": len(train_cases), "eval_cases": len(eval_cases), "train_slices": int(train_idx.numel()),
               "synthetic": int(syn_x.shape[0])}  # fmt: skip
    if eval_cases:
        summary["evaluation"] = {
            mode: evaluate_cases(lambda x, m=mode: model.predict(x, m), data, eval_cases, table, len(names)) for mode in ("average", "target", "source")
        }
    return model, summary
