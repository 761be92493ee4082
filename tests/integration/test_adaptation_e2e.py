"""Local domain adaptation end to end, as sites run it:

factory (tiny, 2 rounds, 2 real Fed-BioMed nodes) -> published to the coordinator's
registry -> served over HTTP with site tokens -> `site-agent adapt source` at a CT site
(pushes its branch) -> `site-agent adapt target` at an MR-like site (pulls only) ->
`site-agent infer` writes a label volume on the input's grid."""

import json

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import cli

from coordinator.registry import Registry
from coordinator.registry_http import serve_registry
from coordinator.site_tokens import SiteTokens
from coordinator.testbed import Testbed
from fedimg_testing.phantom import make_phantom, mr_like
from preprocessing.dataset import load_dataset, write_dataset
from site_agent.runtime import pid_alive

pytestmark = pytest.mark.integration

ORGANS = {"background": 0, "kidney": 1, "liver": 3}


def _organs(label):
    out = np.zeros_like(label)
    out[label == 1] = 1
    out[label == 3] = 3
    return out


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    bed = Testbed(tmp_path_factory.mktemp("adapt"), n_sites=2, phases=["portal_venous", "arterial"])
    bed.setup_sites()
    bed.start_nodes()
    try:
        home = bed.workdir / "coordinator"
        raw = {
            "name": "factory-e2e",
            "plan": "data_factory",
            "sites": {"tags": ["fedimg-demo"], "min_sites": 2, "wait_s": 90},
            "rounds": 2,
            "local_steps": 4,
            "batch_size": 4,
            "clients_per_round": 2,
            "seed": 1,
            "plan_args": {"factory": {"preset": "tiny"}, "r1_interval": 2, "pl_interval": 2},
            "approval": {"request": True, "wait_s": 60},
        }
        spec = bed.workdir / "factory.yaml"
        spec.write_text(yaml.safe_dump(raw))
        res = cli("coordinator", "run", spec, "--home", home, "--grpc-host", "127.0.0.1", "--grpc-port", bed.port,
                  "--public-host", "localhost", timeout=500)  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    finally:
        bed.teardown()
        assert not [p for p in bed.pids() if pid_alive(p)]
    httpd = serve_registry(home, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    tokens = SiteTokens(home)
    configs = []
    for site in bed.sites:
        token_file = site.work_dir / "site-token"
        token_file.write_text(tokens.issue(site.site_name) + "\n")
        token_file.chmod(0o600)
        raw_cfg = yaml.safe_load(site.path.read_text())
        raw_cfg["registry"] = {"url": url, "token_file": str(token_file)}
        site.path.write_text(yaml.safe_dump(raw_cfg))
        configs.append(site)
    source, target = configs
    ct = [make_phantom(s, "portal_venous", (32, 32, 8), (6.0, 6.0, 10.0)) for s in range(3)]
    write_dataset(source.data_dir / "adapt-ct", "adapt-ct", "CT", ORGANS,
                  [(v.hu.astype(np.float32), _organs(v.label), np.diag([*v.spacing, 1.0])) for v in ct])  # fmt: skip
    mr = [make_phantom(50 + s, "portal_venous", (32, 32, 8), (6.0, 6.0, 10.0)) for s in range(3)]
    write_dataset(target.data_dir / "adapt-mr", "adapt-mr", "MR", ORGANS,
                  [(mr_like(v, s), _organs(v.label), np.diag([*v.spacing, 1.0])) for s, v in enumerate(mr)])  # fmt: skip
    yield home, source, target
    httpd.shutdown()
    httpd.server_close()


def _json(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout)


def test_factory_to_source_branch_to_target_adaptation_to_inference(federation, tmp_path):
    home, source, target = federation
    reg = Registry(home)
    (factory,) = reg.list("factory")
    assert factory["name"] == "factory-e2e"

    out = _json(cli("site-agent", "--config", source.path, "adapt", "source", "--dataset", "adapt-ct", "--factory", "factory-e2e",
                    "--branch", "ct-organs", "--steps", "6", "--batch", "4", "--json", timeout=600))  # fmt: skip
    assert out["published"] == "v0001" and out["classes"] == ["background", "kidney", "liver"]
    (branch,) = reg.list("segmentation-branch")
    assert branch["meta"]["published_by"] == source.site_name and branch["meta"]["source_site"] == source.site_name
    assert sorted(branch["files"]) == ["branch.json", "branch.pt"]  # weights and their config, nothing else
    assert branch["meta"]["factory"]["sha256"] == factory["files"]["generator.pt"]["sha256"]
    assert (source.work_dir / "models" / "registry" / "factory" / "factory-e2e" / "v0001" / "generator.pt").is_file()

    before = sorted(p.relative_to(home) for p in (home / "registry").rglob("*") if p.is_file())
    res = cli("site-agent", "--config", target.path, "adapt", "target", "--dataset", "adapt-mr", "--factory", "factory-e2e",
              "--branch", "ct-organs@v0001", "--steps", "4", "--batch", "4", "--few-shot-volumes", "2", "--synthetic", "8", "--json", timeout=600)  # fmt: skip
    out = _json(res)
    assert out["few_shot_slices"] == 2 and set(out["evaluation_dice"]) == {"average", "target", "source"}
    job = target.work_dir / "adapt" / "target-ct-organs"
    assert (job / "model.pt").is_file() and (job / "report" / "index.html").is_file()
    for png in ("losses.png", "translations.png", "overlays.png"):
        assert (job / "report" / png).stat().st_size > 1000
    assert json.loads((job / "job.json").read_text())["status"] == "done"
    after = sorted(p.relative_to(home) for p in (home / "registry").rglob("*") if p.is_file())
    assert after == before  # the target only pulled

    # Started again with the same settings: refused, nothing retrained or lost.
    again = cli("site-agent", "--config", target.path, "adapt", "target", "--dataset", "adapt-mr", "--factory", "factory-e2e",
                "--branch", "ct-organs@v0001", "--steps", "4", "--batch", "4", "--few-shot-volumes", "2", "--synthetic", "8", timeout=300)  # fmt: skip
    assert again.returncode != 0 and "already done" in again.stderr

    case = load_dataset(target.data_dir / "adapt-mr").cases[2]
    rows = _json(cli("site-agent", "infer", case.image, "--model", job, "--out", tmp_path / "labels", "--modality", "MR", "--json", timeout=300))
    (row,) = rows
    image, label = nib.load(case.image), nib.load(row["label"])
    assert label.shape == image.shape and np.allclose(label.affine, image.affine)
    assert set(np.unique(np.asarray(label.dataobj)).tolist()) <= {0, 1, 3}

    # A pushed branch needs a token: a wrong one is refused with a clear message.
    raw_cfg = yaml.safe_load(target.path.read_text())
    bad = tmp_path / "bad-token"
    bad.write_text("not-a-token\n")
    bad.chmod(0o600)
    raw_cfg["registry"]["token_file"] = str(bad)
    cfg_path = tmp_path / "bad-site.yaml"
    cfg_path.write_text(yaml.safe_dump(raw_cfg))
    res = cli("site-agent", "--config", cfg_path, "adapt", "target", "--dataset", "adapt-mr", "--factory", "factory-e2e", "--branch", "ct-organs",
              "--steps", "2", "--job", "other", timeout=300)  # fmt: skip
    assert res.returncode != 0 and "token" in res.stderr and "not-a-token" not in res.stderr
