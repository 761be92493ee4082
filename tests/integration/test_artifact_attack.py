"""Issue 17 case 1 on a real federation (one Fed-BioMed node process, coordinator processes):
a researcher's TorchScript "key encoder" in the site's registry folder, named by the
approved data-factory plan's ``plan_args.key``, reads a secret file of the site and raises
with its content. The site refuses to load it until its staff approve its sha256; even an
approved module's error text never reaches the coordinator; an approved harmless encoder
trains. The federation is shared (module scope); each test puts its own module in the
registry folder and approves what it needs, so no test depends on another's records."""

import hashlib
import json

import pytest
import torch
import yaml
from attack_modules import SecretReader
from conftest import cli

from coordinator.testbed import Testbed
from site_agent.runtime import pid_alive

pytestmark = pytest.mark.integration


SECRET = "SITE-SECRET-4711 Doe^Jane MRN 99812"


class _Encoder(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), x.amax(dim=(2, 3)), x.amin(dim=(2, 3))], dim=1)


def _pulled(site, name: str, module: torch.nn.Module) -> str:
    """Put `module` where a registry pull puts files; return its sha256."""
    folder = site.work_dir / "models" / "registry" / "factory" / name / "v0001"
    folder.mkdir(parents=True)
    torch.jit.script(module).save(str(folder / "encoder.pt"))
    (folder / "artifact.json").write_text(json.dumps({"kind": "factory", "name": name, "version": "v0001", "published_by": "lab-x"}))
    return hashlib.sha256((folder / "encoder.pt").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bed = Testbed(tmp_path_factory.mktemp("attack"), n_sites=1)
    bed.setup_sites()
    site = bed.sites[0]
    secret = site.work_dir / "private" / "notes.txt"
    secret.parent.mkdir(parents=True)
    secret.write_text(SECRET)
    bed.secret = secret
    bed.start_nodes()
    yield bed
    bed.teardown()
    assert not [p for p in bed.pids() if pid_alive(p)]


def _evil(bed, name: str) -> str:
    """A reader module of this test's own in the site's registry folder; its sha256."""
    return _pulled(bed.sites[0], name, SecretReader(str(bed.secret), len(SECRET), name))


def _run(bed, name: str, key_file: str, sha256: str | None = None):
    raw = {
        "name": name,
        "plan": "data_factory",
        "sites": {"tags": ["fedimg-demo"], "min_sites": 1, "wait_s": 90},
        "rounds": 1,
        "local_steps": 2,
        "batch_size": 2,
        "clients_per_round": 1,
        "seed": 1,
        "plan_args": {
            "factory": {"preset": "tiny"},
            "key": {"kind": "encoder", "file": key_file, "dim": 4, "reference_count": 4, **({"sha256": sha256} if sha256 else {})},
        },
        "approval": {"request": True, "wait_s": 60},  # the testbed's site approves the plan (not the artifact)
    }
    spec = bed.workdir / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(raw))
    home = bed.workdir / "coordinator"
    res = cli("coordinator", "run", spec, "--home", home, "--grpc-host", "127.0.0.1", "--grpc-port", bed.port,
              "--public-host", "localhost", timeout=400)  # fmt: skip
    return res, home


def _site_cli(bed, *args):
    return cli("site-agent", "--config", bed.sites[0].path, *args)


def _nowhere_on_the_coordinator(home, res) -> None:
    blobs = [p.read_bytes() for p in home.rglob("*") if p.is_file()]
    assert blobs and not any(SECRET.encode() in b for b in blobs)
    assert SECRET not in res.stdout + res.stderr


def test_the_plan_cannot_load_an_unapproved_module_and_the_site_sees_the_request(bed):
    evil = _evil(bed, "evil")
    # the researcher names the module by its sha256: the report may then say which one was refused
    res, home = _run(bed, "attack", "registry/factory/evil/v0001/encoder.pt", sha256=evil)
    assert res.returncode != 0, res.stdout[-2000:]
    _nowhere_on_the_coordinator(home, res)
    (run_dir,) = [p for p in (home / "runs").iterdir() if "-attack-" in p.name]
    log = (run_dir / "run.log").read_text()
    # what the coordinator learns: the code, the artifact's sha256 and kind, nothing else
    assert "fedimg site error artifact_not_approved" in log and evil in log and "torchscript" in log
    assert str(bed.sites[0].work_dir) not in log
    # the site sees the pending request, who asked and where the file came from
    res = _site_cli(bed, "artifacts", "list", "--json")
    assert res.returncode == 0, res.stderr
    (row,) = [r for r in json.loads(res.stdout) if r["sha256"] == evil]
    origin = row["requests"][-1]["origin"]
    assert row["status"] == "pending" and origin["plan_class"] == "DataFactoryPlan" and origin["setting"] == "plan_args.key.file"
    assert origin["registry"]["name"] == "evil" and origin["registry"]["published_by"] == "lab-x"
    res = _site_cli(bed, "plans", "list", "--json")
    (plan,) = json.loads(res.stdout)  # one plan: the data factory, the same source in every run
    res = _site_cli(bed, "plans", "show", plan["id"])
    assert res.returncode == 0, res.stderr
    block = res.stdout.split("--- artifacts", 1)[1]
    assert evil in block and "pending" in block and "registry entry factory/evil v0001" in block


def test_an_approved_modules_error_text_stays_at_the_site(bed):
    """Approved by mistake, the module runs and reads the file: the coordinator still gets
    only a code; the full text is in the site's own log."""
    evil = _evil(bed, "evil-approved")
    assert _site_cli(bed, "artifacts", "approve", evil, "--kind", "torchscript", "--note", "by mistake").returncode == 0
    res, home = _run(bed, "approved-evil", "registry/factory/evil-approved/v0001/encoder.pt")
    assert res.returncode != 0
    _nowhere_on_the_coordinator(home, res)
    (run_dir,) = [p for p in (home / "runs").iterdir() if "-approved-evil-" in p.name]
    assert "fedimg site error site_error [stage=training" in (run_dir / "run.log").read_text()
    assert SECRET in bed.sites[0].log_file.read_text()  # the site's log keeps the full text


def test_an_approved_encoder_trains(bed):
    good = _pulled(bed.sites[0], "good", _Encoder())
    res = _site_cli(bed, "artifacts", "approve", good, "--kind", "torchscript", "--note", "our encoder")
    assert res.returncode == 0 and f"approved {good}" in res.stdout, res.stderr
    res, home = _run(bed, "good-key", "registry/factory/good/v0001/encoder.pt")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = [p for p in (home / "runs").iterdir() if "-good-key-" in p.name]
    (row,) = json.loads((run_dir / "metrics.json").read_text())["rounds"][0]["sites"].values()
    assert row["train"]["updates"] > 0 and row["train"]["key_checksum32"] > 0
    # plans show lists what the plan loaded, with its status and where it came from
    (plan,) = json.loads(_site_cli(bed, "plans", "list", "--json").stdout)
    block = _site_cli(bed, "plans", "show", plan["id"]).stdout.split("--- artifacts", 1)[1]
    assert f"{good}  approved" in block and "registry entry factory/good v0001" in block
