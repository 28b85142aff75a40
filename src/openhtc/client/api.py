"""Plumbing: one function per HTC REST route, named as in the ``rescalehtc`` client.

The name is the HTTP method followed by the path's literal segments joined by ``_``
(``POST /htc/projects/{projectId}/tasks/{taskId}/jobs/batch`` →
``post_htc_projects_tasks_jobs_batch``). Routes that differ only by a trailing ID share a
function whose last positional argument is that optional ID.

Every function takes a :class:`~openhtc.client.Connection` first, returns decoded JSON
(``dict``/``list``; ``None`` for empty responses) and raises :class:`~openhtc.client.HtcError`
(or a subclass such as ``NotFound``) on any status >= 400.

**List endpoints** return a ``list`` holding the concatenated ``items`` of every page: the
functions follow the absolute ``next`` URL until it is absent. ``max_items`` stops early. For
endpoints that may hold very many items (projects, tasks, jobs, logs, events) an ``iter_*``
twin yields the items lazily, one page request at a time.

Container-registry and storage routes are not covered yet.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, overload

from openhtc.client._transport import Connection, ParamValue, segment

JsonDict = dict[str, Any]
LogSort = Literal["asc", "desc"]

__all__ = [
    "JsonDict",
    "delete_htc_projects_limits",
    "delete_htc_projects_task_retention_policy",
    "delete_htc_projects_tasks",
    "get_auth_token",
    "get_auth_token_whoami",
    "get_auth_whoami",
    "get_htc_gcp_clusters",
    "get_htc_metrics",
    "get_htc_projects",
    "get_htc_projects_dimensions",
    "get_htc_projects_limits",
    "get_htc_projects_task_retention_policy",
    "get_htc_projects_tasks",
    "get_htc_projects_tasks_group_summary_statistics",
    "get_htc_projects_tasks_groups",
    "get_htc_projects_tasks_jobs",
    "get_htc_projects_tasks_jobs_events",
    "get_htc_projects_tasks_jobs_logs",
    "get_htc_projects_tasks_summary_statistics",
    "get_htc_regions",
    "get_htc_task_retention_policy",
    "get_htc_workspaces_dimensions",
    "get_htc_workspaces_limits",
    "get_htc_workspaces_task_retention_policy",
    "get_well_known_jwks",
    "iter_htc_projects",
    "iter_htc_projects_tasks",
    "iter_htc_projects_tasks_jobs",
    "iter_htc_projects_tasks_jobs_events",
    "iter_htc_projects_tasks_jobs_logs",
    "patch_htc_projects",
    "patch_htc_projects_limits",
    "patch_htc_projects_tasks",
    "post_htc_projects",
    "post_htc_projects_limits",
    "post_htc_projects_tasks",
    "post_htc_projects_tasks_jobs_batch",
    "post_htc_projects_tasks_jobs_cancel",
    "put_htc_projects_dimensions",
    "put_htc_projects_task_retention_policy",
    "put_htc_task_retention_policy",
    "put_htc_workspaces_task_retention_policy",
]

_DEFAULT_PAGE_SIZE = 100  # the server's default


def _project(project_id: str) -> str:
    return f"/htc/projects/{segment(project_id)}"


def _task(project_id: str, task_id: str) -> str:
    return f"{_project(project_id)}/tasks/{segment(task_id)}"


def _job(project_id: str, task_id: str, job_id: str) -> str:
    return f"{_task(project_id, task_id)}/jobs/{segment(job_id)}"


def _object(
    conn: Connection, method: str, path: str, payload: Mapping[str, Any] | None = None, **kwargs: Any
) -> JsonDict:
    """Call a route that answers with one JSON object, sending a copy of ``payload`` if given."""
    result: JsonDict = conn.call(method, path, dict(payload) if payload is not None else None, **kwargs)
    return result


def _items(
    conn: Connection, path: str, page_size: int | None, max_items: int | None, **params: ParamValue
) -> Iterator[Any]:
    """Lazily yield the items of a list route, asking for no more than ``max_items`` when that is
    less than a page. ``params`` are the route's filters, sent before ``pageSize``."""
    if max_items is not None and 0 < max_items < (page_size or _DEFAULT_PAGE_SIZE):
        page_size = max_items
    return conn.iter_items(path, {**params, "pageSize": page_size}, max_items=max_items)


# -- token and provider ----------------------------------------------------------------------


def get_well_known_jwks(conn: Connection) -> JsonDict:
    """``GET /.well-known/jwks.json``: the public keys that verify bearer JWTs (no auth needed)."""
    return _object(conn, "GET", "/.well-known/jwks.json", auth=False)


