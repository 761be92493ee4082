"""Issue 17 case 1: nothing executable loads at a site without the site's approval of its
sha256, a site's errors leave as a code and allowlisted fields, and a failed `adapt`
leaves nothing it pulled in the registry folder."""

import hashlib
import io
import json

import pytest
import torch
import yaml
from attack_modules import SecretReader
from click.testing import CliRunner

from pipelines.artifact_approval import (
    STORE_ENV,
    ApprovalStore,
    ArtifactNotApproved,
    ArtifactStoreError,
    load_approved_bytes,
    store_dir,
)
from pipelines.factory.domain_key import build_domain_key
from pipelines.site_errors import SiteError, sanitize, site_boundary

pytestmark = pytest.mark.usefixtures("site_process")

SECRET = "PATIENT-LIST-7f3a: Doe^Jane 1961-02-03"


class _Encoder(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)).repeat(1, 4)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def site_files(tmp_path):
    """A site work folder: a secret file, and a registry folder holding a pulled TorchScript file."""
    work = tmp_path / "work"
    secret = work / "secret.txt"
    secret.parent.mkdir(parents=True)
    secret.write_text(SECRET)
    version = work / "models" / "registry" / "factory" / "evil" / "v0001"
    version.mkdir(parents=True)
    torch.jit.script(SecretReader(str(secret), len(SECRET))).save(str(version / "encoder.pt"))
    (version / "artifact.json").write_text(json.dumps({"kind": "factory", "name": "evil", "version": "v0001", "published_by": "researcher-x"}))
    good = work / "models" / "registry" / "factory" / "good" / "v0001"
    good.mkdir(parents=True)
    torch.jit.script(_Encoder()).save(str(good / "encoder.pt"))
    return work


GOOD = "registry/factory/good/v0001/encoder.pt"


def test_store_records_requests_and_decisions(tmp_path):
    store = ApprovalStore(tmp_path / "artifacts")
    a, b = "ab" * 32, "ac" * 32
    assert store.records() == [] and store.status(a) == "unknown"
    store.request(a, "torchscript", {"plan_class": "P", "run_id": "r1", "setting": "plan_args.key.file", "junk": "dropped"})
    store.request(a, "torchscript", {"plan_class": "P", "run_id": "r1", "setting": "plan_args.key.file"})
    record = store.request(a, "torchscript", {"plan_class": "P", "run_id": "r2"})
    assert record["status"] == "pending" and record["kinds"] == ["torchscript"]
    assert [q["count"] for q in record["requests"]] == [2, 1] and "junk" not in record["requests"][0]["origin"]
    # a unique prefix names it; staff decisions say who, when and why
    assert store.resolve("ababab") == a and store.resolve(a.upper()) == a
    done = store.decide(a, True, note="our own encoder, checked")
    assert done["status"] == "approved" and done["decision"]["note"] == "our own encoder, checked" and done["decision"]["by"]
    assert store.status(a) == "approved"
    # the file on disk is plain JSON, one record per sha256
    doc = json.loads((tmp_path / "artifacts" / "artifacts.json").read_text())
    assert set(doc["artifacts"]) == {a}
    store.decide(b, False, kind="pickle")
    assert [r["sha256"] for r in store.records("rejected")] == [b]
    with pytest.raises(ArtifactStoreError, match="at least 6 hex digits"):
        store.resolve("ab")
    with pytest.raises(ArtifactStoreError, match="no artifact with this sha256 prefix"):
        store.resolve("ffffff")
    with pytest.raises(ArtifactStoreError, match="64 hex digits"):
        store.request("xyz", "torchscript")
    with pytest.raises(ArtifactStoreError, match="kind must be one of"):
        store.request(a, "python")
    (tmp_path / "artifacts" / "artifacts.json").write_text("{broken")
    with pytest.raises(ArtifactStoreError, match="artifacts.json: unreadable approval store"):
        store.records()


def test_prefix_ambiguity_names_the_candidates(tmp_path):
    store = ApprovalStore(tmp_path)
    store.request("abcdef" + "0" * 58, "torchscript")
    store.request("abcdef" + "1" * 58, "torchscript")
    with pytest.raises(ArtifactStoreError, match="matches 2 artifacts"):
        store.resolve("abcdef")


