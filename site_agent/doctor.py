"""Preflight checks a site runs before joining a federation, each failing one with a hint
saying what to check or do."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from preprocessing.dataset import DatasetError, load_dataset
from site_agent import config as site_config
from site_agent import connectivity, node, trust
from site_agent.errors import UserError
from site_agent.runtime import ProcessRuntime

MIN_FREE_GB = 5.0


@dataclass
class Check:
    """One row of the doctor's table.

    Args:
        name: what is checked.
        ok: passed, failed, or None: not applicable now (not a failure).
        detail: what was found.
        hint: for a failing row (or a warning), what to check or do.
        warning: passed, but needs attention soon (shown as WARN; not a failure).
    """

    name: str
    ok: bool | None
    detail: str
    hint: str = ""
    warning: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict (``doctor --json``).

        Returns:
            Its fields by name.
        """
        return asdict(self)


def check_coordinator(host: str, port: int, timeout: float = 3.0, config_path: str = "the site config") -> list[Check]:
    """Rows "coordinator reachable" and, when it is, "coordinator certificate" (the name
    this site dials must be one the coordinator's TLS certificate is valid for).

    Args:
        host: the coordinator's host, as in the site config.
        port: its Fed-BioMed (gRPC) port.
        timeout: seconds for the connection and the TLS handshake each.
        config_path: the site config, named in hints.

    Returns:
        One or two rows.
    """
    pr = connectivity.probe(host, port, timeout=timeout)
    if not pr.reachable:
        hint = connectivity.hint_for(host, port, pr, False, connectivity.LogSummary(), config_path) or ""
        return [Check("coordinator reachable", False, pr.detail, hint)]
    rows = [Check("coordinator reachable", True, pr.detail)]
    if pr.cert_matches:
        rows.append(Check("coordinator certificate", True, f"valid for {host} ({', '.join(pr.cert_names or [])})"))
    else:
        rows.append(Check(
            "coordinator certificate", False,
            f"valid for {', '.join(pr.cert_names or []) or 'nothing readable'}, not for {host!r}",
            connectivity.hint_for(host, port, pr, False, connectivity.LogSummary(), config_path) or "",
        ))  # fmt: skip
    return rows


def check_trust(site: site_config.SiteConfig, timeout: float = 3.0, reachable: bool = True) -> list[Check]:
    """Rows "trust files" (only when group or others may write them), "site enrolled" (key,
    certificate from the coordinator, a pin), "site certificate" (valid now; a warning within
    `trust.EXPIRY_WARNING_DAYS` of its expiry) and "coordinator pinned" (the certificate the
    coordinator presents now is one the site pins; also what the node last saw).

    Args:
        site: the site.
        timeout: seconds for the connection and the TLS handshake.
        reachable: whether the coordinator's port answered (False: its certificate is not fetched again).

    Returns:
        One to four rows.
    """
    info = trust.summary(site)
    rows: list[Check] = []
    if info.get("unsafe"):
        rows.append(Check("trust files", False, info["unsafe"], "the node refuses to start until they are writable by their owner only"))
    if not info["enrolled"]:
        return [*rows, Check("site enrolled", False, info["problem"] or "not enrolled", "enrol the site: docs/guide/security.md")]
    cert = info["certificate"]
    refusal = info["refused_by_coordinator"]
    if refusal:
        rows.append(Check("site enrolled", False, f"the coordinator refused this site at {refusal['time']}: {refusal['reason']}",
                          "ask the coordinator's operator (`coordinator sites list`); a revoked site enrols again with a new request"))  # fmt: skip
    else:
        rows.append(Check("site enrolled", True, cert["subject"]))
    if cert["validity"] in ("expired", "not yet valid"):
        hint = trust.RENEW_HINT if cert["validity"] == "expired" else "check this machine's clock (and the coordinator's)"
        rows.append(Check("site certificate", False, f"{cert['validity_line']}; the coordinator refuses it", hint))
    elif cert["validity"] == "expiring":
        rows.append(Check("site certificate", True, cert["validity_line"], trust.RENEW_HINT, warning=True))
    else:
        rows.append(Check("site certificate", True, cert["validity_line"]))
    pr = connectivity.probe(site.coordinator_host, site.coordinator_port, timeout=timeout) if reachable else connectivity.Probe(False, "")
    last = info["last"] or {}
    if pr.cert_fingerprint is None:
        if last.get("state") == "refused":
            rows.append(Check("coordinator pinned", False, last.get("message", ""), "check the fingerprint with the coordinator's operator"))
        return rows
    if pr.cert_fingerprint in info["pins"] and last.get("state") == "refused" and last.get("seen") == pr.cert_fingerprint:
        # pinned, but the node refused it (outside its validity, or not for the host this site dials)
        rows.append(Check("coordinator pinned", False, last.get("message", ""), "see the detail; the node retries every few seconds"))
    elif pr.cert_fingerprint in info["pins"]:
        rows.append(Check("coordinator pinned", True, f"{site.coordinator_host}:{site.coordinator_port} presents {pr.cert_fingerprint}"))
    else:
        rows.append(Check(
            "coordinator pinned", False,
            f"{site.coordinator_host}:{site.coordinator_port} presents {pr.cert_fingerprint}, pinned: {', '.join(info['pins'])}; the node refuses it",
            "check the fingerprint with the coordinator's operator (`coordinator fingerprint`): if they rotated the certificate, "
            "`site-agent trust add SHA256:...`; otherwise something else answers at this address",
        ))  # fmt: skip
    return rows


