"""Progress in a log (not a terminal): a line at the start, as the stage goes, and at the end."""

import time

from oaq_search import progress


def test_log_lines_mark_start_tenths_and_end(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_GAP_SECONDS", 0.0)  # every tenth gets its line
    with progress.bar(20, "stage", show=None) as counter:  # pytest's capture is not a terminal
        for _ in range(20):
            counter.update()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("stage: 0/20, started") and lines[-1].endswith("stage: 20/20, done in 0 s")
    assert len(lines) == 11  # start, the nine tenths before the last, end


def test_log_lines_keep_coming_through_a_slow_stage(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.01)
    for _ in progress.bar(1000, "slow", iterable=range(3)):  # ends early, as an interrupted stage does
        time.sleep(0.02)  # each step outlasts the longest silence: a line for each
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 1)[1].split(",")[0] for line in lines] == ["0/1000", "1/1000", "2/1000", "3/1000", "3/1000"]
    assert "about" in lines[1] and "done in" in lines[-1]


def test_show_false_prints_nothing(capsys):
    with progress.bar(5, "quiet", show=False) as counter:
        counter.update(5)
    with progress.stage("quiet stage", show=False):
        pass
    assert capsys.readouterr().err == ""


def test_silenced_quiets_stages_that_choose_for_themselves(capsys):
    with progress.silenced():
        with progress.bar(3, "metric's own bar") as counter:  # show=None, as a sensitivity metric's is
            counter.update(3)
        progress.note("a note")
    assert capsys.readouterr().err == ""