def test_unapproved_torchscript_key_is_refused_before_loading(site_files, monkeypatch):
    models = site_files / "models"
    evil = models / "registry" / "factory" / "evil" / "v0001" / "encoder.pt"
    monkeypatch.setenv(STORE_ENV, str(store_dir(site_files)))
    loads = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    raw = {"kind": "encoder", "file": "registry/factory/evil/v0001/encoder.pt"}
    with pytest.raises(ArtifactNotApproved) as e:
        build_domain_key(raw, 32, models_dir=models, origin={"plan_class": "DataFactoryPlan", "run_id": "run-1"})
    assert loads == []  # refused before a byte of it was deserialised
    assert e.value.sha256 == _sha(evil) and e.value.status == "pending" and SECRET not in str(e.value)
    assert f"site-agent artifacts approve {_sha(evil)}" in str(e.value)
    # the request is pending with who asked and where the file came from
    (record,) = ApprovalStore.from_env().records("pending")
    origin = record["requests"][0]["origin"]
    assert record["sha256"] == _sha(evil) and record["kinds"] == ["torchscript"]
    assert origin["setting"] == "key.file" and origin["plan_class"] == "DataFactoryPlan" and origin["run_id"] == "run-1"
    assert origin["path"] == str(evil) and origin["registry"] == {"kind": "factory", "name": "evil", "version": "v0001", "published_by": "researcher-x"}
    # rejected: still refused, and no longer pending
    ApprovalStore.from_env().decide(_sha(evil), False, note="reads files")
    with pytest.raises(ArtifactNotApproved) as e:
        build_domain_key(raw, 32, models_dir=models)
    assert e.value.status == "rejected" and loads == [] and ApprovalStore.from_env().records("pending") == []


def test_approved_encoder_loads_from_the_checked_bytes(site_files, monkeypatch):
    models = site_files / "models"
    monkeypatch.setenv(STORE_ENV, str(store_dir(site_files)))
    good = models / GOOD
    with pytest.raises(ArtifactNotApproved):
        build_domain_key({"kind": "encoder", "file": GOOD}, 32, models_dir=models)
    ApprovalStore.from_env().decide(_sha(good), True)
    dk = build_domain_key({"kind": "encoder", "file": GOOD}, 32, models_dir=models)
    assert dk.dim == 4 and dk.fn.describe()["sha256"] == _sha(good)
    # loads of an approved artifact are recorded too (staff see what each plan loaded)
    (request,) = ApprovalStore.from_env().get(_sha(good))["requests"]
    assert request["count"] == 2 and request["origin"]["path"] == str(good)
    # what is checked is what is loaded: the bytes are read once
    data, digest = load_approved_bytes(good, "torchscript")
    assert digest == _sha(good) and data == good.read_bytes()


