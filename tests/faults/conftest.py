"""The fixture of the object-store fault tests: ``faulty_s3``, a fresh bucket on the
session's moto server reached through a fault-injecting proxy (s3proxy.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import uuid

import pytest
from moto_server import s3_storage_options

pytest.importorskip("s3fs")
pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from s3proxy import S3FaultProxy  # noqa: E402

from learnax.checkpoint import Checkpointer  # noqa: E402

# Few client retries, so that a fault that lasts fails a request within seconds.
# botocore retries 5xx, throttling and dropped connections itself: two attempts in
# all (``total_max_attempts``; its ``max_attempts`` counts retries only, and botocore
# rewrites the dict it is given, hence the deep copy). s3fs then retries SlowDown and
# connection errors again, ``S3FileSystem.retries`` times (5 by default, nested for
# reads: a GET whose connection always drops was tried 150 times here), a class
# attribute that no storage option sets: the fixture lowers it for the test.
S3FS_RETRIES = 2
FEW_RETRIES = {
    "config_kwargs": {
        "retries": {"total_max_attempts": 2, "mode": "standard"},
        "connect_timeout": 2,
        "read_timeout": 20,
    }
}


@dataclasses.dataclass
class FaultyS3:
    """A bucket behind the proxy: ``url`` and ``storage_options`` go through it (and
    its faults); ``client`` is a boto3 client straight to the server, to prepare and
    inspect the bucket without faults."""

    bucket: str
    proxy: S3FaultProxy
    client: object
    storage_options: dict

    @property
    def url(self) -> str:
        """The registry: ``s3://<bucket>/reg``."""
        return f"s3://{self.bucket}/reg"

    def checkpoint_dir(self, run: str = "run") -> str:
        return f"{self.url}/{run}/checkpoints"

    def checkpointer(self, run: str = "run", **kwargs) -> Checkpointer:
        """A Checkpointer on the registry, through the proxy."""
        kwargs.setdefault("storage_options", self.storage_options)
        return Checkpointer(self.url, run, **kwargs)

    def key(self, url: str) -> str:
        prefix = f"s3://{self.bucket}/"
        assert url.startswith(prefix), url
        return url[len(prefix) :]

    def keys(self, url: str = "") -> set[str]:
        """Every object under the prefix ``url`` (the bucket by default), relative to
        it, listed straight from the server."""
        prefix = self.key(url).rstrip("/") + "/" if url else ""
        found = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            found.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
        return found

    def read(self, url: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(url))["Body"].read()

    def manifest(self, checkpoint_url: str) -> dict:
        """The manifest value of ``<checkpoint_url>/manifest.json``, read directly."""
        return json.loads(self.read(f"{checkpoint_url}/manifest.json"))["manifest"]


@pytest.fixture
def faulty_s3(moto_server, monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", S3FS_RETRIES)

    name = f"faults-{uuid.uuid4().hex[:16]}"
    client = moto_server.client()
    client.create_bucket(Bucket=name)
    proxy = S3FaultProxy(moto_server.port)
    try:
        yield FaultyS3(
            name,
            proxy,
            client,
            s3_storage_options(proxy.endpoint_url, **copy.deepcopy(FEW_RETRIES)),
        )
    finally:
        proxy.close()
