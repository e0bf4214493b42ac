"""What other processes see: a new study database opened by two at once, and files written whole."""

import multiprocessing

import pytest

from oaq_search.files import replace_atomically, write_text_atomically
from oaq_search.storage import open_storage


def _open_after(barrier, url: str, results) -> None:
    barrier.wait()  # both processes create Optuna's tables at once: one loses the race
    try:
        open_storage(url)
        results.put("opened")
    except Exception as error:  # the test shows whatever went wrong
        results.put(f"{type(error).__name__}: {error}")


def test_two_processes_opening_a_new_sqlite_study_at_once_both_succeed(tmp_path):
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):  # without the retry, each attempt fails in one of the two processes
        url = f"sqlite:///{tmp_path / f'study{attempt}.db'}"
        barrier, results = context.Barrier(2), context.Queue()
        processes = [context.Process(target=_open_after, args=(barrier, url, results)) for _ in range(2)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        assert outcomes == ["opened", "opened"], outcomes


def test_a_write_that_dies_midway_leaves_the_previous_file_whole(tmp_path):
    path = write_text_atomically(tmp_path / "plan.json", '{"version": 1}\n')

    def dies_midway(partial):
        partial.write_text('{"vers')
        raise KeyboardInterrupt  # Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(path, dies_midway)
    assert path.read_text() == '{"version": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left behind
