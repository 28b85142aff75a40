"""A call's result and its end status are committed together (store/queue.py ``report``).

The embedded executor hands a turn's results to its report (``ExecutorPort.report``), which
writes them in the report's own transaction: a call never reads as ended without its result,
and a report that fails leaves neither, the executor sending both again (``_flush_held``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from tests.functions.conftest import Functions

from openhtc.domain.enums import JobStatus
from openhtc.domain.models import AttemptReport
from openhtc.services.functions import store_functions
from openhtc.store.functions import CallResult
from openhtc.store.transitions import StatusWrites
from openhtc.testing.inprocess import EXECUTOR, StoreHarness, in_process_services
from openhtc.testing.server import HtcServer

S = JobStatus


@pytest.fixture
def harness(tmp_path: Path, db_url: str | None) -> Iterator[StoreHarness]:
    with in_process_services(tmp_path / "data", db_url) as services:
        yield StoreHarness(services)


def _one_call(harness: StoreHarness, x: int) -> Any:
    project = harness.create_project()
    task = harness.create_task(project)
    body = {"image": "python3", "handler": "m.f", "events": [{"x": x}]}
    store_functions(harness.services, harness.who, project, harness.reload_task(task), body)
    [launch] = harness.claim(4)
    return launch


def _row(harness: StoreHarness, launch: Any) -> tuple[int, str | None]:
    [(status, result)] = harness.sql(
        "SELECT j.status, f.result FROM jobs j JOIN function_calls f"
        " ON f.batch_id = j.batch_id AND f.idx = j.idx WHERE j.id = ?",
        launch.job_id,
    )
    return int(status), result


def test_a_failed_report_leaves_neither_the_result_nor_the_end_and_its_retry_writes_both(
    harness: StoreHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    launch = _one_call(harness, 21)
    assert json.loads(launch.event) == {"x": 21}  # a lone call's event comes with its claim
    now = harness.services.clock.now()
    reports = [
        AttemptReport(launch.job_id, launch.attempt, s, now, exit_code=0 if s is S.SUCCEEDED else None)
        for s in (S.RUNNING, S.SUCCEEDED)
    ]
    results = [CallResult(launch.batch_id, launch.array_index, launch.attempt, "42", None)]

    real_flush = StatusWrites.flush

    def failing_flush(self: StatusWrites, commit: bool = False) -> int:
        raise RuntimeError("the database went away mid-report")

    monkeypatch.setattr(StatusWrites, "flush", failing_flush)
    with pytest.raises(RuntimeError):
        harness.executor.report(EXECUTOR, reports, results)
    assert _row(harness, launch) == (int(S.RUNNABLE), None)  # the result was not committed alone

    monkeypatch.setattr(StatusWrites, "flush", real_flush)
    harness.executor.report(EXECUTOR, reports, results)  # the executor's retry: both again
    assert _row(harness, launch) == (int(S.SUCCEEDED), "42")


def test_a_stale_attempts_retried_report_never_overwrites_the_current_result(harness: StoreHarness) -> None:
    """A report retried after an outage longer than the lease (its attempt recovered and run
    again meanwhile) brings an old result: the current attempt's stays."""
    launch = _one_call(harness, 7)
    now = harness.services.clock.now()
    current = launch._replace(attempt=launch.attempt + 1)
    with harness.services.db.write() as conn:  # the lease was lost: attempt 2 runs elsewhere
        conn.exec_driver_sql(
            harness.services.db.sql("UPDATE jobs SET attempt = ? WHERE id = ?"),
            (current.attempt, launch.job_id),
        )
    ended = [
        AttemptReport(current.job_id, current.attempt, s, now, exit_code=0 if s is S.SUCCEEDED else None)
        for s in (S.RUNNING, S.SUCCEEDED)
    ]
    harness.executor.report(
        EXECUTOR, ended, [CallResult(current.batch_id, current.array_index, current.attempt, "14", None)]
    )
    assert _row(harness, launch) == (int(S.SUCCEEDED), "14")
    stale = [AttemptReport(launch.job_id, launch.attempt, S.SUCCEEDED, now, exit_code=0)]
    harness.executor.report(
        EXECUTOR, stale, [CallResult(launch.batch_id, launch.array_index, launch.attempt, "-1", None)]
    )
    assert _row(harness, launch) == (int(S.SUCCEEDED), "14")


def _injected_failures(server: HtcServer) -> Any:
    """Make every write of a call's result fail while the table ``fail_reports`` has a row: the
    report's transaction, which carries the result, fails as a whole."""
    url = server.db_url or f"sqlite:///{server.data_dir / 'openhtc.db'}"
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE fail_reports (n INTEGER)"))
        conn.execute(sa.text("INSERT INTO fail_reports VALUES (1)"))
        if engine.dialect.name == "sqlite":
            conn.execute(
                sa.text(
                    "CREATE TRIGGER fail_report BEFORE UPDATE ON function_calls"
                    " WHEN EXISTS (SELECT 1 FROM fail_reports)"
                    " BEGIN SELECT RAISE(ABORT, 'injected report failure'); END"
                )
            )
        else:
            conn.execute(
                sa.text(
                    "CREATE FUNCTION fail_report() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF EXISTS (SELECT 1 FROM fail_reports) THEN"
                    " RAISE EXCEPTION 'injected report failure'; END IF; RETURN NEW; END $$"
                )
            )
            conn.execute(
                sa.text(
                    "CREATE TRIGGER fail_report BEFORE UPDATE ON function_calls"
                    " FOR EACH ROW EXECUTE FUNCTION fail_report()"
                )
            )
    return engine


def test_a_report_that_fails_is_retried_with_its_calls_results(module_server: HtcServer) -> None:
    """The end of a call whose report failed reads, once the database takes writes again, with
    its result: the results taken for the failed report went back with it."""
    api = module_server.api()
    project_id, task_id = api.project_and_task()
    fn = Functions(module_server, api, project_id, task_id)
    fn.upload_code()
    engine = _injected_failures(module_server)
    try:
        batch = fn.submit("fnlib.handlers.double", [{"x": 5}], code="handlers.zip")
        deadline = time.monotonic() + 60
        while "injected report failure" not in module_server.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, module_server.log_tail()
            time.sleep(0.05)
        assert fn.page(batch)["items"] == []  # not ended: no status without its result
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM fail_reports"))
        [item] = fn.results(batch, 1)
        assert (item["status"], item["result"]) == ("SUCCEEDED", 10)
    finally:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "DROP TRIGGER fail_report"
                    + ("" if engine.dialect.name == "sqlite" else " ON function_calls")
                )
            )
        engine.dispose()
