"""A client of the session's real S3-compatible server (`s3_endpoint`, tests/conftest.py), and one fresh bucket per
test."""

from __future__ import annotations

import uuid
from typing import Any

import pytest


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"kron-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name
