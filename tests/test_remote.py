"""Model/tokenizer downloads (vlm_trainer.remote.localize): every object under the prefix
lands inside the cache directory, and an object key that would not (``../``, absolute,
empty or dot segments, backslashes, the completion marker) fails the download."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm_trainer import remote


@pytest.mark.parametrize("key,rel", [
    ("models/m/config.json", "config.json"),
    ("models/m/sub/dir/weights.safetensors", "sub/dir/weights.safetensors"),
    ("models/m/..hidden", "..hidden"),  # dots inside a name are a name
    ("models/m/sub/", None),  # a "directory" marker object
    ("models/m/", None),
])
def test_keys_inside_the_prefix_map_to_relative_paths(key, rel):
    assert remote.safe_relative(key, "models/m/") == rel


@pytest.mark.parametrize("key", [
    "models/m/../../../etc/passwd",
    "models/m/../sibling/x",
    "models/m/a/../../b",
    "models/m/..",
    "models/m//etc/x",  # an absolute remainder
    "models/m/./x",
    "models/m/a//b",
    "models/m/a\\..\\..\\x",
    "models/m/.complete",  # would mark a half download complete
    "models/m/a\0b",
])
def test_keys_that_leave_the_destination_are_refused(key):
    with pytest.raises(remote.UnsafeKey, match="refused"):
        remote.safe_relative(key, "models/m/")


def _put(endpoint: str, bucket: str, keys: dict[str, bytes]) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for key, body in keys.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


@pytest.fixture
def s3_env(moto_endpoint, tmp_path, monkeypatch):
    from tests.support.s3 import new_bucket

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    return moto_endpoint, new_bucket(moto_endpoint), tmp_path


def test_download_of_a_clean_prefix(s3_env):
    endpoint, bucket, tmp = s3_env
    _put(endpoint, bucket, {"m/config.json": b"{}", "m/sub/w.bin": b"\x00" * 10})
    local = remote.localize(f"s3://{bucket}/m/")
    files = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file())
    assert files == [".complete", "config.json", "sub/w.bin"]


def test_a_traversal_key_fails_the_download_and_writes_nothing_outside(s3_env):
    endpoint, bucket, tmp = s3_env
    _put(endpoint, bucket, {"m/config.json": b"{}", "m/../../../../escaped.txt": b"pwned"})
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            .list_objects_v2(Bucket=bucket, Prefix="m/")["Contents"]]
    assert "m/../../../../escaped.txt" in keys, keys  # the store keeps the key verbatim
    with pytest.raises(remote.UnsafeKey):
        remote.localize(f"s3://{bucket}/m/")
    assert not list(tmp.rglob("escaped.txt"))
    assert not list((tmp / "cache").rglob(".complete")), "a refused download must not be marked complete"
