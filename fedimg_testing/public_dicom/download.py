"""Downloading a source's archive (pinned sha256, PyPI's JSON API as a fallback, hosts that
failed once skipped) and taking a series' DICOM files out of it."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from fedimg_core.hashing import sha256_file
from fedimg_testing.public_dicom.catalogue import HTTP_TIMEOUT_S, USER_AGENT, SeriesSpec, Source, _pypi_json


def _warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def _info(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _http_get(url: str, dst: Path) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp, open(dst, "wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)


def _pypi_resolved_url(src: Source) -> str | None:
    """The file's URL as PyPI's JSON API gives it (for mirrors that serve other paths)."""
    req = urllib.request.Request(_pypi_json(src.package), headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
        meta = json.load(resp)
    for f in meta.get("releases", {}).get(src.version, []):
        if f.get("filename") == src.filename:
            return urllib.parse.urljoin(_pypi_json(src.package), f["url"])
    return None


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return False  # the server answered
    return isinstance(exc, (urllib.error.URLError, TimeoutError, ConnectionError))


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def _download(src: Source, archives: Path, quiet: bool, down_hosts: set[str]) -> Path:
    """Download the source's archive into ``archives`` and check its sha256.

    Tries the pinned URL, then (PyPI) the URL that PyPI's JSON API gives for the same
    file name. A host that refused or timed out once is added to ``down_hosts`` and not
    tried again, so an offline machine does not wait for every source in turn.
    """
    archives.mkdir(parents=True, exist_ok=True)
    dst = archives / src.filename
    if dst.is_file() and sha256_file(dst) == src.sha256:
        return dst
    urls: list[str | Callable[[], str | None]] = [src.url, *src.alt_urls]
    if src.registry == "pypi":
        urls.append(lambda: _pypi_resolved_url(src))
    errors = []
    tried: set[str] = set()
    tmp = dst.with_suffix(dst.suffix + ".part")
    for u in urls:
        if callable(u):
            api_host = _host(_pypi_json(src.package))
            if api_host in down_hosts:
                errors.append(f"{api_host}: unreachable earlier")
                continue
            try:
                url = u()
            except Exception as exc:  # noqa: BLE001 - report and try the next
                if _is_connection_error(exc):
                    down_hosts.add(api_host)
                errors.append(f"PyPI JSON API: {exc}")
                continue
        else:
            url = u
        if not url or url in tried:
            continue
        tried.add(url)
        if _host(url) in down_hosts:
            errors.append(f"{_host(url)}: unreachable earlier")
            continue
        try:
            _info(f"  downloading {url}", quiet)
            _http_get(url, tmp)
        except Exception as exc:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            if _is_connection_error(exc):
                down_hosts.add(_host(url))
            errors.append(f"{url}: {exc}")
            continue
        digest = sha256_file(tmp)
        if digest != src.sha256:
            errors.append(f"{url}: sha256 {digest} != pinned {src.sha256}")
            tmp.unlink(missing_ok=True)
            continue
        os.replace(tmp, dst)
        return dst
    raise RuntimeError("download failed: " + "; ".join(errors))


def _archive_members(archive: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(posix path, reader) for every regular file in a zip/wheel or tar(.gz) archive."""
    name = archive.name.lower()
    if name.endswith((".zip", ".whl")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, (lambda i=info: zf.read(i))
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:  # streaming: members are read in archive order
                if member.isreg():
                    yield member.name, (lambda m=member: tf.extractfile(m).read())
    else:
        raise ValueError(f"unsupported archive type: {archive.name}")


def _in_series_dir(path: str, spec: SeriesSpec) -> bool:
    p = PurePosixPath(path)
    prefix = PurePosixPath(spec.prefix)
    try:
        rel = p.relative_to(prefix)
    except ValueError:
        return False
    if not spec.recursive and len(rel.parts) != 1:
        return False
    if spec.include and not re.search(spec.include, p.name):
        return False
    return True


def _safe_basename(name: str) -> str:
    base = PurePosixPath(name).name
    if base in ("", ".", "..") or "/" in base or "\\" in base or "\x00" in base:
        raise ValueError(f"unsafe file name in archive: {name!r}")
    return base


def _is_dicom_bytes(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def _collect(src: Source, archive: Path) -> dict[str, dict[str, bytes]]:
    """{series name: {basename: bytes}} for all series of a downloaded source."""
    out: dict[str, dict[str, bytes]] = {s.name: {} for s in src.series}
    inner_specs: dict[str, list[SeriesSpec]] = {}
    for spec in src.series:
        if spec.inner_zip:
            inner_specs.setdefault(spec.inner_zip, []).append(spec)
    direct = [s for s in src.series if not s.inner_zip]

    def take(spec: SeriesSpec, path: str, data: bytes) -> None:
        if not _is_dicom_bytes(data):
            return
        base = _safe_basename(path)
        if base in out[spec.name]:
            raise ValueError(f"{spec.name}: two files named {base!r}")
        out[spec.name][base] = data

    for path, read in _archive_members(archive):
        for spec in direct:
            if _in_series_dir(path, spec):
                take(spec, path, read())
        if path in inner_specs:
            with zipfile.ZipFile(io.BytesIO(read())) as inner:
                for info in inner.infolist():
                    if info.is_dir():
                        continue
                    for spec in inner_specs[path]:
                        if _in_series_dir(info.filename, spec):
                            take(spec, info.filename, inner.read(info))
    return out
