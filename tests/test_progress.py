"""Progress lines where no bar can be drawn (fedimg_core.progress), and the dataset commands
showing them when stderr is a pipe."""

import subprocess
import sys

import pytest

from fedimg_core.progress import ProgressLines


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_last_and_at_most_one_line_per_interval():
    clock, said = Clock(), []
    lines = ProgressLines(said.append, unit="cases", every_s=10.0, clock=clock)
    for done, at in [(0, 0.0), (1, 3.0), (2, 9.9), (3, 10.0), (4, 15.0), (5, 20.5), (6, 21.0)]:
        clock.now = 100.0 + at
        lines("converting cases", done, 6)
    assert said == [
        "converting cases: 0/6 cases",
        "converting cases: 3/6 cases, 10 s, about 10 s left",
        "converting cases: 5/6 cases, 20 s, about 4 s left",
        "converting cases: 6/6 cases, 21 s",
    ]


def test_stages_are_counted_apart_and_a_repeated_last_step_is_said_once():
    clock, said = Clock(), []
    lines = ProgressLines(said.append, unit="files", every_s=10.0, clock=clock)
    lines("reading headers", 0, 2)
    lines("reading headers", 2, 2)
    lines("reading headers", 2, 2)
    lines("QC report", 1, 3, detail="case_0001")
    clock.now += 65
    lines("QC report", 2, 3)
    clock.now += 3600
    lines("QC report", 3, 3)
    assert said == [
        "reading headers: 0/2 files",
        "reading headers: 2/2 files",
        "QC report: 1/3 files (case_0001)",
        "QC report: 2/3 files, 1 min 05 s, about 1 min 05 s left",
        "QC report: 3/3 files, 1 h 01 min",
    ]


def test_the_pace_counts_the_steps_after_the_first_report_and_a_stage_may_start_again():
    clock, said = Clock(), []
    lines = ProgressLines(said.append, unit="cases", every_s=10.0, clock=clock)
    lines("scoring", 1, 5)  # reported after its first case
    clock.now += 20
    lines("scoring", 3, 5)  # 2 cases in 20 s: 20 s for the last 2
    lines("scoring", 5, 5)
    lines("scoring", 1, 4)  # the next model's scoring: a new stage under the same label
    clock.now += 1
    lines("scoring", 4, 4)
    assert said == ["scoring: 1/5 cases", "scoring: 3/5 cases, 20 s, about 20 s left", "scoring: 5/5 cases, 20 s", "scoring: 1/4 cases",
                    "scoring: 4/4 cases, 1 s"]  # fmt: skip


def test_unknown_total_and_no_unit():
    said = []
    lines = ProgressLines(said.append, unit="", clock=Clock())
    lines("scanning", 5, None)
    assert said == ["scanning: 5"]


@pytest.mark.parametrize("quiet", [False, True])
def test_prepare_shows_progress_lines_when_stderr_is_a_pipe(tmp_path, quiet):
    from fedimg_testing.phantom import PlantedIdentifiers, make_phantom, write_dicom_series

    for i in range(2):
        write_dicom_series(make_phantom(i, shape=(24, 24, 6), spacing=(1.0, 1.0, 2.0)), tmp_path / "in" / f"s{i}", PlantedIdentifiers.for_case(i, 0))
    cmd = [
        sys.executable,
        "-m",
        "site_agent.cli",
        *(["-q"] if quiet else []),
        "prepare",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out"),
        "--modality",
        "CT",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "\x1b[" not in res.stderr  # plain lines, no terminal codes
    shown = [line for line in res.stderr.splitlines() if "converting cases:" in line or "reading headers:" in line or "QC report:" in line]
    if quiet:
        assert shown == []
    else:
        assert any("reading headers: 12/12 files" in line for line in shown), res.stderr
        assert any("converting cases: 0/2 cases" in line for line in shown), res.stderr
        assert any("converting cases: 2/2 cases" in line for line in shown), res.stderr
        assert any("QC report: 2/2 cases" in line for line in shown), res.stderr
