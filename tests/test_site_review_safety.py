"""Issue 17 case 1, security review of the fix: run ids cannot lead out of the site's state
folder, staff review screens show others' text with its control characters escaped, the
coordinator (only) sees its own plan errors, a key file cannot probe the site's files, and
every executable artifact is deserialised from the checked bytes in memory."""

import hashlib
import importlib
import inspect
import io
import json
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipelines import site_errors
from pipelines.artifact_approval import STORE_ENV, ApprovalStore, ArtifactNotApproved, store_dir
from pipelines.factory.domain_key import KeyConfigError, build_domain_key
from pipelines.site_errors import SiteError, site_boundary
from pipelines.site_state import SiteStateStore
from pipelines.terminal_text import escape_controls, has_controls

pytestmark = pytest.mark.usefixtures("site_process")

ESC = "\x1b"


class _Encoder(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)).repeat(1, 4)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _registry_file(models, name: str, module: torch.nn.Module, published_by: str = "lab-x"):
    folder = models / "registry" / "factory" / name / "v0001"
    folder.mkdir(parents=True)
    torch.jit.script(module).save(str(folder / "encoder.pt"))
    (folder / "artifact.json").write_text(json.dumps({"kind": "factory", "name": name, "version": "v0001", "published_by": published_by}))
    return folder / "encoder.pt"


# -- 1: run ids are plain names; the state store stays under its root ------------------------


@pytest.mark.parametrize("run_id", ["../../outside/evil", "a/b", "..", "/abs", "x\\..\\y", ""])
def test_factory_plan_args_refuse_a_run_id_that_is_not_a_plain_name(run_id):
    from pipelines.factory.training import parse_factory_args
    from pipelines.training import parse_plan_args
    from preprocessing.schema import load_schema

    with pytest.raises(ValueError, match=r"plan_args\.run_id: must be a plain name"):
        parse_factory_args({"run_id": run_id})
    if run_id:  # the segmentation plans' check is the same function
        with pytest.raises(ValueError, match=r"plan_args\.run_id: must be a plain name"):
            parse_plan_args({"run_id": run_id}, load_schema("abdominal-ct"))
    assert parse_factory_args({"run_id": "20261205-liver-ab12"}).run_id == "20261205-liver-ab12"


def test_site_state_store_never_writes_outside_its_root(tmp_path):
    root = tmp_path / "cache"
    for run_id, name in (("../../outside/evil", "domain-key"), ("run", "../x"), ("..", "key-layers")):
        with pytest.raises(ValueError, match="not a plain name"):
            SiteStateStore(root, run_id, name, folder="factory-keys")
    with pytest.raises(ValueError, match="not a plain name"):
        SiteStateStore(root, "run", "x", folder="../elsewhere")
    # a link inside the root that leads out of it
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "factory-keys").symlink_to(outside)
    with pytest.raises(ValueError, match="is not under"):
        SiteStateStore(root, "run", "domain-key", folder="factory-keys")
    store = SiteStateStore(root, "run-1", "DataFactoryPlan")
    store.write({"round": 1})
    assert store.read() == {"round": 1} and store.path.parent == (root / "optimizer-state").resolve()
    assert not any(outside.iterdir())


# -- 2: review screens escape control characters ---------------------------------------------


def test_escape_controls_shows_every_control_and_bidi_character():
    text = f"a\rb{ESC}[1Ac\x00d\x7fe\x85f\u202eg\u2066h\u200fi\tj\u2028k"
    out = escape_controls(text)
    assert out == "a\\rb\\x1b[1Ac\\x00d\\x7fe\\x85f\\u202eg\\u2066h\\u200fi\\x09j\\u2028k".replace("\\r", "\\x0d")
    assert not has_controls(out) and has_controls(text) and not has_controls("x\ty") and has_controls("x\ty", allow_tabs=False)
    assert escape_controls("x\ty", keep_tabs=True) == "x\ty"
    cut = escape_controls(ESC * 50, limit=10)
    assert cut.endswith("…") and len(cut) <= 11 and "\\x1" not in cut[-4:]  # no half escape left
    assert escape_controls("Doe^Jane, plain") == "Doe^Jane, plain"


