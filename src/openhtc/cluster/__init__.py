"""A local cluster for trying and testing cluster mode: ``htc cluster up|status|down``.

``netns``: the bridge and the agents' network namespaces. ``local``: PostgreSQL, the API servers
and the agents as processes, recorded in the cluster's directory.
"""

from __future__ import annotations
