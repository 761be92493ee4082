"""Progress lines where no bar can be drawn (fedimg_core.progress), and the dataset commands' stage
progress that can log them."""

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


def test_stage_progress_lines_when_asked_for(monkeypatch):
    """The dataset commands' stage progress off a terminal: plain lines with ``lines=True``, none by default."""
    from site_agent.commands import datasets

    said = []
    monkeypatch.setattr(datasets.sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(datasets, "log", type("L", (), {"info": staticmethod(said.append)}))
    with datasets.StageProgress() as quiet:
        quiet("convert", 1, 1)
    assert said == []
    with datasets.StageProgress(lines=True) as progress:
        progress("scan", 0, 12)
        progress("scan", 12, 12)
        progress("convert", 2, 2)
    assert said[0] == "reading headers: 0/12 files" and said[1].startswith("reading headers: 12/12 files")
    assert said[2].startswith("converting cases: 2/2 cases")