def test_without_a_store_nothing_executable_loads(site_files, monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    with pytest.raises(ArtifactNotApproved, match=STORE_ENV) as e:
        build_domain_key({"kind": "encoder", "file": GOOD}, 32, models_dir=site_files / "models")
    assert e.value.status == "no_store"


def test_a_site_error_carries_a_code_and_allowlisted_fields_only(site_files, monkeypatch, capsys):
    """Even an approved module that leaks: what leaves the site is the code, never the text."""
    models = site_files / "models"
    evil = models / "registry" / "factory" / "evil" / "v0001" / "encoder.pt"
    monkeypatch.setenv(STORE_ENV, str(store_dir(site_files)))
    ApprovalStore.from_env().decide(_sha(evil), True, note="approved by mistake")

    @site_boundary("training")
    def training_routine():
        build_domain_key({"kind": "encoder", "file": "registry/factory/evil/v0001/encoder.pt"}, 32, models_dir=models)

    with pytest.raises(SiteError) as e:
        training_routine()
    text = f"{e.value!r} {e.value}"
    assert SECRET not in text and "encoder failed" not in text and str(site_files) not in text
    assert e.value.code == "site_error" and e.value.fields["stage"] == "training"
    assert e.value.__suppress_context__  # a traceback Fed-BioMed formats stops at the sanitised error
    # the full text stays in the site's log (the node's stderr), under the incident id
    err = capsys.readouterr().err
    assert SECRET in err and f"incident {e.value.fields['incident']}" in err

    # a refusal keeps its sha256 and kind, even wrapped in another error (the sha256 only
    # for content the requester named by that sha256: disclose)
    try:
        try:
            refusal = ArtifactNotApproved("ab" * 32, "torchscript", "pending", evil, None)
            refusal.disclose = True
            raise refusal
        except ArtifactNotApproved as inner:
            raise RuntimeError(f"wrapped: {SECRET}") from inner
    except RuntimeError as outer:
        refused = sanitize(outer, "init")
    assert refused.code == "artifact_not_approved" and refused.fields["sha256"] == "ab" * 32
    assert refused.fields["kind"] == "torchscript" and SECRET not in str(refused)
    # fields outside the allowlist, or not in their format, never make it into the text
    odd = SiteError("made_up", stage="training", sha256="not-a-hash", path=str(evil), incident="12345678")
    assert odd.code == "site_error" and odd.fields == {"stage": "training", "incident": "12345678"}
    assert "not-a-hash" not in str(odd) and str(evil) not in str(odd)


def test_site_agent_artifacts_commands(site_files, tmp_path, monkeypatch, capsys):
    from site_agent.cli import cli
    from site_agent.commands.artifacts import echo_plan_artifacts
    from site_agent.config import validate
    from site_agent.errors import UserError

    raw = {"site_name": "site-a", "coordinator": {"host": "localhost", "port": 50051}, "data_dir": str(tmp_path / "data"),
           "work_dir": str(site_files), "runtime": "process"}  # fmt: skip
    cfg_path = tmp_path / "site.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    evil = site_files / "models" / "registry" / "factory" / "evil" / "v0001" / "encoder.pt"
    source = "class DataFactoryPlan(DataFactoryPlanBase):\n    pass\n"
    monkeypatch.setenv(STORE_ENV, str(store_dir(site_files)))
    with pytest.raises(ArtifactNotApproved):
        build_domain_key({"kind": "encoder", "file": "registry/factory/evil/v0001/encoder.pt"}, 32, models_dir=site_files / "models",
                         origin={"plan_class": "DataFactoryPlan", "plan_source_sha256": hashlib.sha256(source.encode()).hexdigest()})  # fmt: skip
    monkeypatch.delenv(STORE_ENV)  # the CLI finds the store through the site config
    run = CliRunner().invoke
    sha = _sha(evil)
    res = run(cli, ["--config", str(cfg_path), "artifacts", "list"])
    assert res.exit_code == 0 and sha[:16] in res.output and "pending" in res.output and "registry entry factory/evil v0001" in res.output
    res = run(cli, ["--config", str(cfg_path), "artifacts", "list", "--status", "PENDING", "--json"])
    assert [r["sha256"] for r in json.loads(res.output)] == [sha]
    res = run(cli, ["--config", str(cfg_path), "artifacts", "show", sha[:10]])
    assert res.exit_code == 0 and f"sha256: {sha}" in res.output and "published by researcher-x" in res.output and "DataFactoryPlan" in res.output
    # plans show's block: the artifacts this plan (by the sha256 of its source) asked for
    site = validate(raw, str(cfg_path))
    capsys.readouterr()
    echo_plan_artifacts(site, {"training_plan": source})
    block = capsys.readouterr().out
    assert f"{sha}  pending  torchscript" in block and "registry entry factory/evil v0001" in block and "artifacts approve" in block
    echo_plan_artifacts(site, {"training_plan": "another plan"})
    assert "none so far" in capsys.readouterr().out
    res = run(cli, ["--config", str(cfg_path), "artifacts", "approve", sha[:12], "--note", "checked"])
    assert res.exit_code == 0 and f"approved {sha}" in res.output
    assert ApprovalStore(store_dir(site_files)).status(sha) == "approved"
    res = run(cli, ["--config", str(cfg_path), "artifacts", "reject", sha])
    assert res.exit_code == 0 and ApprovalStore(store_dir(site_files)).status(sha) == "rejected"
    # approving ahead (nothing asked yet) needs the full sha256 and what it is
    other = "cd" * 32
    res = run(cli, ["--config", str(cfg_path), "artifacts", "show", other])  # a full sha256 nothing asked for: one clear error
    assert res.exit_code != 0 and isinstance(res.exception, UserError) and "no artifact with this sha256" in str(res.exception)
    res = run(cli, ["--config", str(cfg_path), "artifacts", "approve", other])
    assert res.exit_code != 0 and "--kind" in str(res.exception)
    res = run(cli, ["--config", str(cfg_path), "artifacts", "approve", other, "--kind", "torchscript"])
    assert res.exit_code == 0 and ApprovalStore(store_dir(site_files)).status(other) == "approved"


def test_the_node_and_its_container_find_the_store(tmp_path):
    from site_agent.config import validate
    from site_agent.runtime import container_spec, node_environment

    site = validate({"site_name": "s", "coordinator": {"host": "coord", "port": 50051}, "data_dir": str(tmp_path / "d"),
                     "work_dir": str(tmp_path / "w"), "runtime": "process"}, "site.yaml")  # fmt: skip
    env = node_environment(site, base={STORE_ENV: "/elsewhere"})
    assert env[STORE_ENV] == str(tmp_path / "w" / "artifacts")
    assert container_spec(site)["environment"][STORE_ENV] == str(tmp_path / "w" / "artifacts")


# -- adapt: nothing a failed command pulled stays ---------------------------------------------


@pytest.fixture
def registry(tmp_path):
    from coordinator.registry_http import serve_registry

    home = tmp_path / "coord"
    httpd = serve_registry(home, "127.0.0.1", 0, api_token="api-token")
    yield home, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _weights(seed: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.randn(3, 3, generator=torch.Generator().manual_seed(seed))}, buf)
    return buf.getvalue()


