"""``htc storage configure-aws``: point an AWS CLI profile at the server's S3 store, once.

Rescale's tutorial exports only ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
``AWS_SESSION_TOKEN`` from a storage token and runs ``aws s3 cp``; against a store that is not
AWS's, the AWS CLI also needs the endpoint and a region. Both go into the profile (``[default]``
unless ``--profile``), with path-style addressing, so the three keys suffice afterwards. The
AWS CLI (v1.29+/v2) and boto3 read ``endpoint_url`` from there.
"""

from __future__ import annotations

import configparser
from pathlib import Path

__all__ = ["LOCAL_STORAGE_NOTE", "write_profile"]

LOCAL_STORAGE_NOTE = (
    "this server keeps storage itself (htc server --storage local): its tokens are openhtc "
    "credentials for `htc storage` and `htcctl`, not S3 ones. S3 tools (aws s3, boto3) need a "
    "server started with --storage seaweedfs or --storage s3."
)


def write_profile(config_file: Path, profile: str, endpoint: str, region: str) -> None:
    """Set endpoint_url, region and path-style S3 addressing in ``profile`` of an AWS config
    file, keeping everything else in it (other profiles, other keys of this one)."""
    section = profile if profile == "default" else f"profile {profile}"
    parser = configparser.RawConfigParser()
    parser.read(config_file, encoding="utf-8")
    if not parser.has_section(section):
        parser.add_section(section)
    parser.set(section, "endpoint_url", endpoint)
    parser.set(section, "region", region)
    parser.set(section, "s3", "\naddressing_style = path")
    config_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = config_file.with_name(f".{config_file.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        parser.write(fh)
    tmp.replace(config_file)
