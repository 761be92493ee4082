"""FedSR against its baselines and ablations on the brain phantom, side by side (Tables I and IV).

One data set, one budget, every method, the same training seeds: K phantom sites (the
``site-a``/``site-b``/``site-c`` scanner profiles, modelled on ABIDE, PPMI and OASIS), each with
unlabelled training scans and a few labelled evaluation scans (labels only score), written as
DICOM, prepared with ``preprocessing.prepare`` and loaded exactly as the FedSR plan loads them
(`pipelines.plans.fedsr_data.PreparedVolumeDataset`'s chain: the schema's deterministic
transforms at ``--spacing``, then padded or cropped to the volume); the atlas is the phantom
template (`make_brain_atlas`, neutral contrast), as a registry atlas prepared like the cases
(`pipelines.fedsr.atlas.prepared_atlas`). Methods:

    fedsr          FedSR: shared encoder + SA representation, personal decoders, SCIE, MI
    fedavg         the whole network averaged (no SA, SCIE, MI); scored as the plan scores it
                   (the site's model after its last round) and, as ``fedavg_global``, the
                   averaged global model after the last round
    fedrep         shared encoder, personal decoders, no SA / SCIE / MI
    standalone     every site alone, no aggregation (FedRep's network: a plain JRS network),
                   the same rounds, steps, fine-tuning schedule and Adam
    centralised    Table IV's "without FL": one JRS network (FedRep's) trained on every site's
                   training volumes pooled for as many updates as the federated encoder gets in
                   all (sites x (rounds - finetune_rounds) x local_steps, one volume per update);
                   then each site fine-tunes its own copy of the decoders (from the central
                   ones, Adam state continued) with the encoder frozen for the federation's
                   fine-tuning budget (finetune_rounds x local_steps)
    fedsr_no_mi    FedSR without the MI term (Table IV)
    fedsr_no_scie  FedSR without SCIE (Table IV)

The federation is simulated in this process with the plan's semantics
(`pipelines.plans.fedsr_base`, no Fed-BioMed): per round, each site loads the global shared
state (`is_shared_parameter`), keeps its personal parts and its own Adam state, reseeds torch
with `round_seed(seed, round, site)`, runs ``local_steps`` Adam updates of one shuffled volume
each through `FedSRUpdater` (encoder frozen in the last ``finetune_rounds``), scores itself after
its last round's updates (before eq. 7, as the plan does) and ends the round (`finish_round`);
the server averages the shared state weighted by the sites' training volumes (FedAvg).

Scores per site (its labelled cases, the personalised model): segmentation Dice, Jaccard,
HD95, ASD, AVD (mean over structures and per structure), registration Dice and NCC (global,
brain-foreground, local); mean +- sd over training seeds. The "no registration" row scores the
unwarped atlas labels and image against each case: the floor every method must beat.

    .venv/bin/python benchmarks/fedsr_methods.py --out /tmp/fedsr-bench          # 3 seeds x 7 methods, ~26 min on one core
    .venv/bin/python benchmarks/fedsr_methods.py --seeds 0 --rounds 2 --out DIR    # a pilot
    .venv/bin/python benchmarks/fedsr_methods.py --quick --out DIR                 # tiny everything (the test's)

Writes ``DIR/benchmark.json`` (every number) and ``DIR/results.md`` (the tables, also printed).
The numbers are printed as measured, whichever method wins.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedimg_core.logs import setup_logging  # noqa: E402
from fedimg_testing.phantom.brain import BRAIN_FOV_MM, BRAIN_SITES, make_brain_atlas, write_brain_site  # noqa: E402
from pipelines.fedsr.atlas import atlas_files, load_atlas, prepared_atlas  # noqa: E402
from pipelines.fedsr.metrics import registration_case_metrics, segmentation_case_metrics, summarise  # noqa: E402
from pipelines.fedsr.networks import FEDSR_PRESETS, FedSRConfig  # noqa: E402
from pipelines.fedsr.objectives import FedSRLossWeights  # noqa: E402
from pipelines.fedsr.training import FEDSR_METHODS, FedSRMethod, FedSRModel, FedSRUpdater, is_shared_parameter, register_atlas, segment_volume  # noqa: E402
from pipelines.metrics import nan_to_none  # noqa: E402
from pipelines.site_state import round_seed  # noqa: E402
from pipelines.transforms import deterministic_transforms  # noqa: E402
from preprocessing.dataset import load_dataset  # noqa: E402
from preprocessing.prepare import PrepareOptions, prepare  # noqa: E402
from preprocessing.schema import LabelSchema, load_label_map, load_schema  # noqa: E402

# under "fedimg" so `setup_logging` shows the progress lines, on a terminal or not
logger = logging.getLogger("fedimg.benchmarks.fedsr_methods")

METHODS = ("fedsr", "fedavg", "fedrep", "standalone", "centralised", "fedsr_no_mi", "fedsr_no_scie")
FEDERATED = ("fedsr", "fedavg", "fedrep", "fedsr_no_mi", "fedsr_no_scie")  # simulated federations of `FEDSR_METHODS`
FEDAVG_GLOBAL = "fedavg_global"  # FedAvg's averaged model after the last round (the paper's FedAvg)
FLOOR = "no_registration"  # the unwarped atlas against every case
NAMES = {
    "fedsr": "FedSR",
    "fedavg": "FedAvg (site's model)",
    FEDAVG_GLOBAL: "FedAvg (global model)",
    "fedrep": "FedRep",
    "standalone": "standalone JRS",
    "centralised": "centralised encoder + site fine-tuning",
    "fedsr_no_mi": "FedSR w/o MI",
    "fedsr_no_scie": "FedSR w/o SCIE",
    FLOOR: "no registration (atlas as is)",
}
# Table IV's cumulative rows, read onto this code's methods: no FL; + FL (FedRep: shared encoder,
# personal decoders); + MI (FedSR without SCIE); + SCIE (FedSR); and the other ablation order
ABLATION_ROWS = ("centralised", "fedrep", "fedsr_no_scie", "fedsr_no_mi", "fedsr")
ABLATION_NAMES = {
    "centralised": "w/o FL (centralised encoder)",
    "fedrep": "+ FL (FedRep)",
    "fedsr_no_scie": "+ FL + MI (FedSR w/o SCIE)",
    "fedsr_no_mi": "+ FL + SCIE (FedSR w/o MI)",
    "fedsr": "+ FL + MI + SCIE (FedSR)",
}
SEG_METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm", "avd_percent", "avd_ml")
REG_METRICS = ("dice_mean", "ncc", "ncc_foreground", "local_ncc")
CENTRAL_SITE = "pooled"  # the centralised pre-training's one "site"


@dataclass(frozen=True)
class BenchmarkConfig:
    """What one benchmark run does (the CLI's options).

    Args:
        seeds: training seeds (weights, data order); the data are the same for every seed.
        methods: methods of `METHODS` to run.
        sites: site profiles of `BRAIN_SITES`.
        train_cases: unlabelled training volumes per site.
        eval_cases: labelled evaluation cases per site (never trained on).
        volume: the volume edge in voxels (a multiple of 8); the phantom's 192 mm field of view
            is resampled to ``192 / volume`` mm, so the head fills the volume.
        size: the network preset (`FEDSR_PRESETS`: tiny, small), with the schema's classes.
        rounds: federated rounds.
        local_steps: updates per site per round (one volume each).
        finetune_rounds: the last rounds with the encoder frozen.
        lr: Adam's learning rate, the same for every method (3e-3: the paper's 1e-4 leaves every
            method near its initialisation in a few hundred updates; docs/results/fedsr.md).
        alpha: eq. 7's smoothing of the SA representation.
        mutual_information: the MI terms' weight (the plan's default 0.1).
        data_seed: the phantom's seed (subjects, scanners' noise).
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    sites: tuple[str, ...] = ("site-a", "site-b", "site-c")
    train_cases: int = 8
    eval_cases: int = 4
    volume: int = 32
    size: str = "tiny"
    rounds: int = 8
    local_steps: int = 8
    finetune_rounds: int = 2
    lr: float = 3e-3
    alpha: float = 0.5
    mutual_information: float = 0.1
    data_seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        bad_sites = [s for s in self.sites if s not in BRAIN_SITES]
        if bad_sites or len(set(self.sites)) != len(self.sites) or not self.sites:
            raise ValueError(f"sites must be distinct profiles of {sorted(BRAIN_SITES)}, got {list(self.sites)}")
        if self.volume % 8 or self.volume < 24:
            raise ValueError(f"volume must be a multiple of 8, at least 24 (the phantom's every structure), got {self.volume}")
        if not 0 <= self.finetune_rounds < self.rounds:
            raise ValueError(f"finetune_rounds must be in [0, rounds): some rounds must train the encoder (got {self.finetune_rounds} of {self.rounds})")
        if self.train_cases < 1 or self.eval_cases < 1 or self.local_steps < 1:
            raise ValueError("train_cases, eval_cases and local_steps must be at least 1")
        if self.size not in ("tiny", "small"):
            raise ValueError(f"size must be tiny or small on a CPU, got {self.size!r}")

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """The volumes' isotropic spacing: the phantom's field of view over the volume edge."""
        s = BRAIN_FOV_MM / self.volume
        return (s, s, s)

    @property
    def volume_size(self) -> tuple[int, int, int]:
        """The (X, Y, Z) volume every case and the atlas are padded or cropped to."""
        return (self.volume, self.volume, self.volume)