def _site_config(tmp_path, work):
    raw = {"site_name": "site-a", "coordinator": {"host": "localhost", "port": 50051}, "data_dir": str(tmp_path / "data"),
           "work_dir": str(work), "runtime": "process"}  # fmt: skip
    cfg_path = tmp_path / "site.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    return cfg_path


def test_artifacts_commands_escape_what_the_coordinator_wrote(tmp_path, monkeypatch):
    from site_agent.cli import cli

    work = tmp_path / "work"
    models = work / "models"
    fake = "0" * 64
    spoof = f"\r{fake}  approved  torchscript  by staff{ESC}[K"
    path = _registry_file(models, "evil", _Encoder(), published_by=spoof)
    monkeypatch.setenv(STORE_ENV, str(store_dir(work)))
    with pytest.raises(ArtifactNotApproved):
        build_domain_key({"kind": "encoder", "file": "registry/factory/evil/v0001/encoder.pt"}, 32, models_dir=models,
                         origin={"plan_class": "DataFactoryPlan", "run_id": f"r1{ESC}[2K", "round": 2})  # fmt: skip
    # recorded: identifiers checked, free text escaped and cut
    (record,) = ApprovalStore(store_dir(work)).records()
    origin = record["requests"][0]["origin"]
    assert origin["run_id"].startswith("invalid: ") and ESC not in json.dumps(origin, ensure_ascii=False)
    assert origin["registry"]["published_by"].startswith("\\x0d" + fake) and origin["round"] == 2
    # a store written before (raw text in it) is escaped when printed too
    doc = json.loads(ApprovalStore(store_dir(work)).path.read_text())
    doc["artifacts"][_sha(path)]["requests"][0]["origin"]["registry"]["published_by"] = spoof
    ApprovalStore(store_dir(work)).path.write_text(json.dumps(doc))
    monkeypatch.delenv(STORE_ENV)
    cfg = _site_config(tmp_path, work)
    for args in (["artifacts", "show", _sha(path)[:10]], ["artifacts", "list"]):
        res = CliRunner().invoke(cli, ["--config", str(cfg), *args])
        assert res.exit_code == 0, res.output
        assert "\r" not in res.output and ESC not in res.output, res.output
        assert "(according to the coordinator)" in res.output
    show = CliRunner().invoke(cli, ["--config", str(cfg), "artifacts", "show", _sha(path)[:10]]).output
    assert f"published by \\x0d{fake}  approved" in show and "status: pending" in show


def _plan_record(source: str, status: str = "Pending", **kw):
    from site_agent.plan_review import PlanRecord

    base = dict(id="training_plan_aaaa", short_id="aaaa", name="exp/P", experiment="exp", plan_key="k", plan_class="P",
                researcher_id="RESEARCHER_x", status=status, hash="h", algorithm="SHA256", date_registered="",
                date_last_action="", notes="", description="")  # fmt: skip
    return PlanRecord(**{**base, **kw, "source": source})


def test_plans_show_escapes_the_source_and_warns():
    from site_agent.plan_review import show_lines

    hidden = "    steal_files()"
    source = f"class P(TorchTrainingPlan):\n{hidden}\n    # {ESC}[1A{ESC}[2K{ESC}[1A\n    x = 1 # ok\rsecond_statement()\n\tpass\n"
    old = _plan_record("class P(TorchTrainingPlan):\n    pass\n", status="Approved", id="training_plan_bbbb", short_id="bbbb")
    plan = _plan_record(source, notes=f"fine{ESC}[31m", researcher_id="R\u202eX")
    lines = show_lines([old, plan], plan)
    text = "\n".join(lines)
    assert lines[0].startswith("WARNING") and lines[-1] == lines[0]
    assert ESC not in text and "\r" not in text and "\u202e" not in text
    assert hidden in lines and "    # \\x1b[1A\\x1b[2K\\x1b[1A" in lines
    assert "+    # \\x1b[1A\\x1b[2K\\x1b[1A" in lines  # in the diff too
    assert "    x = 1 # ok\\x0dsecond_statement()" in lines  # a lone CR stays visible in its line
    assert "\tpass" in lines and "notes: fine\\x1b[31m" in lines and "researcher: R\\u202eX" in lines
    clean = show_lines([old], _plan_record("class P(TorchTrainingPlan):\n\tpass\n"))
    assert not any(line.startswith("WARNING") for line in clean)  # tabs alone are not a warning


