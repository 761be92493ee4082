"""The brain-MRI phantom (FedSR): anatomy, deformations, site contrasts, DICOM sites, prepare, atlas, schema."""

from __future__ import annotations

import dataclasses
import json
import time
from itertools import combinations
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

from fedimg_testing.phantom import (
    ATLAS_CONTRAST,
    BRAIN_SITES,
    BRAIN_TISSUES,
    FREESURFER_VALUES,
    brain_schema,
    make_brain_atlas,
    make_brain_scan,
    make_brain_subject,
    make_brain_template,
    t1_intensities,
    volume_affine_ras,
    warp_nearest,
    write_brain_atlas,
    write_brain_site,
)
from fedimg_testing.phantom.brain import _phantom_volume
from preprocessing.schema import load_label_map, parse_schema

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = brain_schema()
FOREGROUND = {c: i for c, i in SCHEMA.classes.items() if i}
SMALL = (32, 32, 32)


@pytest.fixture(scope="module")
def template64():
    return make_brain_template((64, 64, 64))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _ratio(image: np.ndarray, labels: np.ndarray, a: str, b: str) -> float:
    return float(np.median(image[labels == SCHEMA.classes[a]]) / np.median(image[labels == SCHEMA.classes[b]]))


def test_schema_parses_and_is_builtin():
    from coordinator.plans import builtin_schemas

    path = ROOT / "preprocessing" / "schemas" / "brain-mri.yaml"
    schema = parse_schema(yaml.safe_load(path.read_text()), str(path))
    assert "brain-mri" in builtin_schemas()
    assert schema.name == "brain-mri" and schema.version == "1.0.0" and schema.classes == SCHEMA.classes
    assert schema.modalities["MR"].normalisation == "zscore" and schema.target_spacing == (1.0, 1.0, 1.0)
    required = {"cerebral_white_matter", "cerebral_cortex", "lateral_ventricle", "thalamus", "caudate", "putamen", "pallidum", "brain_stem"}
    assert required <= set(schema.classes) and {"cerebellum_cortex", "cerebellum_white_matter"} <= set(schema.classes)
    assert all(lesions == () for lesions in schema.groups.values())  # no lesion classes
    assert set(schema.surface_tolerance_mm) == set(FOREGROUND) and set(schema.class_notes) == set(FOREGROUND)
    assert set(FREESURFER_VALUES) == set(FOREGROUND)


