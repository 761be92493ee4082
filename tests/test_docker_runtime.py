"""The docker runtime without a Docker engine.

`container_spec(site)` is a pure function: its keyword arguments are checked here, and
fed through the Docker SDK's own argument conversion (with the engine calls stubbed) to
show the SDK accepts them. `DockerRuntime` is driven with a small fake client.
"""

from __future__ import annotations

import json
import os
import warnings

import docker
import docker.errors
import pytest
from click.testing import CliRunner

from site_agent import config as site_config
from site_agent import runtime as rt
from site_agent.errors import UserError
from site_agent.runtime import DockerRuntime, ProcessRuntime, container_name, container_spec, get_runtime

IS_ROOT = os.geteuid() == 0


def make_site(tmp_path, host="coordinator.example.org", port=50051, docker_settings=None, runtime="docker"):
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir(exist_ok=True)
    data.mkdir(exist_ok=True)
    raw = {
        "site_name": "hospital-a",
        "coordinator": {"host": host, "port": port},
        "data_dir": str(data),
        "work_dir": str(work),
        "runtime": runtime,
    }
    if docker_settings is not None:
        raw["docker"] = docker_settings
    site = site_config.validate(raw, "test")
    site.path = tmp_path / "site.yaml"
    site.save(site.path)
    return site


@pytest.fixture
def site(tmp_path):
    return make_site(tmp_path)


# -- container_spec --------------------------------------------------------------------------


def test_image_name_and_labels(tmp_path):
    spec = container_spec(make_site(tmp_path))
    assert spec["image"] == site_config.DEFAULT_IMAGE == "fedimg-site:0.1.0"
    assert spec["name"] == container_name(make_site(tmp_path)) == "fedimg-site-hospital-a"
    assert spec["labels"] == {rt.CONTAINER_LABEL: "hospital-a"}
    assert spec["detach"] is True
    other = make_site(tmp_path, docker_settings={"image": "registry.example.org/fedimg-site:0.1.0"})
    assert container_spec(other)["image"] == "registry.example.org/fedimg-site:0.1.0"


def test_command_runs_the_node_in_the_foreground_with_the_site_config(site):
    assert container_spec(site)["command"] == [
        "--config", str(site.path), "start", "--foreground", "--runtime", "process",
    ]  # fmt: skip


def test_command_is_accepted_by_the_site_agent_cli(site):
    """The image's ENTRYPOINT is `site-agent`: the command must parse and load the config.

    With no node created yet, `start --foreground` stops at its readiness check, naming
    the node folder of the config it loaded: nothing is exec'd.
    """
    from site_agent.cli import cli

    result = CliRunner().invoke(cli, container_spec(site)["command"])
    assert "No such option" not in result.output, result.output
    assert isinstance(result.exception, UserError), (result.output, result.exception)
    assert str(site.node_dir) in str(result.exception) and "site-agent init" in str(result.exception)


def test_config_path_defaults_to_the_work_dir(tmp_path):
    site = make_site(tmp_path)
    site.path = None
    spec = container_spec(site)
    default = str(site.work_dir / "site.yaml")
    assert spec["command"][:2] == ["--config", default]
    assert spec["environment"]["FEDIMG_SITE_CONFIG"] == default
    assert spec["volumes"][default] == {"bind": default, "mode": "ro"}


def test_volumes_same_paths_inside_work_rw_data_and_config_ro(site):
    volumes = container_spec(site)["volumes"]
    assert volumes == {
        str(site.work_dir): {"bind": str(site.work_dir), "mode": "rw"},
        str(site.data_dir): {"bind": str(site.data_dir), "mode": "ro"},
        str(site.path): {"bind": str(site.path), "mode": "ro"},
    }
    for host, mount in volumes.items():
        assert os.path.isabs(host) and host == mount["bind"]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to create a root-owned folder")
