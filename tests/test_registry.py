"""The coordinator's artifact registry (coordinator.registry)."""

import io
import json
import os
import stat

import pytest
import torch

from coordinator import registry as R
from coordinator.registry import KINDS, Registry, RegistryError
from site_agent.errors import UserError


def weights(seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"w": torch.randn(4, 4, generator=g), "step": seed}, buf)
    return buf.getvalue()


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_publish_versions_get_list_verify(tmp_path, monkeypatch):
    # storage mechanics with a stand-in branch file: the real branch validator (registered
    # when coordinator.branches is imported) is tested in test_branch_push.py
    monkeypatch.delitem(R.VALIDATORS, "segmentation-branch", raising=False)
    reg = Registry(tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("size: 64\nn_bins: 29\n")
    meta = {"rounds": 3, "sites": ["a", "b"], "slices": {"size": 64, "n_bins": 29}, "note": None, "lr": 0.002}
    first = reg.publish("factory", "abdomen-gan", {"generator.pt": weights(1), "config.yaml": cfg}, meta)
    assert first["version"] == "v0001" and first["kind"] == "factory" and first["name"] == "abdomen-gan"
    assert first["meta"] == meta
    assert first["created"].endswith("+00:00")
    assert first["files"]["config.yaml"]["bytes"] == len(cfg.read_bytes())
    second = reg.publish("factory", "abdomen-gan", {"generator.pt": weights(2), "info.json": b'{"a": 1}'}, {"rounds": 6})
    assert second["version"] == "v0002"

    base = tmp_path / "registry" / "factory" / "abdomen-gan"
    assert (base / "latest").read_text().strip() == "v0002"
    on_disk = json.loads((base / "v0001" / "artifact.json").read_text())
    assert on_disk == first and set(on_disk) == {"kind", "name", "version", "created", "files", "meta"}
    assert reg.get("factory", "abdomen-gan") == second
    assert reg.get("factory", "abdomen-gan", "v0001")["meta"] == meta  # meta round trip
    assert reg.path("factory", "abdomen-gan") == base / "v0002"
    assert reg.path("factory", "abdomen-gan", "v0001") == base / "v0001"

    branch = reg.publish("segmentation-branch", "site-a", {"branch.pt": weights(3)}, {})
    records = reg.list()
    assert [(r["kind"], r["name"], r["version"]) for r in records] == [
        ("factory", "abdomen-gan", "v0001"),
        ("factory", "abdomen-gan", "v0002"),
        ("segmentation-branch", "site-a", "v0001"),
    ]
    assert reg.list("segmentation-branch") == [branch]
    assert reg.verify("factory", "abdomen-gan", "v0001") == first
    assert reg.verify("factory", "abdomen-gan") == second

    path = reg.load("factory", "abdomen-gan", "generator.pt", "v0001")
    assert path == base / "v0001" / "generator.pt"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.load(io.BytesIO(weights(1)), weights_only=True)["w"])
    assert reg.load("factory", "abdomen-gan", "info.json").read_bytes() == b'{"a": 1}'
    assert not list((tmp_path / "registry" / ".staging").iterdir())


def test_missing_artifacts_are_clear_errors(tmp_path):
    reg = Registry(tmp_path)
    assert reg.list() == []
    with pytest.raises(RegistryError, match="no factory artifact 'gan' in the registry"):
        reg.get("factory", "gan")
    reg.publish("factory", "gan", {"g.pt": weights()}, {})
    with pytest.raises(RegistryError, match=r"has no version v0007; published versions: v0001"):
        reg.get("factory", "gan", "v0007")
    with pytest.raises(RegistryError, match="not a registry version"):
        reg.get("factory", "gan", "../gan")
    with pytest.raises(RegistryError, match="unknown artifact kind 'images'"):
        reg.get("images", "gan")
    with pytest.raises(RegistryError, match="no file 'd.pt'; it has g.pt"):
        reg.load("factory", "gan", "d.pt")
    assert issubclass(RegistryError, UserError)


def test_tampering_is_detected_naming_the_file(tmp_path):
    reg = Registry(tmp_path)
    reg.publish("factory", "gan", {"generator.pt": weights(1), "discriminator.pt": weights(2), "config.json": b"{}"}, {})
    folder = reg.path("factory", "gan")
    target = folder / "discriminator.pt"
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    data[-30] ^= 0xFF
    target.write_bytes(bytes(data))  # same size, other content
    with pytest.raises(RegistryError, match=r"discriminator\.pt: checksum does not match"):
        reg.verify("factory", "gan")
    with pytest.raises(RegistryError, match=r"discriminator\.pt: checksum does not match"):
        reg.load("factory", "gan", "discriminator.pt")
    assert reg.load("factory", "gan", "generator.pt").name == "generator.pt"  # other files still load
    target.unlink()
    with pytest.raises(RegistryError, match=r"discriminator\.pt: missing"):
        reg.verify("factory", "gan")
    target.write_bytes(weights(2))
    reg.verify("factory", "gan")
    (folder / "extra.pt").write_bytes(weights(3))
    with pytest.raises(RegistryError, match="not part of the published artifact: extra.pt"):
        reg.verify("factory", "gan")


@pytest.mark.parametrize("filename", ["volume.npy", "case.nii.gz", "slice.png", "weights.pth", "data.csv", "noext"])
def test_refuses_anything_but_weights_and_configs(tmp_path, filename):
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="only weights and configs can be published"):
        reg.publish("factory", "gan", {"generator.pt": weights(), filename: b"\x00" * 16}, {})
    assert reg.list() == []
    assert not (tmp_path / "registry" / "factory").exists()


