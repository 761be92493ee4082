"""One bad case among good ones never stops `site-agent prepare` (issue 17, cases 5-7).

Each test starts from a valid tiny site of two DICOM series with their NIfTI labels
(``dicom/case_a``, ``dicom/case_c``), adds one bad case (a DICOM series ``dicom/case_b``
or a NIfTI image ``nifti/case_n.nii.gz``, its label where it has one) and checks what a
site sees: exit 3, the good cases prepared into a complete dataset with its manifest, the
bad one refused with its reason code and a message naming its file, no traceback. Cases
that are legal but unusual (int64 NIfTI, label values of 1e20 with ``--unknown-labels
ignore``) are prepared. The CLI runs in-process as in ``tests/test_prepare_malformed.py``.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from rich.console import Console

import site_agent.commands.common
from fedimg_testing.phantom import PlantedIdentifiers, make_phantom, volume_affine_ras, write_dicom_series
from preprocessing.dataset import DatasetError, load_dataset
from tests.test_prepare_malformed import edit, run_prepare

SHAPE = (24, 24, 10)
SPACING = (1.5, 1.5, 2.5)
ORIGIN = (-20.0, -30.0, -40.0)
GOOD = ("case_a", "case_c")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    vol = make_phantom(seed=7, shape=SHAPE, spacing=SPACING)
    affine = volume_affine_ras(vol, ORIGIN, (1, 0, 0, 0, 1, 0))
    local = np.zeros(SHAPE, np.uint8)
    local[vol.label == 3] = 1  # liver
    local[vol.label == 4] = 2  # liver tumour
    (root / "labels").mkdir()
    for i, case in enumerate(("case_a", "case_b", "case_c")):
        write_dicom_series(vol, root / "dicom" / case, PlantedIdentifiers.for_case(7, i), origin=ORIGIN, file_names="instance", seed=i)
        nib.save(nib.Nifti1Image(local, affine), root / "labels" / f"{case}.nii.gz")
    (root / "nifti").mkdir()
    np.save(root / "hu.npy", vol.hu)
    np.save(root / "local.npy", local)
    np.save(root / "affine.npy", affine)
    (root / "map.yaml").write_text(
        yaml.safe_dump(
            {"format": "fedimg-site-labels", "schema": "abdominal-ct", "schema_version": "1.0.0", "labels": {0: "background", 1: "liver", 2: "liver_tumor"}}
        )
    )
    return root


@pytest.fixture
def site(template, tmp_path, monkeypatch):
    monkeypatch.setattr(site_agent.commands.common, "console", Console(width=4000))  # one table row per line
    monkeypatch.delenv("FEDIMG_DEBUG", raising=False)
    root = tmp_path / "site"
    shutil.copytree(template, root)
    return root


def _series(site: Path, case: str = "case_b") -> list[Path]:
    return sorted((site / "dicom" / case).iterdir())


def _edit_series(site: Path, fn) -> None:
    for f in _series(site):
        edit(f, fn)


def _arrays(site: Path):
    return np.load(site / "hu.npy"), np.load(site / "local.npy"), np.load(site / "affine.npy")


def _nifti(site: Path, array, affine=None, dtype=None, name="case_n.nii.gz", folder="nifti") -> Path:
    path = site / folder / name
    nib.save(nib.Nifti1Image(array, _arrays(site)[2] if affine is None else affine, dtype=dtype), path)
    return path


def _label(site: Path, array, dtype=None) -> Path:
    path = site / "labels" / "case_b.nii.gz"
    path.unlink()
    nib.save(nib.Nifti1Image(array, _arrays(site)[2], dtype=dtype), path)
    return path


def _forged_affine(site: Path, affine: np.ndarray) -> Path:
    """A NIfTI whose sform and qform are written as given (float32 may overflow to inf)."""
    hu, _, _ = _arrays(site)
    img = nib.Nifti1Image(hu.astype(np.int16), None)
    with np.errstate(over="ignore", invalid="ignore"):
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
    path = site / "nifti" / "case_n.nii.gz"
    with np.errstate(over="ignore", invalid="ignore"):
        nib.save(img, path)
    return path


def _qform_only_pixdim(site: Path, axis: int, value: float, kind: str = "image") -> Path:
    """A NIfTI whose grid comes from its qform alone (sform_code 0), pixdim[axis] patched to
    `value` in the written header (nibabel would repair it while writing)."""
    hu, local, affine = _arrays(site)
    data = hu.astype(np.int16) if kind == "image" else local
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=0)
    block = bytearray(img.header.binaryblock)
    struct.pack_into("<f", block, 76 + 4 * axis, value)  # pixdim is float32[8] at byte 76
    path = site / "nifti" / "case_n.nii.gz" if kind == "image" else site / "labels" / "case_b.nii.gz"
    path.unlink(missing_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(bytes(block) + b"\0" * 4)
        fh.write(data.tobytes(order="F"))
    return path


def _gzip_bomb(site: Path, shape=(1024, 1024, 512), dtype=np.int16) -> Path:
    """A ~1 MB .nii.gz inflating to 1 GiB of zeros: concatenated gzip members (gzip and
    nibabel read them as one stream) of one compressed 16 MiB block, built in milliseconds."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    affine = _arrays(site)[2]
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr.set_data_offset(352)
    head = hdr.binaryblock + b"\0" * 4
    block = 16 << 20
    member = gzip.compress(b"\0" * block, compresslevel=9)
    total = int(np.prod(shape)) * np.dtype(dtype).itemsize
    path = site / "nifti" / "case_n.nii.gz"
    with open(path, "wb") as fh:
        fh.write(gzip.compress(head, compresslevel=9))
        for _ in range(total // block):
            fh.write(member)
    return path


def _truncated_gzip(site: Path) -> Path:
    """A header declaring 64 x 64 x 64 int16 in a gzip file far too small to hold it."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((64, 64, 64))
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(_arrays(site)[2], code=1)
    hdr.set_data_offset(352)
    path = site / "nifti" / "case_n.nii.gz"
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\1" * 64))
    return path


def _rows_65535(ds) -> None:
    ds.Rows = 65535
    ds.Columns = 65535
    ds.PixelData = b"\0" * 16


def _ipp_x(value):
    def fn(ds):
        ds.ImagePositionPatient = [value, float(ds.ImagePositionPatient[1]), float(ds.ImagePositionPatient[2])]

    return fn


def _set_tag(keyword: str, value):
    return lambda ds: setattr(ds, keyword, value)


def _break_series(fn):
    """Apply `fn` to every file of case_b; the refusal names its first file by name."""

    def breaker(site: Path) -> Path:
        _edit_series(site, fn)
        return _series(site)[0]

    return breaker


# A JPEG 2000 codestream GDCM cannot parse: its decoder throws a C++ exception it does not
# catch, and abort() ends the process that runs it (SIGABRT).
GDCM_ABORT_CODESTREAM = b"\xff\x4f\xff\x51garbage" * 10


def _crafted_jpeg2000(ds) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([GDCM_ABORT_CODESTREAM])
    ds["PixelData"].is_undefined_length = True


def _crafted_first_slice(site: Path) -> Path:
    bad = _series(site)[0]
    edit(bad, _crafted_jpeg2000)
    return bad


def _spacing(scale: float) -> np.ndarray:
    return np.diag([1.5 * scale, 1.5 * scale, 2.5 * scale, 1.0])


def _shifted(offset: float) -> np.ndarray:
    a = np.diag([1.5, 1.5, 2.5, 1.0])
    a[0, 3] = offset
    return a


# (id, breaker(site) -> the file the message must name, extra CLI args, reason code, text in the message)
BAD = [
    # --- case 5: a header that declares far more pixels than the file holds ---
    ("dicom-rows-65535", _break_series(_rows_65535), [], "pixel_data_length", "holds 16 bytes"),
    # --- case 5: a slice on which a native decoder (GDCM) would abort() the whole process ---
    ("dicom-jpeg2000-gdcm-abort", _crafted_first_slice, [], "decoder_crashed", "crashed on this file (killed by SIGABRT)"),
    # --- case 5/6: impossible DICOM geometry ---
    (
        "dicom-pixel-spacing-1e-40",
        _break_series(_set_tag("PixelSpacing", [1e-40, 1e-40])),
        [],
        "bad_geometry_tag",
        "outside the plausible range [0.001, 1000] mm",
    ),
    ("dicom-pixel-spacing-1e39", _break_series(_set_tag("PixelSpacing", [1e39, 1e39])), [], "bad_geometry_tag", "outside the plausible range"),
    ("dicom-ipp-1e39", _break_series(_ipp_x(1e39)), [], "bad_geometry_tag", "further than 100000 mm"),
    ("dicom-ipp-far", _break_series(_ipp_x(2e5)), [], "bad_geometry_tag", "further than 100000 mm"),
    # --- case 5: NIfTI values no float32/int32 holds ---
    ("nifti-float64-1e300", lambda s: _nifti(s, np.full(SHAPE, 1e300)), ["--modality", "CT"], "non_finite", "beyond float32's range"),
    (
        "nifti-int64-huge",
        lambda s: _nifti(s, _arrays(s)[0].astype(np.int64) << 40, dtype=np.int64),
        ["--modality", "CT"],
        "values_out_of_range",
        "do not fit 32 bits",
    ),
    # --- case 6: impossible NIfTI geometry ---
    ("nifti-spacing-1e39", lambda s: _forged_affine(s, _spacing(1e39)), ["--modality", "CT"], "bad_affine", "non-finite values"),
    ("nifti-position-1e39", lambda s: _forged_affine(s, _shifted(1e39)), ["--modality", "CT"], "bad_affine", "non-finite values"),
    ("nifti-spacing-1e30", lambda s: _forged_affine(s, _spacing(1e30)), ["--modality", "CT"], "bad_geometry", "outside the plausible range [0.001, 1000] mm"),
    ("nifti-spacing-1e-6", lambda s: _forged_affine(s, _spacing(1e-6)), ["--modality", "CT"], "bad_geometry", "outside the plausible range"),
    ("nifti-position-1e30", lambda s: _forged_affine(s, _shifted(1e30)), ["--modality", "CT"], "bad_geometry", "from the scanner origin"),
    # --- case 6: a qform voxel size nibabel would silently repair (0 -> 1 mm, -x -> x) ---
    ("nifti-pixdim-0", lambda s: _qform_only_pixdim(s, 1, 0.0), ["--modality", "CT"], "bad_geometry", "pixdim[1:4] = [0.0, 1.5, 2.5] mm must be positive"),
    ("nifti-pixdim-negative", lambda s: _qform_only_pixdim(s, 3, -2.5), ["--modality", "CT"], "bad_geometry", "[1.5, 1.5, -2.5] mm must be positive"),
    ("nifti-pixdim-nan", lambda s: _qform_only_pixdim(s, 2, float("nan")), ["--modality", "CT"], "bad_geometry", "must be positive and finite"),
    ("label-pixdim-negative", lambda s: _qform_only_pixdim(s, 1, -1.5, "label"), [], "bad_geometry", "label voxel size pixdim[1:4] = [-1.5, 1.5, 2.5] mm"),
    # --- case 7: a gzip bomb, a header declaring more than its file holds ---
    ("nifti-gzip-bomb-1gib", _gzip_bomb, ["--modality", "CT"], "too_large", "1.0 GiB of voxel data"),
    ("nifti-gzip-forged-size", _truncated_gzip, ["--modality", "CT"], "corrupt_nifti", "truncated or forged"),
]


def _run(site: Path, extra: list, out: Path | None = None):
    out = out or site.parent / "out"
    inputs = [site / "dicom"]
    if any(site.joinpath("nifti").iterdir()):
        inputs.append(site / "nifti")
    args = [*inputs, "--labels", site / "labels", "--label-map", site / "map.yaml", "--out", out, "--no-qc", *extra]
    return (*run_prepare(args), out)


def _refusal_line(stdout: str, code: str) -> str:
    lines = [l for l in stdout.splitlines() if "refused" in l and f"{code}:" in l]
    assert len(lines) == 1, f"no single refusal with code {code} in:\n{stdout}"
    return lines[0]


@pytest.mark.parametrize("case_id,breaker,extra,code,text", BAD, ids=[c[0] for c in BAD])
def test_bad_case_among_good_ones_is_refused_and_the_rest_prepared(site, case_id, breaker, extra, code, text):
    bad_file = breaker(site)
    rc, stdout, stderr, out = _run(site, extra)
    assert "Traceback" not in stdout + stderr
    assert rc == 3, f"{case_id}: exit {rc}\nstdout: {stdout}\nstderr: {stderr}"
    assert [l for l in stderr.splitlines() if l.strip()] == ["site-agent: 1 case(s) refused; see the reasons above"]
    line = _refusal_line(stdout, code)
    assert str(bad_file) in line, f"{case_id}: the message does not name {bad_file}: {line}"
    assert text in line, f"{case_id}: {text!r} not in {line!r}"
    out = site.parent / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["reason_code"] for r in manifest["refused"]] == [code]
    n_good = len(GOOD) + (1 if "--modality" in extra else 0)  # case_b is good when the bad case is a NIfTI
    ds = load_dataset(out, verify_checksums=True)
    assert len(ds.cases) == n_good
    for case in manifest["cases"]:
        assert np.all(np.isfinite(case["affine"]))
        assert case["spacing"] == [1.5, 1.5, 2.5]
        assert case["label"] is not None
    assert not list(out.rglob(".*.tmp"))


def test_one_bad_case_alone_gives_exit_2_and_no_folder(site):
    for case in GOOD:
        shutil.rmtree(site / "dicom" / case)
        (site / "labels" / f"{case}.nii.gz").unlink()
    _edit_series(site, _rows_65535)
    rc, stdout, stderr, out = _run(site, [])
    assert rc == 2, stderr
    assert "Traceback" not in stdout + stderr
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and str(_series(site)[0]) in lines[0] and "holds 16 bytes" in lines[0], lines
    assert not out.exists()


def test_gzip_bomb_is_refused_before_inflating(site):
    bomb = _gzip_bomb(site)
    assert bomb.stat().st_size < 2 << 20  # ~1 MB on disk, 1 GiB inflated
    tracemalloc.start()
    try:
        rc, stdout, _, _ = _run(site, ["--modality", "CT"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 3
    assert "too_large" in _refusal_line(stdout, "too_large")
    assert peak < 200 << 20, f"peak {peak / 2**20:.0f} MiB of Python/numpy allocations: the bomb was inflated"


def test_int64_nifti_image_is_converted(site):
    hu, local, _ = _arrays(site)
    _nifti(site, hu.astype(np.int64), dtype=np.int64)
    _nifti(site, local.astype(np.int64), dtype=np.int64, folder="labels")
    rc, stdout, stderr, out = _run(site, ["--modality", "CT"])
    assert rc == 0, stdout + stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["cases"]) == 4 and not manifest["refused"]  # three DICOM series and the NIfTI
    ds = load_dataset(out, verify_checksums=True)
    nifti_case = next(c for c in manifest["cases"] if c["source_kind"] == "nifti")
    dicom_case = next(c for c in manifest["cases"] if c["source_kind"] == "dicom")
    assert nifti_case["dtype"] == "int16" and nifti_case["affine"] == dicom_case["affine"]
    for kind in ("image", "label"):  # the same phantom as the DICOM series: the same voxels
        assert np.array_equal(np.asarray(nib.load(out / nifti_case[kind]).dataobj), np.asarray(nib.load(out / dicom_case[kind]).dataobj))
    assert len(ds.cases) == 4


@pytest.mark.parametrize("dtype,value", [(np.float32, 1e20), (np.float64, 1e20), (np.int64, 2**40)])
def test_huge_label_values_map_to_ignore(site, dtype, value):
    _, local, _ = _arrays(site)
    _label(site, np.where(local == 1, dtype(value), local.astype(dtype)), dtype=dtype if dtype is np.int64 else None)
    rc, stdout, stderr, out = _run(site, ["--unknown-labels", "ignore"])
    assert rc == 0, stdout + stderr
    manifest = json.loads((out / "manifest.json").read_text())
    flags = {f for c in manifest["cases"] for f in c["qc_flags"]}
    assert "ignore_voxels" in flags
    case_b = [c for c in manifest["cases"] if "ignore_voxels" in c["qc_flags"]]
    assert len(case_b) == 1
    lab = np.asarray(nib.load(out / case_b[0]["label"]).dataobj)
    good = np.asarray(nib.load(out / next(c for c in manifest["cases"] if c is not case_b[0])["label"]).dataobj)
    liver, tumour = 3, 4  # schema ids; the same phantom: where the good case has liver, case_b has "ignore"
    assert np.array_equal(lab == 255, good == liver) and np.array_equal(lab == tumour, good == tumour) and (lab == 255).any()


def test_unexpected_error_of_one_case_is_a_refusal_naming_its_file(site, monkeypatch, caplog):
    import preprocessing.prepare as prep

    real = prep.convert_case

    def convert(src, *args, **kwargs):
        if "case_b" in src.display:
            raise MemoryError("Unable to allocate 80.0 GiB for an array")
        return real(src, *args, **kwargs)

    monkeypatch.setattr(prep, "convert_case", convert)
    with caplog.at_level(logging.DEBUG, logger="preprocessing.prepare"):
        rc, stdout, stderr, out = _run(site, [])
    assert rc == 3 and "Traceback" not in stdout + stderr
    line = _refusal_line(stdout, "out_of_memory")
    assert str(site / "dicom" / "case_b") in line and str(site / "labels" / "case_b.nii.gz") in line and "MemoryError" in line
    assert any(r.exc_info and r.exc_info[0] is MemoryError for r in caplog.records), "no traceback in the debug log"
    assert len(load_dataset(out, verify_checksums=True).cases) == 2
    # FEDIMG_DEBUG=1: raised, so that a programming error is not hidden behind a refusal
    monkeypatch.setenv("FEDIMG_DEBUG", "1")
    shutil.rmtree(out)
    from preprocessing.schema import load_label_map, load_schema

    schema = load_schema(None)
    with pytest.raises(MemoryError):
        prep.prepare(
            [site / "dicom"], out, schema, load_label_map(site / "map.yaml", schema), labels=[site / "labels"], options=prep.PrepareOptions(qc_report=False)
        )


def test_failure_while_writing_a_case_leaves_none_of_its_files(site, monkeypatch):
    import preprocessing.prepare as prep

    real = prep.commit_case
    committed = []

    def commit(out, case_id, source_hash, staged):
        rec = real(out, case_id, source_hash, staged)
        committed.append(case_id)
        if len(committed) == 2:
            raise ValueError("something no check foresaw")  # its files were written and named, then it fails
        return rec

    monkeypatch.setattr(prep, "commit_case", commit)
    rc, stdout, stderr, out = _run(site, [])
    assert rc == 3 and "Traceback" not in stdout + stderr
    assert "something no check foresaw" in _refusal_line(stdout, "unexpected_error")
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {c["image"] for c in manifest["cases"]} | {c["label"] for c in manifest["cases"]}
    on_disk = {str(p.relative_to(out)) for sub in ("imagesTr", "labelsTr") for p in (out / sub).iterdir()}
    assert on_disk == listed and len(manifest["cases"]) == 2
    assert len(list((out / ".state" / "cases").glob("*.json"))) == 2


def test_loader_refuses_a_non_finite_affine(site):
    rc, _, stderr, out = _run(site, [])
    assert rc == 0, stderr
    load_dataset(out)
    manifest = json.loads((out / "manifest.json").read_text())
    image = out / manifest["cases"][0]["image"]
    img = nib.load(image)
    data = np.asarray(img.dataobj)
    broken = nib.Nifti1Image(data, None)
    with np.errstate(over="ignore"):
        broken.set_sform(_spacing(1e39), code=1)  # 1e39 overflows float32: inf in the header
        broken.set_qform(_spacing(1e39), code=1)
        nib.save(broken, image)
    with pytest.raises(DatasetError, match="non-finite") as err:
        load_dataset(out)
    assert str(image) in str(err.value)


def test_loader_refuses_a_non_finite_affine_in_the_manifest(site):
    rc, _, stderr, out = _run(site, [])
    assert rc == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["cases"][1]["affine"][0][3] = float("nan")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"manifest.json: case case_0001: 'affine'"):
        load_dataset(out)


def test_size_check_counts_the_header_only():
    from preprocessing.dicom import MAX_DATA_BYTES, MAX_VOXELS, SeriesError, check_size

    check_size((512, 512, 1024), 2, "x")  # the limit itself: a long CT as int16
    with pytest.raises(SeriesError, match="512 x 512 x 1025") as err:
        check_size((512, 512, 1025), 2, "x")
    assert err.value.code == "too_large"
    with pytest.raises(SeriesError, match="too_large|limit"):
        check_size((512, 512, 1024), 4, "x")  # the same voxels as float32: 1 GiB
    assert MAX_VOXELS == 2**28 and MAX_DATA_BYTES == 2**29


def test_zlib_ratio_bound_holds():
    # the "truncated or forged" check relies on deflate's 1032:1 bound
    from preprocessing.nifti import GZIP_MAX_RATIO

    data = b"\0" * (8 << 20)
    assert len(data) / len(zlib.compress(data, 9)) <= GZIP_MAX_RATIO
    assert len(data) / len(gzip.compress(data, 9)) <= GZIP_MAX_RATIO


def test_a_header_no_check_foresaw_skips_its_file_only(site, monkeypatch):
    import preprocessing.dicom as dicom

    real = dicom.slice_headers
    bad = _series(site)[0]  # case_b's first file (by name): its series loses that slice

    def headers(path, ds):
        if path == bad:
            raise AttributeError("'MultiValue' object has no attribute 'value'")
        return real(path, ds)

    monkeypatch.setattr(dicom, "slice_headers", headers)
    rc, stdout, stderr, out = _run(site, ["--allow-irregular"])
    assert "Traceback" not in stdout + stderr
    assert rc in (0, 3), stderr
    assert "1 bad_header" in stdout
    assert len(load_dataset(out).cases) >= 2


def test_bad_case_as_a_real_process(site):
    from tests.conftest import cli as run_console_script

    _edit_series(site, _rows_65535)
    out = site.parent / "out"
    r = run_console_script("site-agent", "prepare", site / "dicom", "--labels", site / "labels", "--label-map", site / "map.yaml", "--out", out, "--no-qc")
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert [l for l in r.stderr.splitlines() if l.strip()] == ["site-agent: 1 case(s) refused; see the reasons above"]
    assert [x["reason_code"] for x in json.loads((out / "manifest.json").read_text())["refused"]] == ["pixel_data_length"]


def test_gdcm_abort_is_a_refusal_in_a_real_process(site):
    """The crash is a real abort(): only a separate process shows that the run survives it."""
    from tests.conftest import cli as run_console_script

    bad = _crafted_first_slice(site)
    out = site.parent / "out"
    r = run_console_script("site-agent", "prepare", site / "dicom", "--labels", site / "labels", "--label-map", site / "map.yaml", "--out", out, "--no-qc")
    assert r.returncode == 3, r.stderr
    assert "terminate called" not in r.stderr and "Traceback" not in r.stderr + r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [x["reason_code"] for x in manifest["refused"]] == ["decoder_crashed"]
    assert str(bad) in " ".join(r.stdout.split())  # named in the report (the table may wrap it)
    assert len(load_dataset(out, verify_checksums=True).cases) == 2


def test_series_only_gdcm_decodes_goes_through_one_child_that_names_the_crashing_file(site, monkeypatch):
    """Syntaxes only GDCM decodes (lossless JPEG) are decoded for the whole series in one
    child process: the good slices decode there, and a slice that kills it is named."""
    import subprocess

    import preprocessing.dicom as dicom

    files = _series(site)
    for f in files:  # valid JPEG-LS (which GDCM decodes too) everywhere
        edit(f, lambda ds: ds.compress(pydicom.uid.JPEGLSLossless, encoding_plugin="pyjpegls"))
    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a) or real_popen(*a, **k))
    monkeypatch.setattr(dicom, "_needs_gdcm", lambda s: True)  # as if only GDCM decoded them
    vol = dicom.load_series(dicom.discover([site / "dicom" / "case_b"]).series[0])
    assert len(started) == 1 and np.array_equal(vol.array, _arrays(site)[0])
    series = dicom.discover([site / "dicom" / "case_b"]).series[0]
    bad = series.slices[dicom.series_geometry(series).order[3]].path  # the 4th slice decoded
    edit(bad, _crafted_jpeg2000)
    with pytest.raises(dicom.SeriesError, match="SIGABRT") as err:
        dicom.load_series(dicom.discover([site / "dicom" / "case_b"]).series[0])
    assert err.value.code == "decoder_crashed" and str(bad) in str(err.value) and len(started) == 2


def test_uncompressed_and_in_process_decodable_data_start_no_child(site, monkeypatch):
    import preprocessing.dicom as dicom

    def no_child(*args, **kwargs):
        raise AssertionError("a decoder child process was started")

    monkeypatch.setattr("subprocess.Popen", no_child)
    for case in ("case_a", "case_b"):
        if case == "case_b":
            for f in _series(site):
                edit(f, lambda ds: ds.compress(pydicom.uid.JPEGLSLossless, encoding_plugin="pyjpegls"))
        vol = dicom.load_series(dicom.discover([site / "dicom" / case]).series[0])
        assert np.array_equal(vol.array, _arrays(site)[0])


def test_pixel_length_check_follows_pydicoms_expected_length():
    """Uncompressed YBR_FULL_422 holds 2/3 of Rows x Columns x 3 samples (pydicom's rule): it
    is not refused as short, while data shorter than that still is."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from preprocessing.dicom import SeriesError, check_pixel_length

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 4, 6, 3, 8
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = bytes(4 * 6 * 2)  # 2 bytes a pixel: Y Y Cb Cr for each pair
    check_pixel_length(Path("ybr.dcm"), ds)
    ds.PixelData = bytes(4 * 6 * 2 - 2)
    with pytest.raises(SeriesError) as err:
        check_pixel_length(Path("ybr.dcm"), ds)
    assert err.value.code == "pixel_data_length"
