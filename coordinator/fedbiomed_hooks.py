"""What the coordinator learns from Fed-BioMed while a run goes on, through its own objects.

- `SiteErrors`: the errors sites answer to the researcher's requests, read from Fed-BioMed's
  request objects (``FederatedRequest.errors()``, unsuccessful replies): its training job only
  logs them.
- `ScalarFeed`: the scalars sites stream during a round (validation metrics, training loss),
  through the experiment's monitor callback.
- `RoundOutcomes`: what became of each site's training request (answered, failed, disconnected,
  timed out), read from the request objects, and the policies that end a round (the deadline,
  ``round_timeout_s``, and a lost site staying lost) added to those requests: Fed-BioMed sends
  training requests without any.
- `OutgoingModels`: the global model (and SCAFFOLD's state) of each training request, put into
  the experiment's wire form (one checked buffer, optionally in 16 bits; `pipelines.wire`) before
  it is sent; the sites' SCAFFOLD states checked and decoded when their replies are in.
- `WireCounter`: the bytes Fed-BioMed's gRPC server puts on the wire. Fed-BioMed 6.4.1 has no
  API for these: they exist only in its transport's debug log records, so this is the one place
  where the coordinator reads Fed-BioMed's logging (see `wire_bytes`).

No Fed-BioMed import here: the hooks work on the objects Fed-BioMed hands them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any, Callable, Iterator

from pipelines.wire import decode_params, encode_or_exact, is_encoded

__all__ = ["OutgoingModels", "RoundOutcomes", "ScalarFeed", "SiteErrors", "WireCounter", "wire_bytes"]


class SiteErrors:
    """Keeps the errors sites answer to the requests of this process, as one line per error.

    Fed-BioMed's `Requests.send` returns a `FederatedRequest` whose ``errors()`` (error
    messages) and ``replies()`` (some with ``success`` False and a ``msg``) say what each site
    answered; its training job and strategy only log them. `watch` wraps ``send`` on the
    `Requests` singleton so every request's answers are read when its context ends.

    Args:
        limit: at most this many distinct lines are kept (a site polled every second repeats itself).
    """

    def __init__(self, limit: int = 50):
        self.limit = limit
        self._lock = threading.Lock()
        self._lines: dict[str, None] = {}  # ordered set

    def watch(self, requests: Any) -> None:
        """Read the answers of every request sent through ``requests`` (a Fed-BioMed `Requests`).

        Args:
            requests: the researcher's `Requests` singleton; its ``send`` is wrapped once.
        """
        send = getattr(requests.send, "fedimg_original", requests.send)

        @contextlib.contextmanager
        def send_and_read_errors(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with send(*args, **kwargs) as federated_request:
                try:
                    yield federated_request
                finally:
                    try:
                        self.read(federated_request)
                    except (AttributeError, TypeError):  # an answer of a shape we do not know: the run goes on
                        logging.getLogger(__name__).debug("unreadable request answers", exc_info=True)

        send_and_read_errors.fedimg_original = send  # type: ignore[attr-defined]  # watching twice wraps once
        requests.send = send_and_read_errors

    def read(self, federated_request: Any) -> None:
        """Keep the errors of one answered request.

        Args:
            federated_request: a Fed-BioMed `FederatedRequest` (``errors()``, ``replies()``).
        """
        for node_id, error in federated_request.errors().items():
            code = f"{error.errnum}: " if getattr(error, "errnum", None) else ""
            self._add(node_id, getattr(error, "node_name", None), code + str(error.extra_msg))
        for node_id, reply in federated_request.replies().items():
            if getattr(reply, "success", True) is False:  # TrainReply, TrainingPlanStatusReply, ApprovalReply
                text = getattr(reply, "msg", None) or getattr(reply, "message", None) or "failed without a message"
                self._add(node_id, getattr(reply, "node_name", None), str(text))

    def _add(self, node_id: str, node_name: str | None, text: str) -> None:
        who = f"{node_name} ({node_id})" if node_name and node_name != node_id else node_id
        line = f"{who}: " + " ".join(text.split())
        with self._lock:
            if len(self._lines) < self.limit:
                self._lines[line] = None

    def lines(self) -> list[str]:
        """The distinct error lines kept since the last `clear`, oldest first."""
        with self._lock:
            return list(self._lines)

    def clear(self) -> None:
        """Forget the lines kept so far (a new run starts)."""
        with self._lock:
            self._lines.clear()


OUTCOMES = ("ok", "failed", "timeout", "not_sampled")  # a site's part in a round, as metrics.json records it


class RoundOutcomes:
    """What each site's training request came to, per (experiment, round), and the round's policies.

    Fed-BioMed's training job sends its requests without a policy, so a round waits until every
    site answers or its connection is declared lost (~2 minutes for a stopped process), and it
    keeps only the replies. `watch` wraps ``send`` on the `Requests` singleton: a training
    request gets the policies ``round_policies(timeout_s)`` returns (the deadline when set) and,
    when its context ends, each site's outcome is kept: ``ok``, ``failed`` (an error, an
    unsuccessful reply, a lost connection, a site not connected) or ``timeout``, with a short reason.

    Args:
        is_training_request: tells a training request message (Fed-BioMed's ``TrainRequest``).
        round_policies: the request policies of a round with this deadline in seconds (None: no deadline).
    """

    def __init__(self, is_training_request: Callable[[Any], bool], round_policies: Callable[[float | None], list[Any]]):
        self.timeout_s: float | None = None
        self._is_training_request = is_training_request
        self._round_policies = round_policies
        # called with a training request's messages (node id -> message) before they are sent (`OutgoingModels`)
        self.before_send: list[Callable[[dict[str, Any]], None]] = []
        # called with a training request's Fed-BioMed request object once its replies are in, before they are read
        # and its outcomes kept (`OutgoingModels.received`)
        self.after_replies: list[Callable[[Any], None]] = []
        self._lock = threading.Lock()
        self._outcomes: dict[tuple[str, int, bool], dict[str, dict[str, str]]] = {}

    def watch(self, requests: Any) -> None:
        """Add the deadline to, and read the outcomes of, every training request sent through ``requests``.

        Args:
            requests: the researcher's `Requests` singleton; its ``send`` is wrapped once.
        """
        send = getattr(requests.send, "fedimg_outcomes_original", requests.send)

        @contextlib.contextmanager
        def send_with_deadline(message: Any, nodes: list[str] | None = None, policies: list[Any] | None = None) -> Iterator[Any]:
            key = self._training_key(message)
            timeout = self.timeout_s
            if key is not None:
                policies = [*(policies or []), *self._round_policies(timeout)]
                for hook in self.before_send:
                    hook(message)
            with send(message, nodes, policies) as federated_request:
                try:
                    yield federated_request
                finally:
                    if key is not None:
                        for after in self.after_replies:
                            after(federated_request)
                        try:
                            self._record(key, federated_request, nodes, timeout)
                        except (AttributeError, TypeError):  # a request of a shape we do not know: the run goes on
                            logging.getLogger(__name__).debug("unreadable training request", exc_info=True)

        send_with_deadline.fedimg_outcomes_original = send  # type: ignore[attr-defined]  # watching twice wraps once
        requests.send = send_with_deadline

    def _training_key(self, message: Any) -> tuple[str, int, bool] | None:
        """(experiment id, round from 0, training) of a training request, else None."""
        if not isinstance(message, dict) or not message:  # Fed-BioMed's MessagesByNode: node id -> message
            return None
        first = next(iter(message.values()))
        if not all(self._is_training_request(m) for m in message.values()):
            return None
        return str(first.experiment_id), int(first.round), bool(first.training)

    def _record(self, key: tuple[str, int, bool], federated_request: Any, nodes: list[str] | None, timeout: float | None) -> None:
        found: dict[str, dict[str, str]] = {}
        for request in federated_request.requests:
            found[request.node.id] = outcome_of(request, timeout)
        for nid in nodes or []:  # asked, but not connected: Fed-BioMed made no request for it
            found.setdefault(nid, {"status": "failed", "reason": "not connected"})
        with self._lock:
            self._outcomes[key] = found

    def take(self, experiment_id: str, round_i: int, training: bool = True) -> dict[str, dict[str, str]]:
        """Remove and return the outcomes of one round's request.

        Args:
            experiment_id: the experiment's Fed-BioMed id.
            round_i: the round, from 0.
            training: the training request (False: the validation-only request after the last round).

        Returns:
            node id -> ``{"status": ok|failed|timeout, "reason": ...}`` (no reason when ok); empty
            when no such request was seen.
        """
        with self._lock:
            return self._outcomes.pop((experiment_id, round_i, training), {})


class OutgoingModels:
    """The wire form (`pipelines.wire`) of what training requests carry, and of the SCAFFOLD states the sites answer with.

    Fed-BioMed's training job builds one parameter mapping and gives it to every site's
    message; this replaces it, once per request, with ``{WIRE_KEY: one checked buffer}`` in the
    precision `set` gave the experiment, and likewise the SCAFFOLD state ``c`` the request
    carries (`pipelines.wire_aux`; runs whose sites send their states in the wire form). The
    sites' plans check and decode both before use (`pipelines.plans.transfer`,
    `pipelines.plans.optimizers`). `received` checks the sites' states when their replies are
    in. Experiments never `set` (no ``transfer`` in their model arguments) send plain tensors, as
    Fed-BioMed does. Registered as a `RoundOutcomes.before_send` and ``after_replies`` hook, so
    it sees exactly the training requests.
    """

    def __init__(self) -> None:
        self._precision: dict[str, str] = {}
        self._states: set[str] = set()
        # per experiment: the floating parameters' shapes of the model last sent (a site's state has those names and
        # shapes), and each site's node-state id the request started from (a rejected reply goes back to it)
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._started_from: dict[tuple[str, str], Any] = {}

    def set(self, experiment_id: str, precision: str | None, states: bool = False) -> None:
        """Send the models of this experiment in ``precision``.

        Args:
            experiment_id: the Fed-BioMed experiment id.
            precision: ``fp32``, ``bf16`` or ``fp16``; None: plain tensors (a run from before wire forms,
                whose sites neither send nor expect them).
            states: the SCAFFOLD states travel in the wire form too (``transfer.states``): encode ``c``,
                and require the sites' states in it.
        """
        exp = str(experiment_id)
        if precision is None:
            self._precision.pop(exp, None)
        else:
            self._precision[exp] = precision
        if states and precision is not None:
            self._states.add(exp)
        else:
            self._states.discard(exp)

    def __call__(self, messages: dict[str, Any]) -> None:
        """Encode the parameters (and SCAFFOLD's ``c``) of one training request's messages in place.

        Args:
            messages: node id -> Fed-BioMed ``TrainRequest``.
        """
        encoded: dict[int, Any] = {}
        for node_id, message in messages.items():
            exp = str(getattr(message, "experiment_id", ""))
            precision = self._precision.get(exp)
            params = getattr(message, "params", None)
            if precision is None or not isinstance(params, Mapping) or is_encoded(params):
                continue
            self._started_from[(exp, str(node_id))] = getattr(message, "state_id", None)
            if id(params) not in encoded:  # the same mapping for every site: encode it once
                self._shapes[exp] = {k: tuple(v.shape) for k, v in params.items() if getattr(v, "is_floating_point", lambda: False)()}
                encoded[id(params)] = encode_or_exact(params, precision, _warn, "[fedimg] global model")
            message.params = encoded[id(params)]
            aux_vars = getattr(message, "optim_aux_var", None)  # SCAFFOLD's c, the same for every site
            if exp in self._states and isinstance(aux_vars, Mapping) and aux_vars:
                if id(aux_vars) not in encoded:
                    from pipelines.wire_aux import encode_aux_vars  # imports declearn: runs with auxiliary variables only

                    encoded[id(aux_vars)] = encode_aux_vars(aux_vars, precision, _warn)
                message.optim_aux_var = encoded[id(aux_vars)]

    def received(self, federated_request: Any) -> None:
        """Check and decode the SCAFFOLD states in one training request's replies, in place.

        Runs before Fed-BioMed reads them (it sums the sites' states, which must be float32 by
        then). In a run whose states travel in the wire form, a state must come as a checked
        buffer whose names and shapes are the model's, and the update beside it must pass its
        own check. A reply that fails becomes an unsuccessful one, so the site is left out of
        the round like a failed site, update and state, and its node state goes back to the one
        the round started from (its optimizer then starts the next round where it started this
        one, as the coordinator counted it).

        Args:
            federated_request: Fed-BioMed's request of a training round (its ``requests`` hold the replies).
        """
        for request in getattr(federated_request, "requests", []):
            reply: Any = getattr(request, "reply", None)
            aux_vars = getattr(reply, "optim_aux_var", None)
            if not isinstance(aux_vars, Mapping) or not aux_vars or getattr(reply, "encrypted", False):
                continue
            exp, node = str(getattr(reply, "experiment_id", "")), str(getattr(reply, "node_id", ""))
            what = "SCAFFOLD state"
            try:
                states = self._checked_states(exp, aux_vars)
                if exp in self._states:
                    # The update is checked here as well (the strategy decodes it later): Fed-BioMed sums the states of
                    # every successful reply, so an update refused after this point would leave its state counted.
                    what = "update"
                    _check_update(getattr(reply, "params", None))
                reply.optim_aux_var = states
            except Exception as exc:  # noqa: BLE001  # anything wrong with a site's reply costs that site its round, not the run
                reason = _one_line(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc))
                _warn(f"[fedimg] {node}: its {what} failed its check ({reason}): it is left out of the round")
                reply.success, reply.optim_aux_var = False, None
                reply.msg = f"its {what} failed its check: {reason}"
                if (exp, node) in self._started_from:
                    reply.state_id = self._started_from[(exp, node)]

    def _checked_states(self, exp: str, aux_vars: Mapping[str, Any]) -> dict[str, Any]:
        from pipelines.wire_aux import aux_var_encoded, decode_aux_var, vector_fields

        out: dict[str, Any] = {}
        shapes = self._shapes.get(exp)
        for module, aux_var in aux_vars.items():
            if exp in self._states and not aux_var_encoded(aux_var):
                raise ValueError("plain tensors where this experiment's sites send a checked buffer")
            decoded = decode_aux_var(aux_var, strict=True)
            for field, vector in vector_fields(decoded).items():
                for name, value in vector.coefs.items():
                    if shapes is not None and (name not in shapes or tuple(value.shape) != shapes[name]):
                        raise ValueError(f"{module}.{field}: {name} {tuple(value.shape)} is not a parameter of the model sent")
            out[module] = decoded
        return out


def _check_update(params: Any) -> None:
    """Raise unless a site's update is a wire-form model that passes its check (`pipelines.wire.decode_params`)."""
    if not isinstance(params, Mapping) or not is_encoded(params):
        raise ValueError("plain tensors where this experiment's sites send a checked buffer")
    decode_params(params)


def _warn(message: str) -> None:
    logging.getLogger(__name__).warning(message)


def outcome_of(request: Any, timeout: float | None) -> dict[str, str]:
    """A site's outcome of one request, from Fed-BioMed's `Request` object.

    Args:
        request: the request (``reply``, ``error``, ``status``: a `RequestStatus`).
        timeout: the deadline the request had, if any (for the reason).

    Returns:
        ``{"status": ...}`` plus ``reason`` unless ok.
    """
    reply, error = getattr(request, "reply", None), getattr(request, "error", None)
    status = getattr(getattr(request, "status", None), "value", None)
    if reply is not None:
        if getattr(reply, "success", True) is False:
            return {"status": "failed", "reason": _one_line(getattr(reply, "msg", None) or "training failed without a message")}
        return {"status": "ok"}
    if error is not None:
        code = f"{error.errnum}: " if getattr(error, "errnum", None) else ""
        return {"status": "failed", "reason": _one_line(code + str(getattr(error, "extra_msg", "") or "error"))}
    if status == "DISCONNECT":
        return {"status": "failed", "reason": "disconnected during the round"}
    if timeout:
        return {"status": "timeout", "reason": f"no update within round_timeout_s ({timeout:g} s)"}
    return {"status": "failed", "reason": "no answer"}


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class ScalarFeed:
    """Collects the scalars sites stream during a round, per experiment.

    Fed-BioMed hands each node's `Scalar` feedback to the callback registered for the
    experiment (``Requests.add_monitor_callback``); `track` registers one that keeps the
    message and still calls the experiment's own monitor. Callbacks run on gRPC threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._tracked: list[Any] = []

    def track(self, exp: Any) -> None:
        """Record the scalars streamed for ``exp`` (a Fed-BioMed `Experiment`).

        Args:
            exp: the experiment; its monitor keeps receiving the messages.
        """
        original: Callable[[dict[str, Any]], None] = exp.monitor().on_message_handler

        def handler(msg: dict[str, Any]) -> None:
            original(msg)
            with self._lock:
                self._pending.append(
                    {
                        "experiment": exp.id,
                        "node_id": msg["node_id"],
                        "train": bool(msg["train"]),
                        "global": bool(msg.get("test_on_global_updates")),
                        "metric": {k: float(v) for k, v in msg["metric"].items()},
                    }
                )

        exp.requests.add_monitor_callback(exp.id, handler)
        self._tracked.append(exp)

    def take(self, experiment_id: str) -> list[dict[str, Any]]:
        """Remove and return the scalars received so far for one experiment.

        Args:
            experiment_id: the experiment's Fed-BioMed id.

        Returns:
            Dicts with ``node_id``, ``train`` (training or validation), ``global`` (validation
            of the received global model) and ``metric`` (name -> value), in arrival order.
        """
        with self._lock:
            mine = [m for m in self._pending if m["experiment"] == experiment_id]
            self._pending = [m for m in self._pending if m["experiment"] != experiment_id]
        return mine

    def reset(self) -> None:
        """Stop tracking every experiment and drop what they sent (late messages of a run must
        not reach the next one)."""
        for exp in self._tracked:
            with contextlib.suppress(KeyError):
                exp.requests.remove_monitor_callback(exp.id)
        self._tracked = []
        with self._lock:
            self._pending = []


def wire_bytes(record: logging.LogRecord) -> tuple[str, int] | None:
    """The direction and size of a message in one of Fed-BioMed's transport debug records.

    Fed-BioMed 6.4.1 serializes each message in its gRPC servicer (transport/server.py:
    ``GetTaskUnary`` sends, ``ReplyTask`` receives) and reports the size only in the debug
    records ``"[WIRE][S->N][TX] ... bytes=%d"`` and ``"[WIRE][N->S][RX] ... bytes=%d"``, the
    size being the record's last argument. No API returns it, and measuring the messages
    again would serialize every model a second time and miss resends; hence this parser.

    Args:
        record: any log record of Fed-BioMed's logger.

    Returns:
        ``("to_sites", n)`` or ``("from_sites", n)``, or None for any other record.
    """
    msg = record.msg if isinstance(record.msg, str) else ""
    if not msg.startswith("[WIRE]") or "bytes=" not in msg or not isinstance(record.args, tuple) or not record.args:
        return None
    try:
        n = int(record.args[-1])  # type: ignore[call-overload]  # checked here: anything else is not ours
    except (TypeError, ValueError):
        return None
    if msg.startswith("[WIRE][S->N][TX]"):
        return "to_sites", n
    if msg.startswith("[WIRE][N->S][RX]"):
        return "from_sites", n
    return None


class WireCounter(logging.Handler):
    """Sums the bytes of `wire_bytes` records per direction until `take`.

    Fed-BioMed's logger must pass DEBUG records for it to see them (its own handlers keep
    their levels).
    """

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self._lock = threading.Lock()
        self._counts = {"to_sites": 0, "from_sites": 0}

    def emit(self, record: logging.LogRecord) -> None:
        """Count one record if it reports a message on the wire."""
        found = wire_bytes(record)
        if found is not None:
            with self._lock:
                self._counts[found[0]] += found[1]

    def take(self) -> dict[str, int]:
        """Return ``{"to_sites": bytes, "from_sites": bytes}`` since the last call, and restart."""
        with self._lock:
            out = dict(self._counts)
            self._counts = {"to_sites": 0, "from_sites": 0}
        return out
