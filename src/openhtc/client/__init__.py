"""Python client for openhtc and any Rescale HTC compatible server, built on httpx.

Two layers:

- :mod:`openhtc.client.api`: plumbing, one function per REST route, named as in ``rescalehtc``
  (``get_htc_projects_tasks_jobs(conn, project_id, task_id)``), returning decoded JSON.
- :class:`Session` ▸ :class:`Project` ▸ :class:`Task` ▸ :class:`JobBatch` ▸ :class:`Job`: the
  convenient objects built on it.

Function tasks (a Lambda-style handler mapped over JSON events): ``Task.map`` and
``Task.submit_functions`` (:mod:`openhtc.client.functions`); :mod:`openhtc.client.htcgrid` ports
HTC-Grid client code.

Both raise :class:`HtcError` subclasses (``NotFound``, ``Unauthorized``, …) on failure.
"""

from __future__ import annotations

from openhtc.client import api, htcgrid, live
from openhtc.client._config import StoredCredentials, credentials_path, load_credentials, save_credentials
from openhtc.client._errors import (
    BadRequest,
    CredentialsError,
    Forbidden,
    HtcConnectionError,
    HtcError,
    MethodNotAllowed,
    NotFound,
    ServerError,
    Unauthorized,
)
from openhtc.client._requests import DEFAULT_IMAGE, env_pairs, job_request, normalize_priority
from openhtc.client._transport import (
    DEFAULT_URL,
    Connection,
    Credentials,
    jwt_claims,
    normalize_base_url,
    resolve_credentials,
)
from openhtc.client.functions import FunctionBatch, FunctionCall, FunctionCounts, FunctionError
from openhtc.client.session import (
    JOB_STATUSES,
    TERMINAL_STATUSES,
    Job,
    JobBatch,
    Project,
    Session,
    StatusCounts,
    Task,
)

__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_URL",
    "JOB_STATUSES",
    "TERMINAL_STATUSES",
    "BadRequest",
    "Connection",
    "Credentials",
    "CredentialsError",
    "Forbidden",
    "FunctionBatch",
    "FunctionCall",
    "FunctionCounts",
    "FunctionError",
    "HtcConnectionError",
    "HtcError",
    "Job",
    "JobBatch",
    "MethodNotAllowed",
    "NotFound",
    "Project",
    "ServerError",
    "Session",
    "StatusCounts",
    "StoredCredentials",
    "Task",
    "Unauthorized",
    "api",
    "credentials_path",
    "env_pairs",
    "htcgrid",
    "job_request",
    "jwt_claims",
    "live",
    "load_credentials",
    "normalize_base_url",
    "normalize_priority",
    "resolve_credentials",
    "save_credentials",
]
