"""The crash recovery rule and the executor's attempt journal, without a server or a database.

The rule (``domain/recovery.py``): an attempt re-queued for free must be one whose process cannot
have started; every other one fails its attempt (so an attempt runs at most once). The journal
(``executor/journal.py``) is what tells the two apart after a ``kill -9``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from openhtc.domain.enums import JobStatus
from openhtc.domain.recovery import Recovery, reason, recover, rerun_allowed, rerun_reason, spent_reason
from openhtc.executor import journal as journal_module
from openhtc.executor.journal import AttemptJournal

pytestmark = pytest.mark.unit  # pure code: make test-unit runs it

S = JobStatus


@pytest.mark.parametrize(
    ("status", "may_have_started", "expected"),
    [
        (S.RUNNABLE, False, Recovery.REQUEUE),
        (S.STARTING, False, Recovery.REQUEUE),
        # the process was handed over: its RUNNING report may simply not have been committed
        (S.RUNNABLE, True, Recovery.FAIL_ATTEMPT),
        (S.STARTING, True, Recovery.FAIL_ATTEMPT),
        (S.RUNNING, True, Recovery.FAIL_ATTEMPT),
        # RUNNING was reported: it ran, whatever the journal says
        (S.RUNNING, False, Recovery.FAIL_ATTEMPT),
        # lease expiry: nobody can say, so it may have run
        (S.RUNNABLE, None, Recovery.FAIL_ATTEMPT),
        (S.STARTING, None, Recovery.FAIL_ATTEMPT),
        (S.RUNNING, None, Recovery.FAIL_ATTEMPT),
    ],
)
def test_only_an_attempt_that_cannot_have_started_is_requeued_free(
    status: JobStatus, may_have_started: bool | None, expected: Recovery
) -> None:
    assert recover(status, may_have_started) is expected
    assert recover(int(status), may_have_started) is expected


@pytest.mark.parametrize("status", [S.SUBMITTED_TO_RESCALE, S.SUBMITTED_TO_PROVIDER, S.SUCCEEDED, S.FAILED])
def test_only_active_jobs_are_recovered(status: JobStatus) -> None:
    with pytest.raises(ValueError, match=status.name):
        recover(status, False)


def test_reasons_say_what_happened() -> None:
    assert reason("the executor restarted", Recovery.REQUEUE) == (
        "Re-queued: the executor restarted before the job started"
    )
    failed = reason("the executor restarted", Recovery.FAIL_ATTEMPT)
    assert "may have started" in failed and "the executor restarted" in failed


def test_an_infrastructure_fault_reruns_until_its_own_budget_is_spent() -> None:
    """Infrastructure faults have their own budget (max_infrastructure_retries); 0 means the
    first one ends the job (at most once)."""
    assert [rerun_allowed(done, 3) for done in range(5)] == [True, True, True, False, False]
    assert not rerun_allowed(0, 0)
    fault = reason("the executor restarted", Recovery.FAIL_ATTEMPT)
    assert rerun_reason(fault, 2, 3) == (
        "Re-run 2 of 3 after an infrastructure fault, no retry spent"
        " (Infrastructure fault: the executor restarted after the attempt may have started)"
    )
    assert spent_reason(fault, 0) == fault
    assert spent_reason(fault, 3).endswith("its 3 re-run(s) after infrastructure faults are spent")


def test_journal_replays_the_attempts_begun_and_not_ended(tmp_path: Path) -> None:
    path = tmp_path / "j" / "attempts.journal"
    journal = AttemptJournal(path)
    assert journal.replay() == set()
    journal.open()
    journal.begin(1, 1)
    journal.begin_many([(2, 1), (3, 2)])
    journal.end([(2, 1), (99, 1)])  # an attempt never begun is ignored
    journal.begin(2, 1)  # a withdrawn hand-off begun again
    journal.end([(3, 2)])
    # no close(): as after a kill -9, only what reached the file counts
    assert AttemptJournal(path).replay() == {(1, 1), (2, 1)}
    # a record torn by a crash mid-write was never acknowledged: ignored
    with path.open("ab") as f:
        f.write(b"S 7 1\nS 8")
    assert AttemptJournal(path).replay() == {(1, 1), (2, 1), (7, 1)}
    journal.close()


def test_a_new_start_drops_the_old_journal(tmp_path: Path) -> None:
    path = tmp_path / "attempts.journal"
    first = AttemptJournal(path)
    first.open()
    first.begin(5, 1)
    second = AttemptJournal(path)
    assert second.replay() == {(5, 1)}
    second.open()  # after recovery was committed
    assert AttemptJournal(path).replay() == set()
    second.close()


def test_journal_stays_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_AFTER", 100)
    path = tmp_path / "attempts.journal"
    journal = AttemptJournal(path, sync=False)
    journal.open()
    journal.begin(0, 1)  # a long job, open throughout
    for job in range(1, 1001):
        journal.begin(job, 1)
        journal.end([(job, 1)])
    assert path.stat().st_size < 100 * len(b"E 1000 1\n") * 2 + 100
    assert AttemptJournal(path).replay() == {(0, 1)}
    journal.close()


def test_concurrent_begins_are_all_durable(tmp_path: Path) -> None:
    """Threads share fdatasyncs (group commit); every begin() that returned is in the file."""
    path = tmp_path / "attempts.journal"
    journal = AttemptJournal(path)
    journal.open()

    def worker(base: int) -> None:
        for i in range(50):
            journal.begin(base + i, 1)

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert AttemptJournal(path).replay() == {(k * 1000 + i, 1) for k in range(4) for i in range(50)}
    journal.close()


def _from_another_boot(path: Path) -> None:
    """The file as a machine crash leaves it for the next boot: its boot id is another's."""
    lines = path.read_bytes().split(b"\n")
    _, boot, mode = lines[0].split()
    path.write_bytes(b"\n".join([b"B another-boot-%s %s" % (boot[:8], mode), *lines[1:]]))


def test_a_lazy_journal_is_trusted_in_its_boot_and_after_a_clean_stop_only(tmp_path: Path) -> None:
    """A lazy journal syncs nothing before a hand-off: a kill -9 of the server loses none of its
    writes (the page cache), a crash of the machine may lose its tail. So what it says is
    trusted within the boot it was written in, or once a clean stop closed it (synced, ``C``);
    else the executor cannot say which attempts may have started (EveryAttempt)."""
    path = tmp_path / "attempts.journal"
    journal = AttemptJournal(path, lazy=True)
    assert not journal.sync  # begin() waits for no disk
    journal.replay()
    journal.open()
    journal.begin_many([(1, 1), (2, 1)])
    journal.end([(2, 1)])
    same_boot = AttemptJournal(path, lazy=True)
    assert same_boot.replay() == {(1, 1)} and same_boot.trusted  # as after a kill -9
    _from_another_boot(path)
    rebooted = AttemptJournal(path, lazy=True)
    assert rebooted.replay() == {(1, 1)} and not rebooted.trusted  # the machine crashed
    journal.close()  # a clean stop: synced, then C
    _from_another_boot(path)
    after_stop = AttemptJournal(path, lazy=True)
    assert after_stop.replay() == {(1, 1)} and after_stop.trusted
    # a journal synced before every hand-off is trusted after any crash
    synced = AttemptJournal(tmp_path / "synced.journal")
    synced.open()
    synced.begin(3, 1)
    _from_another_boot(synced.path)
    again = AttemptJournal(synced.path)
    assert again.replay() == {(3, 1)} and again.trusted
    synced.close()
