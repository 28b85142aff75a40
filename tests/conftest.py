"""Fixtures that run the real ``htc server`` as a subprocess, on SQLite and on PostgreSQL.

Choosing the database
    ``pytest --db sqlite|postgres|both`` (or ``OPENHTC_TEST_DB``; default ``both``). Every test
    that uses ``db_url``, ``server`` or ``module_server`` runs once per chosen database.
    PostgreSQL is a private cluster started for the session (see ``openhtc.testing.postgres``); when its
    binaries are missing the PostgreSQL variants are skipped locally and fail when ``CI=true``.

Servers
    ``server`` is a fresh server for one test; ``module_server`` is shared by one test module
    (tests then isolate themselves by creating their own project and task); ``start_server``
    starts more, with extra environment or arguments. A server's combined stdout/stderr goes to
    ``<data_dir>/server.log``; when a test fails, the tail of every live server's log is attached
    to the report.

HTTP helpers
    The server classes live in ``openhtc.testing.server`` (re-exported here). ``server.api()``
    returns an :class:`HtcApi`: an ``httpx.Client`` carrying a bearer token for
    the admin key, plus helpers for projects, tasks, submissions, paginated lists and bounded
    waits. All waits poll with a deadline; nothing sleeps for a fixed time to "let things settle".

Unit tests
    ``@pytest.mark.unit`` marks a test of pure code: no server, database, runtime or network.
    ``make test-unit`` runs just those, in seconds.

Parallel workers
    ``make pytest`` runs the tests on pytest-xdist workers (``-n N --dist loadgroup``). Each worker
    has its own session fixtures (a private PostgreSQL cluster, SeaweedFS, the busybox image) on
    free ports in fresh directories; the tests that must share one worker get an xdist group
    (``openhtc.testing.parallel``: a private Slurm, a local cluster, a module's shared server).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from openhtc.testing.ci import IN_CI
from openhtc.testing.parallel import group_for
from openhtc.testing.postgres import PostgresCluster, running_cluster
from openhtc.testing.server import (  # re-exported: the helpers lived here before openhtc.testing
    DEFAULT_REGION,
    HEALTH_TIMEOUT,
    HtcApi,
    HtcServer,
    ProcessMarker,
    htc_command,
    parse_instant,
)

__all__ = ["DEFAULT_REGION", "HEALTH_TIMEOUT", "IN_CI", "HtcApi", "HtcServer", "ProcessMarker", "htc_command"]

DB_CHOICES = ("sqlite", "postgres", "both")
_LIVE_SERVERS = HtcServer.live  # the servers whose log tails a failing test's report shows


# --------------------------------------------------------------------------------------------
# Options and database parametrization
# --------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        action="store",
        choices=DB_CHOICES,
        default=os.environ.get("OPENHTC_TEST_DB", "both"),
        help="database(s) the server tests run against (env OPENHTC_TEST_DB; default: both)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "crash: kills the server with SIGKILL and restarts it")
    config.addinivalue_line(
        "markers", "unit: pure code only (no server, database, runtime or network); make test-unit runs these"
    )
    config.addinivalue_line(
        "markers",
        "one_db: the feature does not depend on the database; run on the first of --db only "
        "(SQLite with --db both), to keep the suite short",
    )
    config.addinivalue_line(
        "markers",
        "second_workspace: needs a second workspace/tenant created through `htc admin`",
    )
    config.addinivalue_line(  # pytest-xdist registers it too; without xdist it only groups nothing
        "markers", "xdist_group(name): run on the same xdist worker as the other tests of the group"
    )
    if config.getoption("--db") not in DB_CHOICES:
        raise pytest.UsageError(f"--db / OPENHTC_TEST_DB must be one of {', '.join(DB_CHOICES)}")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark the tests that one xdist worker must run together (before xdist reads the marks)."""
    if item.get_closest_marker("xdist_group") is None:
        group = group_for(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def _db_kinds(config: pytest.Config) -> list[str]:
    choice = config.getoption("--db")
    return ["sqlite", "postgres"] if choice == "both" else [choice]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_kind" in metafunc.fixturenames:
        # Session scope lets pytest group all tests of one database together, so module- and
        # session-scoped servers are started once per database.
        kinds = _db_kinds(metafunc.config)
        if metafunc.definition.get_closest_marker("one_db"):
            kinds = kinds[:1]
        metafunc.parametrize("db_kind", kinds, indirect=True, scope="session")


@pytest.fixture(scope="session")
def db_kind(request: pytest.FixtureRequest) -> str:
    """'sqlite' or 'postgres' (parametrized by --db)."""
    return str(request.param)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster for the whole session."""
    with running_cluster() as cluster:
        yield cluster
        HtcServer.reap()  # the servers still exiting, before their database goes


@pytest.fixture(scope="session")
def pg_url_factory(pg_cluster: PostgresCluster) -> Callable[[], str]:
    """Returns a function creating a fresh, empty database and returning its URL."""
    return pg_cluster.new_database


def _fresh_db_url(db_kind: str, request: pytest.FixtureRequest) -> str | None:
    if db_kind == "sqlite":
        return None  # the server's embedded default: SQLite in its data dir
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()


@pytest.fixture
def db_url(db_kind: str, request: pytest.FixtureRequest) -> str | None:
    """A fresh database for one server: None for SQLite, else a new PostgreSQL database URL."""
    return _fresh_db_url(db_kind, request)


# --------------------------------------------------------------------------------------------
# The server under test (the classes are in openhtc.testing.server)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def start_server(
    tmp_path_factory: pytest.TempPathFactory, db_kind: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., HtcServer]]:
    """Factory: ``start_server(db_url=..., env=..., args=..., runtime=...)``; a fresh database by default.

    Every server it starts is stopped at the end of the test.
    """
    started: list[HtcServer] = []

    def start(
        *,
        db_url: str | bool | None = True,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        runtime: str = "process",
    ) -> HtcServer:
        url = _fresh_db_url(db_kind, request) if db_url is True else (db_url or None)
        srv = HtcServer(tmp_path_factory.mktemp("htc-data"), url, env=env, args=args, runtime=runtime)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop(wait=False)  # reaped later: the next test need not wait for the shutdown


@pytest.fixture
def server(start_server: Callable[..., HtcServer]) -> HtcServer:
    """A fresh server for this test, on the parametrized database."""
    return start_server()


@pytest.fixture(scope="module")
def module_server(
    tmp_path_factory: pytest.TempPathFactory, db_kind: str, request: pytest.FixtureRequest
) -> Iterator[HtcServer]:
    """One server shared by the tests of a module (per database)."""
    srv = HtcServer(tmp_path_factory.mktemp("htc-data"), _fresh_db_url(db_kind, request))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop(wait=False)


@pytest.fixture
def api(module_server: HtcServer) -> Iterator[HtcApi]:
    """Admin-authenticated raw-HTTP helpers on the module's shared server.

    Jobs of the tasks created through it are cancelled when the test ends, so a failing test
    leaves no work occupying the shared executor.
    """
    helper = module_server.api()
    yield helper
    if module_server.alive:
        helper.cancel_created_tasks()


@pytest.fixture
def marker() -> Iterator[ProcessMarker]:
    """A fresh ProcessMarker; whatever still carries it at the end of the test is killed."""
    mark = ProcessMarker()
    yield mark
    mark.kill_leftovers()


# --------------------------------------------------------------------------------------------
# Reporting: show the server logs of a failing test
# --------------------------------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI nothing may be skipped: a skipped test there fails the run (CI installs every tool)."""
    HtcServer.reap()  # no server outlives the session (the fixtures stop them without waiting)
    if not IN_CI or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(f"CI=true: {len(skipped)} test(s) skipped; in CI that is a failure", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for srv in _LIVE_SERVERS:
            report.sections.append((f"openhtc server log {srv!r}", srv.log_tail()))


@pytest.fixture
def instant() -> Callable[[str], float]:
    """parse_instant as a fixture, for test modules (which should not import conftest)."""
    return parse_instant
