"""Installing fetched series into the cache and keeping its index; `ensure_public_dicom`,
the entry point."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pydicom
from filelock import FileLock

from fedimg_testing.public_dicom.catalogue import (
    DEFAULT_DEST,
    ENTRY_SCHEMA,
    INDEX_FORMAT,
    INDEX_NAME,
    OFFLINE_ENV,
    PYDICOM_LICENCE,
    PYDICOM_SERIES,
    SOURCES,
    SeriesSpec,
    Source,
)
from fedimg_testing.public_dicom.describe import _describe
from fedimg_testing.public_dicom.download import _collect, _download, _info, _is_dicom_bytes, _warn


def _fingerprint(src: Source) -> str:
    """Changes whenever the catalogue entry of a source changes (so its series are redone)."""
    return hashlib.sha256(f"{ENTRY_SCHEMA}|{src!r}".encode()).hexdigest()[:16]


def _source_meta(src: Source) -> dict:
    meta = {
        "source": src.name,
        "registry": src.registry,
        "package": src.package,
        "version": src.version,
        "licence": src.licence,
        "licence_note": src.licence_note,
        "fingerprint": _fingerprint(src),
    }
    if src.registry != "installed":
        meta["archive"] = {"filename": src.filename, "url": src.url, "sha256": src.sha256}
    return meta


def _install_series(dest: Path, src: Source, spec: SeriesSpec, files: dict[str, bytes], quiet: bool) -> dict:
    """Write one series' files atomically under dest/<source>/<series> and describe it."""
    # Only image instances (drops e.g. an RTSTRUCT next to the slices), of the wanted series.
    kept = {}
    for base, data in files.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
        if "PixelData" not in ds:
            continue
        if spec.series_uid and str(ds.get("SeriesInstanceUID", "")) != spec.series_uid:
            continue
        kept[base] = data
    files = kept
    if len(files) != spec.n_files:
        raise RuntimeError(f"{src.name}/{spec.name}: expected {spec.n_files} DICOM files, found {len(files)}")
    final = dest / src.name / spec.name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=final.parent))
    try:
        for base, data in sorted(files.items()):
            (tmp / base).write_bytes(data)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    names = sorted(files)
    entry = {
        "name": f"{src.name}/{spec.name}",
        "series": spec.name,
        **_source_meta(src),
        "description": spec.description,
        "notes": spec.notes,
        "relpath": f"{src.name}/{spec.name}",
        "path": str(final),
        "n_files": len(names),
        "files": names,
        "sizes": [len(files[n]) for n in names],
    }
    entry.update(_describe([final / n for n in names]))
    _info(
        f"  {entry['name']}: {entry['n_files']} x {entry['modality']} {entry['rows']}x{entry['columns']} {', '.join(entry['transfer_syntax_names'])}",
        quiet,
    )
    return entry


def _entry_valid(dest: Path, entry: dict) -> bool:
    d = dest / entry.get("relpath", "")
    try:
        names = entry["files"]
        sizes = entry["sizes"]
        if len(names) != entry["n_files"] or len(sizes) != len(names):
            return False
        present = {p.name for p in d.iterdir() if p.is_file()}
        if present != set(names):
            return False
        return all((d / n).stat().st_size == s for n, s in zip(names, sizes))
    except (OSError, KeyError, TypeError):
        return False


