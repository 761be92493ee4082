"""Everyday site-agent commands (issue 17, cases 9, 10, 12): plan review by short id with
names and diffs, the node's connection in `status`, hints in `doctor`, first-step messages,
built-in schema names in `prepare`, QC pictures that show the whole label."""

import json
import time
import uuid
from unittest import mock

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from conftest import cli

from coordinator.testbed import free_port
from preprocessing import qc
from preprocessing.schema import load_schema

RESEARCHER = "RESEARCHER_e2e83205-c6ba-4aa7-817c-3f99a40ced52"
PLAN_V1 = """import torch


class SegPlan(TorchTrainingPlan):
    def init_model(self, model_args):
        return torch.nn.Linear(1, 1)

    def training_step(self, data, target):
        return 1
"""
PLAN_V2 = PLAN_V1.replace("return 1\n", "return 2\n")
OTHER = PLAN_V1.replace("SegPlan", "OtherPlan").replace("Linear(1, 1)", "Linear(2, 2)")
IDS = {
    "v1": "aaaa1111-0000-4000-8000-000000000001",
    "v2": "aaaa2222-0000-4000-8000-000000000002",
    "other": "bbbb3333-0000-4000-8000-000000000003",
}


def _init_site(base, port: int, host: str = "127.0.0.1", name: str = "site-e"):
    cfg = base / f"{name}.yaml"
    res = cli("site-agent", "--config", cfg, "init", "--site-name", name, "--coordinator-host", host, "--coordinator-port", port,
              "--data-dir", base / "data", "--work-dir", base / f"work-{name}", "--runtime", "process")  # fmt: skip
    assert res.returncode == 0, res.stderr
    return cfg


def _send_plans(cfg, plans) -> None:
    """Plans arrive as a coordinator sends them: through the node's own approval-request handler."""
    import fedbiomed.node.training_plan_security_manager as tpsm
    from fedbiomed.common.message import ApprovalRequest

    from site_agent import config as site_config
    from site_agent import node

    mgr = node._plan_manager(site_config.load(cfg))
    for uid, description, source in plans:
        with mock.patch.object(tpsm.uuid, "uuid4", return_value=uuid.UUID(uid)):  # ids with a shared prefix
            reply = mgr.reply_training_plan_approval_request(
                ApprovalRequest(researcher_id=RESEARCHER, description=description, training_plan=source, request_id="r")
            )
        assert reply.success, reply


@pytest.fixture(scope="module")
def plan_site(tmp_path_factory):
    base = tmp_path_factory.mktemp("plans")
    cfg = _init_site(base, free_port())
    _send_plans(cfg, [
        (IDS["v1"], "fedimg plan condistfl for experiment liver-seg", PLAN_V1),
        (IDS["v2"], "fedimg plan condistfl for experiment liver-seg", PLAN_V2),
        (IDS["other"], "fedimg plan marginal for experiment spleen", OTHER),
    ])  # fmt: skip
    res = cli("site-agent", "--config", cfg, "plans", "approve", f"training_plan_{IDS['v1']}")
    assert res.returncode == 0, res.stderr
    return cfg


# ---------------------------------------------------------------------------- case 9: plan review


def test_plans_list_prints_short_ids_and_readable_names(plan_site):
    res = cli("site-agent", "--config", plan_site, "plans", "list")
    assert res.returncode == 0, res.stderr
    for needle in ("aaaa1111", "aaaa2222", "bbbb3333", "liver-seg/SegPlan", "spleen/OtherPlan", "e2e83205"):
        assert needle in res.stdout, (needle, res.stdout)
    assert "training_plan_" not in res.stdout and "…" not in res.stdout  # short ids, never cut
    row = next(line for line in res.stdout.splitlines() if "aaaa2222" in line)
    assert "changed from aaaa1111" in row and "Pending" in row
    rows = json.loads(cli("site-agent", "--config", plan_site, "plans", "list", "--json").stdout)
    by_id = {r["id"]: r for r in rows}
    assert by_id[f"training_plan_{IDS['v2']}"]["name"] == "liver-seg/SegPlan"
    assert by_id[f"training_plan_{IDS['v2']}"]["researcher_id"] == RESEARCHER
    assert len(by_id[f"training_plan_{IDS['v2']}"]["hash"]) == 64


def test_plan_ids_accept_unique_prefixes_and_refuse_ambiguous_ones(plan_site):
    res = cli("site-agent", "--config", plan_site, "plans", "show", "aaaa")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "ambiguous" in res.stderr and "aaaa1111" in res.stderr and "aaaa2222" in res.stderr
    assert res.stderr.strip().count("\n") == 0  # one line
    for ref in ("aaaa2", "AAAA2222", f"training_plan_{IDS['v2'][:6]}", f"training_plan_{IDS['v2']}", "training_plan_aaaa22…"):
        shown = cli("site-agent", "--config", plan_site, "plans", "show", ref)
        assert shown.returncode == 0, (ref, shown.stderr)
        assert f"id: training_plan_{IDS['v2']}" in shown.stdout
    assert cli("site-agent", "--config", plan_site, "plans", "reject", "cccc").returncode == 2
    res = cli("site-agent", "--config", plan_site, "plans", "reject", "bbbb", "--note", "not for us")
    assert res.returncode == 0 and "rejected bbbb3333 spleen/OtherPlan" in res.stdout
    rows = json.loads(cli("site-agent", "--config", plan_site, "plans", "list", "--json").stdout)
    assert {r["short_id"]: r["status"] for r in rows}["bbbb3333"] == "Rejected"