# -- data -----------------------------------------------------------------------------------------

EvaluationCase = tuple[torch.Tensor, torch.Tensor, list[float]]  # image (1, X, Y, Z), label (1, X, Y, Z), spacing mm


@dataclass
class SiteVolumes:
    """One site's prepared volumes, as `PreparedVolumeDataset` gives them to the plan.

    Args:
        name: the site (its scanner profile).
        training: unlabelled volumes (1, X, Y, Z) float32.
        evaluation: labelled cases (image, label uint8, spacing mm), only scored.
    """

    name: str
    training: list[torch.Tensor]
    evaluation: list[EvaluationCase]


def load_site_volumes(dataset_dir: Path, name: str, schema: LabelSchema, spacing: Sequence[float], volume_size: Sequence[int]) -> SiteVolumes:
    """A prepared dataset's cases through the plan's chain (`PreparedVolumeDataset.read`, without its cache).

    Args:
        dataset_dir: the prepared dataset.
        name: the site's name.
        schema: the federation schema.
        spacing: the plan's spacing (mm).
        volume_size: the plan's volume.

    Returns:
        Training volumes (unlabelled cases) and evaluation cases (labelled ones).
    """
    from monai.transforms.croppad.dictionary import ResizeWithPadOrCropd

    prepared = load_dataset(dataset_dir)
    chain = deterministic_transforms(schema, prepared.modality, spacing=list(spacing), label_dtype=torch.uint8)
    resize = ResizeWithPadOrCropd(keys=["image", "label"], spatial_size=list(volume_size), mode="constant", allow_missing_keys=True)
    out = SiteVolumes(name=name, training=[], evaluation=[])
    for case in prepared.cases:
        item = chain({"image": str(case.image), **({"label": str(case.label)} if case.label is not None else {})})
        sized = resize(dict(item))
        image = torch.as_tensor(np.asarray(sized["image"]), dtype=torch.float32).contiguous()
        if "label" in sized:
            out.evaluation.append((image, torch.as_tensor(np.asarray(sized["label"])).to(torch.uint8).contiguous(), [float(s) for s in spacing]))
        else:
            out.training.append(image)
    return out