def check_device(setting: str, config_path: str = "the site config") -> list[Check]:
    """What torch sees (build, CUDA, driver, every GPU) and whether the configured device computes.

    Args:
        setting: the site's device setting (auto, cpu, cuda, cuda:N).
        config_path: the config file, for the hints.

    Returns:
        Two rows: ``torch devices`` (informational) and ``device <setting>`` (a tiny 3D convolution
        on the device, compared with the CPU's result).
    """
    from pipelines.device import DeviceError, describe_devices, resolve_device, smoke_test  # torch: only when doctor runs

    seen = describe_devices()
    gpus = "; ".join(f"cuda:{g['index']} {g['name']} {g['memory_mb']} MB, capability {g['capability']}{', bf16' if g['bf16'] else ''}" for g in seen["gpus"])
    build = f"torch {seen['torch']}, " + (f"CUDA {seen['cuda_build']}" if seen["cuda_build"] else "CPU-only build")
    driver = f", driver {seen['driver']}" if seen["driver"] else ""
    cudnn = f", cuDNN {seen['cudnn']}" if seen["cudnn"] else ""
    rows = [Check("torch devices", None if not seen["cuda_available"] else True, f"{build}{cudnn}{driver}; " + (gpus or "no CUDA GPU visible"))]
    try:
        device = resolve_device(setting)
    except DeviceError as exc:
        rows.append(Check(f"device {setting}", False, str(exc), f"set device: auto or cpu in {config_path}, or give the node a GPU (CUDA image, --gpus)"))
        return rows
    ok, detail = smoke_test(device)
    rows.append(
        Check(f"device {setting}", ok, detail, "" if ok else "the GPU computes wrongly or not at all: check the driver (nvidia-smi) and the CUDA build")
    )
    return rows


def _config_hint(path: str | None) -> str:
    p = site_config.resolve_config_path(path)
    if not p.is_file():
        return (f"create it with `site-agent --config {p} init --site-name ... --coordinator-host ... --data-dir ... --work-dir ...`, "
                f"or point --config / ${site_config.CONFIG_ENV} at the existing one")  # fmt: skip
    return (f"fix the key named in the detail in {p} (every key, with an example: docs/guide/site.md; its JSON Schema: "
            "`coordinator schema site` or docs/schemas/site.schema.json)")  # fmt: skip


