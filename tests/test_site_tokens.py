"""Site tokens (coordinator.site_tokens) and `coordinator site-token`."""

import json
import stat

import pytest
from conftest import cli

from coordinator.site_tokens import TOKENS_FILE, SiteTokens
from site_agent.errors import UserError


def test_issue_verify_list_revoke(tmp_path):
    store = SiteTokens(tmp_path)
    assert store.list() == [] and store.verify("anything") is None  # no file yet
    a = store.issue("hospital-a")
    b = store.issue("site_2")
    assert a != b and len(a) >= 40
    assert store.verify(a) == "hospital-a" and store.verify(b) == "site_2"
    assert store.verify(a + "x") is None and store.verify("") is None and store.verify(None) is None
    rows = store.list()
    assert [r["site"] for r in rows] == ["hospital-a", "site_2"]
    assert set(rows[0]) == {"site", "created"} and rows[0]["created"].endswith("+00:00")

    path = tmp_path / TOKENS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert a not in text and b not in text  # only hashes are kept
    assert set(json.loads(text)["sites"]["hospital-a"]) == {"sha256", "created"}

    a2 = store.issue("hospital-a")  # issuing again replaces the token
    assert store.verify(a) is None and store.verify(a2) == "hospital-a"
    store.revoke("hospital-a")
    assert store.verify(a2) is None and store.verify(b) == "site_2"
    assert [r["site"] for r in store.list()] == ["site_2"]
    assert not list(tmp_path.glob(f".{TOKENS_FILE}.*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.parametrize("site", ["Hospital", "-a", "", "a/b", "a" * 64, "a b", None])
def test_site_names_are_validated(tmp_path, site):
    with pytest.raises(UserError, match="site name must be"):
        SiteTokens(tmp_path).issue(site)
    assert not (tmp_path / TOKENS_FILE).exists()


def test_revoke_unknown_and_corrupt_file_are_clear(tmp_path):
    store = SiteTokens(tmp_path)
    store.issue("a")
    with pytest.raises(UserError, match=r"site 'b' has no token .*sites with a token: a"):
        store.revoke("b")
    (tmp_path / TOKENS_FILE).write_text("{not json")
    with pytest.raises(UserError, match=f"{TOKENS_FILE}: not valid JSON"):
        store.verify("x")
    (tmp_path / TOKENS_FILE).write_text('{"sites": {"a": {"sha256": "short"}}}')
    with pytest.raises(UserError, match="not a site-token file"):
        store.list()


def test_cli_issue_list_revoke(tmp_path):
    home = tmp_path / "home"
    res = cli("coordinator", "site-token", "issue", "site-a", "--home", home)
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    assert len(res.stdout.splitlines()) == 1  # the token alone on stdout
    assert "token_file" in res.stderr and "FEDIMG_SITE_TOKEN" in res.stderr and token not in res.stderr
    assert SiteTokens(home).verify(token) == "site-a"

    listed = cli("coordinator", "site-token", "list", "--home", home, "--json")
    assert json.loads(listed.stdout)[0]["site"] == "site-a" and token not in listed.stdout
    assert cli("coordinator", "site-token", "revoke", "site-a", "--home", home).returncode == 0
    assert SiteTokens(home).verify(token) is None

    bad = cli("coordinator", "site-token", "revoke", "site-a", "--home", home)
    assert bad.returncode != 0 and bad.stderr.startswith("coordinator: error: site 'site-a' has no token")
    for verb in ("issue", "revoke", "list"):
        assert "Usage:" in cli("coordinator", "site-token", verb, "--help").stdout
