"""Segmentation branches pushed over HTTP: the coordinator's real policy (coordinator/branches.py)."""

import hashlib
import io
import json

import pytest
import torch

from coordinator.registry import Registry
from coordinator.registry_http import serve_registry
from coordinator.site_tokens import SiteTokens
from pipelines.adaptation.networks import SegmentationBranch, branch_files, validate_branch_files
from pipelines.factory.networks import FactoryConfig, Generator
from site_agent.errors import UserError
from site_agent.registry_client import RegistryClient


def blob(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def setup(tmp_path):
    home = tmp_path / "coord"
    cfg = FactoryConfig.preset("tiny", n_clients=2)
    gen = blob(Generator(cfg).state_dict())
    schema = {"classes": {"background": 0, "kidney": 1, "liver": 3, "spleen": 7}}
    factory_json = {"factory": cfg.to_dict(), "clients": {"site-a": 0, "site-b": 1}, "schema_definition": schema}
    Registry(home).publish("factory", "gan", {"generator.pt": gen, "factory.json": json.dumps(factory_json).encode()}, {})
    identity = {"name": "gan", "version": "v0001", "sha256": hashlib.sha256(gen).hexdigest()}
    httpd = serve_registry(home, "127.0.0.1", 0)
    client = RegistryClient(f"http://127.0.0.1:{httpd.server_address[1]}", SiteTokens(home).issue("site-a"))
    yield home, client, cfg, identity
    httpd.shutdown()
    httpd.server_close()


def test_a_real_branch_is_accepted_and_pulled_back(setup, tmp_path):
    home, client, cfg, identity = setup
    branch = SegmentationBranch.for_factory(cfg, ["background", "liver"], factory=identity)
    meta = {"source_site": "someone-else", "source_client_id": 7, "classes": ["x"], "validation_dice": {"liver": 0.8}, "steps": 100}
    pushed = branch_files(branch)
    state = torch.load(io.BytesIO(pushed["branch.pt"]), weights_only=True)
    hidden = torch.zeros(100_000)  # a weight that is a view of a much larger storage: torch.save keeps all of it
    state["fc2.bias"] = hidden[: state["fc2.bias"].numel()].copy_(state["fc2.bias"])
    pushed["branch.pt"] = blob(state)
    pushed["branch.json"] = pushed["branch.json"] + b" " * 5000  # padding
    # pushed raw: the site's client would refuse a record whose checksums differ from what it sent
    import base64
    import urllib.request

    body = json.dumps({"files": {k: base64.b64encode(v).decode() for k, v in pushed.items()}, "meta": meta}).encode()
    req = urllib.request.Request(client.url + "/registry/segmentation-branch/liver", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {client._token}", "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        record = json.loads(resp.read())
    # the server builds the meta: who pushed, that site's client id in the factory, the branch's own classes
    assert record["meta"] == {"source_site": "site-a", "source_client_id": 0, "factory": identity, "classes": ["background", "liver"],
                              "validation_dice": {"liver": 0.8}, "steps": 100, "published_by": "site-a"}  # fmt: skip
    stored = Registry(home).path("segmentation-branch", "liver")
    assert (stored / "branch.pt").stat().st_size < len(pushed["branch.pt"]) // 10  # rebuilt, not the pushed bytes
    assert (stored / "branch.json").read_bytes() == branch_files(branch)["branch.json"]
    folder = client.pull("segmentation-branch", "liver", dest=tmp_path / "pulled")
    again = validate_branch_files({p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".pt", ".json") and p.name != "artifact.json"})
    x = [torch.randn(1, c, r, r) for c, r in zip(cfg.channels, cfg.resolutions)]
    branch.eval(), again.eval()
    assert torch.equal(branch(x), again(x))


def test_anything_but_a_branch_of_a_held_factory_is_refused(setup):
    home, client, cfg, identity = setup
    good = SegmentationBranch.for_factory(cfg, ["background", "liver"], factory=identity)
    files = branch_files(good)
    other = branch_files(SegmentationBranch.for_factory(cfg, ["background", "liver", "spleen"], factory=identity))
    state = torch.load(io.BytesIO(files["branch.pt"]), weights_only=True)
    extra = dict(state, image=torch.zeros(64, 64))  # a slice smuggled in as a "weight"
    cases = [
        ({**files, "notes.json": b"{}"}, {}, "not a segmentation branch"),
        ({"branch.pt": files["branch.pt"]}, {}, "not a segmentation branch"),
        ({"branch.pt": other["branch.pt"], "branch.json": files["branch.json"]}, {}, "not a segmentation branch"),
        ({"branch.pt": blob(extra), "branch.json": files["branch.json"]}, {}, "image"),
        (files, {"patient_name": "x"}, r"meta: key\(s\) patient_name not allowed"),
        (files, {"validation_dice": {"liver": "see notes"}}, "meta.validation_dice"),
        (files, {"validation_dice": {"Jane Doe": 0.5}}, "meta.validation_dice"),
        (
            {"branch.pt": blob({k: v.double() if v.is_floating_point() else v for k, v in state.items()}), "branch.json": files["branch.json"]},
            {},
            "float64, expected torch.float32",
        ),
        (branch_files(SegmentationBranch.for_factory(cfg, ["background", "brain"], factory=identity)), {}, "brain are not foreground classes"),
        (branch_files(SegmentationBranch.for_factory(cfg, ["liver", "background"], factory=identity)), {}, "must start with background"),
    ]
    for push_files, meta, needle in cases:
        with pytest.raises(UserError, match=needle):
            client.push("segmentation-branch", "x", push_files, meta)
    wrong = SegmentationBranch.for_factory(cfg, ["background", "liver"], factory={**identity, "sha256": "f" * 64})
    with pytest.raises(UserError, match="generator sha256 ffffffffffff"):
        client.push("segmentation-branch", "x", branch_files(wrong))
    unknown = SegmentationBranch.for_factory(cfg, ["background", "liver"], factory={**identity, "version": "v0009"})
    with pytest.raises(UserError, match="names factory gan v0009, which this registry does not hold"):
        client.push("segmentation-branch", "x", branch_files(unknown))
    assert Registry(home).list("segmentation-branch") == []
