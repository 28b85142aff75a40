"""Schemathesis over the served API, on SQLite and PostgreSQL (issue 13: no 500s on any input,
and every documented response matches Rescale's OpenAPI file as patched by tests/spec/patch.py).

Every operation of the file gets ``EXAMPLES`` generated requests, valid and invalid ones (fixed
seed: the same cases on every run), half of them aimed at real objects (the ids of a project,
task, job and limit made first) so they get past the 404s. Two checks: ``not_a_server_error``
(no 5xx) and ``response_schema_conformance`` (a documented status's body matches its schema).
Failures are collected over all operations and reported together. The server runs the noop
runtime: fuzzed commands are stored and scheduled, never executed on this machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance

SPEC_DIR = Path(__file__).parent / "spec"
# Cases per operation: ~60 operations x 30 take about a minute per database. Deeper local runs:
# OPENHTC_FUZZ_EXAMPLES=500.
EXAMPLES = int(os.environ.get("OPENHTC_FUZZ_EXAMPLES", "30"))


def _patched_spec() -> dict[str, Any]:
    loader = importlib.util.spec_from_file_location("openhtc_spec_patch", SPEC_DIR / "patch.py")
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    spec = json.loads((SPEC_DIR / "rescale-htc-openapi.json").read_text())
    return dict(module.patched(spec))


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    start_server: Callable[..., Any],
) -> None:
    server = start_server(runtime="noop")
    api = server.api()
    pid, tid = api.project_and_task()
    parent = api.submit_one(pid, tid, api.job_request(["true"], batch_size=2))["parentJobId"]
    api.wait_terminal(pid, tid, 2)
    limit = api.post(f"/htc/projects/{pid}/limits", {"vCPUs": 4, "modifierRole": "PROJECT_ADMIN"}, expect=201)
    real = {
        "projectId": pid,
        "taskId": tid,
        "jobId": f"{parent}:0",
        "workspaceId": api.get("/auth/token/whoami")["workspaceId"],
        "region": "AWS_US_EAST_1",
        "id": limit["id"],
    }
    headers = {"Authorization": f"Bearer {server.token()}"}
    schema = schemathesis.openapi.from_dict(_patched_spec())
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        failures += _fuzz(operation, server.api_url, headers, real)
    report = "\n".join(failures[:60])
    assert not failures, f"{len(failures)} failing cases:\n{report}\n{server.log_tail(40)}"


def _fuzz(operation: Any, base_url: str, headers: dict[str, str], real: dict[str, Any]) -> list[str]:
    found: list[str] = []
    seen: set[str] = set()
    # Valid requests and invalid ones (wrong types, out-of-range values, missing fields).
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
    )

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases, aim=st.booleans())
    def run(case: Any, aim: bool) -> None:
        if aim and case.path_parameters:
            for name in case.path_parameters:
                if name in real:
                    case.path_parameters[name] = real[name]
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        try:
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
        except (Failure, FailureGroup) as exc:
            for failure in exc.exceptions if isinstance(exc, FailureGroup) else [exc]:
                text = " ".join(f"{failure.title}: {failure.message}".split())[:500]
                key = f"{response.status_code}:{text[:160]}"
                if key not in seen:
                    seen.add(key)
                    found.append(
                        f"{operation.method.upper()} {operation.path} -> {response.status_code}: {text}\n"
                        f"    {case.as_curl_command()[:300]}"
                    )

    run()
    return found


pytestmark = pytest.mark.timeout(900)