def test_root_owned_work_dir_runs_as_10001(site):
    os.chown(site.work_dir, 0, 0)
    assert container_spec(site)["user"] == "10001:10001"
    os.chown(site.work_dir, 0, 4242)  # root user, other group: still never root
    assert container_spec(site)["user"] == "10001:10001"


def test_user_is_the_work_dir_owner(site):
    if IS_ROOT:
        os.chown(site.work_dir, 1234, 2345)
        expected = "1234:2345"
    else:
        expected = f"{os.getuid()}:{os.getgid()}"
    assert container_spec(site)["user"] == expected


def test_missing_work_dir_runs_as_10001(site):
    os.rmdir(site.work_dir)
    assert container_spec(site)["user"] == "10001:10001"


def test_user_is_never_root(site):
    user = container_spec(site)["user"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_environment_coordinator_address_and_forced_security(tmp_path, monkeypatch):
    monkeypatch.setenv("FBM_SECURITY_TRAINING_PLAN_APPROVAL", "False")
    monkeypatch.setenv("FBM_SECURITY_ALLOW_DEFAULT_TRAINING_PLANS", "True")
    monkeypatch.setenv("FBM_SECURITY_FORCE_SECURE_AGGREGATION", "False")
    monkeypatch.setenv("FEDIMG_TEST_STRAY", "host-only")
    site = make_site(tmp_path, host="coordinator.example.org", port=50123)
    env = container_spec(site)["environment"]
    assert env["FBM_RESEARCHER_IP"] == "coordinator.example.org"
    assert env["FBM_RESEARCHER_PORT"] == "50123"
    security = {k: v for k, v in env.items() if k.startswith("FBM_SECURITY_")}
    assert security == {
        "FBM_SECURITY_TRAINING_PLAN_APPROVAL": "True",
        "FBM_SECURITY_ALLOW_DEFAULT_TRAINING_PLANS": "False",
        "FBM_SECURITY_ALLOW_FEDERATED_ANALYTICS": "False",
        "FBM_SECURITY_ALLOW_PREPROC": "False",
    }
    assert env["FEDIMG_SITE_CONFIG"] == str(site.path)
    assert "FEDIMG_TEST_STRAY" not in env, "the host's environment does not leak into the container"
    assert "PATH" not in env  # the image's PATH (its virtual environment) stays
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())


@pytest.mark.parametrize(
    ("restart", "policy"),
    [
        ("unless-stopped", {"Name": "unless-stopped"}),
        ("always", {"Name": "always"}),
        ("on-failure", {"Name": "on-failure", "MaximumRetryCount": 5}),
        ("no", {"Name": ""}),
    ],
)
def test_restart_policy_from_the_config(tmp_path, restart, policy):
    site = make_site(tmp_path, docker_settings={"restart": restart})
    assert container_spec(site)["restart_policy"] == policy


def test_default_restart_policy_is_unless_stopped(site):
    assert container_spec(site)["restart_policy"] == {"Name": "unless-stopped"}


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.1.1", "::1"])
def test_loopback_coordinator_uses_the_host_network(tmp_path, host):
    spec = container_spec(make_site(tmp_path, host=host, docker_settings={"network": "fedimg"}))
    assert spec["network_mode"] == "host"
    assert "network" not in spec  # the SDK refuses network together with network_mode


def test_remote_coordinator_uses_the_configured_network(tmp_path):
    spec = container_spec(make_site(tmp_path, host="coordinator", docker_settings={"network": "fedimg"}))
    assert spec["network"] == "fedimg"
    assert "network_mode" not in spec


def test_remote_coordinator_without_network_uses_the_default_bridge(tmp_path):
    spec = container_spec(make_site(tmp_path, host="coordinator.example.org"))
    assert "network" not in spec and "network_mode" not in spec


