import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cli(name: str, *args: str, env: dict | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run one of the project's console scripts as a user would."""
    return subprocess.run(
        [str(BIN / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package), for testing its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a data_factory spec of three sites, for the rules that treat the factory apart
FACTORY_SPEC = "name: f\nplan: data_factory\nsites: {tags: [demo], ids: [N1, N2, N3]}\nrounds: 4\n"


def spec_problems(text: str) -> dict[str, str]:
    """The problems a spec text is refused with: key path -> problem (the test fails when it is accepted)."""
    from coordinator import spec as spec_mod

    with pytest.raises(spec_mod.SpecError) as info:
        spec_mod.parse(text, "exp.yaml")
    return dict(info.value.problems)


def site_agent_in_process(*args) -> tuple[int, str, str]:
    """`site-agent ARGS` in this process, as the console script runs it: (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from site_agent.cli import cli as site_cli
    from site_agent.errors import run_cli

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["site-agent", *map(str, args)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            run_cli(site_cli, "site-agent")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def write_untrained_target_model(path: Path) -> Path:
    """An untrained adapted target model with every part a real one has (what `infer` loads), saved at `path`."""
    import torch
    import yaml

    from pipelines.adaptation.networks import AdaptConfig, InversionEncoder, SegmentationBranch
    from pipelines.adaptation.training import AdaptedModel
    from pipelines.factory.networks import FactoryConfig, Generator

    torch.manual_seed(0)
    cfg = FactoryConfig.preset("tiny", n_clients=2, key_dim=0, n_bins=0)
    names = ["background", "kidney", "liver"]
    meta = {"factory": {"name": "f", "version": "v0001", "sha256": ""},
            "schema_definition": yaml.safe_load((ROOT / "preprocessing" / "schemas" / "abdominal-ct.yaml").read_text()),
            "slices": {"size": 64, "n_bins": 0, "spacing": [6.0, 6.0, 10.0], "min_foreground": 0.0}, "class_ids": [0, 1, 3],
            "domains": {"source_client_id": 0, "target_client_id": 1}}  # fmt: skip
    model = AdaptedModel("target", Generator(cfg).eval(), InversionEncoder(cfg, AdaptConfig()),
                         SegmentationBranch.for_factory(cfg, names).eval(), SegmentationBranch.for_factory(cfg, names).eval(), 1.0, meta)  # fmt: skip
    torch.save(model.state(), path)
    return path


@pytest.fixture
def site_yaml(tmp_path):
    """A valid site config dict rooted in tmp_path."""
    return {
        "site_name": "site-a",
        "coordinator": {"host": "localhost", "port": 50051},
        "data_dir": str(tmp_path / "data"),
        "work_dir": str(tmp_path / "work"),
        "runtime": "process",
    }


@pytest.fixture
def site_process(monkeypatch):
    """The test plays a site: site errors are sanitised, even if an earlier test in this process ran a coordinator
    experiment (which marks the process as the researcher's; the mark is process-global)."""
    from pipelines import site_errors

    monkeypatch.setattr(site_errors, "_RESEARCHER_PROCESS", False, raising=False)


@pytest.fixture
def one_thread():
    """One torch thread: small tensors gain nothing from two intra-op threads on a busy 2-core box."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def fedbiomed_round():
    """Fed-BioMed's Round class, imported for one test module only.

    A process that imported it is a node process, which `mark_researcher_process` refuses to mark;
    the import is forgotten afterwards so a later test in the session can still play the coordinator.
    """
    imported = "fedbiomed.node.round" in sys.modules
    from fedbiomed.node.round import Round

    yield Round
    if not imported:
        sys.modules.pop("fedbiomed.node.round", None)