def _node_connection(site: site_config.SiteConfig) -> Check | None:
    """The running node's link to the coordinator; None when it runs in a container (the
    process is not ours to inspect) or cannot be told."""
    rt = ProcessRuntime(site)
    st = rt.status()
    if not st.running:
        if site.runtime == "auto":
            return None  # it may run in a container, which is not ours to inspect
        return Check("node connected", None, "the node is not running (process runtime)", "start it with `site-agent start`")
    last = trust.read_status(trust.TrustFiles.of(site)) or {}
    refused = last.get("message") if last.get("state") == "refused" else None
    conn = connectivity.assess(site.coordinator_host, site.coordinator_port, st.pid, rt.logs(5000),
                               site.node_dir / "log" / "security_audit.log", str(site.path), refused)  # fmt: skip
    if conn.connected is None:
        return None
    detail = conn.evidence + (f"; last message from the coordinator {conn.last_contact}" if conn.last_contact else "")
    return Check("node connected", conn.connected, detail, conn.hint or "")


def run_checks(config_path: str | None, min_free_gb: float = MIN_FREE_GB) -> list[Check]:
    """Run every check; a failing check never stops the others.

    Args:
        config_path: the site config (None: $FEDIMG_SITE_CONFIG or ./site.yaml).
        min_free_gb: free space the work folder needs.

    Returns:
        The rows, each failing one (``ok`` False) with a hint.
    """
    checks: list[Check] = []
    try:
        site = site_config.load(config_path)
    except UserError as exc:
        return [Check("site config valid", False, str(exc), _config_hint(config_path))]
    checks.append(Check("site config valid", True, str(site.path)))
    cfg = str(site.path)

    settings: dict[str, Any] | None
    try:
        settings = node.node_settings(site)
        checks.append(Check("node component", True, f"{settings['node_id']} in {site.node_dir}"))
        approval_ok = settings["training_plan_approval"] and not settings["allow_default_training_plans"]
        checks.append(Check(
            "training-plan approval on", approval_ok,
            f"approval={settings['training_plan_approval']}, default plans={settings['allow_default_training_plans']}",
            "" if approval_ok else f"rewrite the node's security settings with `site-agent --config {cfg} init ... --force` "
            f"(the node and its data are kept); `site-agent start` forces approval on in any case",
        ))  # fmt: skip
    except UserError as exc:
        hint = f"create the node with `site-agent --config {cfg} init ... --force` (the config is rewritten)"
        checks.append(Check("node component", False, str(exc), hint))
        settings = None  # no node: the rows that need one are left out

    coordinator_rows = check_coordinator(site.coordinator_host, site.coordinator_port, config_path=cfg)
    checks.extend(coordinator_rows)
    if settings is not None:
        checks.extend(check_trust(site, reachable=bool(coordinator_rows[0].ok)))
    if settings is not None and site.runtime != "docker":
        row = _node_connection(site)
        if row is not None:
            checks.append(row)

    checks.extend(check_device(site.device, cfg))

    probe = site.work_dir if site.work_dir.exists() else Path(site.work_dir.anchor)
    free_gb = shutil.disk_usage(probe).free / 1e9
    checks.append(Check(
        "disk space", free_gb >= min_free_gb, f"{free_gb:.1f} GB free in {probe} (need {min_free_gb:g})",
        "" if free_gb >= min_free_gb else f"free space under {probe} (old jobs in {site.work_dir / 'adapt'}, the volume cache in "
        f"{site.work_dir / 'cache'} can go), or move work_dir in {cfg} to a larger disk",
    ))  # fmt: skip

    if settings is not None:
        entries = node.list_datasets(site)
        if not entries:
            checks.append(Check(
                "datasets", False, "no dataset registered",
                f"prepare one (`site-agent prepare INPUT --out {site.data_dir}/NAME ...`), then "
                f"`site-agent dataset add {site.data_dir}/NAME --tag TAG` with the tag the researchers use",
            ))  # fmt: skip
        for d in entries:
            try:
                ds = load_dataset(d.path, verify_checksums=True)
                checks.append(Check(f"dataset {d.name}", True, f"{len(ds.cases)} cases, checksums match"))
            except DatasetError as exc:
                checks.append(Check(
                    f"dataset {d.name}", False, str(exc),
                    f"its files changed since it was registered: prepare it again (`site-agent prepare ... --out {d.path}`), "
                    f"or unregister it with `site-agent dataset remove {d.dataset_id}`",
                ))  # fmt: skip
    return checks
