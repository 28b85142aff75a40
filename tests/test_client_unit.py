"""Unit tests of openhtc.client: transport, tokens, pagination, errors, credentials, sessions.

Everything runs against ``httpx.MockTransport``; no server, no network.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from openhtc.client import (
    BadRequest,
    Connection,
    CredentialsError,
    HtcConnectionError,
    HtcError,
    NotFound,
    ServerError,
    Session,
    StatusCounts,
    Task,
    Unauthorized,
    api,
    job_request,
    jwt_claims,
    load_credentials,
    normalize_base_url,
    normalize_priority,
    resolve_credentials,
    save_credentials,
)

pytestmark = pytest.mark.unit  # pure code: make test-unit runs it

BASE = "http://htc.test/api/v1"
Handler = Callable[[httpx.Request], httpx.Response]


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_jwt(claims: dict[str, Any]) -> str:
    def enc(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'RS256', 'typ': 'JWT'})}.{enc(claims)}.c2ln"


class FakeServer:
    """Records requests; answers /auth/token itself and delegates everything else to ``handler``."""

    def __init__(self, handler: Handler | None = None, *, expires_in: int = 21600) -> None:
        self.handler = handler or (lambda request: httpx.Response(404, json={"error": "NOT_FOUND"}))
        self.expires_in = expires_in
        self.requests: list[httpx.Request] = []
        self.tokens_issued = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/auth/token"):
            auth = request.headers.get("Authorization", "")
            if auth not in ("Token good-key", "Refresh good-refresh"):
                return httpx.Response(401, json={"error": "invalid_token", "errorDescription": "bad API key"})
            self.tokens_issued += 1
            token = f"jwt-{self.tokens_issued}"
            return httpx.Response(200, json={"tokenValue": token, "expiresIn": self.expires_in})
        return self.handler(request)

    def api_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if not r.url.path.endswith("/auth/token")]


def connect(server: FakeServer, clock: Clock | None = None, **kwargs: Any) -> Connection:
    kwargs.setdefault("api_key", "good-key")
    return Connection(BASE, transport=httpx.MockTransport(server), clock=clock or Clock(), **kwargs)


def ok(body: Any = None, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body) if body is not None else httpx.Response(status)


# -- base URL --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://h:8080", "http://h:8080/api/v1"),
        ("http://h:8080/", "http://h:8080/api/v1"),
        ("http://h:8080/api/v1", "http://h:8080/api/v1"),
        ("http://h:8080/api/v1/", "http://h:8080/api/v1"),
        ("h:8080", "http://h:8080/api/v1"),
        ("https://proxy.example/htc", "https://proxy.example/htc/api/v1"),
    ],
)
def test_base_url_is_normalized_with_or_without_api_prefix(given: str, expected: str) -> None:
    assert normalize_base_url(given) == expected


def test_path_segments_are_quoted_but_job_ids_keep_their_colon() -> None:
    server = FakeServer(lambda r: ok({"jobUUID": "abc:3"}))
    with connect(server) as conn:
        api.get_htc_projects_tasks_jobs(conn, "p 1", "t/2", "abc:3")
    assert server.api_requests()[0].url.raw_path == b"/api/v1/htc/projects/p%201/tasks/t%2F2/jobs/abc:3"


# -- tokens ----------------------------------------------------------------------------------


def test_api_key_is_exchanged_once_for_a_bearer_token() -> None:
    server = FakeServer(lambda r: ok({"items": []}))
    with connect(server) as conn:
        api.get_htc_projects(conn)
        api.get_htc_projects(conn)
    token_requests = [r for r in server.requests if r.url.path == "/api/v1/auth/token"]
    assert len(token_requests) == 1
    assert token_requests[0].headers["Authorization"] == "Token good-key"
    assert all(r.headers["Authorization"] == "Bearer jwt-1" for r in server.api_requests())


def test_token_is_renewed_when_less_than_ten_minutes_remain() -> None:
    clock = Clock()
    server = FakeServer(lambda r: ok({"items": []}), expires_in=3600)
    with connect(server, clock) as conn:
        api.get_htc_projects(conn)
        clock.now += 3600 - 601  # 10 min + 1 s left: keep
        api.get_htc_projects(conn)
        assert server.tokens_issued == 1
        clock.now += 2  # under 10 min left: renew
        api.get_htc_projects(conn)
    assert server.tokens_issued == 2
    assert server.api_requests()[-1].headers["Authorization"] == "Bearer jwt-2"


def test_short_lived_tokens_are_not_renewed_on_every_call() -> None:
    clock = Clock()
    server = FakeServer(lambda r: ok({"items": []}), expires_in=300)
    with connect(server, clock) as conn:
        for _ in range(5):
            api.get_htc_projects(conn)
        assert server.tokens_issued == 1
        clock.now += 151  # past half the lifetime
        api.get_htc_projects(conn)
    assert server.tokens_issued == 2


def test_refresh_token_authenticates_with_refresh_scheme() -> None:
    server = FakeServer(lambda r: ok({"sub": "u"}))
    with connect(server, api_key=None, refresh_token="good-refresh") as conn:
        assert api.get_auth_token_whoami(conn) == {"sub": "u"}
    assert server.requests[0].headers["Authorization"] == "Refresh good-refresh"


def test_bearer_token_is_used_as_given_without_token_exchange() -> None:
    clock = Clock()
    token = make_jwt({"sub": "job", "iat": clock.now, "exp": clock.now + 3600})
    server = FakeServer(lambda r: ok({"items": []}))
    with connect(server, clock, api_key=None, bearer_token=token) as conn:
        api.get_htc_projects(conn)
    assert server.tokens_issued == 0
    assert server.requests[0].headers["Authorization"] == f"Bearer {token}"


def test_expiring_bearer_token_is_replaced_using_the_refresh_token() -> None:
    clock = Clock()
    token = make_jwt({"iat": clock.now - 3500, "exp": clock.now + 100})
    server = FakeServer(lambda r: ok({"items": []}))
    with connect(server, clock, api_key=None, bearer_token=token, refresh_token="good-refresh") as conn:
        api.get_htc_projects(conn)
    assert server.tokens_issued == 1
    assert server.api_requests()[0].headers["Authorization"] == "Bearer jwt-1"


def test_a_401_is_retried_once_with_a_new_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer jwt-1":
            return httpx.Response(401, json={"error": "invalid_token", "errorDescription": "token revoked"})
        return ok({"items": [{"projectId": "p"}]})

    server = FakeServer(handler)
    with connect(server) as conn:
        assert api.get_htc_projects(conn) == [{"projectId": "p"}]
    assert server.tokens_issued == 2


def test_bad_api_key_raises_unauthorized_with_the_server_description() -> None:
    server = FakeServer()
    with connect(server, api_key="wrong") as conn, pytest.raises(Unauthorized) as info:
        api.get_htc_projects(conn)
    assert info.value.status_code == 401
    assert info.value.error_type == "invalid_token"
    assert info.value.message == "bad API key"


def test_no_credentials_raises_credentials_error_before_any_request() -> None:
    server = FakeServer()
    with connect(server, api_key=None) as conn, pytest.raises(CredentialsError):
        api.get_htc_projects(conn)
    assert server.requests == []


def test_jwks_needs_no_credentials() -> None:
    server = FakeServer(lambda r: ok({"keys": []}))
    with connect(server, api_key=None) as conn:
        assert api.get_well_known_jwks(conn) == {"keys": []}
    assert "Authorization" not in server.requests[0].headers


def test_jwt_claims_decodes_the_payload_and_tolerates_garbage() -> None:
    assert jwt_claims(make_jwt({"sub": "x", "exp": 5})) == {"sub": "x", "exp": 5}
    assert jwt_claims("not-a-jwt") == {}
    assert jwt_claims("a.!!!.c") == {}


# -- pagination ------------------------------------------------------------------------------


def paged_handler(pages: dict[str | None, dict[str, Any]], path: str) -> Handler:
    """Serve ``pages`` keyed by pageIndex at ``path``; ``next`` links are absolute."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == path
        return ok(pages[request.url.params.get("pageIndex")])

    return handler