def test_a_failed_adapt_leaves_nothing_in_the_registry_folder(registry, tmp_path, monkeypatch):
    from coordinator.registry import Registry
    from coordinator.site_tokens import SiteTokens
    from site_agent.adapt import run_source
    from site_agent.config import validate
    from site_agent.errors import UserError

    home, url = registry
    Registry(home).publish("factory", "gan", {"generator.pt": _weights(1), "extra.pt": _weights(2)}, {})  # not a usable factory
    monkeypatch.setenv("FEDIMG_SITE_TOKEN", SiteTokens(home).issue("site-a"))
    site = validate({"site_name": "site-a", "coordinator": {"host": "localhost", "port": 50051}, "data_dir": str(tmp_path / "data"),
                     "work_dir": str(tmp_path / "work"), "runtime": "process", "registry": {"url": url}}, "site.yaml")  # fmt: skip
    with pytest.raises(UserError):
        run_source(site, "missing", "gan", "branch", {})
    registry_dir = site.work_dir / "models" / "registry"
    assert not registry_dir.exists() or not any(p.is_file() for p in registry_dir.rglob("*"))
    staging = site.work_dir / "staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_staged_pulls_reach_the_registry_folder_only_on_success(registry, tmp_path):
    from coordinator.registry import Registry
    from coordinator.site_tokens import SiteTokens
    from site_agent.registry_client import RegistryClient, StagedPulls

    home, url = registry
    Registry(home).publish("factory", "gan", {"generator.pt": _weights(1)}, {})
    client = RegistryClient(url, SiteTokens(home).issue("site-a"))
    reg, staging = tmp_path / "models" / "registry", tmp_path / "staging"
    with pytest.raises(RuntimeError, match="later step failed"):
        with StagedPulls(client, reg, staging) as pulls:
            folder = pulls.pull("factory", "gan")
            assert (folder / "generator.pt").read_bytes() == _weights(1) and reg not in folder.parents
            raise RuntimeError("later step failed")
    assert not (reg / "factory" / "gan").exists() and not any(staging.iterdir())
    with StagedPulls(client, reg, staging) as pulls:
        pulls.pull("factory", "gan")
    target = reg / "factory" / "gan" / "v0001"
    assert (target / "generator.pt").read_bytes() == _weights(1) and not any(staging.iterdir())
    # a verified copy in the registry folder is reused, nothing staged
    with StagedPulls(client, reg, staging) as pulls:
        assert pulls.pull("factory", "gan") == target
