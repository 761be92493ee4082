"""Node lifecycle behind one interface, two runtimes.

- ``process``: the node runs as one local process (Fed-BioMed's single-process entry through
  ``python -m site_agent.node_entry``, which pins the coordinator and presents the site's
  certificate) in its own session, with a pid file and a clean
  SIGTERM -> SIGKILL stop. Used where no Docker engine exists (tests, testbed, laptops) and
  inside the site container, where ``start --foreground`` execs the same command.
- ``docker``: the site image runs the same entrypoint through the Docker SDK, with the
  site's folders mounted at the same absolute paths (so dataset paths in the node's
  registry mean the same thing inside and out), as the folder owner's uid:gid, with a
  restart policy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import psutil

from fedimg_core import atomic
from fedimg_core.devices import DEVICE_ENV, cuda_index, node_args_for
from pipelines.artifact_approval import STORE_ENV, store_dir
from site_agent.config import SiteConfig
from site_agent.errors import UserError
from site_agent.node import SECURITY_SETTINGS
from site_agent.processes import parent_death_signal as parent_death_signal  # re-exported: testbeds import them from here
from site_agent.processes import pid_alive as pid_alive
from site_agent.processes import signal_group as signal_group
from site_agent.trust import TRUST_DIR_ENV, TrustFiles, check_enrolled

CONTAINER_LABEL = "org.fedimg.site"


def node_command(site: SiteConfig, python: str = sys.executable) -> list[str]:
    """The command line that runs the site's node: Fed-BioMed's single-process entry
    (``fedbiomed.node.node_pm``) behind `site_agent.node_entry`, which installs the coordinator
    pin and the site's client certificate first.

    Args:
        site: the site (its node folder is the node's config root).
        python: the interpreter to run it with.

    Returns:
        The argument list, for `subprocess.Popen` or `os.execve`.
    """
    return [python, "-m", "site_agent.node_entry", "--config", str(site.node_dir), "--node-args", json.dumps(node_args_for(site.device))]


def node_environment(site: SiteConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the node: coordinator address from the site config, security forced on,
    the site's work folders (cache, models, artifact approvals).

    Every inherited FBM_* variable is dropped: Fed-BioMed reads FBM_<SECTION>_<KEY> over its
    config file, so a stray one could switch approval off or point the node at another database.
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``: no ``torch.load`` in the node unpickles code.

    Args:
        site: the site.
        base: the environment to start from (default: this process's).

    Returns:
        The node's environment.
    """
    env = {k: v for k, v in (base if base is not None else os.environ).items() if not k.startswith("FBM_")}
    env["FBM_RESEARCHER_IP"] = site.coordinator_host
    env["FBM_RESEARCHER_PORT"] = str(site.coordinator_port)
    for key, value in SECURITY_SETTINGS.items():
        env[f"FBM_SECURITY_{key.upper()}"] = value
    env["PYTHONUNBUFFERED"] = "1"
    env[TRUST_DIR_ENV] = str(TrustFiles.of(site).dir)  # pins, site key and certificate (site_agent.node_entry)
    env[DEVICE_ENV] = site.device  # where the plans train and score (pipelines.device.plan_device)
    env["FEDIMG_CACHE_DIR"] = str(site.work_dir / "cache")  # preprocessed volumes, kept across rounds and runs
    env["FEDIMG_SPLITS_DIR"] = str(site.work_dir / "splits")  # which cases each run held out: a record, not a cache
    # pretrained encoder weights for the data factory's domain key, where the site has them
    env["FEDIMG_MODELS_DIR"] = str(site.work_dir / "models")
    # the site's approvals of executable artifacts (TorchScript, pickles): nothing else loads
    env[STORE_ENV] = str(store_dir(site.work_dir))
    # defence in depth: every torch.load in the node (Fed-BioMed's, MONAI's, ours) reads plain
    # tensors only, even one that asks for weights_only=False; the opposite switch is dropped
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    return env


def require_node(site: SiteConfig) -> None:
    """Refuse a site whose Fed-BioMed node was never created (checked before enrolment: it needs the node's id).

    Args:
        site: the site.

    Raises:
        UserError: no node in the site's node folder.
    """
    if not (site.node_dir / "etc" / "config.ini").is_file():
        raise UserError(f"{site.node_dir}: no Fed-BioMed node here; run `site-agent init` first")


@dataclass
class Status:
    """What a runtime says about the node.

    Args:
        running: whether the node runs.
        runtime: ``process`` or ``docker``.
        pid: the node's process id (process runtime), if known.
        detail: a short sentence for the user (since when, stale pid file, container state).
    """

    running: bool
    runtime: str
    pid: int | None = None
    detail: str = ""


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _pid_record(pid: int) -> dict[str, Any]:
    return {"pid": pid, "create_time": _create_time(pid), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _is_our_node(info: dict[str, Any]) -> bool:
    """The pid file names a live process that is the node it recorded.

    A bare pid is not enough: after a reboot the pid may belong to anything, and a pid
    file written inside the site container (pid 1 there) names the host's init outside.
    The process's start time, recorded at launch, tells them apart.
    """
    pid, recorded = int(info["pid"]), info.get("create_time")
    if recorded is None or not pid_alive(pid):
        return False
    now = _create_time(pid)
    return now is not None and abs(now - float(recorded)) < 0.05


class ProcessRuntime:
    """The node as one local process in its own session, with a pid file (testbeds, laptops,
    and inside the site container).

    Args:
        site: the site.
    """

    name = "process"

    def __init__(self, site: SiteConfig) -> None:
        self.site = site

    def _read_pid(self) -> dict[str, Any] | None:
        try:
            info = json.loads(self.site.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def status(self) -> Status:
        """Whether the node the pid file names runs (a reused pid does not count).

        Returns:
            The node's status.
        """
        info = self._read_pid()
        if not info:
            return Status(False, self.name, detail="not started")
        pid = int(info["pid"])
        if _is_our_node(info):
            return Status(True, self.name, pid=pid, detail=f"running since {info.get('started', '?')}")
        return Status(False, self.name, pid=pid, detail="stopped (stale pid file)")

    def owns_running_node(self) -> bool:
        """Whether this runtime started the node that runs now (its pid file names it).

        Returns:
            True when the pid file names a live node process.
        """
        info = self._read_pid()
        return info is not None and bool(info) and _is_our_node(info)

    def _check_ready(self) -> None:
        require_node(self.site)
        if self.site.device.startswith("cuda"):  # a forced GPU must exist before the node starts, not at its first round
            from pipelines.device import DeviceError, resolve_device  # imports torch: only for this check

            try:
                resolve_device(self.site.device)
            except DeviceError as exc:
                raise UserError(f"{self.site.path or 'site config'}: {exc}") from None
        check_enrolled(self.site)  # no key, certificate or coordinator pin: one line saying how to enrol

    def start(self, die_with_parent: bool = False, extra_env: dict[str, str] | None = None) -> Status:
        """Start the node in the background; idempotent when it already runs.

        Args:
            die_with_parent: tie the node to the calling process (testbeds): the kernel sends
                it SIGTERM when the caller dies, even by SIGKILL.
            extra_env: variables added to the node's environment.

        Returns:
            The node's status once started.

        Raises:
            UserError: no node created here yet, or it exited at once.
        """
        self._check_ready()
        current = self.status()
        if current.running:
            return current
        self.site.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.site.log_file, "ab")
        try:
            proc = subprocess.Popen(
                node_command(self.site),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**node_environment(self.site), **(extra_env or {})},
                cwd=str(self.site.work_dir),
                start_new_session=True,  # own process group: a stop reaches every child
                preexec_fn=parent_death_signal(os.getpid()) if die_with_parent else None,
            )
        finally:
            log.close()
        atomic.write_json(self.site.pid_file, _pid_record(proc.pid))
        time.sleep(0.5)
        if proc.poll() is not None:
            raise UserError(f"node exited at once with code {proc.returncode}; see {self.site.log_file}")
        return self.status()

    def run_foreground(self) -> None:
        """Replace this process with the node (container entrypoint: signals reach the node).

        Raises:
            UserError: no node created here yet.
        """
        self._check_ready()
        self.site.work_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.site.pid_file, _pid_record(os.getpid()))  # exec keeps pid and start time
        cmd = node_command(self.site)
        os.execve(cmd[0], cmd, node_environment(self.site))

    def stop(self, timeout: float = 15.0) -> Status:
        """SIGTERM the node's process group, wait, then SIGKILL what is left.

        Args:
            timeout: seconds to wait after SIGTERM.

        Returns:
            The status (not running).
        """
        info = self._read_pid()
        if not info:
            return Status(False, self.name, detail="not started")
        pid = int(info["pid"])
        if _is_our_node(info):  # never signal a process that merely reuses the pid
            signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                signal_group(pid, signal.SIGKILL)
                time.sleep(0.2)
        self.site.pid_file.unlink(missing_ok=True)
        return Status(False, self.name, pid=pid, detail="stopped")

    def logs(self, lines: int = 50) -> list[str]:
        """The end of the node's log file.

        Args:
            lines: how many lines from the end.

        Returns:
            The lines (none when there is no log yet).
        """
        if not self.site.log_file.is_file():
            return []
        with open(self.site.log_file, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            tail = fh.read().decode("utf-8", "replace").splitlines()
        return tail[-lines:]


def container_name(site: SiteConfig) -> str:
    """The docker runtime's container name for this site.

    Args:
        site: the site.

    Returns:
        ``fedimg-site-<site name>``.
    """
    return f"fedimg-site-{site.site_name}"


def container_spec(site: SiteConfig, engine_has_gpus: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``docker.from_env().containers.run(**spec)``.

    Pure function (no engine needed), so the spec is tested where no Docker engine runs.

    Args:
        site: the site.
        engine_has_gpus: the engine has the NVIDIA runtime (``docker info``); with device
            ``auto`` the container then gets every GPU.

    Returns:
        The container's image, command, user, environment, mounts, restart policy, limits and,
        for a GPU device (``cuda``, ``cuda:N``, or ``auto`` on a GPU engine), a device request
        (the image must be the CUDA variant).
    """
    config_path = Path(site.path) if site.path else site.work_dir / "site.yaml"
    st = site.work_dir.stat() if site.work_dir.exists() else None
    user = f"{st.st_uid}:{st.st_gid}" if st else "10001:10001"
    if user.startswith("0:"):
        user = "10001:10001"  # never run the node as root, even if root created the folder
    volumes = {
        str(site.work_dir): {"bind": str(site.work_dir), "mode": "rw"},
        str(site.data_dir): {"bind": str(site.data_dir), "mode": "ro"},
        str(config_path): {"bind": str(config_path), "mode": "ro"},
    }
    loopback = site.coordinator_host in ("localhost", "127.0.0.1", "::1") or site.coordinator_host.startswith("127.")
    restart_policy: dict[str, Any] = {"Name": site.docker.restart} if site.docker.restart != "no" else {"Name": ""}
    if site.docker.restart == "on-failure":
        restart_policy["MaximumRetryCount"] = 5
    spec: dict[str, Any] = {
        "image": site.docker.image,
        # --config belongs to the `site-agent` group: it goes before the subcommand.
        "command": ["--config", str(config_path), "start", "--foreground", "--runtime", "process"],
        "name": container_name(site),
        "detach": True,
        "user": user,
        "environment": {
            "FEDIMG_SITE_CONFIG": str(config_path),
            **{k: v for k, v in node_environment(site, base={}).items()},
        },
        "volumes": volumes,
        "restart_policy": restart_policy,
        "labels": {CONTAINER_LABEL: site.site_name},
        "read_only": False,
        "security_opt": ["no-new-privileges:true"],
        "cap_drop": ["ALL"],
    }
    if site.device.startswith("cuda") or (site.device == "auto" and engine_has_gpus):
        index = cuda_index(site.device)
        # cuda:N: that card only, which the container sees as cuda:0 (its node is started with --device cuda:0)
        request = (
            docker.types.DeviceRequest(device_ids=[str(index)], capabilities=[["gpu"]])
            if index is not None
            else docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
        )
        spec["device_requests"] = [request]
        if index is not None:
            spec["command"] = [*spec["command"], "--device", "cuda:0"]
    if loopback:
        spec["network_mode"] = "host"  # a loopback coordinator is only reachable from the host network
    elif site.docker.network:
        spec["network"] = site.docker.network
    return spec


def docker_engine_available(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping.

    Args:
        timeout: seconds to wait for it.

    Returns:
        False on any failure (no SDK configuration, no socket, no answer).
    """
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no engine answering"
        return False


class DockerRuntime:
    """The node in the site image's container, through the Docker SDK.

    Args:
        site: the site.
        client: a Docker SDK client (default: one from the environment, made when first used).
    """

    name = "docker"

    def __init__(self, site: SiteConfig, client: docker.DockerClient | None = None) -> None:
        self.site = site
        self._client = client

    @property
    def client(self) -> docker.DockerClient:
        """The Docker SDK client, connected and pinged on first use.

        Raises:
            UserError: no Docker engine answers.
        """
        if self._client is None:
            try:
                self._client = docker.from_env(timeout=10)
                self._client.ping()
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"no Docker engine answers ({exc.__class__.__name__}); use --runtime process") from None
        return self._client

    def _container(self) -> Any:
        try:
            return self.client.containers.get(container_name(self.site))
        except docker.errors.NotFound:
            return None

    def status(self) -> Status:
        """Whether the site's container runs.

        Returns:
            The node's status (no pid: the container's process is not ours to inspect).
        """
        c = self._container()
        if c is None:
            return Status(False, self.name, detail="no container")
        return Status(c.status == "running", self.name, detail=f"container {c.name}: {c.status}")

    def start(self) -> Status:
        """Start the site's container (created from `container_spec` when there is none).

        Returns:
            The node's status once started.
        """
        c = self._container()
        if c is not None:
            if c.status != "running":
                c.start()
            return self.status()
        self.client.containers.run(**container_spec(self.site, engine_has_gpus=self._engine_has_gpus()))
        return self.status()

    def _engine_has_gpus(self) -> bool:
        """Whether the engine has the NVIDIA container runtime (what GPU device requests need)."""
        try:
            runtimes = self.client.info().get("Runtimes") or {}
        except docker.errors.DockerException:
            return False
        return "nvidia" in runtimes

    def stop(self, timeout: float = 15.0) -> Status:
        """Stop and remove the site's container (the work folder keeps everything).

        Args:
            timeout: seconds docker waits before it kills the node.

        Returns:
            The status (not running).
        """
        c = self._container()
        if c is not None:
            c.stop(timeout=int(timeout))
            c.remove()
        return Status(False, self.name, detail="stopped")

    def logs(self, lines: int = 50) -> list[str]:
        """The end of the container's log.

        Args:
            lines: how many lines from the end.

        Returns:
            The lines (none without a container).
        """
        c = self._container()
        if c is None:
            return []
        return c.logs(tail=lines).decode("utf-8", "replace").splitlines()

    def run_foreground(self) -> None:
        """Refused: running in the foreground is the process runtime's (the container's entrypoint).

        Raises:
            UserError: always.
        """
        raise UserError("--foreground is for the process runtime (the container entrypoint)")


def get_runtime(site: SiteConfig, override: str | None = None) -> ProcessRuntime | DockerRuntime:
    """The runtime to drive the node with: ``override``, else the config's; ``auto`` picks the
    process runtime when it started the running node or no Docker engine answers.

    Args:
        site: the site.
        override: ``process``, ``docker`` or ``auto`` (None: the config's runtime).

    Returns:
        The runtime.

    Raises:
        UserError: an unknown runtime name.
    """
    choice = override or site.runtime
    if choice == "auto":
        # A pid file means the process runtime started the node: keep talking to it.
        choice = "process" if ProcessRuntime(site).owns_running_node() or not docker_engine_available() else "docker"
    if choice == "docker":
        return DockerRuntime(site)
    if choice == "process":
        return ProcessRuntime(site)
    raise UserError(f"unknown runtime {choice!r}")
