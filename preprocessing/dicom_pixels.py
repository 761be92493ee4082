"""Decoding one DICOM file's pixel data without ever risking this process.

pydicom 3 tries every installed plugin for a transfer syntax; GDCM (C++) ends the process
with abort() on some corrupt or crafted data (an uncaught C++ exception, e.g. in a JPEG 2000
codestream), which would stop a whole prepare run with no manifest. The other plugins report
bad data as Python exceptions, so they run in this process, in `_PLUGIN_PREFERENCE` order;
GDCM runs only in a child process (`preprocessing.decode_worker`, see `IsolatedDecoder`), for
the syntaxes only it decodes (lossless JPEG, 12-bit JPEG) or when the others fail.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, cast

import numpy as np
import pydicom
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from preprocessing.refusals import SeriesError, short_error

__all__ = [
    "DECODE_TIMEOUT_S",
    "ISOLATED_PLUGINS",
    "IsolatedDecoder",
    "check_pixel_length",
    "decoding_plugins",
    "in_process_plugins_only",
    "plugins_for",
    "read_pixels",
]

log = logging.getLogger(__name__)
# pydicom logs every plugin that fails on a frame as an ERROR with its traceback; the failure
# is ours to report (a refusal naming the file, with each plugin's error), so within our
# decoding calls those records are dropped (the CLIs' log handler would print them).
_PYDICOM_DECODER_LOG = logging.getLogger("pydicom.pixels.decoders.base")


@contextmanager
def _pydicom_decoder_log_off() -> Iterator[None]:
    previous = _PYDICOM_DECODER_LOG.disabled
    _PYDICOM_DECODER_LOG.disabled = True
    try:
        yield
    finally:
        _PYDICOM_DECODER_LOG.disabled = previous


_EXPECTED: dict[tuple[int | str, ...], int] = {}  # (rows, columns, frames, samples, bits, photometric) -> expected native length


def check_pixel_length(path: Path, ds: pydicom.Dataset) -> None:
    """Refuse native pixel data shorter than its header declares, before decoding.

    A decoder allocates what the header declares (Rows 65535 over a few bytes): native pixel
    data must hold Rows x Columns x frames x samples x BitsAllocated. The length comes from
    the element's header, the value is not loaded. Encapsulated (compressed) pixel data is
    left to its decoder: its size says nothing.

    Args:
        path: the file, for the message.
        ds: its dataset (pixel data deferred).

    Raises:
        SeriesError: code ``pixel_data_length`` (or ``bad_image_tag`` for non-integer tags).
    """
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and (not UID(str(ts)).is_transfer_syntax or UID(str(ts)).is_encapsulated):
        return  # an unknown transfer syntax is reported by the decoder
    keyword, bits = next(((k, b) for k, b in (("PixelData", 0), ("FloatPixelData", 32), ("DoubleFloatPixelData", 64)) if k in ds), (None, 0))
    if keyword is None:
        return
    try:
        dims = [int(ds.get(k, d) or d) for k, d in (("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1), ("SamplesPerPixel", 1))]
        bits = bits or int(ds.get("BitsAllocated", 0) or 0)
    except (TypeError, ValueError):
        raise SeriesError(f"{path}: Rows/Columns/NumberOfFrames/SamplesPerPixel/BitsAllocated are not integers", "bad_image_tag") from None
    needed = (dims[0] * dims[1] * dims[2] * dims[3] * bits + 7) // 8
    if keyword == "PixelData" and "PhotometricInterpretation" in ds:
        # pydicom's own rule also knows 1-bit packing and YBR_FULL_422's 2/3 length; it depends on these tags
        # only, the same for every slice of a series: computed once per combination (pydicom's is slow)
        key: tuple[int | str, ...] = (*dims, bits, str(ds.get("PhotometricInterpretation", "")))
        if key not in _EXPECTED:
            try:
                _EXPECTED[key] = get_expected_length(ds)
            except (AttributeError, TypeError, ValueError, KeyError):
                _EXPECTED[key] = needed  # a malformed tag: the plain product still bounds what a decoder would allocate
            if len(_EXPECTED) > 256:
                _EXPECTED.pop(next(iter(_EXPECTED)))
        needed = _EXPECTED[key]
    elem = ds.get_item(keyword)  # a raw element while deferred: its length without its value
    value = elem.value
    have = len(value) if isinstance(value, (bytes, bytearray)) else getattr(elem, "length", None)
    if have is None or have == 0xFFFFFFFF:
        return
    if have < needed:
        raise SeriesError(
            f"{path}: pixel data cannot be decoded: it holds {have:,} bytes but Rows x Columns x frames x samples x "
            f"BitsAllocated ({' x '.join(map(str, dims))} x {bits}) need {needed:,}",
            "pixel_data_length",
        )


ISOLATED_PLUGINS = ("gdcm",)
_PLUGIN_PREFERENCE = ("pydicom", "pylibjpeg", "pyjpegls", "pillow")
# A decoder stuck on one file (seconds per slice are normal) is killed after this long.
DECODE_TIMEOUT_S = 300
_WORKER = Path(__file__).with_name("decode_worker.py")


def _transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return UID(str(ts)) if ts else None


def plugins_for(ds: pydicom.Dataset) -> tuple[list[str], bool]:
    """`decoding_plugins` for a dataset: its transfer syntax and BitsStored.

    Args:
        ds: the file's dataset.

    Returns:
        (in-process plugins in order of preference, whether GDCM may decode it in a child).
    """
    try:
        bits = int(ds.get("BitsStored")) if ds.get("BitsStored") not in (None, "") else None
    except (TypeError, ValueError):
        bits = None
    return decoding_plugins(_transfer_syntax(ds), bits)


def decoding_plugins(ts: UID | None, bits_stored: int | None = None) -> tuple[list[str], bool]:
    """The pydicom decoding plugins for a transfer syntax, split by where they may run.

    Args:
        ts: the file's transfer syntax (None: unknown).
        bits_stored: the file's BitsStored, where known (Pillow decodes only 8-bit JPEG
            Extended: a 12-bit series goes to GDCM at once instead of failing slice by slice).

    Returns:
        (plugins that run in this process, in order of preference; whether an isolated
        plugin (GDCM) can decode it in a child process). ``([], False)`` for a native or
        unknown syntax: pydicom's own decoder, or its error, applies as usual.
    """
    if ts is None or not ts.is_transfer_syntax or not ts.is_encapsulated:
        return [], False
    try:
        available = get_decoder(ts).available_plugins
    except NotImplementedError:
        return [], False
    rank = {name: i for i, name in enumerate(_PLUGIN_PREFERENCE)}
    in_process = sorted((p for p in available if p not in ISOLATED_PLUGINS), key=lambda p: (rank.get(p, len(rank)), p))
    if ts == pydicom.uid.JPEGExtended12Bit and bits_stored not in (None, 8):
        in_process = [p for p in in_process if p != "pillow"]
    return in_process, any(p in ISOLATED_PLUGINS for p in available)


class _NeedsIsolation(Exception):
    """No in-process plugin decoded a file that GDCM may decode in a child process."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