@pytest.mark.parametrize("filename", ["sub/generator.pt", "../generator.pt", "..pt", ".hidden.pt", "a b.pt", "", "artifact.json"])
def test_refuses_unsafe_file_names(tmp_path, filename):
    with pytest.raises(RegistryError, match="not allowed|reserved"):
        Registry(tmp_path).publish("factory", "gan", {filename: weights()}, {})


@pytest.mark.parametrize("name", ["a/b", "..", ".", ".hidden", "", "x" * 65, "with space", "naïve"])
def test_refuses_unsafe_artifact_names(tmp_path, name):
    with pytest.raises(RegistryError, match="artifact name .* is not allowed"):
        Registry(tmp_path).publish("factory", name, {"g.pt": weights()}, {})
    assert not (tmp_path / "registry" / "factory").exists()


def test_refuses_bad_content_kind_and_meta(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="unknown artifact kind"):
        reg.publish("dataset", "gan", {"g.pt": weights()}, {})
    with pytest.raises(RegistryError, match="nothing to publish"):
        reg.publish("factory", "gan", {}, {})
    with pytest.raises(RegistryError, match="meta must be JSON-serialisable"):
        reg.publish("factory", "gan", {"g.pt": weights()}, {"bad": object()})
    with pytest.raises(RegistryError, match="meta must be JSON-serialisable"):
        reg.publish("factory", "gan", {"g.pt": weights()}, {"lr": float("nan")})
    with pytest.raises(RegistryError, match="g.pt: not a PyTorch weights file"):
        reg.publish("factory", "gan", {"g.pt": b"\x00\x01 not torch"}, {})

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code",))

    buf = io.BytesIO()
    torch.save({"w": Evil()}, buf)
    with pytest.raises(RegistryError, match="evil.pt: not a PyTorch weights file"):
        reg.publish("factory", "gan", {"evil.pt": buf.getvalue()}, {})
    with pytest.raises(RegistryError, match="c.json: not valid JSON"):
        reg.publish("factory", "gan", {"c.json": b"{nope"}, {})
    with pytest.raises(RegistryError, match="c.yaml: not valid YAML"):
        reg.publish("factory", "gan", {"c.yaml": b"a: [1, 2"}, {})
    with pytest.raises(RegistryError, match="is not a file"):
        reg.publish("factory", "gan", {"c.yaml": tmp_path / "absent.yaml"}, {})
    assert reg.list() == []
    assert not list((tmp_path / "registry" / ".staging").iterdir())


def test_failure_in_the_middle_of_publish_leaves_nothing(tmp_path, monkeypatch):
    reg = Registry(tmp_path)
    reg.publish("factory", "gan", {"generator.pt": weights(1)}, {"round": 1})
    before = listing(tmp_path / "registry")
    real_copy = R._copy_into
    calls = []

    def copy_then_fail(source, dest, *args, **kwargs):
        calls.append(dest.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_copy(source, dest, *args, **kwargs)

    monkeypatch.setattr(R, "_copy_into", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        reg.publish("factory", "gan", {"generator.pt": weights(2), "discriminator.pt": weights(3)}, {"round": 2})
    assert calls == ["generator.pt", "discriminator.pt"]
    assert not (tmp_path / "registry" / "factory" / "gan" / "v0002").exists()
    assert (tmp_path / "registry" / "factory" / "gan" / "latest").read_text().strip() == "v0001"
    assert listing(tmp_path / "registry") == before  # nothing left in staging either
    monkeypatch.undo()

    # a failure after the version folder is in place (writing `latest`) withdraws it
    real_write_text = R.atomic.write_text

    def fail_latest(path, text):
        if os.path.basename(path) == "latest":
            raise OSError(5, "I/O error")
        return real_write_text(path, text)

    monkeypatch.setattr(R.atomic, "write_text", fail_latest)
    with pytest.raises(OSError, match="I/O error"):
        reg.publish("factory", "gan", {"generator.pt": weights(2)}, {"round": 2})
    monkeypatch.undo()
    assert listing(tmp_path / "registry") == before
    assert reg.get("factory", "gan")["version"] == "v0001"
    assert reg.publish("factory", "gan", {"generator.pt": weights(2)}, {"round": 2})["version"] == "v0002"


def test_latest_falls_back_to_newest_complete_version(tmp_path):
    reg = Registry(tmp_path)
    reg.publish("factory", "gan", {"g.pt": weights(1)}, {})
    reg.publish("factory", "gan", {"g.pt": weights(2)}, {})
    base = tmp_path / "registry" / "factory" / "gan"
    (base / "latest").unlink()  # e.g. a publisher killed between the rename and `latest`
    assert reg.get("factory", "gan")["version"] == "v0002"
    (base / "v0003").mkdir()  # a folder without a record is not a version...
    assert reg.get("factory", "gan")["version"] == "v0002"
    assert [r["version"] for r in reg.list()] == ["v0001", "v0002"]
    # ...but its number is never reused
    assert reg.publish("factory", "gan", {"g.pt": weights(3)}, {})["version"] == "v0004"


def test_published_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        Registry(tmp_path).publish("factory", "gan", {"g.pt": weights(), "c.json": b"{}"}, {})
    finally:
        os.umask(old)
    folder = tmp_path / "registry" / "factory" / "gan" / "v0001"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for f in ("g.pt", "c.json", "artifact.json"):
        assert stat.S_IMODE((folder / f).stat().st_mode) == 0o644, f


def test_kinds():
    assert KINDS == ("factory", "segmentation-branch", "model", "atlas")
