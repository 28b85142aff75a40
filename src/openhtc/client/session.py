"""High-level objects: Session ▸ Project ▸ Task ▸ JobBatch ▸ Job.

Each object wraps the JSON the server returned (``.data``) plus the session it came from;
nothing is cached beyond that, and ``refresh()`` fetches it again::

    with Session() as htc:                      # credentials from args, env or `htc login`
        task = htc.project(pid).create_task("sweep")
        batch = task.submit("local/process:latest", ["python", "run.py"], batch_size=100)
        counts = batch.wait(on_progress=print)  # StatusCounts, e.g. {"SUCCEEDED": 100, ...}
        print(batch.job(0).logs())
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Self

import httpx

from openhtc.client import api, functions, live
from openhtc.client._requests import EnvInput, job_request
from openhtc.client._transport import Closeable, Connection

__all__ = [
    "JOB_STATUSES",
    "TERMINAL_STATUSES",
    "Job",
    "JobBatch",
    "Project",
    "Session",
    "StatusCounts",
    "Task",
]

JsonDict = dict[str, Any]

JOB_STATUSES = (
    "SUBMITTED_TO_RESCALE",
    "SUBMITTED_TO_PROVIDER",
    "RUNNABLE",
    "STARTING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
)
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED"})
_MAX_REQUESTS_PER_CALL = 100  # the reference accepts at most 100 submit requests per call


class StatusCounts(dict[str, int]):
    """Job counts by status (every canonical status present, 0 if none)."""

    @classmethod
    def from_statuses(cls, *job_statuses: Mapping[str, Any]) -> StatusCounts:
        counts = cls(dict.fromkeys(JOB_STATUSES, 0))
        for statuses in job_statuses:
            for status, n in statuses.items():
                counts[status] = counts.get(status, 0) + int(n or 0)
        return counts

    @property
    def total(self) -> int:
        return sum(self.values())

    @property
    def succeeded(self) -> int:
        return self.get("SUCCEEDED", 0)

    @property
    def failed(self) -> int:
        return self.get("FAILED", 0)

    @property
    def finished(self) -> int:
        return sum(n for status, n in self.items() if status in TERMINAL_STATUSES)

    @property
    def done(self) -> bool:
        """Every counted job is SUCCEEDED or FAILED (trivially true when there are none)."""
        return self.finished == self.total


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _sleep_until_next(deadline: float | None, poll: float, what: str) -> None:
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(min(poll, remaining))
    else:
        time.sleep(poll)


class Session(Closeable):
    """Entry point. Credentials: explicit arguments, else the environment, else ``htc login``'s file
    (see :func:`~openhtc.client.resolve_credentials`), or a ready :class:`Connection`."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        refresh_token: str | None = None,
        bearer_token: str | None = None,
        connection: Connection | None = None,
        **connection_options: Any,
    ) -> None:
        self.connection = connection or Connection.from_env(
            url, api_key, refresh_token=refresh_token, bearer_token=bearer_token, **connection_options
        )

    def close(self) -> None:
        self.connection.close()

    def __repr__(self) -> str:
        return f"Session({self.connection.base_url!r})"

    @property
    def url(self) -> str:
        return self.connection.base_url

    def whoami(self) -> JsonDict:
        """The bearer token's claims: user, email, workspace, roles."""
        return api.get_auth_token_whoami(self.connection)

    def regions(self) -> list[JsonDict]:
        return api.get_htc_regions(self.connection)

    def projects(self, *, only_mine: bool | None = None) -> list[Project]:
        return [Project(self, p) for p in api.iter_htc_projects(self.connection, only_my_projects=only_mine)]

    def project(self, project_id: str) -> Project:
        """Fetch one project; raises NotFound if it does not exist (or is not yours to see)."""
        return Project(self, api.get_htc_projects(self.connection, project_id))

    def create_project(
        self, name: str, description: str = "", regions: Sequence[str] | None = None
    ) -> Project:
        payload: JsonDict = {"projectName": name, "projectDescription": description}
        if regions:
            payload["regions"] = list(regions)
        return Project(self, api.post_htc_projects(self.connection, payload))

    def task(self, project_id: str, task_id: str) -> Task:
        """Fetch one task by its project and task IDs."""
        return Task(self, api.get_htc_projects_tasks(self.connection, project_id, task_id))