def _undecodable(path: Path, ds: pydicom.Dataset, detail: str) -> SeriesError:
    ts = _transfer_syntax(ds)
    return SeriesError(f"{path}: pixel data cannot be decoded ({ts.name if ts else '?'}): {detail}", "undecodable_pixels")


def _decode_in_process(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """Decode with the plugins that run in this process; raise `_NeedsIsolation` when they
    cannot and GDCM could (in a child), `SeriesError` when nothing can."""
    in_process, isolated = plugins_for(ds)
    if not in_process and not isolated:
        try:
            with warnings.catch_warnings(), _pydicom_decoder_log_off():
                warnings.simplefilter("ignore")
                return ds.pixel_array  # native (uncompressed) data, or pydicom's own error
        except Exception as exc:  # noqa: BLE001 - decoders raise many types
            raise _undecodable(path, ds, short_error(exc)) from None
    errors = []
    for plugin in in_process:
        ds.pixel_array_options(decoding_plugin=plugin)
        try:
            with warnings.catch_warnings(), _pydicom_decoder_log_off():
                warnings.simplefilter("ignore")
                return ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoders raise many types
            errors.append(f"{plugin}: {short_error(exc, 120)}")
    if isolated:
        raise _NeedsIsolation(errors)
    raise _undecodable(path, ds, "; ".join(errors) or "no decoder installed")


class IsolatedDecoder:
    """Decode files with GDCM in one child process, in the order given.

    A file on which the decoder crashes (or exceeds `DECODE_TIMEOUT_S`) is refused as
    ``decoder_crashed``. Use as a context manager; `decode` must be called for the files in
    the order given.

    Args:
        paths: the files the child decodes, in order.
    """

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self._next = 0
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", str(_WORKER), str(DECODE_TIMEOUT_S)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        # both pipes exist (PIPE) and are buffered binary files (bufsize -1, the default)
        stdin = cast(io.BufferedWriter, self._proc.stdin)
        self._stdout = cast(io.BufferedReader, self._proc.stdout)
        stdin.write(json.dumps([str(p) for p in self.paths]).encode())
        stdin.close()

    def __enter__(self) -> IsolatedDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child process (killed if still running) and release its pipes."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stdout.close()
        self._stderr.close()

    def decode(self, path: Path, ds: pydicom.Dataset, earlier: Sequence[str] = ()) -> np.ndarray:
        """The next file's pixel array.

        Args:
            path: the file (must be the next one of the list given).
            ds: its dataset (for the messages).
            earlier: what the in-process decoders said about it, for the message.

        Returns:
            The decoded pixel array, as pydicom's ``pixel_array`` gives it.

        Raises:
            SeriesError: ``undecodable_pixels`` (GDCM refused it too) or ``decoder_crashed``.
            RuntimeError: a file requested out of order (a programming error).
        """
        if self._next >= len(self.paths) or Path(path) != self.paths[self._next]:
            raise RuntimeError(f"IsolatedDecoder: {path} requested out of order")
        self._next += 1
        line = self._stdout.readline()
        record = json.loads(line) if line.endswith(b"\n") else None
        if record is not None and not record["ok"]:
            raise _undecodable(path, ds, "; ".join([*earlier, f"gdcm: {record['error'][:160]}"]))
        if record is not None:
            arr = np.empty(record["shape"], dtype=np.dtype(record["dtype"]))
            view = arr.data.cast("B")
            got = 0
            while got < len(view):
                n = self._stdout.readinto(view[got:])
                if not n:
                    break
                got += n
            if got == len(view):
                return arr
        raise self._crashed(path, ds)

    def _crashed(self, path: Path, ds: pydicom.Dataset) -> SeriesError:
        try:
            rc = self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            rc = self._proc.wait()
        if rc < 0:
            try:
                how = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"killed by signal {-rc}"
            if -rc == signal.SIGALRM:
                how += f": over {DECODE_TIMEOUT_S} s"
        else:
            how = f"exit status {rc}"
        self._stderr.seek(0)
        log.debug("%s: GDCM decoder process ended (%s); its stderr: %s", path, how, self._stderr.read()[-2000:].decode(errors="replace"))
        ts = _transfer_syntax(ds)
        return SeriesError(
            f"{path}: the pixel-data decoder (GDCM, {ts.name if ts else '?'}) crashed on this file ({how}): "
            "a corrupt or crafted file; the other cases are not affected",
            "decoder_crashed",
        )


def read_pixels(path: Path, ds: pydicom.Dataset | None = None, isolated: IsolatedDecoder | None = None) -> tuple[np.ndarray, pydicom.Dataset]:
    """One file's pixel array, decoded without ever risking this process.

    Args:
        path: the DICOM file.
        ds: its dataset, if already read (pixel data may be deferred).
        isolated: a running `IsolatedDecoder` whose next file is `path`, for a file only
            GDCM decodes (a series shares one child process). Without it, the plugins that
            run in this process are tried first, then GDCM in a child for this file alone.

    Returns:
        (pixel array, dataset).

    Raises:
        SeriesError: ``no_pixel_data``, ``pixel_data_length``, ``undecodable_pixels`` or
            ``decoder_crashed``, naming the file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ds is None:
            ds = pydicom.dcmread(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise SeriesError(f"{path}: no pixel data", "no_pixel_data")
    check_pixel_length(path, ds)
    if isolated is not None:
        return isolated.decode(path, ds), ds  # only GDCM decodes it: straight to the child
    try:
        return _decode_in_process(path, ds), ds
    except _NeedsIsolation as exc:
        with IsolatedDecoder([path]) as one:
            return one.decode(path, ds, exc.errors), ds


_SAFE_PLUGINS_LOCK = threading.Lock()


@contextmanager
def in_process_plugins_only() -> Iterator[None]:
    """Within the block, pydicom decodes with no isolated plugin (GDCM).

    For code that decodes through pydicom without choosing a plugin (highdicom reading a
    DICOM SEG). Data only GDCM decodes then fails with a Python exception instead of risking
    abort(), which the caller reports (pydicom's own log of it is dropped). The plugins are
    put back on exit; one block at a time (a lock).

    Yields:
        None, inside the block.
    """
    removed = []
    with _SAFE_PLUGINS_LOCK, _pydicom_decoder_log_off():
        try:
            for uid in pydicom.uid.AllTransferSyntaxes:
                try:
                    decoder = get_decoder(uid)
                except NotImplementedError:
                    continue
                for plugin in ISOLATED_PLUGINS:
                    if plugin in decoder.available_plugins:
                        decoder.remove_plugin(plugin)
                        removed.append((decoder, plugin))
            yield
        finally:
            for decoder, plugin in removed:
                decoder.add_plugin(plugin, (f"pydicom.pixels.decoders.{plugin}", "_decode_frame"))
