"""Authorization rules, pure: roles rank, and job tokens reach only their own task."""

from __future__ import annotations

from openhtc.auth.tokens import Principal
from openhtc.domain.enums import Role
from openhtc.domain.errors import NotFound, PermissionDenied

_RANK = {Role.MEMBER.value: 0, Role.PROJECT_ADMIN.value: 1, Role.WORKSPACE_ADMIN.value: 2}


def require_role(principal: Principal, minimum: Role, action: str) -> None:
    """Users below ``minimum`` (and every job token) may not ``action``."""
    if principal.is_job or _RANK.get(principal.role, -1) < _RANK[minimum.value]:
        raise PermissionDenied(f"{action} requires the {minimum.value} role")


def require_user(principal: Principal, action: str) -> None:
    if principal.is_job:
        raise PermissionDenied(f"job tokens cannot {action}")


def check_project_scope(principal: Principal, project_id: str) -> None:
    if principal.is_job and principal.project_id != project_id:
        raise NotFound(f"project {project_id} not found")


def check_task_scope(principal: Principal, project_id: str, task_id: str) -> None:
    if principal.is_job and (principal.project_id != project_id or principal.task_id != task_id):
        raise NotFound(f"task {task_id} not found")


def check_found(principal: Principal, project_id: str, task_id: str, project: object, task: object) -> None:
    """A project and a task read for a request (None: not found in the caller's workspace or in
    that project), checked in the order the API answers: the project, the scope, the task."""
    if project is None:
        raise NotFound(f"project {project_id} not found")
    check_task_scope(principal, project_id, task_id)
    if task is None:
        raise NotFound(f"task {task_id} not found in project {project_id}")