def test_hardening(site):
    spec = container_spec(site)
    assert spec["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in spec["security_opt"]
    assert not spec.get("privileged")
    assert not spec.get("cap_add")
    assert "ports" not in spec, "the node dials out; no inbound port"


def _sdk_client_with_stubbed_engine(monkeypatch):
    """A real DockerClient whose engine calls are stubbed: no socket is opened."""
    client = docker.DockerClient(base_url="tcp://127.0.0.1:9", version="1.43")
    created = {}

    def create_container(**kwargs):
        created.update(kwargs)
        return {"Id": "0123456789ab"}

    monkeypatch.setattr(client.api, "create_container", create_container)
    monkeypatch.setattr(client.api, "start", lambda *a, **k: None)
    monkeypatch.setattr(client.api, "inspect_container", lambda cid: {"Id": cid, "Name": "/x", "State": {"Status": "running"}})
    return client, created


@pytest.mark.parametrize("host", ["coordinator.example.org", "127.0.0.1"])
def test_the_docker_sdk_accepts_the_spec(tmp_path, monkeypatch, host):
    site = make_site(tmp_path, host=host, docker_settings={"network": "fedimg", "restart": "on-failure"})
    client, created = _sdk_client_with_stubbed_engine(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated or ignored argument either
        client.containers.run(**container_spec(site))
    hc = created["host_config"]
    assert created["image"] == site.docker.image
    assert created["user"] == container_spec(site)["user"]
    assert sorted(hc["Binds"]) == sorted([f"{site.work_dir}:{site.work_dir}:rw", f"{site.data_dir}:{site.data_dir}:ro", f"{site.path}:{site.path}:ro"])
    assert hc["CapDrop"] == ["ALL"] and hc["SecurityOpt"] == ["no-new-privileges:true"]
    assert hc["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 5}
    assert hc["NetworkMode"] == ("host" if host == "127.0.0.1" else "fedimg")
    assert created["environment"]["FBM_SECURITY_TRAINING_PLAN_APPROVAL"] == "True"
    assert created["command"][:2] == ["--config", str(site.path)]


# -- DockerRuntime with a fake client --------------------------------------------------------


class FakeContainer:
    def __init__(self, name, status="running"):
        self.name = name
        self.status = status
        self.calls = []

    def start(self):
        self.calls.append(("start",))
        self.status = "running"

    def stop(self, timeout=None):
        self.calls.append(("stop", timeout))
        self.status = "exited"

    def remove(self):
        self.calls.append(("remove",))

    def logs(self, tail=None):
        self.calls.append(("logs", tail))
        return b"line 1\nline 2\n\xff\n"


class FakeContainers:
    def __init__(self):
        self.by_name: dict[str, FakeContainer] = {}
        self.run_calls: list[dict] = []

    def get(self, name):
        try:
            return self.by_name[name]
        except KeyError:
            raise docker.errors.NotFound(f"No such container: {name}") from None

    def run(self, **kwargs):
        self.run_calls.append(kwargs)
        container = FakeContainer(kwargs["name"])
        self.by_name[kwargs["name"]] = container
        return container


class FakeClient:
    def __init__(self):
        self.containers = FakeContainers()
        self.runtimes = {"runc": {"path": "runc"}}

    def info(self):
        return {"Runtimes": self.runtimes}


@pytest.fixture
def fake():
    return FakeClient()


def test_status_without_a_container(site, fake):
    st = DockerRuntime(site, client=fake).status()
    assert (st.running, st.runtime, st.detail) == (False, "docker", "no container")


def test_start_runs_exactly_the_container_spec(site, fake):
    runtime = DockerRuntime(site, client=fake)
    st = runtime.start()
    assert fake.containers.run_calls == [container_spec(site)]
    assert st.running and st.runtime == "docker"
    assert container_name(site) in st.detail


def test_start_asks_for_gpus_only_where_the_engine_has_the_nvidia_runtime(site, fake):
    site.device = "auto"
    DockerRuntime(site, client=fake).start()
    assert "device_requests" not in fake.containers.run_calls[-1]
    fake.runtimes["nvidia"] = {"path": "nvidia-container-runtime"}
    fake.containers = FakeContainers()
    DockerRuntime(site, client=fake).start()
    (request,) = fake.containers.run_calls[-1]["device_requests"]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]


def test_start_is_idempotent_and_restarts_a_stopped_container(site, fake):
    runtime = DockerRuntime(site, client=fake)
    runtime.start()
    runtime.start()
    assert len(fake.containers.run_calls) == 1, "a running container is not created twice"
    container = fake.containers.by_name[container_name(site)]
    container.status = "exited"
    assert not runtime.status().running
    st = runtime.start()
    assert st.running
    assert container.calls == [("start",)]
    assert len(fake.containers.run_calls) == 1


def test_stop_stops_and_removes_the_container(site, fake):
    runtime = DockerRuntime(site, client=fake)
    runtime.start()
    container = fake.containers.by_name[container_name(site)]
    # the fake keeps the container listed after remove(); drop it the way the engine would
    original_remove = container.remove

    def remove():
        original_remove()
        del fake.containers.by_name[container.name]

    container.remove = remove
    st = runtime.stop(timeout=7.5)
    assert container.calls == [("stop", 7), ("remove",)]
    assert not st.running and st.runtime == "docker"
    assert runtime.status().detail == "no container"


def test_stop_without_a_container_is_harmless(site, fake):
    st = DockerRuntime(site, client=fake).stop()
    assert not st.running


def test_logs(site, fake):
    runtime = DockerRuntime(site, client=fake)
    assert runtime.logs() == []
    runtime.start()
    assert runtime.logs(lines=20) == ["line 1", "line 2", "\ufffd"]
    assert ("logs", 20) in fake.containers.by_name[container_name(site)].calls


def test_run_foreground_is_refused(site, fake):
    with pytest.raises(UserError, match="process runtime"):
        DockerRuntime(site, client=fake).run_foreground()


def test_no_engine_is_a_user_error(site, monkeypatch):
    def no_engine(**kwargs):
        raise docker.errors.DockerException("Error while fetching server API version")

    monkeypatch.setattr(docker, "from_env", no_engine)
    with pytest.raises(UserError, match="--runtime process"):
        DockerRuntime(site).status()


def test_docker_engine_available_is_false_without_an_engine(monkeypatch):
    def no_engine(**kwargs):
        raise docker.errors.DockerException("no engine")

    monkeypatch.setattr(docker, "from_env", no_engine)
    assert rt.docker_engine_available() is False


# -- get_runtime -----------------------------------------------------------------------------


def test_auto_picks_process_without_an_engine(tmp_path, monkeypatch):
    site = make_site(tmp_path, runtime="auto")
    monkeypatch.setattr(rt, "docker_engine_available", lambda *a, **k: False)
    assert isinstance(get_runtime(site, "auto"), ProcessRuntime)
    assert isinstance(get_runtime(site), ProcessRuntime)  # the config says auto


def test_auto_picks_docker_with_an_engine(tmp_path, monkeypatch):
    site = make_site(tmp_path, runtime="auto")
    monkeypatch.setattr(rt, "docker_engine_available", lambda *a, **k: True)
    assert isinstance(get_runtime(site, "auto"), DockerRuntime)
    site.pid_file.write_text('{"pid": 1, "create_time": 1.0}')  # written inside a container: not ours
    assert isinstance(get_runtime(site, "auto"), DockerRuntime)
    site.pid_file.write_text(json.dumps(rt._pid_record(os.getpid())))  # a live process-runtime node: keep it
    assert isinstance(get_runtime(site, "auto"), ProcessRuntime)


def test_explicit_runtimes(site, monkeypatch):
    monkeypatch.setattr(rt, "docker_engine_available", lambda *a, **k: pytest.fail("no probe for an explicit runtime"))
    assert isinstance(get_runtime(site, "docker"), DockerRuntime)
    assert isinstance(get_runtime(site, "process"), ProcessRuntime)
    assert isinstance(get_runtime(site), DockerRuntime)  # the config says docker
    with pytest.raises(UserError, match="unknown runtime"):
        get_runtime(site, "kubernetes")
