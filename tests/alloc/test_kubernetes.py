"""deploy/kubernetes: every manifest against the Kubernetes schemas (kubernetes-validate, offline),
the custom resources against what their operators read, and the queue-depth metric KEDA's
metrics-api scaler reads (docs/deploy-kubernetes.md)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from openhtc.testing.server import DEFAULT_REGION, HtcServer, htc_command

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
CUSTOM = {"keda.sh/v1alpha1", "postgresql.cnpg.io/v1", "kustomize.config.k8s.io/v1beta1"}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.unit
def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    checked = 0
    for name, doc in _documents():
        if doc["apiVersion"] in CUSTOM:
            continue
        try:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc}")
        checked += 1
    assert checked >= 10


@pytest.mark.unit
def test_the_custom_resources_name_what_exists() -> None:
    docs = {(d["kind"], d["metadata"]["name"] if "metadata" in d else n): d for n, d in _documents()}
    kustomization = docs[("Kustomization", "kustomization.yaml")]
    listed = set(kustomization["resources"])
    assert listed <= {p.name for p in DEPLOY.glob("*.yaml")}
    assert listed >= {"server.yaml", "agents.yaml", "keda.yaml", "registry.yaml", "secrets.yaml"}
    scaled = docs[("ScaledObject", "openhtc-agents")]["spec"]
    assert scaled["minReplicaCount"] == 0  # scale to zero
    assert ("Deployment", scaled["scaleTargetRef"]["name"]) in docs
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metadata"]["valueLocation"] == "wantedVcpus"
    assert "/openhtc/v1/alloc/queue-depth" in trigger["metadata"]["url"]
    auth = docs[("TriggerAuthentication", trigger["authenticationRef"]["name"])]["spec"]
    secret = auth["secretTargetRef"][0]
    assert secret["parameter"] == "token" and ("Secret", secret["name"]) in docs
    assert docs[("Cluster", "openhtc-db")]["spec"]["bootstrap"]["initdb"]["database"] == "openhtc"


def _agent_token(srv: HtcServer) -> str:
    out = srv.cli("admin", "create-agent-token", "--region", DEFAULT_REGION).stdout
    return out.strip().splitlines()[-1]


def test_the_queue_depth_metric_counts_queued_and_running_work_then_falls_to_zero(
    start_server: Callable[..., HtcServer], tmp_path: Path
) -> None:
    srv = start_server(args=("--no-executor",))
    token = _agent_token(srv)
    url = f"{srv.url}/openhtc/v1/alloc/queue-depth?region={DEFAULT_REGION}"

    def depth() -> dict[str, Any]:
        answer = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    assert depth()["wantedVcpus"] == 0  # KEDA: no agent
    api = srv.api()
    project_id, task_id = api.project_and_task()
    api.submit_one(project_id, task_id, api.job_request(["true"], batch_size=3, maxVCpus=2))
    api.wait_admitted(project_id, task_id)
    metric = depth()
    assert metric == {
        "region": DEFAULT_REGION,
        "queuedJobs": 3,
        "queuedVcpus": 6,
        "activeJobs": 0,
        "activeVcpus": 0,
        "wantedVcpus": 6,
    }
    # another region's token may not read it; no token: 401
    other = srv.cli("admin", "create-agent-token", "--region", "ELSEWHERE").stdout.strip().splitlines()[-1]
    assert httpx.get(url, headers={"Authorization": f"Bearer {other}"}).status_code == 403
    assert httpx.get(url).status_code == 401

    # an agent runs them: the metric falls back to zero (KEDA scales the agents to zero)
    agent = subprocess.Popen(
        [*htc_command(), "agent", "--server", srv.url, "--region", DEFAULT_REGION, "--runtime", "process",
         "--vcpus", "2", "--work-dir", str(tmp_path / "agent")],
        env={**srv.environment(), "OPENHTC_AGENT_TOKEN": token},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        jobs = api.wait_terminal(project_id, task_id, 3, timeout=60)
        assert {j["status"] for j in jobs} == {"SUCCEEDED"}
        assert depth()["wantedVcpus"] == 0
    finally:
        agent.terminate()
        agent.wait(timeout=30)
