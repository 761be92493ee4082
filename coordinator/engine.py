"""The researcher side on Fed-BioMed: one gRPC server per coordinator process, experiments
built from specs, per-round metrics and checkpoints written to the run directory (Fed-BioMed's
own files go to its ``fedbiomed/`` subfolder; what sites report is read through
`coordinator.fedbiomed_hooks`).

Fed-BioMed is imported lazily: its researcher config is created at import time, so the
component root and server address must be in the environment first.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from coordinator import checkpoints, factory, runs
from coordinator import plans as plan_registry
from coordinator.fedbiomed_hooks import OutgoingModels, RoundOutcomes, ScalarFeed, SiteErrors, WireCounter
from coordinator.privacy import privacy_line, privacy_settings, record_privacy
from coordinator.results import TEST_ROWS, split_test_keys
from coordinator.spec import Spec
from fedimg_core.errors import UserError
from fedimg_core.fedbiomed_console import quiet_fedbiomed_console
from pipelines.site_errors import mark_researcher_process
from pipelines.splits import SPLITS
from pipelines.wire import WireChecksumError, decode_params, transfer_precision, transfer_states

Log = Callable[[str], None]


# Opacus (imported by Fed-BioMed) warns about its secure RNG on every import; DP is not used here.
warnings.filterwarnings("ignore", message="Secure RNG turned off")


class RunError(UserError):
    """A run that could not start or go on (sites missing, plan not approved, a site's error); exit code 1."""

    exit_code = 1


class SitesMissingError(RunError):
    """Too few sites: fewer than ``min_sites`` connected in time, or fewer than the round's
    quorum answered. The run's state records ``error_kind: sites``: it can go on once enough
    sites are back (`coordinator serve` resumes such runs by itself)."""

    error_kind = "sites"


class Federation:
    """Owns the Fed-BioMed researcher component and its gRPC server for this process."""

    def __init__(
        self,
        home: str | os.PathLike,
        host: str = "0.0.0.0",
        port: int = 50051,
        public_host: str | None = None,
        log: Log = print,
    ):
        """`host` is the address the server binds; `public_host` the name sites dial, which the
        TLS certificate must carry (sites check it). Default: `host`, or localhost for a wildcard."""
        self.home = Path(home).resolve()
        self.log = log
        self.home.mkdir(parents=True, exist_ok=True)
        public_host = public_host or (host if host not in ("0.0.0.0", "::", "") else "localhost")
        _check_port_free(host, port)
        os.environ["FBM_RESEARCHER_COMPONENT_ROOT"] = str(self.home / "researcher")
        os.environ["FBM_SERVER_HOST"] = public_host  # certificate CN when the component is created
        os.environ["FBM_SERVER_PORT"] = str(port)
        quiet_fedbiomed_console()
        # deferred: Fed-BioMed creates its researcher config at import time, from the environment set above
        from fedbiomed.common.logger import logger
        from fedbiomed.researcher.config import config
        from fedbiomed.researcher.requests import Requests

        os.environ["FBM_DEBUG"] = "1"  # real exceptions instead of sys.exit() inside Experiment (read per call)

        # Fed-BioMed's own messages go to each run's run.log, not to the console.
        logger.setLevel(os.environ.get("FEDIMG_FBM_LOG_LEVEL", "WARNING"))
        self._fbm_logger = getattr(logger, "_logger", logging.getLogger("fedbiomed"))
        self._scalars = ScalarFeed()  # metrics streamed by the sites, filled by gRPC threads
        self._wire = WireCounter()  # the one reader of Fed-BioMed's log records (no API for wire sizes)
        self._fbm_logger.addHandler(self._wire)
        self._fbm_logger.setLevel(logging.DEBUG)  # Fed-BioMed's own handlers keep their level; the counter needs its debug records
        self.config = config
        _ensure_certificate(config, public_host, log)
        os.environ["FBM_SERVER_HOST"] = host  # Fed-BioMed reads env over its config: bind here
        # Fed-BioMed 6.4.1 accepts any client; `Requests` builds the server by its module-global
        # name `GrpcServer`: point that name at our subclass (mutual TLS, enrolled sites only).
        from coordinator import fedbiomed_transport, late_replies  # deferred: import Fed-BioMed (see their docstrings)

        fedbiomed_transport.install(self.home)
        late_replies.install()  # replies owed to a previous coordinator process: a log line, not a traceback
        self.requests = Requests(config)
        self._site_errors = SiteErrors()  # what sites answer with errors (Fed-BioMed only logs them)
        self._site_errors.watch(self.requests)
        from fedbiomed.common.message import TrainRequest

        from coordinator.request_policies import round_policies

        self._outcomes = RoundOutcomes(lambda m: isinstance(m, TrainRequest), round_policies)  # when a round ends, who answered
        self._outcomes.watch(self.requests)
        self._outgoing = OutgoingModels()  # the global model leaves in the spec's wire form (transfer.precision)
        self._outcomes.before_send.append(self._outgoing)
        self._outcomes.after_replies.append(self._outgoing.received)  # SCAFFOLD states come back in it too
        self.address = f"{public_host}:{port}"

    # -- sites --------------------------------------------------------------------------

    def online_nodes(self) -> list[str]:
        """The node ids of the sites connected now (they answered a ping within 5 s)."""
        return list(self.requests.ping_nodes())

    def matching_sites(self, spec: Spec) -> dict[str, str]:
        """node_id -> node name for connected sites holding data with the spec's tags."""
        from fedbiomed.common.message import SearchRequest
        from fedbiomed.researcher.requests import DiscardOnTimeout

        request = SearchRequest(researcher_id=self.requests._researcher_id, tags=spec.site_tags)
        nodes = spec.site_ids or None
        with self.requests.send(request, nodes, policies=[DiscardOnTimeout(5)]) as fed_req:
            return {nid: (reply.node_name or nid) for nid, reply in fed_req.replies().items() if reply.databases}

    def wait_for_sites(self, spec: Spec) -> dict[str, str]:
        """Wait until the spec's ``min_sites`` sites with its tags are connected.

        Args:
            spec: the experiment spec (site tags and ids, ``min_sites``, ``wait_for_sites_s``).

        Returns:
            node id -> site name of the matching sites.

        Raises:
            RunError: fewer sites than ``min_sites`` within ``wait_for_sites_s``.
        """
        deadline = time.monotonic() + spec.wait_for_sites_s
        last = -1
        while True:
            sites = self.matching_sites(spec)
            if len(sites) != last:
                self.log(f"sites ready: {len(sites)}/{spec.min_sites} ({', '.join(sorted(sites.values())) or 'none yet'})")
                last = len(sites)
            absent = missing_mandatory(spec.mandatory_sites, sites)
            if len(sites) >= spec.min_sites and not absent:
                return sites
            if time.monotonic() >= deadline:
                what = f"tags {spec.site_tags}" + (f" among nodes {spec.site_ids}" if spec.site_ids else "")
                if len(sites) >= spec.min_sites:
                    raise SitesMissingError(
                        f"mandatory site(s) {', '.join(absent)} did not connect within {spec.wait_for_sites_s:g}s "
                        f"(connected with {what}: {', '.join(sorted(sites.values()))})"
                    )
                raise SitesMissingError(
                    f"only {len(sites)} of the {spec.min_sites} required sites with {what} connected within "
                    f"{spec.wait_for_sites_s:g}s (is each site's node started and pointed at {self.address}?)"
                )
            time.sleep(1.0)

    # -- experiments --------------------------------------------------------------------

    def _experiment(self, spec: Spec, run_dir: Path, nodes: list[str] | None = None, folder: Path | None = None,
                    sites: dict[str, str] | None = None):  # fmt: skip
        from fedbiomed.researcher.aggregators import FedAverage
        from fedbiomed.researcher.federated_workflows import Experiment

        mark_researcher_process()  # the plan's post_init runs here: its errors are the researcher's own
        # Fed-BioMed writes everything (breakpoints, the sites' replies, the plan source) into
        # EXPERIMENTS_DIR/<experimentation_folder>: <run>/fedbiomed, away from the run's own files.
        folder = folder or runs.fedbiomed_dir(run_dir)
        self.config.vars["EXPERIMENTS_DIR"] = str(folder.parent)
        # scaffold: averaging plus declearn's SCAFFOLD server module, whose client half the plans step
        # before their local optimizer (pipelines.plans.optimizers); Fed-BioMed's own Scaffold aggregator
        # takes the correction from weight change / learning rate, which is no gradient under Adam
        aggregator = FedAverage()
        return Experiment(
            tags=spec.site_tags,
            nodes=nodes or spec.site_ids or None,
            training_plan_class=plan_registry.resolve(spec.plan),
            model_args=spec.experiment_model_args(run_id=run_dir.name, client_ids=client_ids(sites or {})),
            training_args=spec.training_args(),
            aggregator=aggregator,
            agg_optimizer=_server_optimizer(spec),
            node_selection_strategy=selection_strategy(spec, sites or {}),
            round_limit=spec.rounds,
            secagg=secure_aggregation(spec),
            save_breakpoints=True,
            experimentation_folder=folder.name,
            tensorboard=False,
        )

    def _wire_form(self, exp) -> None:
        """Models of ``exp`` travel in its wire form both ways (a run started before wire forms: plain tensors)."""
        precision = transfer_precision(exp.model_args())
        self._outgoing.set(exp.id, precision, states=transfer_states(exp.model_args()))
        strategy = exp.strategy()
        if hasattr(strategy, "require_wire_form"):
            strategy.require_wire_form(precision is not None)

    def _check_approval(self, exp, spec: Spec, sites: dict[str, str]) -> None:
        """Make sure every selected site approved this exact plan source before round 1."""
        if spec.request_approval:
            sent = io.StringIO()
            with contextlib.redirect_stdout(sent):  # Fed-BioMed prints the plan source; keep it in run.log
                exp.training_plan_approve(description=f"fedimg plan {spec.plan} for experiment {spec.name}")
            self._fbm_logger.warning("[fedimg] plan source sent to the sites for approval:\n%s", sent.getvalue())
        deadline = time.monotonic() + spec.approval_wait_s
        while True:
            status = exp.check_training_plan_status()
            missing = {
                nid: (reply.get("status") if isinstance(reply, dict) else getattr(reply, "status", "?"))
                for nid, reply in status.items()
                if not _approved(reply)
            }
            missing.update({nid: "no answer" for nid in sites if nid not in status})
            if not missing:
                return
            if time.monotonic() >= deadline:
                plan_hash = _plan_hash(exp)
                detail = "; ".join(f"{sites.get(n, n)} ({n}): {s}" for n, s in sorted(missing.items()))
                raise RunError(
                    f"training plan {spec.plan!r} (sha256 {plan_hash[:16]}...) is not approved by "
                    f"{len(missing)} site(s): {detail}. Each site reviews it with `site-agent plans list` "
                    f"and approves with `site-agent plans approve ID`"
                )
            time.sleep(1.0)

    def run(self, run_dir: Path, spec: Spec, resume: bool = False) -> dict:
        """Run (or resume) the spec in `run_dir`; return the final metrics dict."""
        run_dir = Path(run_dir).resolve()
        file_handler = runs.run_log_handler(run_dir)  # plain text: our lines, warnings and errors
        self._fbm_logger.addHandler(file_handler)
        console_log = self.log

        def log(msg: str) -> None:
            console_log(msg)
            self._fbm_logger.log(logging.WARNING, "[fedimg] %s", msg)

        self.log = log
        try:
            return self._run(run_dir, spec, resume)
        finally:
            self.log = console_log
            self._fbm_logger.removeHandler(file_handler)
            file_handler.close()

    def _run(self, run_dir: Path, spec: Spec, resume: bool) -> dict:
        self._site_errors.clear()
        self._scalars.reset()  # nothing from an earlier run of this process may land in this one
        metrics = runs.read_metrics(run_dir) if resume else {"rounds": []}
        metrics["rounds_planned"] = spec.rounds
        metrics["mode"] = spec.mode
        metrics["plan"] = spec.plan
        metrics["local_steps"] = spec.local_steps
        if spec.dp is not None:
            metrics["privacy"] = privacy_settings(spec.dp)  # what each round's per-site epsilon is stated at (`record_privacy`)
        if not spec.is_factory and not spec.is_fedsr:
            metrics["validate_every"] = spec.validate_every
        if not resume:  # a resumed run keeps what its breakpoint sends the sites (`resumed_protocol`)
            metrics["split"] = dict(spec.split)
            metrics["weights"] = spec.weights if spec.mode == "federated" else "none"  # standalone: no aggregation
        schema = spec.model_args.get("schema_definition")
        if isinstance(schema, dict):
            metrics["classes"] = dict(schema.get("classes") or {})
        runs.mark(run_dir, "running", pid=os.getpid(), error=None)
        try:
            sites = self.wait_for_sites(spec)
            if spec.mode == "standalone":
                if resume:
                    raise RunError(f"{run_dir}: standalone runs do not resume; submit the spec again")
                self._standalone(run_dir, spec, sites, metrics)
            else:
                self._federated(run_dir, spec, sites, metrics, resume)
            runs.write_metrics(run_dir, metrics)
            runs.mark(run_dir, "done")
            return metrics
        except KeyboardInterrupt:
            runs.mark(run_dir, "interrupted", error="interrupted by the user", error_kind=None)
            raise
        except UserError as exc:
            # error_kind "sites" (SitesMissingError): `coordinator serve` resumes the run once enough sites are back
            runs.mark(run_dir, "failed", error=str(exc), error_kind=getattr(exc, "error_kind", None))
            raise
        except Exception as exc:  # noqa: BLE001 - turned into a clear message for the researcher
            nodes = "; ".join(self._site_errors.lines())
            msg = " ".join(str(exc).split()) or type(exc).__name__
            error = f"{msg}" + (f" | site errors: {nodes}" if nodes else "")
            runs.mark(run_dir, "failed", error=error, error_kind=None)
            raise RunError(error) from exc
        finally:
            self._scalars.reset()  # late messages of this run must not reach the next one
            runs.write_metrics(run_dir, metrics)

    def _federated(self, run_dir: Path, spec: Spec, sites: dict[str, str], metrics: dict, resume: bool) -> None:
        if resume:
            bkpt = runs.latest_breakpoint(run_dir)
            if bkpt is None:
                raise RunError(f"{run_dir}: no breakpoint to resume from (the run never finished a round)")
            from fedbiomed.researcher.federated_workflows import Experiment

            # The breakpoint names its experimentation folder (bkpt.parent: <run>/fedbiomed, or
            # the run directory itself for runs of the old layout): resume writes on there.
            self.config.vars["EXPERIMENTS_DIR"] = str(bkpt.parent.parent)
            mark_researcher_process()  # the plan's post_init runs again here; its global model stays plain float32 (pipelines.plans.transfer)
            exp = Experiment.load_breakpoint(str(bkpt))
            done = exp.round_current()
            metrics["rounds"] = [r for r in metrics["rounds"] if r["round"] <= done]
            if done and not any(r["round"] == done for r in metrics["rounds"]):
                # Stopped after Fed-BioMed saved the breakpoint but before our record: the
                # round's model is in the breakpoint; its per-site metrics are gone.
                checkpoints.save_global(run_dir, done, _params(exp))
                metrics["rounds"].append({"round": done, "wall_s": 0.0, "update_norm": float("nan"), "sites": {}, "metrics_lost": True})
            self.log(f"resuming {run_dir.name} from {bkpt.name} (round {exp.round_current()}/{spec.rounds})")
            metrics["split"], metrics["weights"] = resumed_protocol(exp)
            restore_quorum(exp, spec, sites, metrics["weights"])
            fresh_secure_aggregation(exp)
        else:
            exp = self._experiment(spec, run_dir, sites=sites)
        self._wire_form(exp)
        self._check_approval(exp, spec, sites)
        self._scalars.track(exp)
        params_before = _params(exp)
        if exp.round_current() == 0:
            checkpoints.save_global(run_dir, 0, params_before)  # the initial global model: the teacher of round 1
        metrics["model"] = _model_size(params_before)
        if spec.is_factory:
            ids = exp.model_args().get("client_ids", {})
            metrics["clients"] = {sites.get(nid, nid): cid for nid, cid in sorted(ids.items(), key=lambda kv: kv[1])}
        self._wire.take()
        validates = _validates(metrics)
        metrics["quorum"] = {"min_per_round": spec.min_per_round, "mandatory": list(spec.mandatory_sites), "round_timeout_s": spec.round_timeout_s}
        self._outcomes.timeout_s = spec.round_timeout_s
        from coordinator.strategy import QuorumNotMet  # deferred: Fed-BioMed's import needs the researcher's environment

        while exp.round_current() < spec.rounds:
            r = exp.round_current() + 1
            if validates:
                schedule_scoring(exp, r, spec.rounds, spec.validate_every)
            t0 = time.monotonic()
            try:
                # After the last round the sites also validate the final aggregated model.
                exp.run_once(test_after=(r == spec.rounds))
            except QuorumNotMet as exc:  # nothing was aggregated: the breakpoint stays at the round before
                raise quorum_error(exc, self._outcomes.take(exp.id, r - 1), sites, r, spec.rounds) from None
            elapsed = time.monotonic() - t0
            params_after = _params(exp)
            record = self._round_record(exp, r, elapsed, sites, params_before, params_after)
            record["bytes"] = self._wire.take()
            sampled = getattr(exp.strategy(), "history", {}).get(r - 1)
            if sampled is not None and (spec.clients_per_round is not None or spec.is_factory):  # equal weights alone sample every site
                record["sampled"] = sorted(sites.get(nid, nid) for nid in sampled)
            answered = exp.strategy()._success_node_history.get(r - 1, [])
            rejected = getattr(exp.strategy(), "rejected", {}).get(r - 1)
            record["site_status"] = site_status(sites, sampled, answered, self._outcomes.take(exp.id, r - 1), rejected)
            self._outcomes.take(exp.id, r, training=False)  # the final validation's request: scored, never aggregated
            record["aggregated_from"] = len(answered)
            if spec.aggregator == "scaffold":
                for name in scaffold_state_lost(metrics["rounds"], record):
                    record["site_status"][name]["warning"] = "its SCAFFOLD state of an earlier round was lost: it joined again as a new SCAFFOLD client"
                    self.log(f"warning: round {r}/{spec.rounds}: {name} trained without its SCAFFOLD state of an earlier round "
                             "(its node state is missing or unreadable) and joined again as a new SCAFFOLD client: the "
                             "correction averages over one client too many from now on; restart the run to undo that")  # fmt: skip
            left_out = {name: row for name, row in record["site_status"].items() if row["status"] in ("failed", "timeout")}
            if left_out:
                self.log(f"round {r}/{spec.rounds}: aggregated from {len(answered)} site(s); left out: "
                         + "; ".join(f"{name} ({row['status']}: {row.get('reason', '')})" for name, row in sorted(left_out.items())))  # fmt: skip
            metrics["rounds"].append(record)
            for name in record_split_sizes(metrics, record):
                self.log(f"warning: {name} has test cases but no validation case: it takes no part in model selection "
                         "and its test cases are not scored (raise split.validation, or give the site more cases)")  # fmt: skip
            if spent := record_privacy(metrics, record):
                self.log(privacy_line(record["round"], spec.rounds, spent, metrics["privacy"]))
            checkpoints.save_global(run_dir, r, params_after)
            if spec.is_factory:
                factory.after_round(run_dir, exp, r, spec.rounds, metrics, self.log)
            elif not spec.is_fedsr:  # FedSR sites score and keep their personalised models themselves
                checkpoints.select_best(run_dir, metrics, record, _local_params(exp, r), sites)
            runs.write_metrics(run_dir, metrics)
            self.log(_format_round(record, spec.rounds))
            params_before = params_after
        if spec.is_factory:
            metrics["published"] = factory.publish(self.home, run_dir, spec, exp, metrics)
            self.log(f"factory published to the registry: {metrics['published']['kind']}/{metrics['published']['name']} {metrics['published']['version']}")
            runs.write_metrics(run_dir, metrics)
            factory.write_report(run_dir)

    def _standalone(self, run_dir: Path, spec: Spec, sites: dict[str, str], metrics: dict) -> None:
        """Each site trains alone: one single-node Fed-BioMed experiment per site (its
        "aggregate" is its own model), advanced round by round side by side."""
        exps = {}
        for nid, name in sorted(sites.items(), key=lambda kv: kv[1]):
            folder = runs.fedbiomed_dir(run_dir) / "standalone" / _safe(name)
            folder.mkdir(parents=True, exist_ok=True)
            exps[nid] = self._experiment(spec, run_dir, nodes=[nid], folder=folder)
            self._wire_form(exps[nid])
        for nid, exp in exps.items():
            self._check_approval(exp, spec, {nid: sites[nid]})
            self._scalars.track(exp)
        first = next(iter(exps.values()))
        metrics["model"] = _model_size(_params(first))
        self._wire.take()
        validates = _validates(metrics)
        for r in range(1, spec.rounds + 1):
            record: dict[str, Any] = {"round": r, "wall_s": 0.0, "update_norm": 0.0, "sites": {}}
            squared = 0.0
            for nid, exp in exps.items():
                if validates:
                    schedule_scoring(exp, r, spec.rounds, spec.validate_every)
                before = _params(exp)
                t0 = time.monotonic()
                exp.run_once(test_after=(r == spec.rounds))
                after = _params(exp)
                sub = self._round_record(exp, r, time.monotonic() - t0, sites, before, after)
                record["wall_s"] += sub["wall_s"]
                record["sites"].update(sub["sites"])
                squared += sub["update_norm"] ** 2
                last = checkpoints.local_last(run_dir, sites[nid])
                checkpoints.save_tensors(last, after)
                checkpoints.select_best_local(metrics, nid, record["sites"].get(nid, {}), last, r)
            record["update_norm"] = squared**0.5  # the sites' updates taken together
            record["bytes"] = self._wire.take()
            metrics["rounds"].append(record)
            for name in record_split_sizes(metrics, record):
                self.log(f"warning: {name} has test cases but no validation case: it takes no part in model selection "
                         "and its test cases are not scored (raise split.validation, or give the site more cases)")  # fmt: skip
            if spent := record_privacy(metrics, record):
                self.log(privacy_line(record["round"], spec.rounds, spent, metrics["privacy"]))
            runs.write_metrics(run_dir, metrics)
            self.log(_format_round(record, spec.rounds))

    def _round_record(self, exp, r, elapsed, sites, before, after) -> dict:
        replies = exp.training_replies().get(r - 1, {}) or {}
        site_rows = {}
        for nid, reply in replies.items():
            timing = reply.get("timing", {}) or {}
            site_rows[nid] = {
                "name": sites.get(nid, nid),
                "samples": int(reply.get("sample_size") or 0),
                "train_s": round(float(timing.get("rtime_training", 0.0)), 3),
                "request_s": round(float(timing.get("rtime_total", 0.0)), 3),
            }
        for m in self._scalars.take(exp.id):
            sent = m["metric"].get("round_index")
            if sent is not None and int(sent) not in (r - 1, r):  # r: the validation-only request after the last round
                # a site that missed its deadline reports an earlier round late: not this round's
                self._fbm_logger.info("[fedimg] late message of round %d from %s dropped", int(sent) + 1, sites.get(m["node_id"], m["node_id"]))
                continue
            add_site_scalar(site_rows.setdefault(m["node_id"], {"name": sites.get(m["node_id"], m["node_id"])}), m)
        delta = torch.sqrt(sum(((after[k].float() - before[k].float()) ** 2).sum() for k in after)).item()
        return {"round": r, "wall_s": round(elapsed, 3), "update_norm": delta, "sites": site_rows}


def scoring_flags(r: int, rounds: int, every: int) -> tuple[bool, bool]:
    """Which models the sites score in round ``r`` of ``rounds`` under ``validate_every: every``.

    The global model after round r-1 is scored at the start of round r when (r - 1) % every == 0
    (so the initial model always is), and at the start of the last round too: Fed-BioMed's final
    validation (``run_once(test_after=True)``) runs with the last round's training arguments, so
    the final model can only be scored when that round scores the global model at its start. Each
    site's local model is scored after training in round r when r % every == 0. ``every`` = 1
    scores everything every round.

    Args:
        r: the round, from 1.
        rounds: the run's rounds.
        every: the spec's ``validate_every`` (>= 1).

    Returns:
        (score the global model at the start of round r, score the local models after round r's training):
        Fed-BioMed's ``test_on_global_updates`` and ``test_on_local_updates`` for the round.
    """
    return (r - 1) % every == 0 or r == rounds, r % every == 0


def schedule_scoring(exp: Any, r: int, rounds: int, every: int) -> None:
    """Set Fed-BioMed's testing flags of an experiment for round ``r`` (`scoring_flags`).

    Fed-BioMed's own setters change these two training arguments and keep the others (what a
    resumed experiment loaded from its breakpoint included); the breakpoint saves them, and they
    are set again before every round, so a resumed run keeps the schedule of its spec.

    Args:
        exp: the Fed-BioMed `Experiment`, before its ``run_once`` for round ``r``.
        r: the round about to run, from 1.
        rounds: the run's rounds.
        every: the spec's ``validate_every``.
    """
    score_global, score_local = scoring_flags(r, rounds, every)
    exp.set_test_on_global_updates(score_global)
    exp.set_test_on_local_updates(score_local)


def _validates(metrics: dict[str, Any]) -> bool:
    """Whether the run's sites hold validation cases (its split, the breakpoint's for a resumed run)."""
    return float((metrics.get("split") or {}).get("validation") or 0.0) > 0


def selection_strategy(spec: Spec, sites: dict[str, str] | None = None):
    """The Fed-BioMed node selection strategy of a spec's experiments: `SampledSitesStrategy`.

    It samples ``clients_per_round`` sites (every site by default), weights them equally (the
    data factory, and ``weights: equal``: the ConDistFL paper's setting) or by training cases
    (Fed-BioMed's FedAvg), and aggregates a round from the sites that answered when at least
    ``sites.min_per_round`` did, every sampled ``sites.mandatory`` one among them. A standalone
    site's experiment needs its one site.

    Args:
        spec: the experiment spec.
        sites: node id -> site name of the run's sites (to find the mandatory ones by name).

    Returns:
        The strategy.
    """
    from coordinator.strategy import SampledSitesStrategy  # deferred: Fed-BioMed's import needs the researcher's environment

    uniform = spec.is_factory or spec.weights == "equal"
    quorum = spec.min_per_round if spec.mode == "federated" else 1
    return SampledSitesStrategy(spec.clients_per_round, spec.seed, uniform=uniform, min_per_round=quorum,
                                mandatory=mandatory_node_ids(spec.mandatory_sites, sites or {}), secure=spec.secagg is not None)  # fmt: skip


def restore_quorum(exp: Any, spec: Spec, sites: dict[str, str], weights: str) -> None:
    """Give a resumed experiment the spec's quorum (a run started before quorums trained with
    Fed-BioMed's default strategy, which fails a round on any missing site).

    Args:
        exp: the experiment loaded from a breakpoint.
        spec: the run's spec.
        sites: node id -> site name of the sites connected now.
        weights: the aggregation weights the breakpoint uses (`resumed_protocol`).
    """
    from coordinator.strategy import SampledSitesStrategy  # deferred: Fed-BioMed's import needs the researcher's environment

    mandatory = mandatory_node_ids(spec.mandatory_sites, sites)
    strategy = exp.strategy()
    if isinstance(strategy, SampledSitesStrategy):
        strategy.set_quorum(spec.min_per_round, mandatory)
    else:
        exp.set_strategy(SampledSitesStrategy(spec.clients_per_round, spec.seed, uniform=weights == "equal",
                                              min_per_round=spec.min_per_round, mandatory=mandatory))  # fmt: skip


def mandatory_node_ids(mandatory: list[str], sites: dict[str, str]) -> list[str]:
    """The node ids of the mandatory sites (named by site name or node id) among ``sites``.

    Args:
        mandatory: the spec's ``sites.mandatory``.
        sites: node id -> site name.

    Returns:
        Node ids, in the order given.
    """
    return [nid for want in mandatory for nid, name in sorted(sites.items()) if want in (nid, name)]


def missing_mandatory(mandatory: list[str], sites: dict[str, str]) -> list[str]:
    """The mandatory sites (names or node ids) that are not among ``sites`` (node id -> name)."""
    return [want for want in mandatory if want not in sites and want not in sites.values()]


def site_status(sites: dict[str, str], sampled: list[str] | None, answered: list[str], outcomes: dict[str, dict[str, str]],
                rejected: dict[str, str] | None = None) -> dict[str, dict[str, str]]:  # fmt: skip
    """Each site's part in a round: ``ok``, ``failed``, ``timeout`` or ``not_sampled``, with a reason.

    Args:
        sites: node id -> site name of the run's sites.
        sampled: the node ids the round asked (None: all of them).
        answered: the node ids whose updates were aggregated.
        outcomes: node id -> the outcome of its training request (`RoundOutcomes.take`).
        rejected: node id -> why its update, although it arrived, was not used (it failed its check).

    Returns:
        site name -> ``{"status": ..., "reason": ...}`` (no reason when ok).
    """
    asked = set(sites if sampled is None else sampled)
    out: dict[str, dict[str, str]] = {}
    for nid, name in sorted(sites.items(), key=lambda kv: kv[1]):
        if nid in answered:
            out[name] = {"status": "ok"}
        elif nid not in asked:
            out[name] = {"status": "not_sampled", "reason": "not sampled this round"}
        else:
            found = outcomes.get(nid) or {"status": "failed", "reason": "no answer"}
            unused = (rejected or {}).get(nid) or "its update could not be used (no sample count)"
            out[name] = found if found["status"] != "ok" else {"status": "failed", "reason": unused}
    return out


def scaffold_state_lost(earlier: list[dict[str, Any]], record: dict[str, Any]) -> list[str]:
    """Sites that trained a round of a SCAFFOLD run without their SCAFFOLD state although the coordinator
    aggregated an update of theirs in an earlier round: the state was lost at the site (node state
    missing or unreadable), and it joined again as a new SCAFFOLD client, so declearn's server module
    now counts it twice and its ``c`` averages over one client too many. A site none of whose earlier
    updates was aggregated (timed out, failed) joins fresh, rightly: not listed.

    Args:
        earlier: the run's earlier round records (their ``site_status``).
        record: this round's record (its sites' ``train`` scalars, ``optimizer_state_restored``).

    Returns:
        The names of the sites whose state was lost, sorted.
    """
    aggregated_before = {name for r in earlier for name, row in (r.get("site_status") or {}).items() if row.get("status") == "ok"}
    lost = {
        row["name"]
        for row in record.get("sites", {}).values()
        if (row.get("train") or {}).get("optimizer_state_restored") == 0.0 and row.get("name") in aggregated_before
    }
    return sorted(lost)


ABSENT = ("disconnected during the round", "not connected", "no answer")  # failed reasons that mean "not there", not "said no"


def quorum_error(exc: Any, outcomes: dict[str, dict[str, str]], sites: dict[str, str], r: int, rounds: int) -> RunError:
    """The error of a round that could not be aggregated: `SitesMissingError` (``error_kind: sites``,
    which `coordinator serve` resumes once the sites are back) when a missing site was absent (lost,
    not connected, past the deadline); a plain `RunError` when every missing site answered with an
    error (a site that refuses or fails does not come back by waiting).

    Args:
        exc: the strategy's `QuorumNotMet`.
        outcomes: node id -> the outcome of its training request.
        sites: node id -> site name.
        r: the round, from 1.
        rounds: the run's rounds.

    Returns:
        The error to raise, its message from `quorum_message`.
    """
    missing = [outcomes.get(nid) or {"status": "failed", "reason": "no answer"} for nid in exc.sampled if nid not in exc.answered]
    absent = any(o["status"] == "timeout" or o.get("reason") in ABSENT for o in missing)
    message = quorum_message(exc, outcomes, sites, r, rounds)
    if absent:
        return SitesMissingError(message)
    return RunError(message.replace("once enough sites are back (`coordinator resume`, or by itself under `coordinator serve`)",
                                    "once the sites' errors are fixed (`coordinator resume`)"))  # fmt: skip


def quorum_message(exc: Any, outcomes: dict[str, dict[str, str]], sites: dict[str, str], r: int, rounds: int) -> str:
    """The one-line reason a round could not be aggregated.

    Args:
        exc: the strategy's `QuorumNotMet` (answered, sampled, min_per_round, mandatory_missing).
        outcomes: node id -> the outcome of its training request.
        sites: node id -> site name.
        r: the round, from 1.
        rounds: the run's rounds.

    Returns:
        The message: the round, how many answered of how many needed, each missing site with its reason.
    """
    missing = []
    for nid in exc.sampled:
        if nid in exc.answered:
            continue
        found = outcomes.get(nid) or {"status": "failed", "reason": "no answer"}
        missing.append(f"{sites.get(nid, nid)} ({found['status']}: {found.get('reason', 'its update could not be used')})")
    mandatory = [sites.get(nid, nid) for nid in exc.mandatory_missing]
    need = f"mandatory site(s) {', '.join(mandatory)} did not answer" if mandatory else f"min_per_round is {exc.min_per_round}"
    if getattr(exc, "secure", False) and not mandatory:
        need = "secure aggregation needs every sampled site"  # the others' masks do not cancel without it
    return (f"round {r}/{rounds}: {len(exc.answered)} of {len(exc.sampled)} sites answered and {need}; missing: {'; '.join(missing)}. "
            "Nothing of this round was aggregated: the run continues from it once enough sites are back "
            "(`coordinator resume`, or by itself under `coordinator serve`)")  # fmt: skip


def add_site_scalar(row: dict[str, Any], message: dict[str, Any]) -> None:
    """Put one scalar message a site streamed into its row of the round record.

    Training scalars merge into ``train``. A testing message scores one model on the site's
    validation cases and, under ``test_``-prefixed keys, on its test cases: the first goes to
    ``val_global`` (the received global model) or ``val_local`` (after local training), the
    second, prefix stripped, to ``test_global`` / ``test_local``. A second global testing
    message in a round is the final model's (after the last round): ``val_final`` / ``test_final``
    (whatever ``validate_every``, the last round scores the global model at its start too: `scoring_flags`).

    Args:
        row: the site's row (updated in place).
        message: a `ScalarFeed` message (``train``, ``global``, ``metric``).
    """
    if message["train"]:
        row["train"] = {**row.get("train", {}), **message["metric"]}
        return
    key = "val_global" if message["global"] else "val_local"
    if key == "val_global" and ("val_global" in row or "test_global" in row):
        key = "val_final"  # the second global validation: the final model, after the last round
    validation, test = split_test_keys(message["metric"])
    row[key] = validation
    if test:
        row[TEST_ROWS[key]] = test


def record_split_sizes(metrics: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """Keep each site's split sizes (``metrics["splits"][<site>]``) from its training scalars.

    The sites report ``cases_training``, ``cases_validation`` and ``cases_test`` with their
    training scalars; a site that reports none (an older site, the data factory) is left out.

    Args:
        metrics: the run's metrics (updated in place).
        record: the round's record.

    Returns:
        The sites first seen in this record with test cases but no validation case: Fed-BioMed
        scores nothing at such a site, so it drops out of selection (the caller warns).
    """
    unscored = []
    for nid, row in record.get("sites", {}).items():
        train = row.get("train") or {}
        if all(f"cases_{name}" in train for name in SPLITS):
            name = row.get("name", nid)
            sizes = {split: int(train[f"cases_{split}"]) for split in SPLITS}
            splits = metrics.setdefault("splits", {})
            if sizes["validation"] == 0 and sizes["test"] > 0 and name not in splits:
                unscored.append(name)
            splits[name] = sizes
    return unscored


def resumed_protocol(exp) -> tuple[dict[str, Any], str]:
    """The split and weights a resumed experiment really uses: its breakpoint's, not the spec's.

    Fed-BioMed resumes with the model arguments, training arguments, aggregator and strategy
    saved in the breakpoint. A run started before the three-way split sent no ``split``: its
    sites hold out ``test_ratio`` of their cases for validation and none for test.

    Args:
        exp: the Fed-BioMed experiment loaded from a breakpoint.

    Returns:
        ``(split, weights)`` as ``metrics.json`` records them.
    """
    from fedbiomed.researcher.aggregators import Scaffold

    split = (exp.model_args() or {}).get("split")
    if not isinstance(split, dict):
        ratio = float((exp.training_args() or {}).get("test_ratio") or 0.0)
        split = {"validation": ratio, "test": 0.0, "seed": 0}
    uniform = bool((getattr(exp.strategy(), "_parameters", None) or {}).get("uniform"))
    weights = "equal" if uniform or isinstance(exp.aggregator(), Scaffold) else "samples"
    return dict(split), weights


def client_ids(sites: dict[str, str]) -> dict[str, int]:
    """node id -> client id (0..K-1), in the order of the site names: stable for a federation."""
    return {nid: i for i, (nid, _) in enumerate(sorted(sites.items(), key=lambda kv: (kv[1], kv[0])))}


def _safe(name: str) -> str:
    return runs.safe_name(name, "site")


def _model_size(params: dict) -> dict:
    return {
        "parameters": int(sum(t.numel() for t in params.values())),
        "bytes": int(sum(t.numel() * t.element_size() for t in params.values())),
    }


def _local_params(exp, r: int) -> dict[str, dict]:
    """node id -> the parameters the site sent after local training in round r."""
    out = {}
    for nid, reply in (exp.training_replies().get(r - 1, {}) or {}).items():
        params = reply.get("params")
        if params is None and reply.get("params_path"):
            from fedbiomed.common.serializer import Serializer

            params = Serializer.load(reply["params_path"])
        if isinstance(params, dict):  # secure aggregation: a flat list of masked integers, no model
            try:
                out[nid] = decode_params(params)
            except WireChecksumError:  # left out of the round by the strategy, which says why
                continue
    return out


def _check_port_free(host: str, port: int) -> None:
    """Fed-BioMed only logs a failed bind; say it before anything else starts."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RunError(f"cannot listen on {host}:{port} for the sites ({exc.strerror}); is another coordinator running?") from None


def _ensure_certificate(config, public_host: str, log: Log) -> None:
    """Point Fed-BioMed's researcher at the coordinator's own server certificate (`coordinator.pki`).

    The certificate is created once and never regenerated silently: sites pin it. A public
    host it is not valid for is an error asking for an explicit rotation. Fed-BioMed's
    researcher id is set to the one the certificate carries (nodes compare the two).
    """
    from coordinator.pki import CoordinatorPKI  # imported here: the rest of this module is another change's

    pki = CoordinatorPKI(Path(config.root).parent)
    if pki.ensure(public_host):
        log(f"server certificate issued for {public_host!r}: {pki.fingerprint()} (sites pin it: `coordinator fingerprint`)")
    config.set("certificate", "private_key", str(pki.server_key.resolve()))  # Fed-BioMed joins etc/ with it: absolute wins
    config.set("certificate", "public_key", str(pki.server_cert.resolve()))
    if config.get("default", "id") != pki.researcher_id():
        config.set("default", "id", pki.researcher_id())
        config.write()


def _approved(reply) -> bool:
    status = reply.get("status") if isinstance(reply, dict) else getattr(reply, "status", None)
    return str(status).lower() == "approved"


def _plan_hash(exp) -> str:
    """The hash a site shows for this plan (`site-agent plans list`): Fed-BioMed's own
    algorithm (sha256 of the minified source), so staff can match the two."""
    from fedbiomed.node.training_plan_security_manager import TrainingPlanSecurityManager

    try:
        digest, _, _ = TrainingPlanSecurityManager._create_hash(SimpleNamespace(_hashing="SHA256"), exp.training_plan().source(), from_string=True)
        return digest
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown"


def _params(exp) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in exp.training_plan().get_model_params().items()}


def secure_aggregation(spec: Spec) -> Any:
    """Fed-BioMed's `SecureAggregation` of a spec's ``secagg`` (False: plain aggregation).

    Each site quantises its model (clipped to ``[-clipping_range, clipping_range]``, 2^13 levels),
    multiplies it by its training cases and masks it (LOM: pairwise Diffie-Hellman masks;
    Joye-Libert: encryption under a share of a server key); the coordinator decrypts only the sum,
    divides it by the total cases and de-quantises it. The keys are set up before the first round,
    and again whenever the round's sites change (`fresh_secure_aggregation` on resume).

    Args:
        spec: the experiment spec.

    Returns:
        The `SecureAggregation` to pass as ``Experiment(secagg=...)``, or False (Fed-BioMed refuses None).
    """
    if spec.secagg is None:
        return False
    from fedbiomed.common.constants import SecureAggregationSchemes
    from fedbiomed.researcher.secagg import SecureAggregation

    scheme = SecureAggregationSchemes.JOYE_LIBERT if spec.secagg["scheme"] == "joye-libert" else SecureAggregationSchemes.LOM
    return SecureAggregation(scheme=scheme, clipping_range=int(spec.secagg["clipping_range"]))


def fresh_secure_aggregation(exp: Any) -> None:
    """Give a resumed experiment new secure-aggregation keys (a no-op without secure aggregation).

    A breakpoint keeps the keys' context, and LOM derives its masks from the keys and the round
    number: redoing a round that failed with the same keys would mask the sites' new updates with
    the masks of their first attempt, whose difference the coordinator may then learn. A new
    `SecureAggregation` of the same scheme and clipping range sets up new keys with the round's
    sites before it runs.

    Args:
        exp: the experiment loaded from a breakpoint.
    """
    secagg = exp.secagg
    if secagg is None or not secagg.active:
        return
    from fedbiomed.researcher.secagg import SecureAggregation

    exp.set_secagg(SecureAggregation(scheme=secagg.scheme, clipping_range=secagg.clipping_range))


def _server_optimizer(spec: Spec):
    """The coordinator's declearn optimizer: FedOpt's module and/or SCAFFOLD's server half (None: plain averaging)."""
    if spec.server_optimizer is None and spec.aggregator != "scaffold":
        return None
    from declearn.optimizer.modules import AdamModule, MomentumModule, OptiModule, ScaffoldServerModule, YogiModule
    from fedbiomed.common.optimizers import Optimizer

    modules: list[OptiModule] = [ScaffoldServerModule()] if spec.aggregator == "scaffold" else []
    lr = 1.0
    if spec.server_optimizer is not None:
        opt = dict(spec.server_optimizer)
        name = opt.pop("name")
        lr = float(opt.pop("lr", 1.0))
        if name == "momentum":
            modules.append(MomentumModule(beta=float(opt.get("momentum", 0.9))))
        elif name == "adam":
            modules.append(AdamModule(beta_1=float(opt.get("beta_1", 0.9)), beta_2=float(opt.get("beta_2", 0.99))))
        else:
            modules.append(YogiModule(beta_1=float(opt.get("beta_1", 0.9)), beta_2=float(opt.get("beta_2", 0.99))))
    return Optimizer(lr=lr, modules=modules)


def _format_round(record: dict, total: int) -> str:
    parts = []
    for nid, row in sorted(record["sites"].items(), key=lambda kv: kv[1].get("name", kv[0])):
        bits = [f"{row.get('name', nid)}: n={row.get('samples', '?')}"]
        for label, key in (("global", "val_global"), ("local", "val_local")):
            if "dice_mean" in row.get(key, {}):
                bits.append(f"{label} dice={row[key]['dice_mean']:.3f}")
        train = row.get("train", {})
        loss = train.get("loss_mean", train.get("Loss"))
        if "d_loss" in train or "g_loss" in train:
            bits.append(f"D={train.get('d_loss', float('nan')):.3f} G={train.get('g_loss', float('nan')):.3f}")
        elif loss is not None:
            bits.append(f"loss={loss:.3f}")
        parts.append(" ".join(bits))
    mb = sum((record.get("bytes") or {}).values()) / 1e6
    status = record.get("site_status") or {}
    asked = [row for row in status.values() if row["status"] != "not_sampled"]
    taken = f", {record.get('aggregated_from')} of {len(asked)} sites" if len(asked) > (record.get("aggregated_from") or 0) else ""
    return f"round {record['round']}/{total} ({record['wall_s']:.1f}s, {mb:.1f} MB, |update|={record['update_norm']:.4f}{taken}) " + " | ".join(parts)