@pytest.mark.parametrize("shape, min_voxels", [(SMALL, 8), ((64, 64, 64), 80)])
def test_every_class_in_template_and_subjects(shape, min_voxels):
    for vol in (make_brain_template(shape), *(make_brain_subject(s, shape) for s in (0, 1, 2))):
        assert vol.labels.dtype == np.uint8 and vol.tissue.dtype == np.uint8 and vol.shape == shape
        counts = {c: int((vol.labels == i).sum()) for c, i in FOREGROUND.items()}
        assert min(counts.values()) >= min_voxels, (vol.seed, counts)
        assert set(np.unique(vol.labels)) == set(SCHEMA.classes.values())
        # bilateral structures are on both sides of the midline
        for c in ("lateral_ventricle", "thalamus", "caudate", "putamen", "pallidum", "cerebellum_white_matter"):
            m = vol.labels == FOREGROUND[c]
            assert (m & vol.left).any() and (m & ~vol.left).any(), c
    # a head: scalp around skull around the brain, air outside, at every size
    tissue = make_brain_template(shape).tissue
    assert tissue[0, 0, 0] == BRAIN_TISSUES.index("air")
    mid = tissue[:, shape[1] // 2, shape[2] // 2]
    inward = [BRAIN_TISSUES[t] for t in mid[: shape[0] // 2]]
    first = [inward.index(t) for t in ("scalp", "skull", "cerebral_cortex")]
    assert first == sorted(first)


def test_too_small_grid_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="too small"):
        make_brain_template((8, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        make_brain_subject(0, (32, 32))
    with pytest.raises(ValueError, match="strength"):
        make_brain_subject(0, SMALL, strength=-1)


def test_determinism():
    a, b, c = make_brain_subject(7, SMALL), make_brain_subject(7, SMALL), make_brain_subject(8, SMALL)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.tissue, b.tissue) and np.array_equal(a.displacement, b.displacement)
    assert not np.array_equal(a.labels, c.labels)
    assert np.array_equal(make_brain_template(SMALL).labels, make_brain_template(SMALL).labels)
    assert np.array_equal(t1_intensities(a.tissue, "site-a", 3), t1_intensities(a.tissue, "site-a", 3))
    assert not np.array_equal(t1_intensities(a.tissue, "site-a", 3), t1_intensities(a.tissue, "site-a", 4))
    assert np.array_equal(make_brain_scan(7, "site-b", SMALL).image, make_brain_scan(7, "site-b", SMALL).image)
    # strength 0 is the template itself
    assert np.array_equal(make_brain_subject(7, SMALL, strength=0.0).labels, make_brain_template(SMALL).labels)


def test_subjects_are_deformed_but_not_destroyed(template64):
    per_class: dict[str, list[float]] = {c: [] for c in FOREGROUND}
    means = []
    for seed in range(5):
        sub = make_brain_subject(seed, (64, 64, 64))
        d = {c: _dice(template64.labels == i, sub.labels == i) for c, i in FOREGROUND.items()}
        for c, v in d.items():
            per_class[c].append(v)
        means.append(np.mean(list(d.values())))
    # registration has real work to do (mean Dice well below 1) but anatomy survives
    assert 0.55 <= np.mean(means) <= 0.85, means
    assert all(0.45 <= m <= 0.9 for m in means), means
    for c, v in per_class.items():
        assert 0.2 <= np.mean(v) <= 0.95, (c, v)
    assert np.mean(per_class["cerebral_white_matter"]) > np.mean(per_class["pallidum"])  # small structures suffer most


def test_deformation_is_smooth_invertible_and_explains_the_labels(template64):
    recovered, unregistered = [], []
    for seed in (0, 1, 2):
        sub = make_brain_subject(seed, (64, 64, 64))
        u = sub.displacement
        assert u.shape == (3, 64, 64, 64) and u.dtype == np.float32
        mag = np.sqrt((u**2).sum(0))
        brain = template64.labels > 0
        assert 0.7 < mag[brain].mean() < 4.0  # a few voxels, not a shift of the whole head
        # Jacobian of p -> p + u(p) by central differences: positive everywhere (no folding)
        J = np.stack([np.stack(np.gradient(u[i]), axis=-1) for i in range(3)], axis=-2) + np.eye(3)
        det = np.linalg.det(J)
        assert det.min() > 0.2 and det.max() < 3.0, (det.min(), det.max())
        # smooth: neighbouring displacements differ by far less than a voxel
        assert max(np.abs(np.diff(u, axis=a)).max() for a in (1, 2, 3)) < 0.6
        # the template's labels pulled back through the displacement give the subject's labels,
        # up to nearest-neighbour resampling at 3 mm (the ceiling of a perfect registration)
        warped = warp_nearest(template64.labels, u)
        recovered.append(np.mean([_dice(warped == i, sub.labels == i) for i in FOREGROUND.values()]))
        unregistered.append(np.mean([_dice(template64.labels == i, sub.labels == i) for i in FOREGROUND.values()]))
    assert min(recovered) > 0.82 and np.mean(recovered) > np.mean(unregistered) + 0.1, (recovered, unregistered)


def test_same_subject_at_any_resolution():
    # 96-voxel grid centres 3i+1 are exactly the 32-voxel grid centres
    coarse, fine = make_brain_subject(5, SMALL), make_brain_subject(5, (96, 96, 96))
    assert (fine.labels[1::3, 1::3, 1::3] == coarse.labels).mean() > 0.995


def test_t1_contrast_and_site_differences():
    sub = make_brain_subject(11, SMALL)
    ratios = {}
    for name, prof in BRAIN_SITES.items():
        img = t1_intensities(sub.tissue, prof, 1)
        # thick-slice sites return fewer slices: compare on a subject drawn on their grid
        lab = sub.labels if prof.slice_factor == 1 else make_brain_scan(11, prof, SMALL).subject.labels
        if prof.slice_factor > 1:
            assert img.shape == (32, 32, 32 // prof.slice_factor)
            img = make_brain_scan(11, prof, SMALL).image
        assert img.dtype == np.float32 and img.min() == 0.0 and img.max() <= 4095
        wm, gm, csf = (np.median(img[lab == SCHEMA.classes[c]]) for c in ("cerebral_white_matter", "cerebral_cortex", "lateral_ventricle"))
        assert wm > gm > csf, name  # T1: white bright, grey darker, fluid dark
        ratios[name] = _ratio(img, lab, "cerebral_white_matter", "cerebral_cortex")
    assert all(abs(ratios[a] - ratios[b]) > 0.03 for a, b in combinations(ratios, 2)), ratios
    # air is the masked background (exactly 0), every tissue voxel is > 0
    img = t1_intensities(sub.tissue, "site-a", 1)
    air = sub.tissue == BRAIN_TISSUES.index("air")
    assert (img[air] == 0).all() and (img[~air] > 0).all()
    with pytest.raises(ValueError, match="unknown site"):
        t1_intensities(sub.tissue, "site-z", 1)


def test_bias_field_present_and_per_site():
    sub = make_brain_subject(2, (64, 64, 64))
    wm = sub.labels == SCHEMA.classes["cerebral_white_matter"]
    prof = BRAIN_SITES["site-b"]
    flat = dataclasses.replace(prof, bias=0.0, noise_sd=0.0, slice_factor=1)
    biased = dataclasses.replace(prof, noise_sd=0.0, slice_factor=1)
    img_flat, img_bias = t1_intensities(sub.tissue, flat, 0), t1_intensities(sub.tissue, biased, 0)
    gain = img_bias[wm] / img_flat[wm]
    # a multiplicative field within 1 +- bias that changes white matter by over 10 % across the brain
    assert gain.max() / gain.min() > 1.1 and 1 - prof.bias - 1e-3 <= gain.min() and gain.max() <= 1 + prof.bias + 1e-3
    # smooth: the field barely changes between neighbouring voxels
    field = np.where(wm, img_bias / np.maximum(img_flat, 1e-6), np.nan)
    assert np.nanmax(np.abs(np.diff(field, axis=0))) < 0.02
    # sites differ in bias strength: site-b's white matter varies more than site-c's
    spread = {}
    for name in ("site-b", "site-c"):
        p = dataclasses.replace(BRAIN_SITES[name], noise_sd=0.0, slice_factor=1)
        g = t1_intensities(sub.tissue, p, 0)[wm] / t1_intensities(sub.tissue, dataclasses.replace(p, bias=0.0), 0)[wm]
        spread[name] = g.max() / g.min()
    assert spread["site-b"] > spread["site-c"] + 0.05, spread
    assert ATLAS_CONTRAST.bias == 0.0


def test_thick_slice_site_has_fewer_thicker_slices():
    scan = make_brain_scan(4, "site-b", (64, 64, 64))
    assert BRAIN_SITES["site-b"].slice_factor == 2
    assert scan.image.shape == scan.subject.shape == (64, 64, 32)
    assert scan.subject.spacing == (3.0, 3.0, 6.0)


def test_write_brain_site_dicom_labels_and_identifiers(tmp_path):
    site = write_brain_site(tmp_path / "site", "site-a", 2, seed=3, labelled=[1], shape=SMALL)
    assert site.cases == ["case_000", "case_001"] and list(site.label_paths) == ["case_001"]
    assert not (site.labels_dir / "case_000.nii.gz").exists()
    for i, case in enumerate(site.cases):
        files = sorted(site.series_dir(i).iterdir())
        assert len(files) == SMALL[2]
        dss = [pydicom.dcmread(f) for f in files]
        assert all(d.SOPClassUID == pydicom.uid.MRImageStorage and d.Modality == "MR" for d in dss)
        assert dss[0].BodyPartExamined == "HEAD" and "RescaleSlope" not in dss[0]
        dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
        pixels = np.stack([d.pixel_array.T for d in dss], axis=-1)
        scan = make_brain_scan(site.case_seeds[i], "site-a", SMALL)
        assert np.array_equal(pixels, np.rint(scan.image).astype(np.uint16))
        raw = b"".join(f.read_bytes() for f in files)
        ids = site.identifiers[i]
        missing = [s for s in ids.strings() if s.encode() not in raw]
        assert not missing, missing
        assert "BRAIN" in ids.study_description and "ABDOMEN" not in ids.study_description
    # labels: FreeSurfer values on the series grid with the CT phantom's affine convention
    img = nib.load(site.label_paths["case_001"])
    scan = make_brain_scan(site.case_seeds[1], "site-a", SMALL)
    assert img.shape == SMALL and img.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, volume_affine_ras(_phantom_volume(scan.subject), site.origins[1], (1, 0, 0, 0, 1, 0)))
    data = np.asarray(img.dataobj)
    fs_values = {v for pair in FREESURFER_VALUES.values() for v in pair}
    assert set(np.unique(data)) <= fs_values | {0} and {4, 43} <= set(np.unique(data))  # both ventricles
    lmap = load_label_map(site.label_map, SCHEMA)
    lut = lmap.lookup_table(SCHEMA, np.unique(data), "test")
    assert np.array_equal(np.vectorize(lut.get)(data), scan.subject.labels)
    # an unlabelled site writes no labels and no label map
    bare = write_brain_site(tmp_path / "bare", "site-c", 1, seed=4, shape=SMALL)
    assert bare.labels_dir is None and bare.label_map is None and not (bare.root / "labels").exists()
    with pytest.raises(ValueError, match="labelled"):
        write_brain_site(tmp_path / "bad", "site-a", 2, seed=1, labelled=[2], shape=SMALL)


def test_site_prepares_with_the_brain_schema(tmp_path):
    from preprocessing.dataset import load_dataset
    from preprocessing.prepare import PrepareOptions, prepare

    # site-b: thick slices (16 at 12 mm), one labelled case of three
    site = write_brain_site(tmp_path / "site", "site-b", 3, seed=9, labelled=[1], shape=SMALL)
    result = prepare(
        [site.dicom_dir],
        tmp_path / "ds",
        SCHEMA,
        load_label_map(site.label_map, SCHEMA),
        labels=[site.labels_dir],
        options=PrepareOptions(name="brain", qc_report=False),
    )
    assert result.count("ok") == 3
    ds = load_dataset(tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert ds.modality == "MR" and len(ds.cases) == 3
    assert manifest["schema"] == {"name": "brain-mri", "version": "1.0.0"}
    labelled = [c for c in manifest["cases"] if c["label"]]
    assert len(labelled) == 1 and sum(1 for c in manifest["cases"] if "unlabeled" in c["qc_flags"]) == 2
    case = labelled[0]
    assert case["shape"] == [32, 32, 16] and case["spacing"] == [6.0, 6.0, 12.0]
    lab = np.asarray(nib.load(tmp_path / "ds" / case["label"]).dataobj)
    truth = make_brain_scan(site.case_seeds[1], "site-b", SMALL).subject.labels
    assert np.array_equal(lab, truth[::-1, ::-1, :])  # LPS series -> RAS dataset, schema ids
    assert set(np.unique(lab)) == set(SCHEMA.classes.values())


def test_atlas_files(tmp_path, template64):
    image_path, label_path = write_brain_atlas(tmp_path / "atlas", (64, 64, 64))
    img, lab = nib.load(image_path), nib.load(label_path)
    assert img.shape == lab.shape == (64, 64, 64) and np.array_equal(img.affine, lab.affine)
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), 3.0) and np.allclose(img.affine @ [31.5, 31.5, 31.5, 1], [0, 0, 0, 1])
    labels = np.asarray(lab.dataobj)
    assert lab.get_data_dtype() == np.uint8 and np.array_equal(labels, template64.labels)
    image = np.asarray(img.dataobj)
    atlas_ratio = _ratio(image, labels, "cerebral_white_matter", "cerebral_cortex")
    for name in BRAIN_SITES:
        scan = make_brain_scan(0, name, (64, 64, 64))
        assert abs(_ratio(scan.image, scan.subject.labels, "cerebral_white_matter", "cerebral_cortex") - atlas_ratio) > 0.02, name
    stripped = make_brain_atlas((64, 64, 64), skull_strip=True)
    non_brain = np.isin(template64.tissue, [BRAIN_TISSUES.index(t) for t in ("air", "scalp", "skull")])
    assert (stripped.image[non_brain] == 0).all() and (stripped.image[~non_brain] > 0).all()
    other = make_brain_atlas(SMALL, seed=-1)
    assert other.seed == -1 and not np.array_equal(other.labels, make_brain_template(SMALL).labels)


def test_fast_enough():
    make_brain_subject(100, (64, 64, 64))  # warm imports and caches
    t = time.perf_counter()
    make_brain_subject(101, (64, 64, 64))
    t64 = time.perf_counter() - t
    t = time.perf_counter()
    make_brain_subject(102, SMALL)
    t32 = time.perf_counter() - t
    assert t64 < 1.0 and t32 < 0.5, (t64, t32)


def test_write_dicom_series_pixel_values_are_checked(tmp_path):
    from fedimg_testing.phantom import PlantedIdentifiers, write_dicom_series

    vol = _phantom_volume(make_brain_template(SMALL))
    ids = PlantedIdentifiers.for_case(0, 0)
    with pytest.raises(ValueError, match="MR series only"):
        write_dicom_series(vol, tmp_path / "a", ids, pixel_values=np.zeros(SMALL))
    with pytest.raises(ValueError, match="shape"):
        write_dicom_series(vol, tmp_path / "b", ids, modality="MR", pixel_values=np.zeros((32, 32, 31)))
    with pytest.raises(ValueError, match="65535"):
        write_dicom_series(vol, tmp_path / "c", ids, modality="MR", pixel_values=np.full(SMALL, -5.0))
