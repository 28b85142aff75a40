"""The one place openhtc departs from Rescale's OpenAPI file (rescale-htc-openapi.json, a verbatim
copy of shared/reference). Each change makes the file say what Rescale's production server answers
and what its clients read, from Rescale's own patch file (v2/api/swagger.jsonnet) and the
rescale-htc-api-notes; docs/compatibility.md#the-spec-patch lists them. None loosens a check:
every other difference between the file and openhtc's answers is a defect in openhtc.

``patched(spec)`` returns a patched deep copy; tests/test_fuzz_schemathesis.py fuzzes against it.
"""

from __future__ import annotations

import copy
from typing import Any

# 1. Rescale's patch declares these nullable (api-notes §2 "Nulls"); everything else is omitted
#    when absent, never null.
NULLABLE = {
    "HTCProject": ["organizationCode"],
    "HTCTask": ["archivedAt", "deletedAt"],
    "HTCJob": [
        "completedAt", "startedAt", "instanceId", "maxGpus", "maxSwap", "statusReason",
        "failureCode", "container", "instanceLabels",
    ],
    "JobStatusSummary": ["group"],
    "RescaleJobStatusEvent": ["statusReason", "instanceId", "container", "instanceLabels"],
    "HTCJobDefinition": ["workingDir"],
    "HTCJobSubmitRequest": ["rescaleProjectId"],
}  # fmt: skip


def patched(spec: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    schemas = out["components"]["schemas"]
    for schema, props in NULLABLE.items():
        for prop in props:
            schemas[schema]["properties"][prop]["nullable"] = True
    # ... and in the file's inline copy of HTCTask for DELETE /htc/projects/{p}/tasks/{t}.
    deleted = out["paths"]["/htc/projects/{projectId}/tasks/{taskId}"]["delete"]["responses"]["200"]
    for prop in NULLABLE["HTCTask"]:
        deleted["content"]["application/json"]["schema"]["properties"][prop]["nullable"] = True
    # 2. JobStatusSummary.jobStatuses is an object of counts; the file also gives it the
    #    RescaleJobStatus enum, which no object can match.
    del schemas["JobStatusSummary"]["properties"]["jobStatuses"]["enum"]
    # 3. PresignedPutUrlResponse.url is the URL string (the file has Java's URL object; its own
    #    example is a string).
    schemas["PresignedPutUrlResponse"]["properties"]["url"] = {"type": "string", "format": "uri"}
    # 4. GET /htc/regions answers an array of HTCRegionAdminSettings, which the tutorial and the
    #    rescalehtc client iterate (the file says one HTCInfraResource).
    ok = out["paths"]["/htc/regions"]["get"]["responses"]["200"]["content"]["application/json"]
    ok["schema"] = {"type": "array", "items": {"$ref": "#/components/schemas/HTCRegionAdminSettings"}}
    return out