def build_data(cfg: BenchmarkConfig, workdir: Path) -> tuple[dict[str, SiteVolumes], torch.Tensor, torch.Tensor]:
    """Write, prepare and load every site and the atlas (what a real federation's sites would hold).

    Args:
        cfg: the run's configuration.
        workdir: where the DICOM series, prepared datasets and atlas go.

    Returns:
        Site name -> volumes, and the prepared atlas image (1, 1, X, Y, Z) and labels (1, 1, X, Y, Z).
    """
    schema = load_schema("brain-mri")
    shape = cfg.volume_size
    sites: dict[str, SiteVolumes] = {}
    n = cfg.train_cases + cfg.eval_cases
    for k, name in enumerate(cfg.sites):
        # distinct subjects per site: write_brain_site's case seed is seed * 1000 + case
        site = write_brain_site(workdir / "raw" / name, name, n, seed=100 * (cfg.data_seed + 1) + k, labelled=list(range(cfg.train_cases, n)), shape=shape)
        assert site.label_map is not None and site.labels_dir is not None
        result = prepare([site.dicom_dir], workdir / "prepared" / name, schema, load_label_map(site.label_map, schema), labels=[site.labels_dir],
                         options=PrepareOptions(name=name, qc_report=False))  # fmt: skip
        converted = result.count("ok") + result.count("flagged")  # flagged: converted with QC notes (few slices, unlabelled)
        if converted != n:
            raise RuntimeError(f"{name}: prepared {converted} of {n} cases")
        sites[name] = load_site_volumes(workdir / "prepared" / name, name, schema, cfg.spacing_mm, shape)
        logger.info("%s: %d training volumes, %d evaluation cases", name, len(sites[name].training), len(sites[name].evaluation))
    atlas = make_brain_atlas(shape)
    files = atlas_files(atlas.image, atlas.labels, atlas.affine, schema, "MR", source="fedimg brain phantom template", sharing="synthetic")
    folder = workdir / "atlas"
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, content in files.items():
        (folder / file_name).write_bytes(content)
    atlas_image, atlas_label = prepared_atlas(load_atlas(folder), schema, list(cfg.spacing_mm), shape)
    return sites, atlas_image, atlas_label


# -- the federation ------------------------------------------------------------------------------


def network_config(size: str, schema: LabelSchema) -> FedSRConfig:
    """The preset's widths with the schema's classes (what the plan builds, `fedsr_network_config`).

    Args:
        size: a preset of `FEDSR_PRESETS`.
        schema: the federation schema.

    Returns:
        The network configuration.
    """
    preset = FEDSR_PRESETS[size]
    return FedSRConfig(in_channels=1, num_classes=schema.num_classes, channels=preset.channels, sa_dim=preset.sa_dim,
                       integrate_velocity=False, integration_steps=preset.integration_steps)  # fmt: skip


def shared_state(model: FedSRModel) -> dict[str, torch.Tensor]:
    """What a site sends: the parameters and buffers the coordinator averages (a copy).

    Args:
        model: a site's model.

    Returns:
        Name -> tensor.
    """
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_shared_parameter(k, model.method)}


def personal_state(model: FedSRModel) -> dict[str, torch.Tensor]:
    """What stays at a site (its decoders and critics unless the method shares them; a copy).

    Args:
        model: a site's model.

    Returns:
        Name -> tensor.
    """
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not is_shared_parameter(k, model.method)}


