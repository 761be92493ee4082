"""A whole federation on one machine: a coordinator and N site nodes as real processes on
loopback, each site with its own config, node component and data.

Teardown is guaranteed: every child runs in its own session (a terminal's Ctrl-C reaches
only the testbed, which then stops them in order), and every child is tied to the testbed
with PR_SET_PDEATHSIG, so even a SIGKILL of the testbed takes them down.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml

from coordinator import registry as R
from coordinator import runs
from coordinator.pki import CoordinatorPKI
from fedimg_core.errors import UserError
from fedimg_core.logs import verbosity_args
from site_agent import config as site_config
from site_agent import trust
from site_agent.runtime import ProcessRuntime, parent_death_signal, pid_alive, signal_group

log = logging.getLogger(__name__)
TAG = "fedimg-demo"

# Cases per phantom site in the main job (`coordinator testbed`, `./scripts/demo.sh`) and the methods benchmark: enough
# for 4 test cases per site besides 1 validation and 5 training cases (the demo spec's split). `Testbed` itself
# defaults to the site tool's 4, which keeps the tests fast.
DEMO_CASES_PER_SITE = 10


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it).

    Returns:
        The port number.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_spec_text() -> str:
    """The built-in demo spec (``coordinator/examples/phantom_condistfl.yaml``).

    Returns:
        Its YAML text.
    """
    return resources.files("coordinator").joinpath("examples/phantom_condistfl.yaml").read_text()


def chest_spec_text() -> str:
    """The radiograph demo spec (``coordinator/examples/chest_condistfl.yaml``).

    Returns:
        Its YAML text.
    """
    return resources.files("coordinator").joinpath("examples/chest_condistfl.yaml").read_text()


def enroll_site(home: Path, site: site_config.SiteConfig, public_host: str = "localhost") -> dict:
    """The whole enrolment of one site in one process (testbeds and tests; real sites use the CLIs):
    the site's key and CSR, signed with the coordinator home's site CA, installed with the pin.

    Args:
        home: the coordinator home (its PKI is created for ``public_host`` if missing).
        site: the site (its node must exist).
        public_host: the name the site dials.

    Returns:
        What `site_agent.trust.install` returns.
    """
    pki = CoordinatorPKI(home)
    pki.ensure(public_host)
    csr = trust.request(site)
    # the testbed makes both sides: a site re-created under the same name (a new node) replaces its enrolment
    cert, _ = pki.sign_csr(csr.read_bytes(), site.site_name, replace=True)
    return trust.install(site, cert, pki.fingerprint())


class Testbed:
    """A coordinator and ``n_sites`` site nodes on loopback under ``workdir``.

    Its own progress lines go to this module's logger; the coordinator CLI's output (its
    log lines, already timestamped, and its tables) to ``out``, by default this module's
    logger at DEBUG (a library user sees them with debug logging on).

    Args:
        workdir: where the sites, the coordinator home and the out-of-federation set live.
        n_sites: number of site nodes (at least one).
        port: gRPC port (0: a free one).
        auto_approve: each site runs an approver that approves the plan.
        out: receives each line the coordinator CLI prints.
        oof_phase: contrast phase of the out-of-federation test set (None: none).
        phases: each site's scanner phase, cycled over the sites.
        modalities: each site's scanner (CT or MR-like), cycled over the sites.
        classes: every site labels these (None: an organ group chosen by seed).
        cases: each site's number of cases, cycled over the sites (None: 4 each).
        reference_labels: each site also holds test-only reference labels of every organ group
            it does not label (`coordinator.testbed_site.reference_classes_for`), prepared with
            ``--reference-labels`` and scored on its test cases only (the forgetting measure).
        brain: FedSR sites instead: each site's brain-MRI scanner profile (``site-a`` ... ``site-d``
            of `fedimg_testing.phantom.BRAIN_SITES`), cycled over the sites; None: abdominal CT/MR.
        labelled: brain sites: how many of each site's cases have labels (its evaluation cases).
        body: ``abdomen`` (CT/MR phantoms) or ``chest``: radiograph sites after the ConDistFL paper's 2D
            setting (site i: scanner i of `fedimg_testing.phantom.chest.SCANNERS`, labelling left lung,
            right lung, heart or pneumothorax; cycled), prepared with the chest-xr schema; their reference
            labels are the paper's (`coordinator.testbed_site.CHEST_REFERENCES`: the other lung, or both lungs
            at the heart site, none at the pneumothorax site).

    Raises:
        UserError: fewer than one site.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, workdir: Path, n_sites: int, port: int = 0, auto_approve: bool = True, out: Callable[[str], None] | None = None,
                 oof_phase: str | None = None, phases: list[str] | None = None, modalities: list[str] | None = None,
                 classes: list[str] | None = None, cases: list[int] | None = None, reference_labels: bool = True,
                 device: str = "auto", brain: list[str] | None = None, labelled: int = 0, body: str = "abdomen"):  # fmt: skip
        if n_sites < 1:
            raise UserError("a testbed needs at least one site")
        self.workdir = Path(workdir).resolve()
        self.n_sites = n_sites
        self.oof_phase = oof_phase  # contrast phase of the out-of-federation test set (None: none)
        self.phases = list(phases or ["portal_venous"])  # each site's scanner phase, cycled over the sites
        self.modalities = list(modalities or ["CT"])  # each site's scanner (CT or MR-like), cycled over the sites
        self.classes = list(classes) if classes else None  # every site labels these (None: an organ group by seed)
        self.cases = list(cases) if cases else None  # cases per site, cycled (None: the site tool's default)
        self.reference_labels = reference_labels  # test-only reference labels of the classes a site does not label
        self.device = device  # every site's device setting (auto: a GPU when torch sees one)
        self.brain = list(brain) if brain else None  # FedSR sites: brain-MRI scanner profiles, cycled
        self.labelled = labelled
        self.body = body  # abdomen (CT/MR) or chest (radiographs)
        self.port = port or free_port()
        self.auto_approve = auto_approve
        self.out = out or (lambda line: log.debug("%s", line))  # the coordinator's own (already timestamped) lines
        self.children: list[subprocess.Popen] = []
        self.sites: list[site_config.SiteConfig] = []
        self._stopped = False

    # -- children ------------------------------------------------------------------------

    def _spawn(self, cmd: list[str], log_path: Path | None = None, **kw) -> subprocess.Popen:
        log_file = open(log_path, "ab") if log_path else None
        proc = subprocess.Popen(
            cmd,
            stdout=log_file or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=parent_death_signal(os.getpid()),
            **kw,
        )
        if log_file:
            log_file.close()
        self.children.append(proc)
        return proc

    def modality(self, i: int) -> str:
        """Site i's scanner modality (the list is cycled over the sites).

        Args:
            i: the site's index, from 0.

        Returns:
            ``CT`` or ``MR``; ``CR`` or ``DX`` for chest sites.
        """
        if self.body == "chest":
            from fedimg_testing.phantom import CHEST_SCANNERS as SCANNERS

            return SCANNERS[i % len(SCANNERS)].modality
        return "MR" if self.brain else self.modalities[i % len(self.modalities)]

    def dataset_dir(self, i: int) -> Path:
        """Site i's prepared dataset (named after its modality; ``brain`` for FedSR sites, ``chest`` for radiograph sites)."""
        if self.body == "chest":
            return self.sites[i].data_dir / "chest"
        return self.sites[i].data_dir / ("brain" if self.brain else self.modality(i).lower())

    def site_config_path(self, i: int) -> Path:
        """Site i's ``site.yaml``.

        Args:
            i: the site's index, from 0.

        Returns:
            ``<workdir>/sites/site-<i+1>/site.yaml``.
        """
        return self.workdir / "sites" / f"site-{i + 1}" / "site.yaml"

    def setup_sites(self) -> None:
        """Create each site (config, node, demo data, registration) in parallel processes."""

        def one(i: int) -> None:
            cfg = self.site_config_path(i)
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable, "-m", "coordinator.testbed_site", "setup", "--config", str(cfg),
                "--name", f"site-{i + 1}", "--port", str(self.port), "--seed", str(i + 1), "--tag", TAG,
                "--phase", self.phases[i % len(self.phases)],
                *(["--body", "chest"] if self.body == "chest" else ["--modality", self.modality(i)]),
                *(["--classes", ",".join(self.classes)] if self.classes else []),
                *(["--cases", str(self.cases[i % len(self.cases)])] if self.cases else []),
                *([] if self.reference_labels else ["--no-reference-labels"]),
                *(["--brain", self.brain[i % len(self.brain)], "--labelled", str(self.labelled)] if self.brain else []),
                "--device", self.device,
            ]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=parent_death_signal(os.getpid()))
            if res.returncode != 0:
                raise UserError(f"site-{i + 1} setup failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")

        def oof() -> None:
            assert self.oof_phase  # submitted only when there is one
            cmd = [
                sys.executable, "-m", "coordinator.testbed_site", "data", "--out", str(self.oof_dataset),
                "--seed", "99", "--phase", self.oof_phase, "--name", "out-of-federation", "--modality", self.oof_modality,
            ]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=parent_death_signal(os.getpid()))
            if res.returncode != 0:
                raise UserError(f"out-of-federation test set failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")

        with ThreadPoolExecutor(max_workers=min(self.n_sites + 1, os.cpu_count() or 2)) as pool:
            jobs = [pool.submit(one, i) for i in range(self.n_sites)]
            if self.oof_phase:
                jobs.append(pool.submit(oof))
            for job in jobs:
                job.result()
        self.sites = [site_config.load(self.site_config_path(i)) for i in range(self.n_sites)]
        for site in self.sites:
            enroll_site(self.home, site)
        log.info("%d sites prepared and enrolled under %s", self.n_sites, self.workdir / "sites")

    @property
    def oof_modality(self) -> str:
        """The out-of-federation scanner is the first site's modality (an MR federation is
        tested on MR; a mixed one on its first site's)."""
        return self.modality(0)

    @property
    def oof_dataset(self) -> Path:
        """The prepared out-of-federation test set (named after its modality)."""
        return self.workdir / "out-of-federation" / self.oof_modality.lower()

    @property
    def home(self) -> Path:
        """The coordinator home of the testbed (``<workdir>/coordinator``)."""
        return self.workdir / "coordinator"

    def install_atlas(self, name: str = "brain-atlas", size: int = 32) -> dict[str, str]:
        """FedSR: publish the phantom's atlas to the coordinator's registry and put it at every site.

        The atlas is the brain phantom's template in a neutral contrast
        (`fedimg_testing.phantom.make_brain_atlas`), on the grid the sites' phantom heads use. Each
        site gets the registry's files in ``<work_dir>/models/registry/atlas/<name>/<version>/``,
        where `site-agent atlas pull` leaves them (the testbed runs no registry server); the plan
        checks their sha256 against the spec's. A version already published is reused.

        Args:
            name: the atlas's registry name.
            size: voxels per axis (the sites' ``--brain-size``).

        Returns:
            The ``plan_args.atlas`` entry of a FedSR spec (name, version, sha256).
        """
        from coordinator.atlas import atlas_spec_entry, publish_atlas_arrays
        from fedimg_testing.phantom import make_brain_atlas
        from pipelines.fedsr.atlas import ATLAS_FILE, atlas_files
        from preprocessing.schema import load_schema

        registry = R.Registry(self.home)
        atlas = make_brain_atlas(shape=(size, size, size))
        source_text, sharing = "fedimg brain phantom template", "synthetic: no person"
        content = atlas_files(atlas.image, atlas.labels, atlas.affine, load_schema("brain-mri"), "MR", source_text, sharing)[ATLAS_FILE]
        digest = hashlib.sha256(content).hexdigest()
        # the phantom is deterministic: a version with this content already published is reused
        same = [r for r in registry.list("atlas") if r["name"] == name and r["files"][ATLAS_FILE]["sha256"] == digest]
        if same:
            entry = atlas_spec_entry(same[-1])
        else:
            entry = publish_atlas_arrays(self.home, name, atlas.image, atlas.labels, atlas.affine, "brain-mri", "MR", source_text, sharing)["spec"]
        source = registry.path("atlas", name, entry["version"])
        for site in self.sites:
            target = site.work_dir / "models" / "registry" / "atlas" / name / entry["version"]
            target.mkdir(parents=True, exist_ok=True)
            for file in source.iterdir():
                if file.is_file():
                    shutil.copyfile(file, target / file.name)
        return entry

    def evaluate_and_report(self) -> int:
        """After a run: score it on the out-of-federation set, then write its report."""
        done = [r for r in runs.list_runs(self.home) if r["status"] == "done"]
        if not done:
            return 1
        run_id = done[-1]["run_id"]
        if runs.read_metrics(runs.find_run(self.home, run_id)).get("plan") in ("data_factory", "fedsr"):
            # the factory: no segmentation to score (its samples and registry entry are written by the run);
            # FedSR: each site scored its own personalised model on its labelled cases (metrics.json)
            return 0
        steps = []
        if self.oof_phase and (self.oof_dataset / "manifest.json").is_file():
            steps.append(["evaluate", run_id, "--home", str(self.home), "--data", str(self.oof_dataset)])
        steps.append(["report", run_id, "--home", str(self.home)])
        for args in steps:
            proc = self._spawn([sys.executable, "-m", "coordinator.cli", *verbosity_args(), *args], env={**os.environ, "PYTHONUNBUFFERED": "1"})
            assert proc.stdout is not None  # _spawn pipes stdout when given no log file
            for line in proc.stdout:
                self.out(line.decode("utf-8", "replace").rstrip())
            if proc.wait() != 0:
                return proc.returncode
        return 0

    def next_steps(self) -> list[str]:
        """How to look at what the testbed ran: the home, the run, `results`, the report."""
        found = runs.list_runs(self.home) if (self.home / "runs").is_dir() else []
        if not found:
            return [f"no run was recorded (coordinator home {self.home}); the logs are under {self.workdir}"]
        info = found[-1]
        run_dir = Path(info["run_dir"])
        home = str(self.home)
        lines = [
            f"run {info['run_id']}: {info['status']} (coordinator home {home})",
            f"  coordinator status --home {home}",
            f"  coordinator results {info['run_id']} --home {home}",
        ]
        report = run_dir / "report" / "index.html"
        if report.is_file():
            lines.append(f"  report: {report}")
        elif info["status"] == "done":
            lines.append(f"  coordinator report {info['run_id']} --home {home}")
        lines += [f"  evaluation: {path}" for path in sorted((run_dir / "evaluations").glob("*.json"))]
        lines.append(f"  run log: {run_dir / 'run.log'}; site logs: {self.workdir / 'sites'}")
        return lines

    def start_nodes(self) -> None:
        """Start every site's Fed-BioMed node (and its plan approver unless ``auto_approve`` is off), sharing the cores."""
        # All nodes share this machine's cores: without a thread budget each torch process
        # starts one OpenMP thread per core and they spin against each other.
        threads = str(max(1, (os.cpu_count() or 1) // self.n_sites))
        budget = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        for site in self.sites:
            # Started from this (main) thread: PDEATHSIG follows the thread that forked.
            st = ProcessRuntime(site).start(die_with_parent=True, extra_env=budget)
            log.info("%s: node started (pid %s)", site.site_name, st.pid)
            if self.auto_approve:
                self._spawn(
                    [sys.executable, "-m", "coordinator.testbed_site", "approve", "--config", str(site.path)],
                    log_path=site.work_dir / "approver.log",
                )

    def run_spec(self, spec_text: str, rounds: int | None = None) -> int:
        """Run a spec on the testbed's sites with `coordinator run` in a child process.

        Args:
            spec_text: the spec's YAML; its site selection is replaced by the testbed's sites.
            rounds: overrides the spec's rounds when given.

        Returns:
            The exit code of `coordinator run`.

        Raises:
            UserError: the spec is not a mapping.
        """
        raw = yaml.safe_load(spec_text)
        if not isinstance(raw, dict):
            raise UserError("testbed spec: expected a mapping")
        raw.setdefault("sites", {})
        raw["sites"] = {**raw["sites"], "tags": [TAG], "min_sites": self.n_sites}
        raw["sites"].pop("ids", None)
        if rounds:
            raw["rounds"] = rounds
        spec_path = self.workdir / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        cmd = [
            sys.executable, "-m", "coordinator.cli", *verbosity_args(), "run", str(spec_path),
            "--home", str(self.home), "--grpc-host", "127.0.0.1", "--grpc-port", str(self.port), "--public-host", "localhost",
        ]  # fmt: skip
        log.info("coordinator: running %s on localhost:%s, waiting for %d sites", raw.get("name"), self.port, self.n_sites)
        proc = self._spawn(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None  # _spawn pipes stdout when given no log file
        for line in proc.stdout:
            self.out(line.decode("utf-8", "replace").rstrip())
        return proc.wait()

    def pids(self) -> list[int]:
        """Process ids of the testbed's children and site nodes (for checks that none is left).

        Returns:
            The pids.
        """
        pids = [c.pid for c in self.children]
        for site in self.sites:
            st = ProcessRuntime(site).status()
            if st.pid:
                pids.append(st.pid)
        return pids

    def teardown(self) -> None:
        """Stop every child process and site node (signal them all, then wait); a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        for child in self.children:
            if child.poll() is None:
                signal_group(child.pid, signal.SIGTERM)
        for site in self.sites:  # signal every node first, then wait: stops run in parallel
            st = ProcessRuntime(site).status()
            if st.running and st.pid:
                signal_group(st.pid, signal.SIGTERM)
        for site in self.sites:
            ProcessRuntime(site).stop(timeout=10)
        deadline = time.monotonic() + 10
        for child in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(child.pid, signal.SIGKILL)
                child.wait()
        left = [p for p in self.pids() if pid_alive(p)]
        if left:
            log.warning("testbed stopped; still alive: %s", left)
        else:
            log.info("testbed stopped: all processes ended")


def run(workdir: Path, n_sites: int, spec_text: str | None = None, rounds: int | None = None, port: int = 0,
        auto_approve: bool = True, oof_phase: str | None = "non_contrast", phases: list[str] | None = None,
        modalities: list[str] | None = None, classes: list[str] | None = None, cases: list[int] | None = None,
        device: str = "auto", body: str = "abdomen") -> int:  # fmt: skip
    """Set up, run one spec, score it out of federation, report, tear down (`coordinator testbed`).

    The coordinator CLI's output and, last, where to look at the run go to stdout; the
    testbed's own progress lines to this module's logger.

    Args:
        workdir: where the federation lives (created).
        n_sites: number of site nodes.
        spec_text: the spec to run (None: the built-in demo).
        rounds: overrides the spec's rounds.
        port: gRPC port (0: a free one).
        auto_approve: sites approve the plan.
        oof_phase: contrast phase of the out-of-federation test set (None: none).
        phases: each site's scanner phase, cycled over the sites.
        modalities: each site's scanner, cycled over the sites.
        classes: classes every site labels (None: organ group i at site i).
        cases: cases per site, cycled over the sites (None: 4 each).
        device: every site's device setting (auto, cpu, cuda, cuda:N).
        body: ``abdomen`` or ``chest`` (radiograph sites; the default spec is then `chest_spec_text`).

    Returns:
        The coordinator's exit code (130 when interrupted).
    """
    text = spec_text or (chest_spec_text() if body == "chest" else default_spec_text())
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        loaded = None  # `coordinator run` reports it, naming the line
    plan = loaded.get("plan") if isinstance(loaded, dict) else None
    fedsr = plan == "fedsr"  # FedSR needs brain-MRI sites (unlabelled but for 2 evaluation cases each) and the atlas
    bed = Testbed(workdir, n_sites, port=port, auto_approve=auto_approve, out=lambda line: print(line, flush=True),
                  oof_phase=None if fedsr else oof_phase, phases=phases, modalities=modalities, classes=classes,
                  cases=cases or ([8] if fedsr else None), device=device,
                  brain=["site-a", "site-b", "site-c"] if fedsr else None, labelled=2 if fedsr else 0, body=body)  # fmt: skip

    def _on_signal(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_signal) if threading.current_thread() is threading.main_thread() else None
    try:
        bed.workdir.mkdir(parents=True, exist_ok=True)
        (bed.workdir / "testbed.pid").write_text(f"{os.getpid()}\n")
        bed.setup_sites()
        if fedsr:
            entry = bed.install_atlas()
            log.info("atlas %s %s at every site (sha256 %s...)", entry["name"], entry["version"], entry["sha256"][:12])
        bed.start_nodes()
        code = bed.run_spec(text, rounds=rounds)
        if code == 0:
            code = bed.evaluate_and_report()
        return code
    except KeyboardInterrupt:
        log.warning("testbed interrupted: stopping every process")
        return 130
    finally:
        bed.teardown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        try:
            for line in bed.next_steps():  # last on screen: where to look at the run (the command's result: stdout)
                bed.out(line)
        except Exception as exc:  # noqa: BLE001 - a hint must never hide the run's own outcome
            log.warning("cannot list the run: %s", exc)
