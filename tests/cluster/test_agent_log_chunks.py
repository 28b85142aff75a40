"""Log chunks an agent ships late (``log_store = database``), played with raw httpx as an agent
would: a cancelled job's last lines still go in, but once its task is deleted (its logs deleted
with it) the server refuses them (409, the agent forgets them) instead of writing rows that
nothing would ever delete."""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa
from tests.cluster.test_agent_protocol import Agent, agent_token, claim, submit
from tests.cluster.test_agent_security import post_logs

from openhtc.domain.enums import JobStatus
from openhtc.testing.server import HtcServer


def _chunk(key: tuple[int, int], offset: int, text: str) -> dict[str, object]:
    return {"job_id": key[0], "attempt": key[1], "offset": offset, "data": f"{time.time()}\t{text}\n"}


def test_a_deleted_tasks_late_log_chunks_are_refused(start_server: Callable[..., HtcServer]) -> None:
    srv = start_server(
        args=("--no-executor",),
        env={"OPENHTC_LOG_STORE": "database", "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "0"},
    )
    api = srv.api()
    agent = Agent(srv, agent_token(srv), "late")
    agent.register()
    kept_project, kept_task = submit(api)
    (kept,) = claim(agent, 1)
    gone_project, gone_task = submit(api)
    (gone,) = claim(agent, 1)
    keys = [(lease["job_id"], lease["attempt"]) for lease in (kept, gone)]
    agent.exchange(held=keys, reports=[agent.report(*key, JobStatus.STARTING) for key in keys])
    first = [_chunk(key, 0, "started") for key in keys]
    assert post_logs(agent, first).status_code == 200

    api.cancel(kept_project, kept_task)
    api.request("DELETE", api.task_path(gone_project, gone_task))
    offsets = {c["job_id"]: len(str(c["data"]).encode()) for c in first}
    late = [_chunk(key, offsets[key[0]], "stopping") for key in keys]
    resp = post_logs(agent, late)
    assert resp.status_code == 409, resp.text
    assert resp.json()["refused"] == [list(keys[1])]
    # the agent forgets the refused attempt; the cancelled job's last line still goes in
    assert post_logs(agent, late[:1]).status_code == 200
    job_uuid = api.jobs(kept_project, kept_task)[0]["jobUUID"]
    assert api.log_lines(kept_project, kept_task, job_uuid) == ["started", "stopping"]

    url = srv.db_url or f"sqlite:///{srv.data_dir / 'openhtc.db'}"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT task_id, count(*) FROM log_chunks GROUP BY task_id ORDER BY task_id")
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(kept_task, 2)]