def get_auth_token(conn: Connection, authorization_header: str | None = None) -> JsonDict:
    """``GET /auth/token``: ``{tokenValue, expiresIn}``.

    ``authorization_header`` is ``Token <apiKey>`` or ``Refresh <refreshToken>``; by default the
    connection's own key or refresh token. The connection manages its bearer token itself, so
    this is rarely needed.
    """
    return conn.fetch_token(authorization_header)


def get_auth_token_whoami(conn: Connection) -> JsonDict:
    """``GET /auth/token/whoami``: the payload of the bearer token (user, workspace, roles)."""
    return _object(conn, "GET", "/auth/token/whoami")


def get_auth_whoami(conn: Connection, authorization_header: str | None = None) -> JsonDict:
    """``GET /auth/whoami`` (``Token <apiKey>`` auth): ``{user, userFeatures}``."""
    header = authorization_header or conn.token_auth_header()
    return _object(conn, "GET", "/auth/whoami", headers={"Authorization": header}, auth=False)


def get_htc_gcp_clusters(conn: Connection, workspace_id: str) -> JsonDict:
    """``GET /htc/gcp/clusters/{workspaceId}``."""
    return _object(conn, "GET", f"/htc/gcp/clusters/{segment(workspace_id)}")


@overload
def get_htc_regions(
    conn: Connection, region: None = None, *, cloud_provider: str | None = None, enabled: bool | None = None
) -> list[JsonDict]: ...
@overload
def get_htc_regions(
    conn: Connection, region: str, *, cloud_provider: str | None = None, enabled: bool | None = None
) -> JsonDict: ...
def get_htc_regions(
    conn: Connection,
    region: str | None = None,
    *,
    cloud_provider: str | None = None,
    enabled: bool | None = None,
) -> list[JsonDict] | JsonDict:
    """``GET /htc/regions`` (a list of region settings) or ``GET /htc/regions/{region}``."""
    if region is not None:
        return _object(conn, "GET", f"/htc/regions/{segment(region)}")
    return conn.get_list("/htc/regions", {"cloudProvider": cloud_provider, "enabled": enabled})


def get_htc_metrics(conn: Connection) -> str:
    """``GET /htc/metrics``: workspace metrics in the Prometheus text format."""
    return conn.get_text("/htc/metrics", headers={"Accept": "text/plain"})


# -- projects --------------------------------------------------------------------------------


def iter_htc_projects(
    conn: Connection,
    *,
    only_my_projects: bool | None = None,
    page_size: int | None = None,
    max_items: int | None = None,
) -> Iterator[JsonDict]:
    """Lazily yield the projects of ``GET /htc/projects``."""
    return _items(conn, "/htc/projects", page_size, max_items, onlyMyProjects=only_my_projects)


@overload
def get_htc_projects(
    conn: Connection,
    project_id: None = None,
    *,
    only_my_projects: bool | None = None,
    page_size: int | None = None,
    max_items: int | None = None,
) -> list[JsonDict]: ...
@overload
def get_htc_projects(
    conn: Connection,
    project_id: str,
    *,
    only_my_projects: bool | None = None,
    page_size: int | None = None,
    max_items: int | None = None,
) -> JsonDict: ...
def get_htc_projects(
    conn: Connection,
    project_id: str | None = None,
    *,
    only_my_projects: bool | None = None,
    page_size: int | None = None,
    max_items: int | None = None,
) -> list[JsonDict] | JsonDict:
    """``GET /htc/projects`` (all pages) or ``GET /htc/projects/{projectId}``."""
    if project_id is not None:
        return _object(conn, "GET", _project(project_id))
    return list(
        iter_htc_projects(conn, only_my_projects=only_my_projects, page_size=page_size, max_items=max_items)
    )


def post_htc_projects(conn: Connection, payload: Mapping[str, Any]) -> JsonDict:
    """``POST /htc/projects`` with ``{projectName, projectDescription, regions?}``."""
    return _object(conn, "POST", "/htc/projects", payload)


def patch_htc_projects(conn: Connection, project_id: str, payload: Mapping[str, Any]) -> JsonDict:
    """``PATCH /htc/projects/{projectId}`` with ``{regions: [...]}`` (adds regions)."""
    return _object(conn, "PATCH", _project(project_id), payload)


def get_htc_projects_dimensions(conn: Connection, project_id: str) -> list[JsonDict]:
    """``GET /htc/projects/{projectId}/dimensions``: the project's compute environments."""
    return conn.get_list(f"{_project(project_id)}/dimensions")