def test_list_follows_absolute_next_until_it_is_absent() -> None:
    path = "/api/v1/htc/projects/p/tasks/t/jobs"
    nxt = f"http://htc.test{path}?status=RUNNING&pageIndex="
    pages: dict[str | None, dict[str, Any]] = {
        None: {"items": [{"jobUUID": "a:0"}, {"jobUUID": "a:1"}], "next": nxt + "c2"},
        "c2": {"items": [{"jobUUID": "a:2"}], "next": nxt + "c3"},
        "c3": {"items": [{"jobUUID": "a:3"}]},
    }
    server = FakeServer(paged_handler(pages, path))
    with connect(server) as conn:
        jobs = api.get_htc_projects_tasks_jobs(conn, "p", "t", status="RUNNING")
    assert [j["jobUUID"] for j in jobs] == ["a:0", "a:1", "a:2", "a:3"]
    sent = server.api_requests()
    assert [r.url.params.get("pageIndex") for r in sent] == [None, "c2", "c3"]
    assert all(r.url.params.get("status") == "RUNNING" for r in sent)


def test_iterator_variant_fetches_pages_lazily() -> None:
    path = "/api/v1/htc/projects"
    pages: dict[str | None, dict[str, Any]] = {
        None: {"items": [{"projectId": "1"}], "next": f"http://htc.test{path}?pageIndex=2"},
        "2": {"items": [{"projectId": "2"}]},
    }
    server = FakeServer(paged_handler(pages, path))
    with connect(server) as conn:
        it = api.iter_htc_projects(conn)
        assert server.api_requests() == []
        assert next(it) == {"projectId": "1"}
        assert len(server.api_requests()) == 1
        assert list(it) == [{"projectId": "2"}]


