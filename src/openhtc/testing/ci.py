"""Skip locally, fail in CI: the one rule for a test whose tool or service is missing.

CI installs every tool the suite uses (``make containers``, ``make postgres``), so there a missing
one is a broken machine, not a reason to skip; on a developer's machine it is a skip saying what
to install. ``CI=true`` is what the CI services set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import NoReturn


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this run is CI's (``CI=true``); ``environ`` defaults to the process's environment."""
    env = os.environ if environ is None else environ
    return env.get("CI", "").lower() == "true"


IN_CI = in_ci()  # for the test modules and hooks that read it as a constant


def skip_or_fail(message: str) -> NoReturn:
    """``pytest.skip(message)`` locally, ``pytest.fail(message)`` in CI."""
    import pytest  # the test tools are a dev dependency: import them only when a test runs

    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_tools(*tools: str, hint: str = "make containers installs them") -> None:
    """Skip (locally) or fail (in CI) unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"not installed: {', '.join(missing)} ({hint})")