def put_htc_projects_dimensions(
    conn: Connection, project_id: str, payload: Sequence[Mapping[str, Any]]
) -> list[JsonDict]:
    """``PUT /htc/projects/{projectId}/dimensions``; an empty list removes every restriction."""
    result: list[JsonDict] = conn.put(f"{_project(project_id)}/dimensions", [dict(p) for p in payload])
    return result


@overload
def get_htc_projects_limits(conn: Connection, project_id: str, id: None = None) -> list[JsonDict]: ...
@overload
def get_htc_projects_limits(conn: Connection, project_id: str, id: int) -> JsonDict: ...
def get_htc_projects_limits(
    conn: Connection, project_id: str, id: int | None = None
) -> list[JsonDict] | JsonDict:
    """``GET /htc/projects/{projectId}/limits`` (a list) or ``…/limits/{id}``."""
    if id is not None:
        return _object(conn, "GET", f"{_project(project_id)}/limits/{segment(id)}")
    return conn.get_list(f"{_project(project_id)}/limits")


def post_htc_projects_limits(conn: Connection, project_id: str, payload: Mapping[str, Any]) -> JsonDict:
    """``POST /htc/projects/{projectId}/limits`` with ``{vCPUs, modifierRole}``."""
    return _object(conn, "POST", f"{_project(project_id)}/limits", payload)


def delete_htc_projects_limits(conn: Connection, project_id: str, id: int | None = None) -> None:
    """``DELETE /htc/projects/{projectId}/limits`` (all) or ``…/limits/{id}``."""
    path = f"{_project(project_id)}/limits" + (f"/{segment(id)}" if id is not None else "")
    conn.delete(path)


def patch_htc_projects_limits(
    conn: Connection, project_id: str, id: int, payload: Mapping[str, Any]
) -> JsonDict:
    """``PATCH /htc/projects/{projectId}/limits/{id}`` with ``{vCPUs}``."""
    return _object(conn, "PATCH", f"{_project(project_id)}/limits/{segment(id)}", payload)


def get_htc_projects_task_retention_policy(conn: Connection, project_id: str) -> JsonDict:
    """``GET /htc/projects/{projectId}/task-retention-policy``.

    NotFound means the project has no policy of its own: the workspace policy applies.
    """
    return _object(conn, "GET", f"{_project(project_id)}/task-retention-policy")


def put_htc_projects_task_retention_policy(
    conn: Connection, project_id: str, payload: Mapping[str, Any]
) -> JsonDict:
    """``PUT /htc/projects/{projectId}/task-retention-policy``: ``{deleteAfter, archiveAfter}`` (hours)."""
    return _object(conn, "PUT", f"{_project(project_id)}/task-retention-policy", payload)


def delete_htc_projects_task_retention_policy(conn: Connection, project_id: str) -> None:
    """``DELETE /htc/projects/{projectId}/task-retention-policy``."""
    conn.delete(f"{_project(project_id)}/task-retention-policy")


# -- tasks -----------------------------------------------------------------------------------


def iter_htc_projects_tasks(
    conn: Connection, project_id: str, *, page_size: int | None = None, max_items: int | None = None
) -> Iterator[JsonDict]:
    """Lazily yield the tasks of a project (ARCHIVED and DELETED ones included)."""
    return _items(conn, f"{_project(project_id)}/tasks", page_size, max_items)


@overload
def get_htc_projects_tasks(
    conn: Connection,
    project_id: str,
    task_id: None = None,
    *,
    page_size: int | None = None,
    max_items: int | None = None,
) -> list[JsonDict]: ...
@overload
def get_htc_projects_tasks(
    conn: Connection,
    project_id: str,
    task_id: str,
    *,
    page_size: int | None = None,
    max_items: int | None = None,
) -> JsonDict: ...
def get_htc_projects_tasks(
    conn: Connection,
    project_id: str,
    task_id: str | None = None,
    *,
    page_size: int | None = None,
    max_items: int | None = None,
) -> list[JsonDict] | JsonDict:
    """``GET /htc/projects/{projectId}/tasks`` (all pages) or ``…/tasks/{taskId}``."""
    if task_id is not None:
        return _object(conn, "GET", _task(project_id, task_id))
    return list(iter_htc_projects_tasks(conn, project_id, page_size=page_size, max_items=max_items))


def post_htc_projects_tasks(conn: Connection, project_id: str, payload: Mapping[str, Any]) -> JsonDict:
    """``POST /htc/projects/{projectId}/tasks`` with ``{taskName, taskDescription}`` (not idempotent)."""
    return _object(conn, "POST", f"{_project(project_id)}/tasks", payload)


