"""What an idle exchange no longer does, and the rules that must still hold (issue 16).

A server trusts an agent's record it read while the agent keeps calling it
(services/agent_records.py) and an agent token it verified once (auth/tokens.py); a long poll
waits on one timer, not in one-second slices. What a user would notice if those broke:

* an agent the leader marked lost keeps being served by the server it idles on (it must hear
  409 at once, and its jobs are someone else's);
* an agent token, once the agent is rebound to another one, still acts for it (403 at once);
* an expired agent token still works because it was verified before;
* a server that stops leaves its agents' long polls to be cut rather than answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.cluster.test_agent_protocol import Agent, agent_token, submit
from tests.cluster.test_multiserver import start, wait_one_leader

from openhtc.auth.keys import new_signing_key_pem, signing_key_from_pem
from openhtc.auth.tokens import TokenService
from openhtc.domain.clock import Clock
from openhtc.domain.errors import Unauthenticated
from openhtc.testing.postgres import PostgresCluster
from openhtc.testing.server import HtcServer

# Long enough that a record read by the follower is trusted between calls a second apart
# (liveness - 3 heartbeat intervals: 5 s), short enough to lose an agent within the test.
LIVENESS = 8.0


@pytest.fixture
def servers() -> Iterator[list[HtcServer]]:
    started: list[HtcServer] = []
    yield started
    for one in started:
        one.stop()


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s")
        time.sleep(0.2)


def test_an_agent_the_leader_marks_lost_hears_it_at_once_from_the_server_it_idles_on(
    pg_cluster: PostgresCluster, servers: list[HtcServer], tmp_path: Path
) -> None:
    url = pg_cluster.new_database()
    env = {"OPENHTC_AGENT_LIVENESS_SECONDS": str(LIVENESS), "OPENHTC_MAX_INFRASTRUCTURE_RETRIES": "1"}
    leader = start(servers, tmp_path, url, executor=False, env=env)
    follower = start(servers, tmp_path, url, executor=False, env=env)
    assert wait_one_leader(servers) is leader
    first, second = agent_token(leader), agent_token(leader)
    idler = Agent(follower, first, "idler")
    other = Agent(leader, agent_token(leader), "other")
    idler.register()
    other.register()
    for _ in range(4):  # idle calls a second apart: the follower serves them from what it read
        idler.exchange()
        other.exchange()
        time.sleep(1.0)
    # the idler falls silent; the other agent keeps calling (the leader trusts itself) until the
    # leader has marked the idler lost. Probed through the leader with another incarnation: its
    # record is read and nothing is written (no heartbeat), and it says "lost" once it is.
    via_leader = Agent(leader, first, "idler")
    via_leader.agent_id, via_leader.incarnation = idler.agent_id, "probe"

    def lost() -> bool:
        other.exchange()
        return via_leader.exchange(expect=409)["error"] == "agent lost"

    wait_until(lost, "lost mark")
    # the follower, which read the record while the agent was live, now says so too, and gives
    # the lost agent no job
    submit(follower.api())
    assert idler.exchange(max_jobs=1, expect=409) == {"error": "agent lost"}
    # the agent id is free: another token binds it; the old token no longer acts for it, on
    # either server, at once
    rebound = Agent(leader, second, "rebound")
    rebound.agent_id, rebound.incarnation = idler.agent_id, idler.incarnation
    rebound.register()
    assert rebound.exchange()["leases"] == []
    assert idler.exchange(expect=403)
    via_leader.incarnation = idler.incarnation
    assert via_leader.exchange(expect=403)


def test_a_second_process_registering_as_the_agent_stops_the_first_within_a_second_everywhere(
    pg_cluster: PostgresCluster, servers: list[HtcServer], tmp_path: Path
) -> None:
    """The same agent id registers again (a copied work directory on another host) through the
    other server while the first process keeps calling the server that trusts its record."""
    url = pg_cluster.new_database()
    env = {"OPENHTC_AGENT_LIVENESS_SECONDS": "120"}
    leader = start(servers, tmp_path, url, executor=False, env=env)
    follower = start(servers, tmp_path, url, executor=False, env=env)
    token = agent_token(leader, agents=2)
    first = Agent(follower, token, "twin")
    first.register()
    for _ in range(3):
        first.exchange()
    second = Agent(leader, token, "twin")
    second.agent_id = first.agent_id  # another incarnation of the same agent id
    second.register()
    answers = []
    for _ in range(10):  # the follower sees the new incarnation at its next heartbeat write (1 s)
        resp = first.http.post(
            f"/openhtc/v1/agents/{first.agent_id}/exchange",
            json={"incarnation": first.incarnation, "free": {"vcpus": 4, "memory_mb": 8192}, "max_jobs": 1},
        )
        answers.append(resp.status_code)
        if resp.status_code == 409:
            assert resp.json() == {"error": "stale incarnation"}
            break
        time.sleep(0.5)
    assert answers[-1] == 409 and len(answers) <= 4, answers
    assert second.exchange()["leases"] == []


def test_a_long_poll_open_when_the_server_stops_is_answered_not_cut(
    start_server: Callable[..., HtcServer],
) -> None:
    # a poll far longer than the server's wait for responses in progress at SIGTERM (5 s)
    srv = start_server(args=("--no-executor",), env={"OPENHTC_AGENT_POLL_SECONDS": "60"})
    agent = Agent(srv, agent_token(srv), "poller")
    agent.register()
    agent.exchange()  # the server's heartbeat writer runs from the first exchange on
    answers: list[Any] = []

    def poll() -> None:
        try:
            answers.append(agent.exchange(max_jobs=1, wait=60.0))
        except (httpx.HTTPError, AssertionError) as exc:
            answers.append(exc)

    waiting = threading.Thread(target=poll)
    waiting.start()
    time.sleep(1.0)  # the poll waits at the server
    assert not answers
    srv.stop()
    waiting.join(timeout=30)
    assert answers and isinstance(answers[0], dict), answers
    assert answers[0]["leases"] == []


class _Clock(Clock):
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def now(self) -> float:
        return self.t


def test_an_agent_token_verified_before_is_refused_once_it_expires() -> None:
    clock = _Clock()
    tokens = TokenService(signing_key_from_pem(new_signing_key_pem()), clock, 3600, 7200)
    token = tokens.agent("fleet", "*", ttl=60)
    assert tokens.verify_agent(token)["sub"] == "fleet"
    clock.t += 30
    assert tokens.verify_agent(token)["sub"] == "fleet"  # trusted from the first check
    clock.t += 31
    with pytest.raises(Unauthenticated):
        tokens.verify_agent(token)
    # a token signed by another installation's key is never taken, cached or not
    other = TokenService(signing_key_from_pem(new_signing_key_pem()), clock, 3600, 7200)
    with pytest.raises(Unauthenticated):
        tokens.verify_agent(other.agent("fleet", "*", ttl=600))
