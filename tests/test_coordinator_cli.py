"""Bad input at the coordinator's boundary: one clear line, non-zero exit, no traceback."""

import socket

import pytest

from conftest import cli

GOOD = "name: t\nplan: fedavg_segmentation\nsites: {tags: [nobody], min_sites: 1, wait_s: 1}\nrounds: 1\n"


def _one_clear_line(res, *needles):
    assert res.returncode != 0
    err = res.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in res.stdout
    assert err.startswith("coordinator: error"), err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_broken_spec(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: t\nplan: [unclosed\n")
    _one_clear_line(cli("coordinator", "run", p, "--home", tmp_path / "h"), "broken.yaml: not valid YAML")
    assert not (tmp_path / "h" / "runs").exists()  # nothing created for a refused spec


def test_unknown_plan(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(GOOD.replace("fedavg_segmentation", "condistfl_v9"))
    _one_clear_line(cli("coordinator", "validate", p), "exp.yaml: plan: unknown plan 'condistfl_v9'")


def test_missing_spec_file(tmp_path):
    _one_clear_line(cli("coordinator", "submit", tmp_path / "nope.yaml"), "nope.yaml: spec file not found")


def test_unreachable_coordinator(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(GOOD)
    url = f"http://127.0.0.1:{_closed_port()}"
    res = cli("coordinator", "submit", p, "--url", url, "--token", "x")
    _one_clear_line(res, "cannot reach the coordinator", url)
    _one_clear_line(cli("coordinator", "status", "--url", url, "--token", "x"), "cannot reach the coordinator")


def test_no_site_connects(tmp_path):
    """A run whose sites never show up fails with the reason and is recorded as failed."""
    p = tmp_path / "exp.yaml"
    p.write_text(GOOD)
    res = cli("coordinator", "run", p, "--home", tmp_path / "h", "--grpc-host", "127.0.0.1", "--grpc-port", str(_closed_port()))
    _one_clear_line(res, "only 0 of the 1 required sites", "nobody")
    st = cli("coordinator", "status", "--home", tmp_path / "h", "--json")
    assert '"status": "failed"' in st.stdout


def test_unknown_run(tmp_path):
    _one_clear_line(cli("coordinator", "results", "nope", "--home", tmp_path), "no run 'nope'")


@pytest.mark.parametrize("verb", ["run", "resume", "serve", "submit", "status", "results", "validate", "testbed"])
def test_every_verb_has_help(verb):
    res = cli("coordinator", verb, "--help")
    assert res.returncode == 0 and "Usage:" in res.stdout
