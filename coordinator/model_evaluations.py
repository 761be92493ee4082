"""What sites chose to send about a published model on their own cases (`site-agent evaluate --send`).

Only aggregates are accepted, by construction (`SentEvaluation`): per class of the model and
per metric of `pipelines.metrics` the mean, median and n (no mean or median behind fewer than
``MIN_CASES_SENT`` cases, and at least that many cases in all); the number of cases; the
modality; whether lesions were merged. Anything else (a case id, a per-case list, a dataset name, an
unknown key) is refused. The site is the token's, never the body's claim. Stored as
``<home>/model-evaluations/<name>/<version>/<site>.json`` (a site's newest evaluation of a
version replaces its older one), outside the registry's immutable versions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError

from coordinator import registry as R
from fedimg_core import atomic
from fedimg_core.config import ConfigModel, problems_of
from fedimg_core.errors import UserError
from fedimg_core.registry_wire import MIN_CASES_SENT
from pipelines.metrics import METRICS

FOLDER = "model-evaluations"

__all__ = ["FOLDER", "SentEvaluation", "read_evaluations", "store_evaluation"]


class Summary(ConfigModel):
    """One metric of one class over the site's cases."""

    mean: float | None = None
    median: float | None = None
    n: Annotated[int, Field(ge=0, le=10**7)]


class SentEvaluation(ConfigModel):
    """The body of ``POST /registry/model/<name>/<version>/evaluations``: aggregates only."""

    site: str | None = None  # ignored: the token says which site sent it
    model: str
    weights_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    modality: Annotated[str, Field(max_length=16)]
    cases: Annotated[int, Field(ge=1, le=10**7)]
    merge_lesions: bool
    classes: dict[str, dict[str, Summary]]


def _finite(v: float | None) -> bool:
    return v is None or math.isfinite(v)


def store_evaluation(home: Path, name: str, version: str, site: str, body: Any) -> dict[str, Any]:
    """Validate a site's aggregate against the published version and store it.

    Args:
        home: the coordinator's home.
        name: the model package's name.
        version: its version (``vNNNN``).
        site: the sending site (from its token).
        body: the parsed JSON body.

    Returns:
        What was stored.

    Raises:
        RegistryError: no such version, or a body that is not an aggregate of this model.
    """
    reg = R.Registry(home)
    record = reg.get("model", name, version)
    try:
        sent = SentEvaluation.model_validate(body)
    except ValidationError as exc:
        raise R.RegistryError(f"not an aggregate evaluation: {'; '.join(f'{k}: {p}' for k, p in problems_of(exc, SentEvaluation))}") from None
    config = json.loads((reg.path("model", name, version) / "package.json").read_text(encoding="utf-8"))
    if sent.weights_sha256 != record["files"]["model.safetensors"]["sha256"]:
        raise R.RegistryError(f"model {name} {version}: the evaluation is of other weights (sha256 {sent.weights_sha256[:12]}...)")
    classes = set(config["classes"]) - {"background"}
    unknown = sorted(set(sent.classes) - classes)
    if unknown:
        raise R.RegistryError(f"model {name} {version}: classes {unknown} are not classes the model predicts ({', '.join(sorted(classes))})")
    for cls, metrics in sent.classes.items():
        bad = sorted(set(metrics) - set(METRICS))
        if bad:
            raise R.RegistryError(f"classes.{cls}: unknown metrics {bad}; expected some of {', '.join(METRICS)}")
        for metric, s in metrics.items():
            if not (_finite(s.mean) and _finite(s.median)):
                raise R.RegistryError(f"classes.{cls}.{metric}: mean and median must be finite numbers or null")
    if sent.cases < MIN_CASES_SENT:
        raise R.RegistryError(f"an evaluation of {sent.cases} cases: at least {MIN_CASES_SENT} are needed (fewer would say too much about each patient)")
    for cls, metrics in sent.classes.items():
        for metric, s in metrics.items():
            if s.n < MIN_CASES_SENT and (s.mean is not None or s.median is not None):
                raise R.RegistryError(f"classes.{cls}.{metric}: a mean or median of {s.n} cases; send null below {MIN_CASES_SENT} cases")
    if sent.modality not in config.get("modalities", []):
        raise R.RegistryError(f"modality {sent.modality!r} is not one the model has an intensity rule for")
    stored = {"site": site, "model": f"{name}@{version}", **sent.model_dump(exclude={"site", "model"})}
    target = Path(home) / FOLDER / name / version / f"{site}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(target, stored)
    return stored


def read_evaluations(home: Path, name: str, version: str | None = None) -> list[dict[str, Any]]:
    """The aggregates sites sent about a model package (every version, or one).

    Args:
        home: the coordinator's home.
        name: the package's name.
        version: one version (None: all).

    Returns:
        The stored aggregates, by version then site.

    Raises:
        UserError: an unreadable stored file.
    """
    base = Path(home) / FOLDER / name
    folders = [base / version] if version else sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    out = []
    for folder in folders:
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                out.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                raise UserError(f"{path}: unreadable ({exc})") from None
    return out