def load_index(dest: Path | str = DEFAULT_DEST) -> dict | None:
    """The index if it exists and parses (entries not checked); ``path`` made absolute."""
    dest = Path(dest)
    try:
        index = json.loads((dest / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        return None
    for e in index.get("series", []):
        e["path"] = str(dest / e["relpath"])
    return index


def _write_index(dest: Path, index: dict) -> None:
    tmp = dest / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, dest / INDEX_NAME)


def _remove_stale(source_dir: Path, keep: set[str]) -> None:
    """Drop series directories of a source that the catalogue no longer lists."""
    for p in source_dir.iterdir():
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _lock(dest: Path):
    """Serialise concurrent fetches into the same dest (e.g. parallel test workers)."""
    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(dest / ".lock"):
        yield


def _installed_pydicom_source() -> tuple[Source, Path]:
    root = Path(pydicom.__file__).resolve().parent / "data" / "test_files" / "dicomdirtests"
    src = Source(
        name="pydicom",
        registry="installed",
        package="pydicom",
        version=str(pydicom.__version__),
        licence=PYDICOM_LICENCE,
        licence_note=(
            "Copied from the installed pydicom package (pydicom/data/test_files/dicomdirtests). "
            "pydicom's test_files/README.txt: from pcir.org freely available image sets, downsized "
            "to 16x16; 'I believe there is no restriction on using any of these files'."
        ),
        series=PYDICOM_SERIES,
    )
    return src, root


def ensure_public_dicom(
    dest: Path | str = DEFAULT_DEST,
    *,
    offline: bool | None = None,
    force: bool = False,
    keep_archives: bool = False,
    quiet: bool = False,
) -> dict:
    """Make sure the catalogued series are in ``dest``; return the index.

    Sources already present and intact are left alone. Sources that cannot be
    fetched are reported in ``index["unavailable"]`` and skipped. ``offline``
    (default: the FEDIMG_PUBLIC_DICOM_OFFLINE environment variable) skips all
    downloads.
    """
    dest = Path(dest).resolve()
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0", "false", "no")
    offline_reason = f"offline ({OFFLINE_ENV} set or --offline): not downloaded"
    down_hosts: set[str] = set()
    with _lock(dest):
        old = None if force else load_index(dest)
        old_entries = {e["name"]: e for e in (old or {}).get("series", [])}
        series: list[dict] = []
        unavailable: dict[str, str] = {}
        sources_meta: dict[str, dict] = {}
        t0 = time.monotonic()

        pd_src, pd_root = _installed_pydicom_source()
        all_sources: list[Source] = [pd_src, *SOURCES]
        for src in all_sources:
            sources_meta[src.name] = _source_meta(src)
            wanted = [f"{src.name}/{s.name}" for s in src.series]
            present = [old_entries.get(n) for n in wanted]
            fp = _fingerprint(src)
            if all(e is not None and e.get("fingerprint") == fp and _entry_valid(dest, e) for e in present):
                for e in present:
                    e["path"] = str(dest / e["relpath"])
                series.extend(present)
                continue
            _info(f"{src.name} {src.version} ({src.registry})", quiet)
            try:
                if src.registry == "installed":
                    collected = {}
                    for spec in src.series:
                        files = {p.name: p.read_bytes() for p in sorted((pd_root / spec.prefix).iterdir()) if p.is_file()}
                        collected[spec.name] = {k: v for k, v in files.items() if _is_dicom_bytes(v)}
                else:
                    if offline:
                        raise RuntimeError(offline_reason)
                    archive = _download(src, dest / "_archives", quiet, down_hosts)
                    collected = _collect(src, archive)
                entries = [_install_series(dest, src, spec, collected[spec.name], quiet) for spec in src.series]
                series.extend(entries)
                _remove_stale(dest / src.name, {s.name for s in src.series})
                if src.registry != "installed" and not keep_archives:
                    (dest / "_archives" / src.filename).unlink(missing_ok=True)
            except Exception as exc:  # noqa: BLE001 - offline-tolerant by design
                unavailable[src.name] = f"{type(exc).__name__}: {exc}"
                _warn(f"{src.name} {src.version} ({src.registry}) not available: {exc}")
                # Keep whatever intact series of this source an earlier run left.
                series.extend(e for e in present if e is not None and _entry_valid(dest, e))

        archives = dest / "_archives"
        if archives.is_dir() and not keep_archives and not any(archives.iterdir()):
            archives.rmdir()
        index = {
            "format": INDEX_FORMAT,
            "generated_by": "scripts/fetch_public_dicom.py",
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dest": str(dest),
            "sources": sources_meta,
            "unavailable": unavailable,
            "series": series,
        }
        if series != (old or {}).get("series") or unavailable != (old or {}).get("unavailable"):
            _write_index(dest, index)
        _info(f"{len(series)} series in {dest} ({time.monotonic() - t0:.1f} s)", quiet)
        return index
