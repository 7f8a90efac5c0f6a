"""The fault-injecting S3 proxy (s3proxy.py) itself: requests pass through it unchanged
and are logged by kind, and each fault is seen by a plain boto3 client (one attempt,
no retries) as the test that uses it expects."""

from __future__ import annotations

import threading
import time

import botocore.config
import botocore.exceptions
import pytest
from s3proxy import (
    applied_then,
    delay,
    drop_after,
    drop_before,
    skew,
    stale_list,
    status,
    truncate,
)

boto3 = pytest.importorskip("boto3")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture
def through_proxy(faulty_s3):
    """A boto3 client through the proxy that tries each request once."""
    return boto3.client(
        "s3",
        endpoint_url=faulty_s3.proxy.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )


def exists(faulty_s3, key: str) -> bool:
    return key in faulty_s3.keys()


def test_requests_pass_through_and_are_logged_by_kind(faulty_s3):
    fs = s3fs.S3FileSystem(**faulty_s3.storage_options, skip_instance_cache=True)
    base = f"{faulty_s3.bucket}/p"
    big = bytes(range(256)) * (6 << 12)  # 6 MiB: a multipart upload of two parts

    fs.pipe_file(f"{base}/small", b"hello")
    with fs.open(f"{base}/big", "wb", block_size=5 << 20) as f:
        f.write(big)
    assert fs.cat_file(f"{base}/small") == b"hello"
    assert fs.cat_file(f"{base}/big") == big
    assert fs.info(f"{base}/small")["size"] == 5
    assert sorted(fs.ls(base, detail=False)) == [f"{base}/big", f"{base}/small"]
    fs.rm_file(f"{base}/small")
    fs.rm([f"{base}/big"])

    assert faulty_s3.keys() == set()
    kinds = {e.kind for e in faulty_s3.proxy.log}
    assert kinds >= {
        "put",
        "create_multipart",
        "upload_part",
        "complete_multipart",
        "get",
        "head",
        "list",
        "delete",
        "delete_many",
    }
    assert all(e.fault is None for e in faulty_s3.proxy.log)


def test_status_fault_answers_an_s3_error_without_applying_the_request(faulty_s3, through_proxy):
    faulty_s3.proxy.add("put", "a", status(503, "SlowDown"), times=1)

    with pytest.raises(botocore.exceptions.ClientError) as e:
        through_proxy.put_object(Bucket=faulty_s3.bucket, Key="a", Body=b"1")
    assert e.value.response["Error"]["Code"] == "SlowDown"
    assert not exists(faulty_s3, "a")
    through_proxy.put_object(Bucket=faulty_s3.bucket, Key="a", Body=b"1")  # times=1: used up
    assert exists(faulty_s3, "a")
    assert [e.fault for e in faulty_s3.proxy.requests("put")] == ["status(503, SlowDown)", None]


def test_status_fault_on_head_has_no_body(faulty_s3, through_proxy):
    faulty_s3.client.put_object(Bucket=faulty_s3.bucket, Key="a", Body=b"1")
    faulty_s3.proxy.add("head", "a", status(500, "InternalError"))

    with pytest.raises(botocore.exceptions.ClientError) as e:
        through_proxy.head_object(Bucket=faulty_s3.bucket, Key="a")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500


def test_applied_then_fault_applies_the_request_and_answers_an_error(faulty_s3, through_proxy):
    faulty_s3.proxy.add("put", "a", applied_then(500))

    with pytest.raises(botocore.exceptions.ClientError) as e:
        through_proxy.put_object(Bucket=faulty_s3.bucket, Key="a", Body=b"1")
    assert e.value.response["Error"]["Code"] == "InternalError"
    assert faulty_s3.read(f"s3://{faulty_s3.bucket}/a") == b"1"


def test_drop_before_closes_the_connection_without_applying_the_request(faulty_s3, through_proxy):
    faulty_s3.proxy.add("put", "a", drop_before)

    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        through_proxy.put_object(Bucket=faulty_s3.bucket, Key="a", Body=b"1")
    assert not exists(faulty_s3, "a")


def test_drop_after_applies_the_request_and_closes_the_connection(faulty_s3, through_proxy):
    faulty_s3.proxy.add("delete", "a", drop_after)
    faulty_s3.client.put_object(Bucket=faulty_s3.bucket, Key="a", Body=b"1")

    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        through_proxy.delete_object(Bucket=faulty_s3.bucket, Key="a")
    assert not exists(faulty_s3, "a")


def test_truncate_sends_half_the_body_under_the_full_length(faulty_s3, through_proxy):
    faulty_s3.client.put_object(Bucket=faulty_s3.bucket, Key="a", Body=b"x" * 1000)
    faulty_s3.proxy.add("get", "a", truncate)

    reply = through_proxy.get_object(Bucket=faulty_s3.bucket, Key="a")
    assert reply["ContentLength"] == 1000
    with pytest.raises(botocore.exceptions.BotoCoreError):  # IncompleteRead / streaming error
        reply["Body"].read()


def test_stale_list_leaves_the_matching_keys_out(faulty_s3, through_proxy):
    for key in ("d/old", "d/new/1", "d/new/2"):
        faulty_s3.client.put_object(Bucket=faulty_s3.bucket, Key=key, Body=b"1")
    faulty_s3.proxy.add("list", "d/", stale_list(hide="new"))

    flat = through_proxy.list_objects_v2(Bucket=faulty_s3.bucket, Prefix="d/")
    by_dir = through_proxy.list_objects_v2(Bucket=faulty_s3.bucket, Prefix="d/", Delimiter="/")

    assert [o["Key"] for o in flat["Contents"]] == ["d/old"]
    assert flat["KeyCount"] == 1
    assert "CommonPrefixes" not in by_dir
    assert [o["Key"] for o in by_dir["Contents"]] == ["d/old"]


def test_skew_shifts_last_modified_of_heads_and_listings(faulty_s3, through_proxy):
    faulty_s3.client.put_object(Bucket=faulty_s3.bucket, Key="a", Body=b"1")
    true = faulty_s3.client.head_object(Bucket=faulty_s3.bucket, Key="a")["LastModified"]
    faulty_s3.proxy.add("head", "a", skew(-7200))
    faulty_s3.proxy.add("list", "", skew(-7200))

    head = through_proxy.head_object(Bucket=faulty_s3.bucket, Key="a")["LastModified"]
    listed = through_proxy.list_objects_v2(Bucket=faulty_s3.bucket)["Contents"][0]

    assert (true - head).total_seconds() == 7200
    assert abs((true - listed["LastModified"]).total_seconds() - 7200) < 1


def test_delay_holds_a_request_until_released(faulty_s3, through_proxy):
    release = threading.Event()
    faulty_s3.proxy.add("put", "a", delay(30, release))
    done = threading.Event()

    def put() -> None:
        through_proxy.put_object(Bucket=faulty_s3.bucket, Key="a", Body=b"1")
        done.set()

    threading.Thread(target=put, daemon=True).start()
    time.sleep(0.3)
    assert not done.is_set() and not exists(faulty_s3, "a")
    release.set()
    assert done.wait(10)
    assert exists(faulty_s3, "a")
