"""Fixtures of the multi-node tests: an S3 server on loopback (moto), for a store every
node reaches over the network: the store tests' server (tests/store/test_object_store.py)."""

from __future__ import annotations

import pytest
from store.test_object_store import BUCKET, _aws_env, s3_endpoint  # noqa: F401


@pytest.fixture(scope="module")
def moto_s3(s3_endpoint):  # noqa: F811
    """{"bucket": name, "env": the AWS environment a user would set for the server}."""
    return {"bucket": BUCKET, "env": _aws_env(s3_endpoint)}
