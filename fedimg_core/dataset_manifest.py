"""The prepared-dataset format's two JSON files: ``manifest.json`` and ``dataset.json``, as models.

A prepared dataset (``site-agent prepare``) is a folder::

    <root>/dataset.json      name, labels, channel names, "training" list of image/label pairs
                             (MONAI's decathlon loader and nnU-Net-style tools read it)
    <root>/manifest.json     format version, schema, per-case geometry and sha256 of every output
    <root>/imagesTr/<case>.nii.gz
    <root>/labelsTr/<case>.nii.gz
    <root>/labelsRef/<case>.nii.gz  optional test-only reference labels (classes the site does
                             not train on; never in dataset.json, never used for training)

The models are what the writers write and the readers check. Readers are lenient where a
manifest may come from another version of fedimg (keys they do not know are kept, not
refused); writers fill every key they know. `preprocessing.dataset` reads and writes the
folders (NIfTI files included).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, SerializeAsAny, field_validator

from fedimg_core import atomic
from fedimg_core.config import ConfigModel, validate_config
from fedimg_core.errors import ConfigError, FedimgError

__all__ = [
    "CONVERTER_VERSION",
    "DATASET_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "SUPPORTED_VERSIONS",
    "CaseRecord",
    "DatasetDescription",
    "DatasetError",
    "DatasetSchemaError",
    "Manifest",
    "ManifestCase",
    "SchemaRef",
    "NnunetCase",
    "TrainingEntry",
    "describe_cases",
    "read_description",
    "read_manifest",
    "write_description",
    "write_manifest",
]

FORMAT_NAME = "fedimg-prepared-dataset"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # v1: before the DICOM converter (no schema block); read as-is
CONVERTER_VERSION = "0.2.0"
MANIFEST_FILE = "manifest.json"
DATASET_FILE = "dataset.json"


class DatasetError(FedimgError):
    """A folder is not a valid prepared dataset. The message names the file and the problem."""


class DatasetSchemaError(FedimgError, ValueError):
    """A prepared dataset does not fit the federation's label schema."""


class _Lenient(ConfigModel):
    """A machine-written file another fedimg version may have written: keys not known here are kept."""

    model_config = ConfigDict(extra="allow")


class SchemaRef(_Lenient):
    """The label schema a dataset was prepared with (``manifest.json`` ``schema``)."""

    name: str
    version: str


class ManifestCase(_Lenient):
    """One case of ``manifest.json`` as readers need it: its id, files and checksums."""

    case_id: str = Field(description="case_0000, case_0001, ...: sequential, nothing identifying.")
    image: str = Field(description="The image, relative to the dataset folder (imagesTr/<case>.nii.gz).")
    label: str | None = Field(None, description="The label map, relative to the dataset folder; absent or null when unlabelled.")
    reference_label: str | None = Field(
        None, description="The test-only reference label map (labelsRef/<case>.nii.gz, classes the site does not train on); absent or null when none."
    )
    affine: list[list[float]] | None = Field(None, description="Voxel-to-world (RAS+) 4x4 matrix.")
    sha256: dict[str, str] = Field(default_factory=dict, description="'image' / 'label' / 'reference_label' -> sha256 of the file.")


class CaseRecord(ManifestCase):
    """One case of ``manifest.json`` as the writers write it (what `prepare` records per case).

    `preprocessing.dataset.write_dataset` fills the geometry keys only; ``site-agent
    prepare`` fills them all. Only the keys listed here ever reach a manifest.
    """

    shape: list[int] | None = None
    spacing: list[float] | None = None
    intensity_range: list[float] | None = None
    qc_flags: list[str] = Field(default_factory=list)
    source_hash: str | None = None
    source_kind: str | None = None
    label_source_kind: str | None = None
    orientation: list[str] | None = None
    dtype: str | None = None
    schema_version: str | None = None
    labeled_classes: list[int] | None = None
    label_voxels: dict[str, int] | None = None
    converter_version: str | None = None
    input_sha256: str | None = None
    status: str | None = None
    radiograph: dict[str, str] | None = Field(
        None,
        description="A projection radiograph (CR, DX), prepared in its image plane: spacing_source (PixelSpacing, ImagerPixelSpacing, "
        "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor or declared), values (voi_lut, window or modality), photometric, "
        "view (ViewPosition) and patient_orientation (what +column and +row point to); null for volumes.",
    )


class Manifest(_Lenient):
    """``manifest.json``: what a prepared dataset holds and how it was made."""

    format: str = Field(FORMAT_NAME, description=f"Always {FORMAT_NAME!r}.")
    format_version: int = Field(FORMAT_VERSION, description=f"One of {list(SUPPORTED_VERSIONS)}.")
    converter_version: str | None = None
    schema_ref: SchemaRef | None = Field(None, alias="schema", description="The label schema used (null for format 1 and synthetic data).")
    modality: str | None = None
    labeled_classes: list[int] | None = Field(None, description="The schema ids this site labels (absent: every class).")
    reference_classes: list[int] | None = Field(
        None, description="The schema ids of the test-only reference labels (disjoint from labeled_classes; absent or null: none)."
    )
    ignore_label: int | None = None
    # SerializeAsAny: a writer's CaseRecord is written whole, not cut down to ManifestCase's keys
    cases: list[SerializeAsAny[ManifestCase]] = Field(description="One entry per case (at least one).")
    refused: list[dict[str, Any]] | None = Field(None, description="Refused sources as {source: salted hash, reason_code}.")
    counts: dict[str, int] | None = None

    @field_validator("cases")
    @classmethod
    def _some(cls, value: list[ManifestCase]) -> list[ManifestCase]:
        if not value:
            raise ValueError("must be a non-empty list of cases")
        return value