def delete_htc_projects_tasks(conn: Connection, project_id: str, task_id: str) -> JsonDict:
    """``DELETE /htc/projects/{projectId}/tasks/{taskId}``: returns the task, now DELETED."""
    return _object(conn, "DELETE", _task(project_id, task_id))


def patch_htc_projects_tasks(
    conn: Connection, project_id: str, task_id: str, payload: Mapping[str, Any]
) -> JsonDict:
    """``PATCH /htc/projects/{projectId}/tasks/{taskId}`` with ``{lifecycleStatus: ARCHIVED|ACTIVE}``."""
    return _object(conn, "PATCH", _task(project_id, task_id), payload)


def get_htc_projects_tasks_summary_statistics(conn: Connection, project_id: str, task_id: str) -> JsonDict:
    """``GET …/tasks/{taskId}/summary-statistics``: ``{group: null, jobStatuses: {STATUS: count}}``."""
    return _object(conn, "GET", f"{_task(project_id, task_id)}/summary-statistics")


def get_htc_projects_tasks_group_summary_statistics(
    conn: Connection,
    project_id: str,
    task_id: str,
    group: str | Sequence[str] | None = None,
    *,
    page_size: int | None = None,
    max_items: int | None = None,
) -> list[JsonDict]:
    """``GET …/tasks/{taskId}/group-summary-statistics``: one ``{group, jobStatuses}`` per group
    (only the given ``group``/groups if set)."""
    groups = [group] if isinstance(group, str) else (list(group) if group is not None else None)
    path = f"{_task(project_id, task_id)}/group-summary-statistics"
    return list(_items(conn, path, page_size, max_items, group=groups))


def get_htc_projects_tasks_groups(
    conn: Connection,
    project_id: str,
    task_id: str,
    *,
    page_size: int | None = None,
    max_items: int | None = None,
) -> list[str]:
    """``GET …/tasks/{taskId}/groups``: the names of the task's groups."""
    return list(_items(conn, f"{_task(project_id, task_id)}/groups", page_size, max_items))


# -- jobs ------------------------------------------------------------------------------------


def iter_htc_projects_tasks_jobs(
    conn: Connection,
    project_id: str,
    task_id: str,
    *,
    group: str | None = None,
    status: str | None = None,
    job_ids: Sequence[str] | None = None,
    view_type: str | None = None,
    page_size: int | None = None,
    max_items: int | None = None,
) -> Iterator[JsonDict]:
    """Lazily yield the jobs of a task, filtered by group, status and job IDs."""
    return _items(
        conn,
        f"{_task(project_id, task_id)}/jobs",
        page_size,
        max_items,
        group=group,
        status=status,
        jobId=list(job_ids) if job_ids is not None else None,
        viewType=view_type,
    )


@overload
def get_htc_projects_tasks_jobs(
    conn: Connection,
    project_id: str,
    task_id: str,
    job_id: None = None,
    *,
    group: str | None = None,
    status: str | None = None,
    job_ids: Sequence[str] | None = None,
    view_type: str | None = None,
    page_size: int | None = None,
    max_items: int | None = None,
) -> list[JsonDict]: ...
@overload
def get_htc_projects_tasks_jobs(
    conn: Connection,
    project_id: str,
    task_id: str,
    job_id: str,
    *,
    group: str | None = None,
    status: str | None = None,
    job_ids: Sequence[str] | None = None,
    view_type: str | None = None,
    page_size: int | None = None,
    max_items: int | None = None,
) -> JsonDict: ...
def get_htc_projects_tasks_jobs(
    conn: Connection,
    project_id: str,
    task_id: str,
    job_id: str | None = None,
    *,
    group: str | None = None,
    status: str | None = None,
    job_ids: Sequence[str] | None = None,
    view_type: str | None = None,
    page_size: int | None = None,
    max_items: int | None = None,
) -> list[JsonDict] | JsonDict:
    """``GET …/tasks/{taskId}/jobs`` (all pages) or ``…/jobs/{jobId}`` (``"{parentJobId}:{index}"``)."""
    if job_id is not None:
        return _object(conn, "GET", _job(project_id, task_id, job_id))
    return list(
        iter_htc_projects_tasks_jobs(
            conn,
            project_id,
            task_id,
            group=group,
            status=status,
            job_ids=job_ids,
            view_type=view_type,
            page_size=page_size,
            max_items=max_items,
        )
    )