def federated_average(states: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """FedAvg of the sites' shared states, weighted (the coordinator's aggregation).

    Args:
        states: site -> its sent state.
        weights: site -> its weight (its number of training volumes).

    Returns:
        The global shared state.
    """
    total = float(sum(weights[s] for s in states))
    names = next(iter(states.values())).keys()
    # in float64, so identical inputs (a frozen encoder) average back to themselves up to float32 rounding
    return {k: sum((states[s][k].double() * (weights[s] / total) for s in states), torch.zeros(())).to(states[next(iter(states))][k].dtype) for k in names}


@dataclass
class FederationResult:
    """What a simulated federation leaves.

    Args:
        scored: site -> its model after the last round's updates, before eq. 7 (what the plan scores).
        global_state: the shared state after the last aggregation (None without aggregation).
        last_received: the shared state every site received at the start of the last round
            (None without aggregation).
        personal: site -> its personal state after the last round.
        models: site -> its model after the last round (eq. 7 applied).
        optimizers: site -> its Adam state after the last round.
        history: one row per site and round: the round's mean loss terms.
    """

    scored: dict[str, FedSRModel]
    global_state: dict[str, torch.Tensor] | None
    last_received: dict[str, torch.Tensor] | None
    personal: dict[str, dict[str, torch.Tensor]]
    models: dict[str, FedSRModel]
    optimizers: dict[str, dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)


def simulate_federation(
    method: FedSRMethod,
    config: FedSRConfig,
    volumes: Mapping[str, Sequence[torch.Tensor]],
    atlas_image: torch.Tensor,
    atlas_label: torch.Tensor,
    *,
    rounds: int,
    local_steps: int,
    finetune_rounds: int,
    lr: float,
    seed: int,
    weights: FedSRLossWeights | None = None,
    alpha: float = 0.5,
    aggregate: bool = True,
    initial: FedSRModel | None = None,
    initial_optimizer: Mapping[str, Any] | None = None,
    first_round: int = 0,
    label: str = "",
    clock: Callable[[], float] = time.monotonic,
) -> FederationResult:
    """Run a FedSR-plan federation in this process (no Fed-BioMed), the plan's semantics round by round.

    Per round and site: the global shared state is loaded (`is_shared_parameter`); the site keeps
    its personal parts and its own Adam state between rounds; torch is reseeded with
    ``round_seed(seed, round, site)``; `FedSRUpdater` (encoder frozen in the last
    ``finetune_rounds``), ``initialise_sa``, ``local_steps`` Adam updates of one volume each (a
    shuffled pass over the site's volumes, reshuffled when exhausted, as Fed-BioMed's data loader
    with ``batch_size`` 1), a copy of the model to score, ``finish_round``. Then the server averages
    the sent shared states weighted by the sites' numbers of training volumes.

    Args:
        method: the method (what is shared and used).
        config: the network's sizes.
        volumes: site -> its training volumes (1, X, Y, Z).
        atlas_image: (1, 1, X, Y, Z).
        atlas_label: (1, 1, X, Y, Z).
        rounds: rounds to run.
        local_steps: updates per site and round.
        finetune_rounds: the last rounds with the encoder frozen.
        lr: Adam's learning rate.
        seed: the run's seed (initial weights; with the round and site, each round's seed).
        weights: the loss weights (None: the paper's).
        alpha: eq. 7's smoothing coefficient.
        aggregate: False: every site trains alone (standalone).
        initial: the model every site starts from (None: a fresh one seeded by `seed`).
        initial_optimizer: the Adam state every site starts from (None: fresh).
        first_round: the first round's index (seeds and the fine-tuning schedule count from it).
        label: the progress lines' prefix.
        clock: the time source of the progress lines.

    Returns:
        The sites' scored and final models, the global state, the history.
    """
    if initial is None:
        torch.manual_seed(seed)  # the coordinator's initial model: every site starts from the same weights
        initial = FedSRModel(config, method)
    sites = list(volumes)
    models = {s: copy.deepcopy(initial) for s in sites}
    optimizers = {s: torch.optim.Adam(models[s].parameters(), lr=lr) for s in sites}
    if initial_optimizer is not None:
        for s in sites:
            optimizers[s].load_state_dict(copy.deepcopy(dict(initial_optimizer)))
    site_weights = {s: float(len(volumes[s])) for s in sites}
    global_state = shared_state(initial) if aggregate else None
    last_received: dict[str, torch.Tensor] | None = None
    scored: dict[str, FedSRModel] = {}
    history: list[dict[str, Any]] = []
    total_rounds = first_round + rounds
    start = clock()
    for r in range(first_round, total_rounds):
        finetune = finetune_rounds > 0 and r >= total_rounds - finetune_rounds
        sent: dict[str, dict[str, torch.Tensor]] = {}
        if global_state is not None:
            last_received = {k: v.clone() for k, v in global_state.items()}
        round_losses: list[dict[str, float]] = []
        for s in sites:
            model, optimizer = models[s], optimizers[s]
            if global_state is not None:
                model.load_state_dict(global_state, strict=False)  # the shared parts arrive; personal ones stay
            torch.manual_seed(round_seed(seed, r, s))
            updater = FedSRUpdater(model, atlas_image, atlas_label, weights, alpha=alpha, finetune=finetune)
            updater.initialise_sa()
            model.train()
            order: list[int] = []
            for _ in range(local_steps):
                if not order:
                    order = torch.randperm(len(volumes[s])).tolist()
                optimizer.zero_grad(set_to_none=True)
                updater.loss(volumes[s][order.pop(0)].unsqueeze(0)).backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
                optimizer.step()
            if r == total_rounds - 1:
                scored[s] = copy.deepcopy(model)  # the plan scores before eq. 7: with the f the decoders trained with
            means = updater.finish_round()
            round_losses.append(means)
            history.append({"round": r, "site": s, "finetune": finetune, **means})
            sent[s] = shared_state(model)
        if global_state is not None:
            global_state = federated_average(sent, site_weights)
        mean = {k: statistics.fmean(m[k] for m in round_losses) for k in ("loss_registration", "loss_segmentation")}
        logger.info("%s round %d/%d%s: %.0f s, loss reg %.3f seg %.3f", label, r + 1, total_rounds, " (fine-tuning)" if finetune else "",
                    clock() - start, mean["loss_registration"], mean["loss_segmentation"])  # fmt: skip
    return FederationResult(
        scored=scored,
        global_state=global_state,
        last_received=last_received,
        personal={s: personal_state(models[s]) for s in sites},
        models=models,
        optimizers={s: copy.deepcopy(optimizers[s].state_dict()) for s in sites},
        history=history,
    )


# -- scoring --------------------------------------------------------------------------------------


def _flat(seg: Mapping[str, Any], reg: Mapping[str, Any], classes: Mapping[str, int], n: int) -> dict[str, float]:
    """The summaries as flat numbers: means over cases of the per-case means, and per structure."""
    nan = float("nan")
    out: dict[str, float] = {"n_cases": float(n)}
    for m in SEG_METRICS:
        out[f"seg_{m}"] = float(seg["mean_over_structures"][m]["mean"]) if m in seg["mean_over_structures"] else nan
    for m in REG_METRICS:
        out[f"reg_{m}"] = float(reg["case"][m]["mean"]) if m in reg["case"] else nan
    for name in classes:
        per, rper = seg["structures"].get(name, {}), reg["structures"].get(name, {})
        for m in ("dice", "hd95_mm"):
            out[f"seg_{m}.{name}"] = float(per[m]["mean"]) if m in per else nan
        out[f"reg_dice.{name}"] = float(rper["dice"]["mean"]) if "dice" in rper else nan
    return out


def score_cases(
    cases: Sequence[EvaluationCase], atlas_image: torch.Tensor, atlas_label: torch.Tensor, classes: Mapping[str, int], model: FedSRModel | None
) -> dict[str, Any]:
    """A site's labelled cases scored as the plan scores them; ``model`` None: no registration (the floor).

    Args:
        cases: the site's evaluation cases.
        atlas_image: (1, 1, X, Y, Z).
        atlas_label: (1, 1, X, Y, Z).
        classes: structure name -> class id (no background).
        model: the site's personalised model, or None for the unwarped atlas as prediction and
            registration.

    Returns:
        ``{"metrics": flat means, "segmentation": summary, "registration": summary}``.
    """
    segmentation, registration = [], []
    for image, label, spacing in cases:
        reference = label[0].long()
        if model is None:
            predicted, warped_label, warped_image = atlas_label[0, 0], atlas_label[0, 0], atlas_image[0, 0]
        else:
            batch = image.unsqueeze(0)
            predicted = segment_volume(model, batch)[0, 0]
            reg = register_atlas(model, batch, atlas_image, atlas_label)
            warped_label, warped_image = reg.warped_label[0, 0], reg.warped_image[0, 0]
        segmentation.append(segmentation_case_metrics(predicted, reference, classes, spacing))
        registration.append(registration_case_metrics(warped_label, reference, warped_image, image[0], classes))
    seg, reg_summary = summarise(segmentation), summarise(registration)
    return {"metrics": _flat(seg, reg_summary, classes, len(cases)), "segmentation": seg, "registration": reg_summary}


# -- one method, one seed ------------------------------------------------------------------------


def run_method(
    name: str,
    seed: int,
    cfg: BenchmarkConfig,
    data: Mapping[str, SiteVolumes],
    atlas_image: torch.Tensor,
    atlas_label: torch.Tensor,
    config: FedSRConfig,
) -> tuple[dict[str, FedSRModel], dict[str, FederationResult], dict[str, FedSRModel]]:
    """Train one method with one seed.

    Args:
        name: a method of `METHODS`.
        seed: the training seed.
        cfg: the run's configuration.
        data: site -> its volumes.
        atlas_image: (1, 1, X, Y, Z).
        atlas_label: (1, 1, X, Y, Z).
        config: the network's sizes.

    Returns:
        site -> the model it scores; the federations run (by stage name); extra models to score
        under other names (``fedavg_global``: site -> the averaged global model).
    """
    weights = FedSRLossWeights(registration_mutual_information=cfg.mutual_information, segmentation_mutual_information=cfg.mutual_information)
    training = {s: data[s].training for s in cfg.sites}
    common: dict[str, Any] = {"lr": cfg.lr, "seed": seed, "weights": weights, "alpha": cfg.alpha}
    if name in FEDERATED:
        fed = simulate_federation(FEDSR_METHODS[name], config, training, atlas_image, atlas_label, rounds=cfg.rounds, local_steps=cfg.local_steps,
                                  finetune_rounds=cfg.finetune_rounds, label=f"{name} seed {seed}", **common)  # fmt: skip
        extra: dict[str, FedSRModel] = {}
        if name == "fedavg" and fed.global_state is not None:
            global_model = copy.deepcopy(fed.models[cfg.sites[0]])
            global_model.load_state_dict(fed.global_state, strict=False)  # FedAvg shares everything but the (unused) critics
            extra = {s: global_model for s in cfg.sites}
        return fed.scored, {"federation": fed}, extra
    plain = FEDSR_METHODS["fedrep"]  # a plain JRS network: no SA representation, SCIE or MI
    if name == "standalone":
        alone = simulate_federation(plain, config, training, atlas_image, atlas_label, rounds=cfg.rounds, local_steps=cfg.local_steps,
                                    finetune_rounds=cfg.finetune_rounds, aggregate=False, label=f"standalone seed {seed}", **common)  # fmt: skip
        return alone.scored, {"standalone": alone}, {}
    if name != "centralised":
        raise ValueError(f"unknown method {name!r}")
    pooled = {CENTRAL_SITE: [v for s in cfg.sites for v in training[s]]}
    pre_rounds = cfg.rounds - cfg.finetune_rounds
    # as many updates as the federated encoder gets in all: every site's local steps of every encoder round
    central = simulate_federation(plain, config, pooled, atlas_image, atlas_label, rounds=pre_rounds, local_steps=cfg.local_steps * len(cfg.sites),
                                  finetune_rounds=0, aggregate=False, label=f"centralised seed {seed}", **common)  # fmt: skip
    stages = {"pretraining": central}
    if cfg.finetune_rounds == 0:
        return {s: central.scored[CENTRAL_SITE] for s in cfg.sites}, stages, {}
    scored: dict[str, FedSRModel] = {}
    for s in cfg.sites:
        tuned = simulate_federation(plain, config, {s: training[s]}, atlas_image, atlas_label, rounds=cfg.finetune_rounds, local_steps=cfg.local_steps,
                                    finetune_rounds=cfg.finetune_rounds, aggregate=False, initial=central.models[CENTRAL_SITE],
                                    initial_optimizer=central.optimizers[CENTRAL_SITE], first_round=pre_rounds,
                                    label=f"centralised seed {seed} fine-tuning {s}", **common)  # fmt: skip
        scored[s] = tuned.scored[s]
        stages[f"finetuning {s}"] = tuned
    return scored, stages, {}


# -- the whole benchmark -------------------------------------------------------------------------


@dataclass
class BenchmarkResult:
    """Everything one benchmark run measured.

    Args:
        config: the run's configuration.
        scores: method -> seed -> site -> `score_cases`'s result.
        floor: site -> the no-registration scores.
        federations: (method, seed) -> stage -> the federation run.
        wall_s: (method, seed) -> training and scoring seconds.
        history: (method, seed) -> stage -> the rounds' mean loss terms per site.
        total_s: the whole run's seconds.
        markdown: the tables.
    """

    config: BenchmarkConfig
    scores: dict[str, dict[int, dict[str, dict[str, Any]]]]
    floor: dict[str, dict[str, Any]]
    federations: dict[tuple[str, int], dict[str, FederationResult]]
    wall_s: dict[tuple[str, int], float]
    history: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    total_s: float = 0.0
    markdown: str = ""


def run_benchmark(cfg: BenchmarkConfig, workdir: Path, keep_federations: bool = True) -> BenchmarkResult:
    """Build the data once, then train and score every method with every seed.

    Args:
        cfg: the run's configuration.
        workdir: where the phantom sites, prepared datasets and atlas are written.
        keep_federations: keep every federation's models in the result (a test inspects them).

    Returns:
        The scores, the floor and (optionally) the federations.
    """
    t_start = time.monotonic()
    schema = load_schema("brain-mri")
    classes = {name: idx for name, idx in schema.classes.items() if idx != 0}
    data, atlas_image, atlas_label = build_data(cfg, workdir)
    config = network_config(cfg.size, schema)
    floor = {s: score_cases(data[s].evaluation, atlas_image, atlas_label, classes, None) for s in cfg.sites}
    result = BenchmarkResult(config=cfg, scores={}, floor=floor, federations={}, wall_s={})
    logger.info("data ready in %.0f s: %d sites, volume %d^3 at %.1f mm; %d methods x %d seeds", time.monotonic() - t_start, len(cfg.sites),
                cfg.volume, cfg.spacing_mm[0], len(cfg.methods), len(cfg.seeds))  # fmt: skip
    for seed in cfg.seeds:
        for name in cfg.methods:
            t0 = time.monotonic()
            scored, stages, extra = run_method(name, seed, cfg, data, atlas_image, atlas_label, config)
            score_sets = {name: scored, **({FEDAVG_GLOBAL: extra} if extra else {})}
            for label, models in score_sets.items():
                result.scores.setdefault(label, {})[seed] = {
                    s: score_cases(data[s].evaluation, atlas_image, atlas_label, classes, models[s]) for s in cfg.sites
                }
            result.wall_s[(name, seed)] = time.monotonic() - t0
            result.history[(name, seed)] = {stage: fed.history for stage, fed in stages.items()}
            if keep_federations:
                result.federations[(name, seed)] = stages
            dice = statistics.fmean(result.scores[name][seed][s]["metrics"]["seg_dice"] for s in cfg.sites)
            logger.info("%s seed %d done in %.0f s (total %.0f s): mean S-Dice %.3f", name, seed, result.wall_s[(name, seed)], time.monotonic() - t_start, dice)
    result.total_s = time.monotonic() - t_start
    result.markdown = markdown_tables(result)
    return result


# -- tables ---------------------------------------------------------------------------------------


def seed_stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample sd (ddof 1) and n over seeds, NaNs left out.

    Args:
        values: one number per seed.

    Returns:
        ``{"mean", "sd", "n"}`` (sd NaN below two values).
    """
    kept = [v for v in values if not math.isnan(v)]
    return {
        "mean": statistics.fmean(kept) if kept else float("nan"),
        "sd": statistics.stdev(kept) if len(kept) > 1 else float("nan"),
        "n": float(len(kept)),
    }


def summary_table(result: BenchmarkResult) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Method -> site (and ``all``: the mean over sites) -> metric -> mean, sd, n over seeds.

    Args:
        result: the benchmark's result.

    Returns:
        The summary; the floor under `FLOOR` (no seed dependence: sd NaN).
    """
    sites = list(result.config.sites)
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for method, per_seed in result.scores.items():
        seeds = sorted(per_seed)
        keys = list(per_seed[seeds[0]][sites[0]]["metrics"])
        rows: dict[str, dict[str, dict[str, float]]] = {}
        for s in sites:
            rows[s] = {k: seed_stats([per_seed[seed][s]["metrics"][k] for seed in seeds]) for k in keys}
        rows["all"] = {k: seed_stats([_nanmean([per_seed[seed][s]["metrics"][k] for s in sites]) for seed in seeds]) for k in keys}
        out[method] = rows
    keys = list(result.floor[sites[0]]["metrics"])
    out[FLOOR] = {s: {k: seed_stats([result.floor[s]["metrics"][k]]) for k in keys} for s in sites}
    out[FLOOR]["all"] = {k: seed_stats([_nanmean([result.floor[s]["metrics"][k] for s in sites])]) for k in keys}
    return out


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else float("nan")


def _fmt(stats: Mapping[str, float], scale: float = 1.0, digits: int = 1) -> str:
    mean, sd = stats["mean"] * scale, stats["sd"] * scale
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _row_order(result: BenchmarkResult) -> list[str]:
    order = [m for m in (*METHODS[:2], FEDAVG_GLOBAL, *METHODS[2:]) if m in result.scores]
    return [*order, FLOOR]


def markdown_tables(result: BenchmarkResult) -> str:
    """The paper's Table I and Table IV layouts, all segmentation and registration metrics, per structure.

    Args:
        result: the benchmark's result.

    Returns:
        Markdown.
    """
    cfg = result.config
    summary = summary_table(result)
    sites = list(cfg.sites)
    rows = _row_order(result)
    n_cases = cfg.eval_cases
    seeds = ", ".join(str(s) for s in cfg.seeds)
    lines = [
        f"Mean ± sd over training seeds ({seeds}; n = {len(cfg.seeds)}) of each site's mean over its {n_cases} labelled cases. "
        f"Dice in %, HD95 and ASD in mm, AVD in % of the reference volume; NCC: local (9-voxel windows, squared) unless named.",
        "",
        "**Table I layout: per site, segmentation (S-Dice, HD95) and registration (R-Dice, local NCC)**",
        "",
        "| method | " + " | ".join(f"{s} S-Dice | {s} HD95 | {s} R-Dice | {s} NCC" for s in sites) + " | all S-Dice | all R-Dice |",
        "| --- |" + " --- |" * (4 * len(sites) + 2),
    ]
    for m in rows:
        r = summary[m]
        cells = []
        for s in sites:
            cells += [_fmt(r[s]["seg_dice"], 100), _fmt(r[s]["seg_hd95_mm"], 1, 1), _fmt(r[s]["reg_dice_mean"], 100), _fmt(r[s]["reg_local_ncc"], 1, 3)]
        cells += [_fmt(r["all"]["seg_dice"], 100), _fmt(r["all"]["reg_dice_mean"], 100)]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    ablation = [m for m in ABLATION_ROWS if m in result.scores]
    if ablation:
        lines += ["", "**Table IV layout: ablation, mean over sites (S-Dice / R-Dice, %)**", "", "| variant | S-Dice | R-Dice |", "| --- | --- | --- |"]
        for m in ablation:
            lines.append(f"| {ABLATION_NAMES[m]} | {_fmt(summary[m]['all']['seg_dice'], 100)} | {_fmt(summary[m]['all']['reg_dice_mean'], 100)} |")
        lines.append(f"| {NAMES[FLOOR]} | {_fmt(summary[FLOOR]['all']['seg_dice'], 100)} | {_fmt(summary[FLOOR]['all']['reg_dice_mean'], 100)} |")
    lines += [
        "",
        "**All metrics, mean over sites**",
        "",
        "| method | S-Dice | Jaccard | HD95 | ASD | AVD % | R-Dice | NCC global | NCC brain | NCC local |",
        "| --- |" + " --- |" * 9,
    ]
    for m in rows:
        a = summary[m]["all"]
        lines.append(
            f"| {NAMES[m]} | {_fmt(a['seg_dice'], 100)} | {_fmt(a['seg_jaccard'], 100)} | {_fmt(a['seg_hd95_mm'])} | {_fmt(a['seg_asd_mm'])} | "
            f"{_fmt(a['seg_avd_percent'])} | {_fmt(a['reg_dice_mean'], 100)} | {_fmt(a['reg_ncc'], 1, 3)} | {_fmt(a['reg_ncc_foreground'], 1, 3)} | "
            f"{_fmt(a['reg_local_ncc'], 1, 3)} |"
        )
    schema = load_schema("brain-mri")
    structures = [n for n, i in schema.classes.items() if i != 0]
    lines += ["", "**Segmentation Dice per structure (%), mean over sites and seeds**", "",
              "| method | " + " | ".join(structures) + " |", "| --- |" + " --- |" * len(structures)]  # fmt: skip
    for m in rows:
        a = summary[m]["all"]
        lines.append(f"| {NAMES[m]} | " + " | ".join(f"{a[f'seg_dice.{n}']['mean'] * 100:.1f}" for n in structures) + " |")
    return "\n".join(lines) + "\n"


def to_json(result: BenchmarkResult, command: str) -> dict[str, Any]:
    """Every number of a run, JSON-ready (NaN as null).

    Args:
        result: the benchmark's result.
        command: the command line that ran it.

    Returns:
        The record.
    """
    record = nan_to_none(
        {
            "command": command,
            "config": asdict(result.config),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads()},
            "total_wall_s": result.total_s,
            "wall_s": {f"{m} seed {s}": v for (m, s), v in result.wall_s.items()},
            "summary": summary_table(result),
            "floor": result.floor,
            "scores": {m: {str(seed): sites for seed, sites in per_seed.items()} for m, per_seed in result.scores.items()},
            "history": {f"{m} seed {s}": stages for (m, s), stages in result.history.items()},
        }
    )
    assert isinstance(record, dict)  # nan_to_none keeps the structure
    return record