def test_max_items_stops_early_and_asks_for_a_small_page() -> None:
    path = "/api/v1/htc/projects/p/tasks/t/jobs/a:0/logs"
    pages: dict[str | None, dict[str, Any]] = {
        None: {"items": [{"message": "1"}, {"message": "2"}], "next": f"http://htc.test{path}?pageIndex=x"},
        "x": {"items": [{"message": "3"}]},
    }
    server = FakeServer(paged_handler(pages, path))
    with connect(server) as conn:
        lines = api.get_htc_projects_tasks_jobs_logs(conn, "p", "t", "a:0", sort="asc", max_items=2)
    assert [line["message"] for line in lines] == ["1", "2"]
    sent = server.api_requests()
    assert len(sent) == 1
    assert sent[0].url.params["pageSize"] == "2"
    assert sent[0].url.params["sort"] == "asc"


def test_next_on_another_origin_is_rebased_onto_our_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "htc.test"
        if request.url.params.get("pageIndex") == "2":
            return ok({"items": [2]})
        return ok({"items": [1], "next": "http://10.0.0.5:8080/htc/projects?pageSize=1&pageIndex=2"})

    server = FakeServer(handler)
    with connect(server) as conn:
        assert api.get_htc_projects(conn, page_size=1) == [1, 2]
    second = server.api_requests()[1]
    assert str(second.url) == "http://htc.test/api/v1/htc/projects?pageSize=1&pageIndex=2"


def test_a_repeated_next_is_reported_instead_of_looping_forever() -> None:
    server = FakeServer(lambda r: ok({"items": [1], "next": f"{BASE}/htc/projects?pageIndex=same"}))
    with connect(server) as conn, pytest.raises(HtcError, match="pagination loop"):
        api.get_htc_projects(conn)


def test_an_empty_page_ends_pagination_even_with_next() -> None:
    server = FakeServer(lambda r: ok({"items": [], "next": f"{BASE}/htc/projects?pageIndex=more"}))
    with connect(server) as conn:
        assert api.get_htc_projects(conn) == []
    assert len(server.api_requests()) == 1


def test_bare_array_responses_are_returned_as_lists() -> None:
    server = FakeServer(lambda r: ok([{"region": "AWS_US_EAST_1"}]))
    with connect(server) as conn:
        assert api.get_htc_regions(conn, enabled=True) == [{"region": "AWS_US_EAST_1"}]
    assert server.api_requests()[0].url.params["enabled"] == "true"


# -- errors ----------------------------------------------------------------------------------


