"""The shared test harness's one rule for missing tools: skip on a developer's machine, fail in
CI (openhtc.testing.ci), so CI never passes by skipping what it was meant to test."""

from __future__ import annotations

import pytest

from openhtc.testing.ci import in_ci, require_tools, skip_or_fail

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