def test_plans_show_diffs_against_the_last_approved_plan_of_the_same_name(plan_site):
    res = cli("site-agent", "--config", plan_site, "plans", "show", "aaaa2")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "name: liver-seg/SegPlan" in out and f"researcher: {RESEARCHER}" in out
    assert "changes since approved plan aaaa1111 (liver-seg/SegPlan, same name" in out
    assert "-        return 1" in out and "+        return 2" in out
    diff = out[out.index("--- changes") : out.index("--- source ---")]
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["-        return 1", "+        return 2"]  # only the change (with its context lines)
    assert out.index("--- changes") < out.index("--- source ---")  # the diff comes before the whole source
    assert "class SegPlan(TorchTrainingPlan)" in out[out.index("--- source ---") :]
    first = cli("site-agent", "--config", plan_site, "plans", "show", "aaaa1", "--no-source").stdout
    assert "no approved plan of the same name or class" in first and "--- source ---" not in first


def test_plans_list_status_filter_ignores_case(plan_site):
    everything = json.loads(cli("site-agent", "--config", plan_site, "plans", "list", "--json").stdout)
    pending = sorted(r["short_id"] for r in everything if r["status"] == "Pending")  # bbbb3333 too, unless rejected by now
    assert "aaaa2222" in pending and "aaaa1111" not in pending
    for word in ("pending", "PENDING", "Pending"):
        res = cli("site-agent", "--config", plan_site, "plans", "list", "--status", word, "--json")
        assert res.returncode == 0, (word, res.stderr)
        rows = json.loads(res.stdout)
        assert sorted(r["short_id"] for r in rows) == pending
    res = cli("site-agent", "--config", plan_site, "plans", "list", "--status", "approved")
    assert res.returncode == 0 and "aaaa1111" in res.stdout and "aaaa2222" not in res.stdout


# ---------------------------------------------------------------------------- case 10: connectivity


def _wait_for_log(path, needle: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} not in {path} after {timeout} s")


def test_status_says_not_connected_when_the_coordinator_is_unreachable(tmp_path):
    from coordinator.testbed import enroll_site
    from site_agent import config as site_config

    port = free_port()  # nothing listens there
    cfg = _init_site(tmp_path, port)
    enroll_site(tmp_path / "home", site_config.load(cfg), public_host="127.0.0.1")  # a node starts only enrolled
    try:
        assert cli("site-agent", "--config", cfg, "start").returncode == 0
        _wait_for_log(tmp_path / "work-site-e" / "node.log", "Launching node")
        res = cli("site-agent", "--config", cfg, "status", "--json")
        assert res.returncode == 0, res.stderr  # running
        st = json.loads(res.stdout)
        assert st["running"] is True and st["connected"] is False
        conn = st["connection"]
        assert conn["reachable"] is False and conn["coordinator"] == f"127.0.0.1:{port}"
        assert conn["node_started"] and conn["last_contact"] is None
        assert "nothing listens" in conn["hint"] and str(cfg) in conn["hint"]
        text = cli("site-agent", "--config", cfg, "status")
        assert "NOT CONNECTED" in text.stdout and "hint: nothing listens" in text.stdout
        assert "last message from the coordinator: none since the node started" in text.stdout
        assert cli("site-agent", "--config", cfg, "status", "--require-connection").returncode == 4
    finally:
        cli("site-agent", "--config", cfg, "stop")
    stopped = cli("site-agent", "--config", cfg, "status", "--json")
    assert stopped.returncode == 3 and json.loads(stopped.stdout)["connected"] is None


def test_doctor_gives_a_hint_for_each_failing_row(tmp_path):
    cfg = _init_site(tmp_path, free_port())
    res = cli("site-agent", "--config", cfg, "doctor", "--json", "--min-free-gb", "1e9")
    assert res.returncode == 1
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    failing = [r for r in rows.values() if r["ok"] is False]
    assert {"coordinator reachable", "disk space", "datasets"} <= {r["name"] for r in failing}
    assert all(r["hint"] for r in failing), failing
    assert "nothing listens" in rows["coordinator reachable"]["hint"] and str(cfg) in rows["coordinator reachable"]["hint"]
    assert "free space" in rows["disk space"]["hint"]
    assert "site-agent dataset add" in rows["datasets"]["hint"]
    assert rows["site enrolled"]["ok"] is False and "site-agent enroll request" in rows["site enrolled"]["detail"]
    assert rows["node connected"]["ok"] is None and "site-agent start" in rows["node connected"]["hint"]
    text = cli("site-agent", "--config", cfg, "doctor", "--min-free-gb", "1e9").stdout
    assert "hint for coordinator reachable: nothing listens" in text and "hint for datasets:" in text
    missing = cli("site-agent", "--config", tmp_path / "nope.yaml", "doctor", "--json")
    (row,) = json.loads(missing.stdout)
    assert row["ok"] is False and "--config" in row["hint"] and "init" in row["hint"]


