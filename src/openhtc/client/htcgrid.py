"""An HTC-Grid-style connector on openhtc's function tasks, to port HTC-Grid client code.

HTC-Grid's client (``api.connector.AWSConnector``) sends a list of events as one *session*,
polls for the session's results and cancels sessions. The same three calls here run the
handler as an openhtc function batch::

    # HTC-Grid                                  # openhtc
    connector = AWSConnector()                  connector = HtcGridConnector(task, "py:1",
    connector.init(config, username=..., ...)       "handlers.lambda_handler", code="lambda.zip")
    connector.authenticate()
    session = connector.send(events)            session = connector.send(events)
    out = connector.get_results(session, 60)    out = connector.get_results(session, 60)
    connector.cancel_sessions([session_id])     connector.cancel_sessions([session_id])

Differences: ``finished_OUTPUT`` holds each handler's decoded JSON result (HTC-Grid: the string
it returned); a handler that raises is in ``failed``, with ``failed_OUTPUT`` holding its error
(HTC-Grid counts it as finished); cancelling really stops running calls. A session id is the
batch ids of the submission joined by ``+`` (one batch per 100,000 events), so any connector
on the same task can collect or cancel it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from openhtc.client.functions import FunctionBatch, FunctionCall
from openhtc.client.session import Task

__all__ = ["HtcGridConnector"]

JsonDict = dict[str, Any]
SEPARATOR = "+"


class HtcGridConnector:
    """``send`` / ``get_results`` / ``cancel_sessions`` of HTC-Grid's connector, on one task."""

    def __init__(self, task: Task, image: str, handler: str, *, code: str | None = None, **options: Any):
        """``options``: ``max_vcpus``, ``max_memory``, ``timeout``, ``retries``, ``priority``, ``group``
        (:meth:`openhtc.client.Task.submit_functions`)."""
        self.task = task
        self.image = image
        self.handler = handler
        self.code = code
        self.options = options

    def send(self, tasks_list: Sequence[Any]) -> JsonDict:
        """Submit one session: each item of ``tasks_list`` is one handler call's event.
        Returns ``{"session_id", "task_ids"}``; task ids are ``"<session_id>_<index>"``."""
        batch = self.task.submit_functions(
            self.image, self.handler, tasks_list, code=self.code, **self.options
        )
        session_id = SEPARATOR.join(batch.batch_ids)
        return {"session_id": session_id, "task_ids": [f"{session_id}_{i}" for i in range(batch.count)]}

    def _batch(self, session: Mapping[str, Any] | str) -> FunctionBatch:
        session_id = session if isinstance(session, str) else str(session["session_id"])
        return self.task.function_batch(session_id.split(SEPARATOR))

    def get_results(self, submission_response: Mapping[str, Any] | str, timeout_sec: float = 0) -> JsonDict:
        """Wait up to ``timeout_sec`` seconds (0: look once) for the session's calls to end and
        return what has ended, as HTC-Grid's ``get_results`` does: ``finished`` task ids with
        ``finished_OUTPUT`` (the results), ``failed`` with ``failed_OUTPUT`` (the errors:
        ``{type, message, traceback}``), ``cancelled`` (HTC-Grid's key; openhtc reports a
        cancelled call as failed) and ``metadata.tasks_in_response``. Calls are reported in
        index order up to the first one still running; a timeout returns that partial answer."""
        batch = self._batch(submission_response)
        session_id = SEPARATOR.join(batch.batch_ids)
        done: list[FunctionCall] = []
        try:
            calls = batch.calls(timeout=timeout_sec) if timeout_sec > 0 else batch.calls(wait=0.0)
            for call in calls:
                done.append(call)
        except TimeoutError:
            pass  # HTC-Grid returns what has ended so far
        out: JsonDict = {
            "finished": [],
            "finished_OUTPUT": [],
            "failed": [],
            "failed_OUTPUT": [],
            "cancelled": [],
        }
        for call in done:
            key = "finished" if call.ok else "failed"
            out[key].append(f"{session_id}_{call.index}")
            out[f"{key}_OUTPUT"].append(call.result if call.ok else call.error)
        out["metadata"] = {"tasks_in_response": len(done)}
        return out

    def cancel_sessions(self, session_ids: Sequence[str]) -> JsonDict:
        """Cancel the sessions' calls that have not ended (running ones are stopped).
        Returns ``{session_id: number cancelled}``."""
        return {session_id: self._batch(session_id).cancel() for session_id in session_ids}
