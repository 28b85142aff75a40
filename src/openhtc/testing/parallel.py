"""Which tests one pytest-xdist worker must run together (``make pytest`` runs ``-n N --dist loadgroup``).

Every worker has its own session fixtures (a private PostgreSQL, SeaweedFS, the busybox image) on
free ports and in fresh directories, so most tests may run on any worker at any time. Two kinds
go to one xdist group, so that one worker runs them one after the other:

* tests that use something only one of should exist on the host at a time (``EXCLUSIVE``): a
  private Slurm (its cgroups are its node's own, but its pilots take CPUs a second one's would
  slow) and a local cluster (its bridge number is the first free one: two clusters made at once
  may pick the same);
* the tests of a module that share a module-scoped fixture (``module_server``, a registry, an
  agent): split over workers, each worker would start it again. One group per module and database.

``conftest.py`` applies :func:`group_for` to each collected test (``pytest_itemcollected``); a test
may also carry ``@pytest.mark.xdist_group("slurm")`` itself (a test that starts such a thing
without the fixture). Without ``--dist loadgroup`` (``-n 0``, or a plain ``pytest``) the marks
change nothing.
"""

from __future__ import annotations

from typing import Any

# fixture name -> the group of every test that uses it (directly or through another fixture)
EXCLUSIVE = {
    "slurm": "slurm",  # tests/alloc/conftest.py: a private Slurm
    "make_cluster": "netns",  # tests/cluster/conftest.py: a local cluster (bridge, namespaces)
}


def _fixture_scopes(item: Any) -> dict[str, str]:
    """Fixture name -> scope, for every fixture the test uses (its closure)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:  # not a pytest.Function (a doctest, a plugin's item): no fixtures to share
        return {}
    scopes = {}
    for name, defs in info.name2fixturedefs.items():
        if defs:
            scope = defs[-1].scope
            scopes[name] = scope if isinstance(scope, str) else str(getattr(scope, "value", scope))
    return scopes


def group_for(item: Any) -> str | None:
    """The xdist group ``item`` belongs to, or None (any worker, any time)."""
    scopes = _fixture_scopes(item)
    for fixture, group in EXCLUSIVE.items():
        if fixture in scopes:
            return group
    if "module" in scopes.values():
        callspec = getattr(item, "callspec", None)
        db = callspec.params.get("db_kind") if callspec is not None else None
        module = item.nodeid.split("::", 1)[0]
        return f"{module}[{db}]" if db else module
    return None