# ---------------------------------------------------------------------------- case 12: first steps


def test_missing_site_config_names_config_option_env_and_init(tmp_path):
    res = cli("site-agent", "plans", "list", cwd=tmp_path, env={"FEDIMG_SITE_CONFIG": ""})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = res.stderr.strip()
    assert err.count("\n") == 0
    assert "--config" in err and "$FEDIMG_SITE_CONFIG" in err and "site-agent init" in err
    assert str(tmp_path / "site.yaml") in err  # where it looked
    late = cli("site-agent", "plans", "list", "--config", tmp_path / "x.yaml")
    assert late.returncode == 2 and "--config belongs before the command" in late.stderr


def _ct_nifti(path, shape=(20, 20, 8)):
    x, y, _ = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    body = ((x - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2) < (shape[0] / 2.5) ** 2
    data = np.where(body, 40, -1000).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0]))
    img.set_qform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def test_prepare_accepts_a_builtin_schema_name(tmp_path):
    image = _ct_nifti(tmp_path / "case_a.nii.gz")
    res = cli("site-agent", "prepare", image, "--out", tmp_path / "out", "--modality", "CT", "--schema", "abdominal-ct", "--no-qc", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()
    bad = cli("site-agent", "prepare", image, "--out", tmp_path / "out2", "--modality", "CT", "--schema", "abdominal")
    assert bad.returncode == 2 and "built-in schema name (abdominal-ct, brain-mri, chest-xr)" in bad.stderr
    assert not (tmp_path / "out2").exists()


def test_qc_picture_is_large_and_shows_slices_across_the_whole_label(tmp_path):
    schema = load_schema("abdominal-ct")
    shape = (40, 40, 24)
    image = np.random.default_rng(0).normal(40, 30, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[5:15, 10:20, 4:19] = schema.classes["kidney"]  # slices k = 4..18
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "lab.nii.gz"))

    axial, coronal, sagittal = qc.strip_positions(label, schema, shape)
    assert axial[0] == 4 and axial[-1] == 18 and len(axial) == qc.STRIP_SLICES  # first to last labelled slice
    assert coronal[0] == 10 and coronal[-1] == 19 and sagittal[0] == 5 and sagittal[-1] == 14
    assert qc.strip_positions(None, schema, shape)[0] == sorted({int(v) for v in np.round(np.linspace(2, 21, qc.STRIP_SLICES))})

    out = tmp_path / "case_0000.png"
    qc.case_figure(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", out, schema, case_id="case_0000")
    png = mpimg.imread(out)
    assert png.shape[1] >= 1600 and png.shape[0] >= 1200  # was 1200 x 500
    # the strips (lower half) show the label too, in the class colour
    want = qc.OVERLAY_ALPHA * (np.array(qc.class_colour(schema.classes["kidney"])) - np.mean(qc.class_colour(schema.classes["kidney"])))
    lower = png[png.shape[0] // 2 :, :, :3].astype(np.float64)
    chroma = lower - lower.mean(axis=-1, keepdims=True)
    assert (np.abs(chroma - want).max(axis=-1) < 0.03).sum() > 2000


def test_plans_list_shows_markup_in_a_plan_name_as_written(tmp_path):
    """A researcher's experiment name is text: rich markup in it is printed, never applied."""
    cfg = _init_site(tmp_path, free_port(), name="site-m")
    _send_plans(cfg, [("cccc4444-0000-4000-8000-000000000004", "fedimg plan condistfl for experiment [black on black]x[/]", PLAN_V1)])
    res = cli("site-agent", "--config", cfg, "plans", "list")
    assert res.returncode == 0, res.stderr
    assert "[black on black]x[/]/SegPlan" in res.stdout.replace("\n", "")


def test_one_process_reads_each_sites_own_node_database(tmp_path):
    """Fed-BioMed's database connector is a process-wide singleton that keeps the first path
    it is given; the site agent points it at the site asked about (the testbed and tests
    touch several sites' nodes in one process)."""
    from site_agent import config as site_config
    from site_agent import node

    first = site_config.load(_init_site(tmp_path, free_port(), name="site-x"))
    second = site_config.load(_init_site(tmp_path, free_port(), name="site-y"))
    for site, folder in ((first, "data-x"), (second, "data-y")):
        (tmp_path / folder).mkdir()
        node._dataset_manager(site).add_database(name=folder, data_type="custom", tags=[folder], description="d", path=str(tmp_path / folder))
    assert [d.name for d in node.list_datasets(first)] == ["data-x"]
    assert [d.name for d in node.list_datasets(second)] == ["data-y"]