def test_plans_show_command_on_a_real_node_database(tmp_path):
    from conftest import cli
    from test_site_agent_everyday import _init_site, _send_plans

    from coordinator.testbed import free_port

    cfg = _init_site(tmp_path, free_port())
    source = f"import torch\n\n\nclass P(TorchTrainingPlan):\n    def f(self):\n        return open('/etc/passwd').read()\n        # {ESC}[1A{ESC}[2K{ESC}[1A\n"
    _send_plans(cfg, [("cccc1111-0000-4000-8000-000000000001", f"fedimg plan condistfl for experiment x{ESC}[2K", source)])
    res = cli("site-agent", "--config", cfg, "plans", "show", "cccc1111")
    assert res.returncode == 0, res.stderr
    assert ESC not in res.stdout and res.stdout.startswith("WARNING")
    assert "return open('/etc/passwd').read()" in res.stdout and "\\x1b[1A" in res.stdout
    assert "name: x\\x1b[2K/P" in res.stdout


# -- 3: the coordinator marks its own process; sites stay sanitised ----------------------------


def _failing_post_init():
    @site_boundary("init")
    def post_init():
        raise ValueError("plan_args.factory.presset: unknown key (did you mean 'preset'?)")

    return post_init


def test_errors_are_sanitised_unless_the_coordinator_marked_its_process(monkeypatch):
    # a process that imported both sides (the coordinator after its plan hash) is not marked
    monkeypatch.setitem(sys.modules, "fedbiomed.researcher", sys.modules.get("fedbiomed.researcher", object()))
    monkeypatch.setenv("FEDIMG_RESEARCHER_PROCESS", "1")  # no environment switches it
    with pytest.raises(SiteError):
        _failing_post_init()()
    import fedbiomed.node.training_plan_security_manager  # noqa: F401 - what coordinator/engine.py imports

    site_errors.mark_researcher_process()
    with pytest.raises(ValueError, match="presset"):  # the researcher sees their own typo
        _failing_post_init()()


def test_a_node_process_cannot_be_marked(monkeypatch):
    monkeypatch.setitem(sys.modules, "fedbiomed.node.round", object())
    with pytest.raises(RuntimeError, match="node process"):
        site_errors.mark_researcher_process()
    assert site_errors.in_researcher_process() is False


def test_the_coordinator_marks_its_process_where_it_builds_the_experiment():
    from coordinator.engine import Federation

    source = inspect.getsource(Federation._experiment)
    assert "mark_researcher_process()" in source and source.index("mark_researcher_process()") < source.index("Experiment(")


# -- 4: the key file cannot probe the site's files --------------------------------------------


def test_key_file_must_lie_in_the_registry_folder(tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "private").mkdir(parents=True)
    torch.jit.script(_Encoder()).save(str(models / "private" / "enc.pt"))
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "approvals"))
    for name in ("private/enc.pt", "enc.pt", "registry"):
        with pytest.raises(KeyConfigError, match=r"key\.file: must be a path in the models directory's registry/ folder"):
            build_domain_key({"kind": "encoder", "file": name}, 32, models_dir=models)
    # a link in registry/ that leads elsewhere counts as missing
    (models / "registry").mkdir()
    (models / "registry" / "enc.pt").symlink_to(models / "private" / "enc.pt")
    with pytest.raises(KeyConfigError, match="leads out of"):
        build_domain_key({"kind": "encoder", "file": "registry/enc.pt"}, 32, models_dir=models)
    assert ApprovalStore(tmp_path / "approvals").records() == []


def _report(models, raw) -> SiteError:
    @site_boundary("training")
    def training_routine():
        build_domain_key(raw, 32, models_dir=models)

    with pytest.raises(SiteError) as e:
        training_routine()
    return e.value