class _Resource:
    """A project or task: the JSON the server returned (``data``) and the session it came from."""

    def __init__(self, session: Session, data: JsonDict) -> None:
        self.session = session
        self.data = data

    @property
    def _conn(self) -> Connection:
        return self.session.connection


class Project(_Resource):
    def __repr__(self) -> str:
        return f"Project({self.id!r}, name={self.name!r})"

    @property
    def id(self) -> str:
        return str(self.data["projectId"])

    @property
    def name(self) -> str:
        return str(self.data.get("projectName", ""))

    @property
    def description(self) -> str:
        return str(self.data.get("projectDescription", ""))

    def refresh(self) -> Self:
        self.data = api.get_htc_projects(self._conn, self.id)
        return self

    def tasks(self, *, include_deleted: bool = False) -> list[Task]:
        """The project's tasks, oldest first as the server lists them; DELETED ones only on request."""
        return [
            Task(self.session, t)
            for t in api.iter_htc_projects_tasks(self._conn, self.id)
            if include_deleted or t.get("lifecycleStatus") != "DELETED"
        ]

    def task(self, task_id: str) -> Task:
        return Task(self.session, api.get_htc_projects_tasks(self._conn, self.id, task_id))

    def create_task(self, name: str, description: str = "") -> Task:
        payload = {"taskName": name, "taskDescription": description}
        return Task(self.session, api.post_htc_projects_tasks(self._conn, self.id, payload))

    def add_regions(self, regions: Sequence[str]) -> Self:
        self.data = api.patch_htc_projects(self._conn, self.id, {"regions": list(regions)})
        return self

    def limits(self) -> list[JsonDict]:
        return api.get_htc_projects_limits(self._conn, self.id)

    def set_limit(self, vcpus: int, role: str = "PROJECT_ADMIN") -> JsonDict:
        """Set (or overwrite) the vCPU limit owned by ``role`` (PROJECT_ADMIN or WORKSPACE_ADMIN)."""
        return api.post_htc_projects_limits(self._conn, self.id, {"vCPUs": vcpus, "modifierRole": role})

    def remove_limits(self) -> None:
        api.delete_htc_projects_limits(self._conn, self.id)