def post_htc_projects_tasks_jobs_batch(
    conn: Connection,
    project_id: str,
    task_id: str,
    payload: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    group: str | None = None,
) -> list[JsonDict]:
    """``POST …/tasks/{taskId}/jobs/batch[?group=G]``.

    ``payload`` is a list of HTCJobSubmitRequest objects (a single object is wrapped). Returns
    one echo per request with ``parentJobId``, ``group``, ``batchSize``, ``projectId``, ``taskId``.
    """
    body = [dict(payload)] if isinstance(payload, Mapping) else [dict(p) for p in payload]
    result: list[JsonDict] = conn.post(f"{_task(project_id, task_id)}/jobs/batch", body, {"group": group})
    return result


def post_htc_projects_tasks_jobs_cancel(
    conn: Connection, project_id: str, task_id: str, group: str | None = None
) -> None:
    """``POST …/tasks/{taskId}/jobs/cancel[?group=G]``: asks to cancel every unfinished job."""
    conn.post(f"{_task(project_id, task_id)}/jobs/cancel", None, {"group": group})


def iter_htc_projects_tasks_jobs_logs(
    conn: Connection,
    project_id: str,
    task_id: str,
    job_id: str,
    sort: LogSort | None = None,
    page_size: int | None = 5000,
    max_items: int | None = None,
) -> Iterator[JsonDict]:
    """Lazily yield ``{timestamp, message}`` log lines (newest first unless ``sort="asc"``)."""
    return _items(conn, f"{_job(project_id, task_id, job_id)}/logs", page_size, max_items, sort=sort)


def get_htc_projects_tasks_jobs_logs(
    conn: Connection,
    project_id: str,
    task_id: str,
    job_id: str,
    sort: LogSort | None = None,
    page_size: int | None = 5000,
    max_items: int | None = None,
) -> list[JsonDict]:
    """``GET …/jobs/{jobId}/logs``: ``{timestamp, message}`` lines; the server sorts newest first
    by default, ``sort="asc"`` gives them oldest first."""
    return list(
        iter_htc_projects_tasks_jobs_logs(
            conn, project_id, task_id, job_id, sort=sort, page_size=page_size, max_items=max_items
        )
    )


def iter_htc_projects_tasks_jobs_events(
    conn: Connection,
    project_id: str,
    task_id: str,
    job_id: str,
    *,
    page_size: int | None = None,
    max_items: int | None = None,
) -> Iterator[JsonDict]:
    """Lazily yield the status events of a job."""
    return _items(conn, f"{_job(project_id, task_id, job_id)}/events", page_size, max_items)


def get_htc_projects_tasks_jobs_events(
    conn: Connection,
    project_id: str,
    task_id: str,
    job_id: str,
    *,
    page_size: int | None = None,
    max_items: int | None = None,
) -> list[JsonDict]:
    """``GET …/jobs/{jobId}/events``: the job's status events (RescaleJobStatusEvent)."""
    return list(
        iter_htc_projects_tasks_jobs_events(
            conn, project_id, task_id, job_id, page_size=page_size, max_items=max_items
        )
    )


# -- workspaces ------------------------------------------------------------------------------


def get_htc_workspaces_dimensions(conn: Connection, workspace_id: str) -> list[JsonDict]:
    """``GET /htc/workspaces/{workspaceId}/dimensions``."""
    return conn.get_list(f"/htc/workspaces/{segment(workspace_id)}/dimensions")


def get_htc_workspaces_limits(conn: Connection, workspace_id: str) -> JsonDict:
    """``GET /htc/workspaces/{workspaceId}/limits``: ``{vCPUs, ...}``."""
    return _object(conn, "GET", f"/htc/workspaces/{segment(workspace_id)}/limits")


def get_htc_workspaces_task_retention_policy(conn: Connection, workspace_id: str) -> JsonDict:
    """``GET /htc/workspaces/{workspaceId}/task-retention-policy``."""
    return _object(conn, "GET", f"/htc/workspaces/{segment(workspace_id)}/task-retention-policy")


def put_htc_workspaces_task_retention_policy(
    conn: Connection, workspace_id: str, payload: Mapping[str, Any]
) -> JsonDict:
    """``PUT /htc/workspaces/{workspaceId}/task-retention-policy`` (workspace admins only)."""
    return _object(conn, "PUT", f"/htc/workspaces/{segment(workspace_id)}/task-retention-policy", payload)


# The names the rescalehtc documentation uses for the two workspace retention-policy calls.
get_htc_task_retention_policy = get_htc_workspaces_task_retention_policy
put_htc_task_retention_policy = put_htc_workspaces_task_retention_policy