def test_missing_other_and_unapproved_key_files_look_alike_to_the_coordinator(tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    path = _registry_file(models, "enc", _Encoder())
    sha = _sha(path)
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "approvals"))
    store = ApprovalStore(tmp_path / "approvals")
    file = "registry/factory/enc/v0001/encoder.pt"
    missing = _report(models, {"kind": "encoder", "file": "registry/factory/nope/v0001/encoder.pt"})
    other = _report(models, {"kind": "encoder", "file": file, "sha256": "0" * 64})
    assert store.records() == []  # a declared sha256 that differs records nothing
    present = _report(models, {"kind": "encoder", "file": file})
    for e in (missing, other, present):
        assert e.code == "artifact_not_approved" and set(e.fields) == {"stage", "kind", "incident"}, e.fields
        assert sha not in str(e) and str(tmp_path) not in str(e)
    # the site's log has the details
    err = capsys.readouterr().err
    assert "registry/factory/nope/v0001/encoder.pt" in err and f"its sha256 {sha} differs" in err
    # the requester who names the content by its sha256 learns its status (nothing new to them)
    declared = _report(models, {"kind": "encoder", "file": file, "sha256": sha})
    assert declared.fields["sha256"] == sha and declared.fields["status"] == "pending"
    assert [r["sha256"] for r in store.records("pending")] == [sha]


# -- the loaders: approval first, then bytes in memory -----------------------------------------


def test_an_unapproved_perceptual_network_is_refused(tmp_path, monkeypatch):
    from pipelines.adaptation.losses import PerceptualDistance

    class _Dist(torch.nn.Module):
        def forward(self, x, y):
            return (x - y).abs().mean(dim=(1, 2, 3))

    path = tmp_path / "lpips.pt"
    torch.jit.script(_Dist()).save(str(path))
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "approvals"))
    loads = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(ArtifactNotApproved) as e:
        PerceptualDistance(path)
    assert e.value.status == "pending" and loads == []
    assert ApprovalStore(tmp_path / "approvals").get(_sha(path))["requests"][0]["origin"]["setting"] == "adaptation settings: perceptual"


def test_torchscript_is_only_ever_loaded_from_bytes_in_memory(tmp_path, monkeypatch):
    from pipelines.adaptation.losses import PerceptualDistance

    class _Dist(torch.nn.Module):
        def forward(self, x, y):
            return (x - y).abs().mean(dim=(1, 2, 3))

    models = tmp_path / "models"
    enc = _registry_file(models, "enc", _Encoder())
    dist = tmp_path / "lpips.pt"
    torch.jit.script(_Dist()).save(str(dist))
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "approvals"))
    for p in (enc, dist):
        ApprovalStore(tmp_path / "approvals").decide(_sha(p), True, kind="torchscript")
    seen = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda f, *a, **k: seen.append(f) or real_load(f, *a, **k))
    build_domain_key({"kind": "encoder", "file": "registry/factory/enc/v0001/encoder.pt"}, 32, models_dir=models)
    PerceptualDistance(dist)
    assert len(seen) == 2 and all(isinstance(f, io.BytesIO) for f in seen), seen


# -- every Fed-BioMed entry point of a plan is a site boundary ---------------------------------


def test_every_plan_entry_point_and_dataset_read_is_wrapped_by_site_boundary():
    from coordinator.plans import PLANS
    from pipelines.plans.datasets import PreparedSegmentationDataset, PreparedSliceDataset

    def wrapped(fn) -> bool:  # site_boundary's wrapper around the plan's own function
        return callable(getattr(fn, "__wrapped__", None)) and fn.__code__.co_filename == site_errors.__file__

    assert PLANS
    for name, target in PLANS.items():
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        for entry in ("post_init", "training_data", "training_routine", "testing_routine"):
            fn = getattr(cls, entry)
            assert wrapped(fn), (name, entry)
    for dataset in (PreparedSegmentationDataset, PreparedSliceDataset):
        assert wrapped(dataset.read), dataset


def test_the_node_loads_torch_files_as_plain_tensors_only(tmp_path):
    from site_agent.config import validate
    from site_agent.runtime import node_environment

    site = validate({"site_name": "s", "coordinator": {"host": "coord", "port": 50051}, "data_dir": str(tmp_path / "d"),
                     "work_dir": str(tmp_path / "w"), "runtime": "process"}, "site.yaml")  # fmt: skip
    env = node_environment(site, base={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in env
