"""`site-agent infer`: segment NIfTI volumes, DICOM series or prepared datasets with an adapted model.

Writes a NIfTI label on each input's grid (and a DICOM SEG for DICOM input on request);
every output path is checked before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipelines.adaptation import volumes as V
from pipelines.adaptation.training import AdaptedModel
from pipelines.factory.slices import SliceSettings
from preprocessing.dataset import DatasetError, load_dataset
from preprocessing.schema import LabelSchema, parse_schema
from site_agent.adapt_common import job_device, log
from site_agent.config import SiteConfig
from site_agent.errors import UserError

__all__ = ["run_infer", "schema_name"]


def run_infer(model_path: str | Path, inputs: list[str], out: Path, mode: str = "average", dicom_seg: bool = False,
              modality: str | None = None, overwrite: bool = False, device: str | None = None,
              site: SiteConfig | None = None) -> list[dict]:  # fmt: skip
    """Segment NIfTI volumes, DICOM series folders or prepared datasets with an adapted model;
    writes ``<out>/<name>.nii.gz`` (label on the input grid) and, for DICOM input with
    ``dicom_seg``, ``<out>/<name>.seg.dcm``. ``<name>`` is the input's name
    (`pipelines.adaptation.volumes.output_stem`) or a dataset's case id. Each written
    volume is logged at INFO.

    Every output path is checked before anything is written: two inputs with the same name,
    or an output file already there (an earlier run's label, perhaps of another patient)
    without `overwrite`, refuse the whole run.

    Args:
        model_path: the adapted model's ``model.pt``.
        inputs: NIfTI files, DICOM series folders or prepared dataset folders.
        out: the output folder (created).
        mode: which branch predicts (``average``, ``target``, ``source``).
        dicom_seg: also write a DICOM SEG for DICOM series inputs.
        modality: CT or MR, for NIfTI inputs.
        overwrite: replace output files that already exist.
        device: where the network runs: auto, cpu, cuda or cuda:N (None: the site's
            ``device``, auto without a site); the labels are the same wherever it runs, up
            to the device's float rounding.
        site: the site whose ``device`` is the default (None: none).

    Returns:
        One row per written volume (input, label path, voxels per class, DICOM SEG path).

    Raises:
        UserError: a device this machine lacks, a bad model or input, clashing or existing
            outputs (nothing written then).
    """
    on = job_device(site, device)  # first: a device this machine lacks is refused before any work
    try:
        model = AdaptedModel.load(model_path).to(on)  # model.pt holds CPU tensors
    except ValueError as exc:
        raise UserError(str(exc)) from None
    schema = parse_schema(model.meta["schema_definition"], f"{model_path}: schema_definition")
    log.debug("model %s: %s model of classes %s, predicting with mode %s", model_path, model.kind, ", ".join(model.class_names), mode)
    sk = model.meta["slices"]
    spacing = sk["spacing"]
    settings = SliceSettings(size=sk["size"], n_bins=sk["n_bins"], spacing=tuple(spacing) if isinstance(spacing, list) else spacing, min_foreground=0.0)
    ids = model.class_ids

    def predict_fn(x, bins):
        p = model.predict(x, mode) if x.shape[0] > 1 else model.predict(torch.cat([x, x]), mode)[:1]
        p = p.cpu()  # the branch's few classes leave the device, not the schema's many
        full = torch.zeros(p.shape[0], schema.num_classes, *p.shape[2:])
        full[:, ids] = p
        return full

    jobs: list[tuple[str, str, Path, str | None]] = []  # (name, kind, source, modality)
    for item in inputs:
        p = Path(item)
        if (p / "manifest.json").is_file():
            try:
                ds = load_dataset(p)
            except DatasetError as exc:
                raise UserError(f"{p}: {exc}") from None
            jobs += [(c.case_id, "nifti", c.image, ds.modality) for c in ds.cases]
        elif p.is_dir():
            jobs.append((_output_stem(V, p), "dicom", p, modality))
        elif p.is_file():
            if modality is None:
                raise UserError(f"{p}: a NIfTI input needs --modality (CT or MR)")
            jobs.append((_output_stem(V, p), "nifti", p, modality))
        else:
            raise UserError(f"{p}: no such file or folder")
    seen: dict[str, Path] = {}
    for name, _, src, _ in jobs:  # one output per name: refuse before writing anything over another
        if name in seen:
            raise UserError(f"{seen[name]} and {src} would both write {out / name}.nii.gz; run them with separate --out folders (or rename one)")
        seen[name] = src
    if dicom_seg and not any(k == "dicom" for _, k, _, _ in jobs):
        raise UserError("--dicom-seg needs a DICOM series folder as input")
    for name, _, src, mod in jobs:
        if mod is not None and mod not in schema.modalities:
            raise UserError(f"{src}: modality {mod!r} has no intensity rule in schema {schema.name} ({', '.join(schema.modalities)})")
    if not overwrite:
        # An earlier run's label may be another patient's under the same name (case_a of
        # another folder): never replace it silently. lexists: a dangling link counts too.
        targets = [out / f"{name}.nii.gz" for name, _, _, _ in jobs]
        targets += [out / f"{name}.seg.dcm" for name, kind, _, _ in jobs if kind == "dicom" and dicom_seg]
        existing = [t for t in targets if os.path.lexists(t)]
        if existing:
            more = f" (and {len(existing) - 1} more output(s) of this run)" if len(existing) > 1 else ""
            raise UserError(f"{existing[0]} already exists{more}; pass --overwrite to replace it, or choose another --out")
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for name, kind, src, mod in jobs:
        try:
            if kind == "dicom":
                files = sorted(f for f in Path(src).rglob("*") if f.is_file() and not f.name.startswith("."))
                pred = V.predict_dicom_series(files, schema, settings, predict_fn, modality=mod)
            else:
                assert mod is not None  # a NIfTI job always has one: its dataset's, or --modality (checked above)
                pred = V.predict_volume_2d(src, mod, schema, settings, predict_fn)
        except (ValueError, OSError) as exc:
            raise UserError(f"{src}: {exc}") from None
        target = out / f"{name}.nii.gz"
        pred.save_nifti(target)
        row = {"input": str(src), "label": str(target), "voxels": {schema_name(schema, c): int((pred.label == c).sum()) for c in ids[1:]}}
        if kind == "dicom" and dicom_seg:
            seg_path = out / f"{name}.seg.dcm"
            assert pred.sources is not None  # predict_dicom_series gives the instance files
            V.write_dicom_seg(pred.label, pred.sources, {c: schema_name(schema, c) for c in ids[1:]}, seg_path, schema)
            row["dicom_seg"] = str(seg_path)
        log.info("%s: %s", name, target)
        rows.append(row)
    return rows


def _output_stem(volumes, path: Path) -> str:
    try:
        return volumes.output_stem(path)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def schema_name(schema: LabelSchema, class_id: int) -> str:
    """The name of a class of the label schema.

    Args:
        schema: the federation's label schema.
        class_id: one of its class ids.

    Returns:
        The class's name.
    """
    return next(k for k, v in schema.classes.items() if v == class_id)