# -- the command line ----------------------------------------------------------------------------

QUICK = {"seeds": [0], "sites": ["site-a", "site-b"], "train_cases": 2, "eval_cases": 1, "volume": 24, "rounds": 2, "local_steps": 2, "finetune_rounds": 1}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The parsed options (``--quick`` applied).
    """
    d = BenchmarkConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    ap.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS)
    ap.add_argument("--sites", nargs="+", default=list(d.sites), choices=sorted(BRAIN_SITES))
    ap.add_argument("--train-cases", type=int, default=d.train_cases, help="unlabelled training volumes per site")
    ap.add_argument("--eval-cases", type=int, default=d.eval_cases, help="labelled evaluation cases per site")
    ap.add_argument("--volume", type=int, default=d.volume, help="volume edge (voxels, multiple of 8); spacing 192 mm / volume")
    ap.add_argument("--size", default=d.size, choices=("tiny", "small"))
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument("--local-steps", type=int, default=d.local_steps)
    ap.add_argument("--finetune-rounds", type=int, default=d.finetune_rounds)
    ap.add_argument(
        "--lr",
        type=float,
        default=d.lr,
        help="Adam's learning rate, every method alike (default 3e-3; the plan's and paper's 1e-4 barely moves at this budget: docs/results/fedsr.md)",
    )
    ap.add_argument("--alpha", type=float, default=d.alpha)
    ap.add_argument("--mutual-information", type=float, default=d.mutual_information, help="the MI terms' weight")
    ap.add_argument("--data-seed", type=int, default=d.data_seed)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave the other core to others)")
    ap.add_argument("--quick", action="store_true", help="tiny everything: 2 sites x 2 volumes, 24^3, 2 rounds x 2 steps, one seed")
    ap.add_argument("--workdir", type=Path, default=None, help="where the phantom data go (default: a temporary folder)")
    ap.add_argument("--out", type=Path, required=True, help="folder for benchmark.json and results.md")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def config_from(args: argparse.Namespace) -> BenchmarkConfig:
    """The configuration the options describe.

    Args:
        args: `parse_args`'s result.

    Returns:
        The configuration.
    """
    return BenchmarkConfig(
        seeds=tuple(dict.fromkeys(args.seeds)), methods=tuple(dict.fromkeys(args.methods)), sites=tuple(args.sites), train_cases=args.train_cases,
        eval_cases=args.eval_cases, volume=args.volume, size=args.size, rounds=args.rounds, local_steps=args.local_steps,
        finetune_rounds=args.finetune_rounds, lr=args.lr, alpha=args.alpha, mutual_information=args.mutual_information, data_seed=args.data_seed,
    )  # fmt: skip


def run(args: argparse.Namespace, keep_federations: bool = False) -> BenchmarkResult:
    """Run the benchmark the options describe and write ``benchmark.json`` and ``results.md``.

    Args:
        args: `parse_args`'s result.
        keep_federations: keep the federations' models in the result.

    Returns:
        The result.
    """
    torch.set_num_threads(args.threads)
    cfg = config_from(args)
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([".venv/bin/python", "benchmarks/fedsr_methods.py", *_argv(args)])
    if args.workdir is not None:
        result = run_benchmark(cfg, args.workdir, keep_federations)
    else:
        with tempfile.TemporaryDirectory(prefix="fedsr-bench-") as tmp:
            result = run_benchmark(cfg, Path(tmp), keep_federations)
    (args.out / "benchmark.json").write_text(json.dumps(to_json(result, command), indent=1))
    (args.out / "results.md").write_text(f"Command: `{command}`; total {result.total_s / 60:.1f} min.\n\n" + result.markdown)
    return result


def _argv(args: argparse.Namespace) -> list[str]:
    """The options as a command line (what `run` records)."""
    if args.quick:
        return ["--quick", "--out", str(args.out)]
    out = ["--seeds", *map(str, args.seeds), "--methods", *args.methods, "--sites", *args.sites]
    for key in (
        "train_cases",
        "eval_cases",
        "volume",
        "size",
        "rounds",
        "local_steps",
        "finetune_rounds",
        "lr",
        "alpha",
        "mutual_information",
        "data_seed",
        "threads",
    ):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return [*out, "--out", str(args.out)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        0.
    """
    setup_logging()
    # once-per-call notices of other libraries that would bury the progress lines
    logging.getLogger("monai.networks.blocks.Warp").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    args = parse_args(argv)
    result = run(args)
    print(result.markdown)
    print(f"total {result.total_s / 60:.1f} min; written: {args.out / 'benchmark.json'}, {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