SUPERSET = {"error": "NOT_FOUND", "errorType": "NOT_FOUND", "errorDescription": "no", "message": "Task t"}
VALIDATION = {"errorType": "VALIDATION", "errorDescription": "bad batchSize"}
IMAGE = {"error": "IMAGE_UNAVAILABLE", "message": "Image x is unavailable"}


@pytest.mark.parametrize(
    ("status", "body", "cls", "error_type", "message"),
    [
        (404, SUPERSET, NotFound, "NOT_FOUND", "Task t"),
        (400, VALIDATION, BadRequest, "VALIDATION", "bad batchSize"),
        (404, IMAGE, NotFound, "IMAGE_UNAVAILABLE", "Image x is unavailable"),
        (418, {}, HtcError, None, "I'm a teapot"),
    ],
)
def test_error_bodies_are_parsed_into_typed_errors(
    status: int, body: dict[str, Any], cls: type[HtcError], error_type: str | None, message: str
) -> None:
    server = FakeServer(lambda r: httpx.Response(status, json=body) if body else httpx.Response(status))
    with connect(server) as conn, pytest.raises(cls) as info:
        api.get_htc_projects(conn, "p")
    err = info.value
    assert type(err) is cls
    assert (err.status_code, err.error_type, err.message) == (status, error_type, message)
    assert err.response is not None and err.response.status_code == status
    assert str(err).startswith(f"HTTP {status}")


def test_non_json_server_errors_keep_their_text() -> None:
    server = FakeServer(lambda r: httpx.Response(502, text="upstream down"))
    with connect(server) as conn, pytest.raises(ServerError) as info:
        api.get_htc_projects(conn)
    assert info.value.message == "upstream down"


def test_unreachable_server_raises_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with (
        Connection(BASE, api_key="k", transport=httpx.MockTransport(refuse)) as conn,
        pytest.raises(HtcConnectionError) as info,
    ):
        api.get_htc_projects(conn)
    assert "connection refused" in info.value.message
    assert info.value.status_code is None
    assert isinstance(info.value.__cause__, httpx.ConnectError)


# -- credential resolution -------------------------------------------------------------------


def test_explicit_arguments_beat_environment_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "credentials.json"
    save_credentials("http://file:1", "file-key", cfg)
    env = {"OPENHTC_URL": "http://env:2", "OPENHTC_API_KEY": "env-key"}
    creds = resolve_credentials("http://arg:3", "arg-key", env=env, config_path=cfg)
    assert (creds.url, creds.api_key, creds.source) == ("http://arg:3/api/v1", "arg-key", "explicit")


def test_environment_key_beats_job_tokens_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "credentials.json"
    save_credentials("http://env:2", "file-key", cfg)
    env = {
        "OPENHTC_URL": "http://env:2",
        "OPENHTC_API_KEY": "env-key",
        "RESCALE_HTC_REFRESH_TOKEN": "rt",
    }
    creds = resolve_credentials(env=env, config_path=cfg)
    assert (creds.url, creds.api_key, creds.refresh_token) == ("http://env:2/api/v1", "env-key", None)


def test_in_job_environment_provides_tokens_and_api_url(tmp_path: Path) -> None:
    env = {
        "OPENHTC_API_URL": "http://server:8080/api/v1",
        "RESCALE_HTC_BEARER_TOKEN": "bt",
        "RESCALE_HTC_REFRESH_TOKEN": "rt",
    }
    creds = resolve_credentials(env=env, config_path=tmp_path / "none.json")
    assert creds.url == "http://server:8080/api/v1"
    assert (creds.api_key, creds.bearer_token, creds.refresh_token) == (None, "bt", "rt")


def test_login_file_supplies_url_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "credentials.json"
    save_credentials("http://file:1/api/v1", "file-key", cfg)
    creds = resolve_credentials(env={}, config_path=cfg)
    assert (creds.url, creds.api_key, creds.source) == (
        "http://file:1/api/v1",
        "file-key",
        "credentials file",
    )
    same = resolve_credentials("http://file:1/", env={}, config_path=cfg)
    assert same.api_key == "file-key"


def test_login_file_key_is_never_sent_to_another_server(tmp_path: Path) -> None:
    cfg = tmp_path / "credentials.json"
    save_credentials("http://file:1", "file-key", cfg)
    creds = resolve_credentials(env={"OPENHTC_URL": "http://elsewhere:9"}, config_path=cfg)
    assert creds.url == "http://elsewhere:9/api/v1"
    assert creds.api_key is None


