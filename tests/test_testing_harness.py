"""The shared test harness's one rule for missing tools: skip on a developer's machine, fail in
CI (openhtc.testing.ci), so CI never passes by skipping what it was meant to test."""

from __future__ import annotations

import pytest

from openhtc.testing.ci import in_ci, require_tools, skip_or_fail
from openhtc.testing.parallel import EXCLUSIVE, group_for

pytestmark = pytest.mark.unit  # pure code: make test-unit runs it

MISSING = "openhtc-no-such-tool"


def test_only_ci_true_means_ci() -> None:
    assert in_ci({"CI": "true"}) and in_ci({"CI": "TRUE"})
    assert not in_ci({}) and not in_ci({"CI": "1"}) and not in_ci({"CI": "false"})


def test_a_missing_tool_skips_locally_and_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        require_tools("sh", MISSING)
    require_tools("sh")  # present: nothing happens


def test_a_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=MISSING):
        require_tools(MISSING)
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL"):
        skip_or_fail("PostgreSQL unavailable")


def test_the_tests_that_must_share_a_worker_carry_one_xdist_group(request: pytest.FixtureRequest) -> None:
    """openhtc.testing.parallel, over this session's tests (all of them in a full run): a private
    Slurm's or a local cluster's tests share one group, and a module's tests that share a
    module-scoped fixture (a server) share one per database. Under ``--dist loadgroup`` one worker
    runs each group: no two Slurms or cluster bridges are made at once, no module server twice."""
    for item in request.session.items:
        marks = [m.args[0] for m in item.iter_markers("xdist_group")]
        info = item._fixtureinfo  # type: ignore[attr-defined]
        scopes = {name: defs[-1].scope for name, defs in info.name2fixturedefs.items() if defs}
        exclusive = [group for fixture, group in EXCLUSIVE.items() if fixture in scopes]
        if exclusive or "test_slurm_demo" in item.nodeid:  # the demo starts its Slurm itself
            assert marks == (exclusive or ["slurm"]), (item.nodeid, marks)
        elif "module" in scopes.values():
            module = item.nodeid.split("::")[0]
            callspec = getattr(item, "callspec", None)
            db = callspec.params.get("db_kind") if callspec else None
            assert marks == [f"{module}[{db}]" if db else module], (item.nodeid, marks)
        else:
            assert marks == [], (item.nodeid, marks)
    assert group_for(request.node) is None  # this test shares nothing: any worker, any time
