"""The exchange's answer is built without the wire models (executor/protocol.py, launch_json):
what an agent reads back must be exactly what the models would have sent."""

from __future__ import annotations

import orjson

from openhtc.domain.models import JobLaunch
from openhtc.executor import protocol as wire


def launch(**fields: object) -> JobLaunch:
    base: dict[str, object] = {
        "job_id": 7, "attempt": 2, "job_uuid": "p:3", "batch_id": 5, "array_index": 3,
        "project_id": "proj", "task_id": "task", "region": "AWS_US_EAST_1", "image": "busybox",
        "commands": ("sh", "-c", "echo ü"), "envs": (("AWS_BATCH_JOB_ARRAY_INDEX", "3"),),
        "vcpus": 2, "memory_mb": 1024, "disk_gib": 10, "timeout_s": 60, "working_dir": "/w",
        "batch_envs": (("RESCALE_HTC_BEARER_TOKEN", "t.o.k"), ("USER_VAR", "x=y")),
    }  # fmt: skip
    base.update(fields)
    return JobLaunch(**base)  # type: ignore[arg-type]


def test_a_launch_built_directly_reads_back_as_the_wire_model_sends_it() -> None:
    for one, token, event in (
        (launch(), "pull", '{"args": [1]}'),
        (launch(timeout_s=None, working_dir=None, image="", batch_envs=()), None, None),
    ):
        envs = orjson.Fragment(orjson.dumps(one.batch_envs))
        direct = orjson.loads(orjson.dumps(wire.launch_json(one, token, event, envs)))
        assert direct == wire.launch_to_wire(one, token, event).model_dump(mode="json")
        assert direct == orjson.loads(orjson.dumps(wire.launch_json(one, token, event)))
        # and the agent reads it back as the launch it was
        assert wire.launch_from_wire(wire.Launch.model_validate(direct)) == one
