from pathlib import Path

import pytest
import yaml

from fedimg_core.site_config import SiteConfigFile
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
        ({"site_name": "Bad Name"}, "site_name: must be 1-63 of a-z 0-9 _ - starting with a letter or digit (got 'Bad Name')"),
        ({"coordinator": {"host": "x", "port": 70000}}, "coordinator.port: must be an integer in [1, 65535] (got 70000)"),
        ({"coordinator": {"host": "", "port": 1}}, "coordinator.host: must be a non-empty string"),
        ({"coordinator": "x:1"}, "coordinator: must be a mapping with keys host, port"),
        ({"data_dir": "relative/path"}, "data_dir: must be an absolute path (got 'relative/path')"),
        ({"runtime": "k8s"}, "runtime: must be one of auto, process, docker (got 'k8s')"),
        ({"docker": {"restart": "sometimes"}}, "docker.restart: must be one of no, always, unless-stopped, on-failure"),
        ({"docker": {"tag": "x"}}, "docker.tag: unknown key"),
        ({"colour": "blue"}, "colour: unknown key; allowed: config_version, coordinator, data_dir, device, docker, registry, runtime, site_name, work_dir"),
    ],
)
def test_invalid_config_names_the_field(site_yaml, change, message):
    with pytest.raises(ConfigError) as info:
        site_config.validate({**site_yaml, **change}, "site.yaml")
    assert str(info.value).startswith(f"site.yaml: {message}"), info.value
    assert info.value.file == "site.yaml" and info.value.problems[0][0] == message.split(":")[0]


def test_every_problem_is_listed_and_a_misspelt_key_suggested_once(site_yaml):
    raw = {k: v for k, v in site_yaml.items() if k != "site_name"}
    raw.update({"site_nam": "a", "runtime": "k8s", "work_dir": "rel"})
    with pytest.raises(ConfigError) as info:
        site_config.validate(raw, "site.yaml")
    keys = [key for key, _ in info.value.problems]
    # "site_name: required" is not reported besides the typo that most likely meant it
    assert sorted(keys) == ["runtime", "site_nam", "work_dir"], info.value
    assert "site.yaml: site_nam: unknown key; did you mean 'site_name'?" in str(info.value)
    assert str(info.value).startswith("site.yaml: 3 problems")


def test_defaults_and_empty_docker_section(site_yaml):
    cfg = site_config.validate({**site_yaml, "docker": None}, "t")
    assert cfg.docker.image == site_config.DEFAULT_IMAGE and cfg.docker.restart == "unless-stopped" and cfg.docker.network is None
    assert site_config.validate({k: v for k, v in site_yaml.items() if k != "runtime"}, "t").runtime == "auto"
    assert site_config.validate({**site_yaml, "coordinator": {"host": " h ", "port": 1}}, "t").coordinator_host == "h"


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


def test_the_guide_s_example_is_a_valid_config_naming_every_key():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "site.md").read_text()
    block = guide.split("## The site config", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    raw = yaml.safe_load(block)
    cfg = site_config.validate(raw, "docs/guide/site.md")
    assert cfg.registry is not None and cfg.docker.restart == "unless-stopped"
    shown = set(raw) | {f"{k}.{sub}" for k, v in raw.items() if isinstance(v, dict) for sub in v}
    every = set(SiteConfigFile.model_fields) | {
        f"{k}.{sub}"
        for k, f in SiteConfigFile.model_fields.items()
        for m in getattr(f.annotation, "__args__", (f.annotation,))
        if hasattr(m, "model_fields")
        for sub in m.model_fields
    }
    assert every <= shown, f"keys the guide's example leaves out: {sorted(every - shown)}"
