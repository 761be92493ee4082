import pytest
import yaml

from site_agent import config as site_config
from site_agent.errors import ConfigError


def test_valid_config_round_trips(tmp_path, site_yaml):
    cfg = site_config.validate(site_yaml, "t")
    path = tmp_path / "site.yaml"
    cfg.save(path)
    again = site_config.load(path)
    assert again.site_name == "site-a"
    assert again.coordinator_port == 50051
    assert again.node_dir == tmp_path / "work" / "node"
    assert again.path == path.resolve()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"site_name": "Bad Name"}, "site_name"),
        ({"coordinator": {"host": "x", "port": 70000}}, "coordinator.port"),
        ({"coordinator": {"host": "", "port": 1}}, "coordinator.host"),
        ({"data_dir": "relative/path"}, "data_dir must be an absolute path"),
        ({"runtime": "k8s"}, "runtime must be one of"),
        ({"colour": "blue"}, "unknown key(s) colour"),
    ],
)
def test_invalid_config_names_the_field(site_yaml, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        site_config.validate({**site_yaml, **change}, "site.yaml")


def test_missing_and_broken_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="site config not found"):
        site_config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("site_name: [unclosed")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        site_config.load(bad)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, site_yaml):
    cfg = site_config.validate(site_yaml, "t")
    cfg.save(tmp_path / "site.yaml")
    cfg.save(tmp_path / "site.yaml")
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["site.yaml"]
    assert yaml.safe_load((tmp_path / "site.yaml").read_text())["site_name"] == "site-a"