class Task(_Resource):
    def __repr__(self) -> str:
        return f"Task({self.id!r}, name={self.name!r}, project={self.project_id!r})"

    @property
    def id(self) -> str:
        return str(self.data["taskId"])

    @property
    def project_id(self) -> str:
        return str(self.data["projectId"])

    @property
    def name(self) -> str:
        return str(self.data.get("taskName", ""))

    @property
    def lifecycle_status(self) -> str:
        return str(self.data.get("lifecycleStatus", ""))

    def refresh(self) -> Self:
        self.data = api.get_htc_projects_tasks(self._conn, self.project_id, self.id)
        return self

    # -- submitting ------------------------------------------------------------------------

    def submit(
        self,
        image: str,
        commands: Sequence[str] | str,
        batch_size: int = 1,
        envs: EnvInput | None = None,
        group: str | None = None,
        max_vcpus: int = 1,
        max_memory: int = 4000,
        exec_timeout: int | None = None,
        retries: int = 0,
        priority: str | None = None,
        architecture: str | None = None,
        *,
        job_name: str | None = None,
        max_disk_gib: int | None = None,
        tags: Mapping[str, str] | None = None,
        regions: Sequence[str] | None = None,
    ) -> JobBatch:
        """Submit ``batch_size`` jobs running ``commands`` in ``image``; jobs see their index in
        ``$AWS_BATCH_JOB_ARRAY_INDEX``. See :func:`~openhtc.client.job_request` for the fields."""
        request = job_request(
            image,
            commands,
            batch_size=batch_size,
            job_name=job_name,
            envs=envs,
            max_vcpus=max_vcpus,
            max_memory=max_memory,
            exec_timeout=exec_timeout,
            retries=retries,
            priority=priority,
            architecture=architecture,
            max_disk_gib=max_disk_gib,
            tags=tags,
            regions=regions,
        )
        return self.submit_requests([request], group=group)[0]

    def run(
        self,
        image: str,
        commands: Sequence[str] | str,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        group: str | None = None,
        **fields: Any,
    ) -> Job:
        """Submit one job running ``commands`` in ``image`` and return it once it has ended
        (SUCCEEDED or FAILED; ``timeout``: ``TimeoutError`` past it). On an openhtc server
        it is one request (``POST …/jobs/run``) answered the moment the job ends; elsewhere
        the submit, then :meth:`Job.wait`. ``fields``: as :meth:`submit`'s (not batch_size)."""
        request = job_request(image, commands, **fields)
        deadline = _deadline(timeout)
        conn = self._conn
        if live.supported(conn):
            wait = live.MAX_WAIT if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                data = live.run_job(conn, self.project_id, self.id, request, min(wait, live.MAX_WAIT), group)
            except live.Unsupported:  # nothing was submitted: the Rescale routes below
                pass
            else:
                job = Job(self, str(data["jobUUID"]), data)
                return job if job.done else job.wait(_left(deadline), poll)
        batch = self.submit_requests([request], group=group)[0]
        return batch.job(0).wait(_left(deadline), poll)

    def submit_requests(
        self, requests: Sequence[Mapping[str, Any]], group: str | None = None
    ) -> list[JobBatch]:
        """Submit raw HTCJobSubmitRequest objects (100 per call); one JobBatch per request."""
        batches: list[JobBatch] = []
        for start in range(0, len(requests), _MAX_REQUESTS_PER_CALL):
            chunk = requests[start : start + _MAX_REQUESTS_PER_CALL]
            echoes = api.post_htc_projects_tasks_jobs_batch(
                self._conn, self.project_id, self.id, chunk, group
            )
            batches.extend(JobBatch(self, echo) for echo in echoes)
        return batches

    # -- function calls (client/functions.py) --------------------------------------------

    def submit_functions(
        self,
        image: str,
        handler: str,
        events: Sequence[Any],
        *,
        code: str | None = None,
        max_vcpus: int = 1,
        max_memory: int = 512,
        timeout: int = 60,
        retries: int = 0,
        priority: int | None = None,
        group: str | None = None,
    ) -> functions.FunctionBatch:
        """Run ``handler(event, context)`` (``"pkg.module.function"``, from the image or from the
        ``code`` zip in project storage) once per event, in chunks of 100,000 events per call.
        ``max_memory`` is in MiB, ``timeout`` in seconds per call."""
        return functions.submit_functions(
            self, image, handler, events, code=code, max_vcpus=max_vcpus, max_memory=max_memory,
            timeout=timeout, retries=retries, priority=priority, group=group,
        )  # fmt: skip

    def map(
        self,
        image: str,
        handler: str,
        events: Sequence[Any],
        *,
        code: str | None = None,
        max_vcpus: int = 1,
        max_memory: int = 512,
        timeout: int = 60,
        retries: int = 0,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """The handler's results for ``events``, in order. The first failed call (in index order)
        raises its :class:`~openhtc.client.FunctionError` and cancels the calls still running,
        unless ``return_exceptions``: then the FunctionError stands in the list in its place."""
        batch = functions.submit_functions(
            self, image, handler, events, code=code, max_vcpus=max_vcpus, max_memory=max_memory,
            timeout=timeout, retries=retries, wait=functions.SUBMIT_WAIT,
        )  # fmt: skip
        try:
            return [result for _, result in batch.results(return_exceptions=return_exceptions)]
        except BaseException:
            batch.cancel()  # nobody holds the batch after map: stop what is left of it
            raise

    def function_batch(self, batch_ids: str | Sequence[str]) -> functions.FunctionBatch:
        """A handle on function batches submitted earlier, by id (in submission order)."""
        return functions.function_batch(self, batch_ids)

    # -- observing -------------------------------------------------------------------------

    def summary(self, group: str | Sequence[str] | None = None) -> StatusCounts:
        """Job counts by status, for the whole task or for the given group(s)."""
        if group is None:
            body = api.get_htc_projects_tasks_summary_statistics(self._conn, self.project_id, self.id)
            return StatusCounts.from_statuses(body.get("jobStatuses") or {})
        items = api.get_htc_projects_tasks_group_summary_statistics(
            self._conn, self.project_id, self.id, group
        )
        return StatusCounts.from_statuses(*(item.get("jobStatuses") or {} for item in items))

    def groups(self) -> list[str]:
        return api.get_htc_projects_tasks_groups(self._conn, self.project_id, self.id)

    def jobs(
        self, status: str | None = None, group: str | None = None, *, max_items: int | None = None
    ) -> Iterator[Job]:
        """Iterate over the task's jobs (lazily, page by page), optionally filtered."""
        for data in api.iter_htc_projects_tasks_jobs(
            self._conn, self.project_id, self.id, group=group, status=status, max_items=max_items
        ):
            yield Job(self, str(data["jobUUID"]), data)

    def job(self, job_id: str) -> Job:
        """Fetch one job by its ID (``"{parentJobId}:{index}"``)."""
        return Job(self, job_id).refresh()

    def wait(
        self,
        group: str | Sequence[str] | None = None,
        timeout: float | None = None,
        poll: float = 1.0,
        on_progress: Callable[[StatusCounts], None] | None = None,
        *,
        expected: int = 0,
    ) -> StatusCounts:
        """Wait until every job (of ``group``/groups, if given) is SUCCEEDED or FAILED and at
        least ``expected`` jobs are counted; return the final counts.

        On an openhtc server the counts are pushed (``/openhtc/v1``, client/live.py): the call
        returns the moment the last job ends, and ``on_progress`` receives the counts each
        time they change. Elsewhere it polls the summary every ``poll`` seconds and
        ``on_progress`` receives every polled summary. Raises ``TimeoutError`` after ``timeout`` s.
        """
        deadline = _deadline(timeout)
        if live.supported(self._conn):
            groups = [] if group is None else [group] if isinstance(group, str) else list(group)
            try:
                return self._wait_pushed(groups, deadline, poll, on_progress, expected)
            except live.Unsupported:
                pass
        while True:
            counts = self.summary(group)
            if on_progress is not None:
                on_progress(counts)
            if counts.total >= expected and counts.done:
                return counts
            _sleep_until_next(deadline, poll, f"task {self.id}")

    def _wait_pushed(
        self,
        groups: list[str],
        deadline: float | None,
        poll: float,
        on_progress: Callable[[StatusCounts], None] | None,
        expected: int,
    ) -> StatusCounts:
        conn = self._conn
        counts = StatusCounts.from_statuses()
        while True:
            left = live.MAX_WAIT if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for task {self.id}")
            if on_progress is None:  # one long poll answers when done
                body = live.wait_task(conn, self.project_id, self.id, groups, min(left, live.MAX_WAIT))
                counts = StatusCounts.from_statuses(body.get("statusCounts") or {})
                if counts.total >= expected and counts.done:
                    return counts
            else:  # a stream of counts, for the progress
                try:
                    for event in live.follow_counts(
                        conn, self.project_id, self.id, groups, read_timeout=min(left, live.MAX_WAIT)
                    ):
                        counts = StatusCounts.from_statuses(event.data.get("statusCounts") or {})
                        on_progress(counts)
                        if counts.total >= expected and counts.done:
                            return counts
                        if deadline is not None and time.monotonic() >= deadline:
                            raise TimeoutError(f"timed out waiting for task {self.id}")
                except httpx.ReadTimeout:
                    continue  # the deadline is checked above
            if counts.done:  # done, yet fewer jobs than expected are counted: look again soon
                _sleep_until_next(deadline, poll, f"task {self.id}")

    # -- lifecycle -------------------------------------------------------------------------

    def cancel(self, group: str | None = None) -> None:
        """Ask the server to cancel every unfinished job (of ``group``); cancelled jobs end FAILED."""
        api.post_htc_projects_tasks_jobs_cancel(self._conn, self.project_id, self.id, group)

    def archive(self) -> Self:
        return self._set_lifecycle_status("ARCHIVED")

    def unarchive(self) -> Self:
        return self._set_lifecycle_status("ACTIVE")

    def _set_lifecycle_status(self, status: str) -> Self:
        self.data = api.patch_htc_projects_tasks(
            self._conn, self.project_id, self.id, {"lifecycleStatus": status}
        )
        return self

    def delete(self) -> Self:
        self.data = api.delete_htc_projects_tasks(self._conn, self.project_id, self.id)
        return self


class JobBatch:
    """One submitted HTCJobSubmitRequest: jobs ``{parent_job_id}:0`` … ``:{batch_size - 1}``."""

    def __init__(self, task: Task, data: JsonDict) -> None:
        self.task = task
        self.data = data

    def __repr__(self) -> str:
        return f"JobBatch({self.parent_job_id!r}, group={self.group!r}, batch_size={self.batch_size})"

    @property
    def parent_job_id(self) -> str:
        return str(self.data["parentJobId"])

    @property
    def group(self) -> str | None:
        group = self.data.get("group")
        return str(group) if group is not None else None

    @property
    def batch_size(self) -> int:
        return int(self.data.get("batchSize") or 1)

    @property
    def job_ids(self) -> list[str]:
        return [f"{self.parent_job_id}:{i}" for i in range(self.batch_size)]

    def job(self, index: int) -> Job:
        """The job at ``index`` (not fetched until its data is used)."""
        if not 0 <= index < self.batch_size:
            raise IndexError(f"job index {index} outside batch of {self.batch_size}")
        return Job(self.task, f"{self.parent_job_id}:{index}")

    def jobs(self) -> list[Job]:
        """Fetch the batch's jobs, ordered by index (lists the batch's group and keeps its own)."""
        prefix = f"{self.parent_job_id}:"
        jobs = [job for job in self.task.jobs(group=self.group) if job.id.startswith(prefix)]
        return sorted(jobs, key=lambda job: job.index)

    def summary(self) -> StatusCounts:
        """Counts for the batch's group (the whole task if the server reported no group)."""
        return self.task.summary(self.group)

    def wait(
        self,
        timeout: float | None = None,
        poll: float = 1.0,
        on_progress: Callable[[StatusCounts], None] | None = None,
    ) -> StatusCounts:
        """Wait until every job of the batch's group is finished; return the group's counts.

        Summaries are kept per group, so this is one cheap request per poll; when several
        batches share a group it waits for all of them.
        """
        return self.task.wait(self.group, timeout, poll, on_progress, expected=self.batch_size)


class Job:
    def __init__(self, task: Task, job_id: str, data: JsonDict | None = None) -> None:
        self.task = task
        self.id = job_id
        self._data = data

    def __repr__(self) -> str:
        status = self._data.get("status") if self._data else None
        return f"Job({self.id!r}, status={status!r})"

    @property
    def _conn(self) -> Connection:
        return self.task.session.connection

    @property
    def parent_job_id(self) -> str:
        return self.id.rpartition(":")[0]

    @property
    def index(self) -> int:
        tail = self.id.rpartition(":")[2]
        return int(tail) if tail.isdigit() else 0

    @property
    def data(self) -> JsonDict:
        """The job's HTCJob JSON (fetched on first use)."""
        if self._data is None:
            self.refresh()
        assert self._data is not None
        return self._data

    def refresh(self) -> Self:
        self._data = api.get_htc_projects_tasks_jobs(self._conn, self.task.project_id, self.task.id, self.id)
        return self

    @property
    def status(self) -> str:
        return str(self.data.get("status", ""))

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def exit_code(self) -> int | None:
        container = self.data.get("container") or {}
        code = container.get("exitCode")
        return int(code) if isinstance(code, int | float) else None

    @property
    def failure_code(self) -> str | None:
        code = self.data.get("failureCode")
        return str(code) if code else None

    def log_entries(self, sort: api.LogSort = "asc", max_items: int | None = None) -> list[JsonDict]:
        """``{timestamp, message}`` lines, oldest first by default."""
        return api.get_htc_projects_tasks_jobs_logs(
            self._conn, self.task.project_id, self.task.id, self.id, sort=sort, max_items=max_items
        )

    def logs(self, sort: api.LogSort = "asc", max_items: int | None = None) -> list[str]:
        """The log lines' text, oldest first by default."""
        return [str(entry.get("message", "")) for entry in self.log_entries(sort, max_items)]

    def events(self) -> list[JsonDict]:
        return api.get_htc_projects_tasks_jobs_events(self._conn, self.task.project_id, self.task.id, self.id)

    def wait(self, timeout: float | None = None, poll: float = 1.0) -> Self:
        """Wait until the job is SUCCEEDED or FAILED: pushed on an openhtc server (returns the
        moment it ends), else polled every ``poll`` seconds."""
        deadline = _deadline(timeout)
        conn, task = self._conn, self.task
        while live.supported(conn):
            left = live.MAX_WAIT if deadline is None else deadline - time.monotonic()
            try:
                self._data = live.wait_job(
                    conn, task.project_id, task.id, self.id, max(0.0, min(left, live.MAX_WAIT))
                )
            except live.Unsupported:
                break
            if self.done:
                return self
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"timed out waiting for job {self.id}")
        while not self.refresh().done:
            _sleep_until_next(deadline, poll, f"job {self.id}")
        return self