class TrainingEntry(_Lenient):
    """One image/label pair of ``dataset.json`` ``training``."""

    image: str
    label: str | None = None


class NnunetCase(_Lenient):
    """One case of ``dataset.json`` ``dataset``: nnU-Net v2's explicit file list (its channel files and label)."""

    images: list[str] = Field(description="The case's channel files, relative to the dataset folder (one: imagesTr/<case>.nii.gz).")
    label: str = Field(description="The case's label map, relative to the dataset folder.")


class DatasetDescription(_Lenient):
    """``dataset.json``: the decathlon / nnU-Net v2 description of a prepared dataset.

    MONAI reads ``training`` (``monai.data.load_decathlon_datalist``); nnU-Net v2 reads
    ``dataset``, which names each case's files, so our ``<case>.nii.gz`` names need no
    channel suffix, and counts the labelled cases in ``numTraining``.
    """

    name: str = Field(description="The dataset's name (letters, digits, _ . + -).")
    description: str | None = None
    tensorImageSize: str | None = None
    channel_names: dict[str, str] | None = Field(None, description="{'0': modality}.")
    modality: dict[str, str] | None = Field(None, description="{'0': modality} (decathlon's name for channel_names).")
    labels: dict[str, int] = Field(description="Class name -> id.")
    numTraining: int | None = Field(None, description="The number of labelled cases (the entries of 'dataset').")
    file_ending: str | None = None
    training: list[TrainingEntry] = Field(description="Image/label pairs, paths relative to the dataset folder.")
    dataset: dict[str, NnunetCase] | None = Field(None, description="Case id -> its files, for nnU-Net v2 (labelled cases only).")

    def modality_name(self) -> str:
        """The modality of channel 0 (``unknown`` when the file names none).

        Returns:
            The modality code (CT, MR, ...).
        """
        return (self.channel_names or self.modality or {}).get("0", "unknown")


def describe_cases(name: str, description: str, modality: str, labels: dict[str, int], cases: Sequence[ManifestCase]) -> DatasetDescription:
    """The ``dataset.json`` of a prepared dataset: one builder for every writer.

    Args:
        name: the dataset's name.
        description: one line saying what the dataset is.
        modality: the images' modality (CT, MR, ...), channel 0's name.
        labels: class name -> id (background 0, ids contiguous).
        cases: the cases, in order; unlabelled ones are listed in ``training`` only.

    Returns:
        The description, valid for MONAI's decathlon datalist loader and as an nnU-Net v2
        raw dataset (whose integrity check refuses label values outside ``labels``: a
        dataset holding the schema's ignore label needs `preprocessing.nnunet_export`).
    """
    training = [TrainingEntry(image=c.image, label=c.label) if c.label else TrainingEntry(image=c.image) for c in cases]
    labelled = {c.case_id: NnunetCase(images=[c.image], label=c.label) for c in cases if c.label}
    return DatasetDescription.model_validate(
        {
            "name": name,
            "description": description,
            "tensorImageSize": "2D" if modality in ("CR", "DX") else "3D",  # a radiograph is stored with a singleton third axis
            "channel_names": {"0": modality},
            "modality": {"0": modality},
            "labels": dict(sorted(labels.items(), key=lambda kv: kv[1])),
            "numTraining": len(labelled),
            "file_ending": ".nii.gz",
            "training": [t.model_dump(exclude_unset=True) for t in training],
            "dataset": {k: v.model_dump() for k, v in labelled.items()},
        }
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (this folder is not a prepared dataset)", file=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})", file=path) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level", file=path)
    return data


def _parsed(model: type[_Lenient], data: dict[str, Any], path: Path) -> Any:
    try:
        return validate_config(model, data, where=str(path))
    except ConfigError as exc:  # a dataset is not a config the user wrote: keep the dataset's error type
        raise DatasetError(str(exc), file=path, key=exc.key) from None


def read_manifest(root: str | Path) -> Manifest:
    """Read and check ``<root>/manifest.json``.

    Args:
        root: the dataset folder.

    Returns:
        The manifest (keys of other fedimg versions kept as extra attributes).

    Raises:
        DatasetError: the file is missing, not JSON, not our format or version, or a key is wrong.
    """
    path = Path(root) / MANIFEST_FILE
    data = _read_json(path)
    # which format first: another program's manifest.json gets one line, not a list of its keys
    if data.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}", file=path, key="format")
    if data.get("format_version") not in SUPPORTED_VERSIONS:
        raise DatasetError(
            f"{path}: format_version {data.get('format_version')!r} is not supported (expected one of {list(SUPPORTED_VERSIONS)})",
            file=path,
            key="format_version",
        )
    manifest: Manifest = _parsed(Manifest, data, path)
    return manifest


def read_description(root: str | Path) -> DatasetDescription:
    """Read and check ``<root>/dataset.json``.

    Args:
        root: the dataset folder.

    Returns:
        The description.

    Raises:
        DatasetError: the file is missing, not JSON, or a key is missing or wrong.
    """
    path = Path(root) / DATASET_FILE
    description: DatasetDescription = _parsed(DatasetDescription, _read_json(path), path)
    return description


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    """Write ``<root>/manifest.json`` atomically.

    Args:
        root: the dataset folder.
        manifest: what to write; keys never set (a lean case of `write_dataset`) are left out.
    """
    atomic.write_json(Path(root) / MANIFEST_FILE, manifest.model_dump(by_alias=True, exclude_unset=True))


def write_description(root: str | Path, description: DatasetDescription) -> None:
    """Write ``<root>/dataset.json`` atomically.

    Args:
        root: the dataset folder.
        description: what to write; keys never set are left out.
    """
    atomic.write_json(Path(root) / DATASET_FILE, description.model_dump(by_alias=True, exclude_unset=True))
