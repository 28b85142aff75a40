"""The results page SQLite builds as JSON (store/functions.py ``page_json``) says what the
row-by-row page says, for every kind of call end, and gives way to it where it cannot; on
PostgreSQL the row-by-row page (read in one round trip) says the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from openhtc.domain.enums import JobStatus
from openhtc.services.functions import results_page, store_functions
from openhtc.store.functions import FunctionStore
from openhtc.testing.inprocess import StoreHarness, in_process_services

EVENTS = 8
# idx: (status, attempt, result, error, result attempt, failure code, reason): each kind of end
ENDS: dict[int, tuple[Any, ...]] = {
    0: (JobStatus.SUCCEEDED, 1, '{"x": [1, 2.5, "s"]}', None, 1, None, None),
    1: (JobStatus.SUCCEEDED, 1, "null", None, 1, None, None),
    2: (JobStatus.SUCCEEDED, 2, '"two"', None, 2, None, None),
    3: (
        JobStatus.FAILED,
        1,
        None,
        '{"type": "ValueError", "message": "odd", "traceback": "T"}',
        1,
        "ErrorUserFailure",
        "handler raised",
    ),
    4: (
        JobStatus.FAILED,
        2,
        None,
        '{"type": "KeyError", "message": "old", "traceback": ""}',
        1,
        "ErrorInfrastructureFault",
        "worker lost",
    ),  # the error is an earlier attempt's
    5: (JobStatus.FAILED, 1, None, None, None, "ErrorJobTimeout", "timed out"),
    6: (JobStatus.FAILED, 1, None, None, None, None, None),
}


def _page(
    services: Any, task_id: str, batch: str, start: int, built: bool, limit: int = 100
) -> dict[str, Any]:
    if not built:
        real = FunctionStore.page_json
        FunctionStore.page_json = lambda *args: None  # type: ignore[method-assign]
    try:
        body, count = results_page(services, task_id, batch, start, limit)
    finally:
        if not built:
            FunctionStore.page_json = real  # type: ignore[method-assign]
    decoded: dict[str, Any] = orjson.loads(orjson.dumps(body))
    assert len(decoded["items"]) == count
    return decoded


def test_the_json_page_equals_the_row_by_row_page_for_every_kind_of_end(
    tmp_path: Path, db_url: str | None
) -> None:
    with in_process_services(tmp_path / "data", db_url) as services:
        harness = StoreHarness(services)
        project = harness.create_project()
        task = harness.create_task(project)
        body = {"image": "bb", "handler": "m.f", "events": [{"x": i} for i in range(EVENTS)]}
        batch = store_functions(services, harness.who, project, harness.reload_task(task), body)[0]["batchId"]
        batch_id = harness.sql("SELECT id FROM batches WHERE parent_job_id = ?", batch)[0][0]
        with services.db.write() as conn:
            for idx, (status, attempt, result, error, result_attempt, code, reason) in ENDS.items():
                conn.exec_driver_sql(
                    services.db.sql(
                        "UPDATE jobs SET status = ?, attempt = ?, failure_code = ?, status_reason = ?"
                        " WHERE batch_id = ? AND idx = ?"
                    ),
                    (int(status), attempt, code, reason, batch_id, idx),
                )
                conn.exec_driver_sql(
                    services.db.sql(
                        "UPDATE function_calls SET result = ?, error = ?, attempt = ?"
                        " WHERE batch_id = ? AND idx = ?"
                    ),
                    (result, error, result_attempt, batch_id, idx),
                )
        built = _page(services, task.id, batch, 0, built=True)
        assert built == _page(services, task.id, batch, 0, built=False)
        assert [item["index"] for item in built["items"]] == list(ENDS)  # up to the call not ended
        assert built["items"][0]["result"] == {"x": [1, 2.5, "s"]}
        assert built["items"][3]["error"]["type"] == "ValueError"
        assert built["items"][4]["error"]["type"] == "ErrorInfrastructureFault"  # not the old attempt's
        assert built["next"] == len(ENDS)
        assert _page(services, task.id, batch, 2, built=True) == _page(
            services, task.id, batch, 2, built=False
        )
        assert _page(services, task.id, batch, 7, built=True)["items"] == []  # call 7 has not ended
        for start in range(EVENTS):  # any start, any limit: the same items, count and next
            for limit in (1, 2, 3, 100):
                page = _page(services, task.id, batch, start, built=True, limit=limit)
                assert page == _page(services, task.id, batch, start, built=False, limit=limit)

        # A result kept in storage: the row-by-row page reads it from there.
        with services.db.write() as conn:
            conn.exec_driver_sql(
                services.db.sql("UPDATE function_calls SET result_key = 'k' WHERE batch_id = ? AND idx = 2"),
                (batch_id,),
            )
        if db_url is not None:
            return  # PostgreSQL: always row by row
        with services.db.read() as conn:
            assert FunctionStore(services.db).page_json(conn, batch_id, 0, 100) is None
            assert FunctionStore(services.db).page_json(conn, batch_id, 3, 100) is not None