def test_default_url_without_any_configuration(tmp_path: Path) -> None:
    creds = resolve_credentials(env={}, config_path=tmp_path / "none.json")
    assert creds.url == "http://127.0.0.1:8080/api/v1"
    assert (creds.api_key, creds.refresh_token, creds.bearer_token) == (None, None, None)


def test_credentials_file_is_private_and_round_trips(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg" / "openhtc" / "credentials.json"
    assert save_credentials("http://h/api/v1", "secret", cfg) == cfg
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cfg.parent).st_mode) == 0o700
    stored = load_credentials(cfg)
    assert stored is not None and (stored.url, stored.api_key) == ("http://h/api/v1", "secret")
    cfg.write_text("{not json")
    assert load_credentials(cfg) is None


def test_session_reads_xdg_config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENHTC_URL", "OPENHTC_API_URL", "OPENHTC_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RESCALE_HTC_BEARER_TOKEN", raising=False)
    monkeypatch.delenv("RESCALE_HTC_REFRESH_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    save_credentials("http://login:7/api/v1", "good-key", tmp_path / "openhtc" / "credentials.json")
    server = FakeServer(lambda r: ok({"sub": "me"}))
    with Session(transport=httpx.MockTransport(server)) as session:
        assert session.url == "http://login:7/api/v1"
        assert session.whoami() == {"sub": "me"}
    assert server.requests[0].headers["Authorization"] == "Token good-key"


# -- session objects -------------------------------------------------------------------------


TASK = {"projectId": "p", "taskId": "t", "taskName": "sweep", "lifecycleStatus": "ACTIVE"}


def counts(**statuses: int) -> dict[str, int]:
    return dict(StatusCounts.from_statuses(statuses))


def test_submit_posts_one_request_and_returns_a_job_batch() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return ok(TASK)
        body = json.loads(request.content)
        echo = {**body[0], "parentJobId": "b1", "group": request.url.params.get("group"), "projectId": "p"}
        return ok([echo])

    server = FakeServer(handler)
    with Session(connection=connect(server)) as session:
        task = session.task("p", "t")
        batch = task.submit(
            "repo/img:1", "echo $AWS_BATCH_JOB_ARRAY_INDEX", batch_size=3, envs={"A": "1"}, group="g",
            exec_timeout=120, retries=2, priority="economy",
        )  # fmt: skip
    post = server.api_requests()[-1]
    assert post.url.path == "/api/v1/htc/projects/p/tasks/t/jobs/batch"
    assert post.url.params["group"] == "g"
    [sent] = json.loads(post.content)
    assert sent["batchSize"] == 3
    assert sent["retryStrategy"] == {"maxRetries": 2}
    assert sent["htcJobDefinition"] == {
        "imageName": "repo/img:1",
        "commands": ["sh", "-c", "echo $AWS_BATCH_JOB_ARRAY_INDEX"],
        "maxVCpus": 1,
        "maxMemory": 4000,
        "envs": [{"name": "A", "value": "1"}],
        "execTimeoutSeconds": 120,
        "priority": "ON_DEMAND_ECONOMY",
    }
    assert (batch.parent_job_id, batch.group, batch.batch_size) == ("b1", "g", 3)
    assert batch.job_ids == ["b1:0", "b1:1", "b1:2"]
    assert batch.job(2).id == "b1:2"


def test_task_wait_polls_group_summaries_until_every_job_finished() -> None:
    polls = [
        {"items": [{"group": "g", "jobStatuses": counts(RUNNING=2)}]},
        {"items": [{"group": "g", "jobStatuses": counts(RUNNING=1, SUCCEEDED=1)}]},
        {"items": [{"group": "g", "jobStatuses": counts(SUCCEEDED=1, FAILED=1)}]},
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith("/group-summary-statistics")
        assert request.url.params.get_list("group") == ["g"]
        return ok(polls.pop(0))

    seen: list[int] = []
    server = FakeServer(handler)
    with Session(connection=connect(server)) as session:
        result = Task(session, TASK).wait("g", poll=0, on_progress=lambda c: seen.append(c.finished))
    assert seen == [0, 1, 2]
    assert (result.succeeded, result.failed, result.total, result.done) == (1, 1, 2, True)


def test_task_wait_times_out() -> None:
    server = FakeServer(lambda r: ok({"group": None, "jobStatuses": counts(RUNNING=1)}))
    with Session(connection=connect(server)) as session, pytest.raises(TimeoutError):
        Task(session, TASK).wait(timeout=0.05, poll=0.01)


def test_summary_of_several_groups_is_summed() -> None:
    body = {
        "items": [
            {"group": "a", "jobStatuses": {"SUCCEEDED": 2, "FAILED": 0}},
            {"group": "b", "jobStatuses": {"SUCCEEDED": 1, "FAILED": 3}},
        ]
    }
    server = FakeServer(lambda r: ok(body))
    with Session(connection=connect(server)) as session:
        summary = Task(session, TASK).summary(["a", "b"])
    assert server.api_requests()[0].url.params.get_list("group") == ["a", "b"]
    assert (summary.succeeded, summary.failed, summary["RUNNING"]) == (3, 3, 0)


def test_job_logs_are_requested_oldest_first() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/logs"):
            return ok(
                {"items": [{"timestamp": "t1", "message": "hello"}, {"timestamp": "t2", "message": "bye"}]}
            )
        return ok({"jobUUID": "b:0", "status": "SUCCEEDED", "container": {"exitCode": 0}})

    server = FakeServer(handler)
    with Session(connection=connect(server)) as session:
        job = Task(session, TASK).job("b:0")
        assert (job.status, job.done, job.exit_code, job.failure_code) == ("SUCCEEDED", True, 0, None)
        assert job.logs() == ["hello", "bye"]
    assert server.api_requests()[-1].url.params["sort"] == "asc"


# -- request building ------------------------------------------------------------------------


def test_priorities_accept_short_and_wire_names() -> None:
    assert normalize_priority("Economy") == "ON_DEMAND_ECONOMY"
    assert normalize_priority("ON_DEMAND_PRIORITY") == "ON_DEMAND_PRIORITY"
    with pytest.raises(ValueError):
        normalize_priority("urgent")


def test_job_request_omits_unset_optional_fields() -> None:
    request = job_request("img", ["python", "x.py"])
    assert request == {
        "jobName": "openhtc-job",
        "batchSize": 1,
        "htcJobDefinition": {
            "imageName": "img",
            "commands": ["python", "x.py"],
            "maxVCpus": 1,
            "maxMemory": 4000,
        },
    }


def test_cli_flags_override_file_requests() -> None:
    from openhtc.cli.submit import SubmitOverrides, build_requests, parse_envs

    file_requests = [
        {
            "jobName": "from-file",
            "batchSize": 5,
            "group": "file-group",
            "htcJobDefinition": {
                "imageName": "a:1",
                "commands": ["run"],
                "envs": [{"name": "A", "value": "1"}],
            },
        },
        {"htcJobDefinition": {"commands": ["other"], "maxMemory": 8000, "imageName": "b:2"}},
    ]
    overrides = SubmitOverrides(batch_size=2, envs=parse_envs(["B=2", "A=9"]), retries=1)
    [(g1, r1), (g2, r2)] = build_requests(file_requests, overrides)
    assert g1 == "file-group" and g2 is None
    assert "group" not in r1
    assert (r1["jobName"], r1["batchSize"], r1["retryStrategy"]) == ("from-file", 2, {"maxRetries": 1})
    assert r1["htcJobDefinition"]["envs"] == [{"name": "A", "value": "9"}, {"name": "B", "value": "2"}]
    assert r1["htcJobDefinition"]["imageName"] == "a:1"
    assert r2["htcJobDefinition"]["imageName"] == "b:2"
    assert r2["htcJobDefinition"]["maxMemory"] == 8000
    assert r2["htcJobDefinition"]["commands"] == ["other"]

    [(group, only)] = build_requests(None, SubmitOverrides(command=["echo", "hi"], group="g", image="x"))
    assert group == "g"
    assert only["htcJobDefinition"]["commands"] == ["echo", "hi"]
    assert only["htcJobDefinition"]["imageName"] == "x"
