"""The file locks (`filelock`) of the site-token file, the approval store and the registry
serialise writers in different processes: concurrent read-modify-writes lose nothing, and
the lock files are where they always were."""

import hashlib
import multiprocessing as mp

from coordinator.registry import Registry
from coordinator.site_tokens import SiteTokens
from pipelines.artifact_approval import ApprovalStore

N = 6


def _issue(home: str, i: int) -> None:
    SiteTokens(home).issue(f"site-{i}")


def _request(root: str, i: int) -> None:
    ApprovalStore(root).request(hashlib.sha256(str(i).encode()).hexdigest(), "torchscript")


def _publish(home: str, i: int) -> None:
    Registry(home).publish("factory", "gan", {"a.json": f'{{"i": {i}}}'.encode()}, {})


def _run(target, arg) -> None:
    ctx = mp.get_context("spawn")  # fresh interpreters: nothing shared but the files
    procs = [ctx.Process(target=target, args=(arg, i)) for i in range(N)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def test_concurrent_token_issues_all_land(tmp_path):
    _run(_issue, str(tmp_path))
    assert [e["site"] for e in SiteTokens(tmp_path).list()] == sorted(f"site-{i}" for i in range(N))
    assert (tmp_path / ".site-tokens.lock").is_file()


def test_concurrent_approval_requests_all_land(tmp_path):
    _run(_request, str(tmp_path))
    assert len(ApprovalStore(tmp_path).records()) == N
    assert (tmp_path / ".lock").is_file()


def test_concurrent_publishes_get_distinct_versions(tmp_path):
    _run(_publish, str(tmp_path))
    assert Registry(tmp_path).versions("factory", "gan") == [f"v{i:04d}" for i in range(1, N + 1)]
    assert (tmp_path / "registry" / ".lock").is_file()
