"""The registry pulls of one command, staged outside the models folder until the command succeeds.

Downloads land in ``<work_dir>/staging/`` (outside the models folder a plan can name files in)
and move into the registry folder only when the command succeeds; a failed command leaves
nothing there, and a killed command's leftovers are removed by the next one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from site_agent.processes import pid_alive
from site_agent.registry_pull import RegistryReader
from site_agent.registry_transport import check_kind, check_name

__all__ = ["STAGING_PREFIX", "StagedPulls"]

STAGING_PREFIX = "pull-"


def _pid_of(folder: Path) -> int | None:
    try:
        return int(folder.name[len(STAGING_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


class StagedPulls:
    """The registry pulls of one command, kept out of the registry folder until it succeeds.

    Downloads go to a folder of their own under `staging_root` (which must lie outside the
    models folder plans can name files in); `commit` moves each verified version into
    ``<registry_dir>/<kind>/<name>/<version>/``, `discard` deletes them. Used as a context
    manager it commits when the block succeeds and discards when it raises::

        with StagedPulls(client, work_dir / "models" / "registry", work_dir / "staging") as pulls:
            folder = pulls.pull("factory", "abdomen-gan")
            ...  # everything the command does with it

    Args:
        client: the `RegistryClient` (any `RegistryReader`).
        registry_dir: the site's registry folder (a verified copy there is reused).
        staging_root: where this command's downloads wait.
    """

    def __init__(self, client: RegistryReader, registry_dir: str | os.PathLike, staging_root: str | os.PathLike):
        self.client = client
        self.registry_dir = Path(registry_dir)
        self.staging_root = Path(staging_root)
        self._dir: Path | None = None
        self._staged: list[tuple[Path, Path, dict]] = []

    def _staging(self) -> Path:
        if self._dir is None:
            self.staging_root.mkdir(parents=True, exist_ok=True)
            for old in self.staging_root.glob(f"{STAGING_PREFIX}*"):  # left by a command that was killed
                pid = _pid_of(old)
                if pid is not None and pid != os.getpid() and not pid_alive(pid):
                    shutil.rmtree(old, ignore_errors=True)
            self._dir = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.staging_root))
        return self._dir

    def pull(self, kind: str, name: str, version: str = "latest") -> Path:
        """A verified folder of the version: the registry folder's copy when it still
        verifies, else a staged download (moved into the registry folder by `commit`).

        Args:
            kind: the artifact's kind.
            name: its name.
            version: ``vNNNN``, or ``latest``.

        Returns:
            The version's folder (staged or in the registry folder).
        """
        check_kind(kind)
        check_name(name)
        record = self.client.record(kind, name, version)
        target = self.registry_dir / kind / name / record["version"]
        if self.client._cached(target, record):
            return target
        folder = self.client._fetch(record, self._staging())
        self._staged.append((folder, target, record))
        return folder

    def commit(self) -> list[Path]:
        """Move every staged version into the registry folder.

        Returns:
            Their folders there.
        """
        done = []
        for folder, target, record in self._staged:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                if self.client._cached(target, record):  # a concurrent command put the same version there
                    done.append(target)
                    continue
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".stale", dir=target.parent))
                os.rename(target, trash / target.name)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(folder, target)
            done.append(target)
        self._staged.clear()
        self.discard()
        return done

    def discard(self) -> None:
        """Delete this command's downloads that were not committed."""
        self._staged.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "StagedPulls":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
