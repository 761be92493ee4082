"""The ground floor: one error family, old import paths that still work, shared wire constants."""

import pickle

import pytest

from fedimg_core import atomic, registry_wire
from fedimg_core.errors import ConfigError, FedimgError, UserError
from fedimg_core.hashing import sha256_file


def test_errors_carry_an_optional_file_and_key_and_survive_pickling(tmp_path):
    exc = UserError("bad value", file=tmp_path / "site.yaml", key="registry.url")
    assert str(exc) == "bad value" and exc.file == str(tmp_path / "site.yaml") and exc.key == "registry.url"
    assert exc.exit_code == 2 and isinstance(ConfigError("x"), UserError)
    back = pickle.loads(pickle.dumps(exc))
    assert (str(back), back.file, back.key) == ("bad value", exc.file, exc.key)
    plain = FedimgError("no location")
    assert plain.file is None and plain.key is None


def test_library_errors_join_the_family_and_keep_their_standard_base():
    from coordinator.plans import PlanArgsError
    from pipelines.factory.key_config import KeyConfigError
    from preprocessing.dataset import DatasetError, DatasetSchemaError
    from preprocessing.schema import SchemaError

    for cls in (DatasetError, DatasetSchemaError, KeyConfigError, PlanArgsError, atomic.FileReadError):
        assert issubclass(cls, FedimgError) and not issubclass(cls, UserError), cls  # run_cli's handling is unchanged
    assert issubclass(SchemaError, ConfigError)  # a label schema / label map is a config file the user wrote
    for cls in (DatasetSchemaError, KeyConfigError, PlanArgsError, atomic.FileReadError):
        assert issubclass(cls, ValueError), cls
    err = PlanArgsError("lr", "must be positive")
    assert err.key == "lr" and str(err) == "lr: must be positive"


def test_former_import_paths_give_the_same_objects():
    import preprocessing.atomic
    import preprocessing.dataset
    import site_agent.errors
    import site_agent.registry_client as client
    from coordinator import registry, registry_http
    from fedimg_core.cli import run_cli

    assert site_agent.errors.UserError is UserError and site_agent.errors.ConfigError is ConfigError
    assert site_agent.errors.run_cli is run_cli
    assert preprocessing.atomic.write_json is atomic.write_json and preprocessing.atomic.FileReadError is atomic.FileReadError
    assert preprocessing.dataset.sha256_file is sha256_file
    for name in ("KINDS", "ALLOWED_SUFFIXES", "RECORD_FILE"):
        assert getattr(registry, name) == getattr(client, name) == getattr(registry_wire, name)
    assert registry_http.SHA256_HEADER == client.SHA256_HEADER == registry_wire.SHA256_HEADER
    assert registry_http.MAX_PUSH_BYTES == client.MAX_PUSH_BYTES == registry_wire.MAX_PUSH_BYTES


def test_sha256_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert sha256_file(p, chunk=1) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_publish_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "report"
    atomic.publish_dir(target, lambda d: (d / "a.txt").write_text("1"))
    atomic.publish_dir(target, lambda d: (d / "b.txt").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]

    def fail(d):
        (d / "c.txt").write_text("3")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic.publish_dir(target, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"] and sorted(p.name for p in target.iterdir()) == ["b.txt"]
