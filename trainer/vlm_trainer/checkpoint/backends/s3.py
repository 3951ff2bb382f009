"""A checkpoint store in S3 (or an S3-compatible store) through boto3.

``endpoint_url`` (or env ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) selects an
S3-compatible store and switches to path-style addressing. Region from ``AWS_REGION`` /
``AWS_DEFAULT_REGION`` (default ``us-east-1``). Credentials come only from the standard AWS
environment / boto3's default chain: never arguments, never stored here, never logged.
``request_checksum`` ("when_supported" / "when_required") sets botocore's request/response
checksum behaviour ("when_required" for stores that reject botocore's aws-chunked CRC trailers).
Retries: botocore's, configured from ``RetrySettings`` (``transfer.py``), nothing on top.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from ..errors import CheckpointStoreError
from ..layout import HASH_CHUNK
from ..store import CheckpointStore


def _not_found(e: Exception) -> bool:
    """A botocore ClientError for a missing key (404 / NoSuchKey)."""
    from botocore.exceptions import ClientError

    if not isinstance(e, ClientError):
        return False
    code = str(e.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound") or e.response.get("ResponseMetadata", {}).get(
        "HTTPStatusCode") == 404


def _precondition_failed(e: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(e, ClientError):
        return False
    return (e.response.get("Error", {}).get("Code") == "PreconditionFailed"
            or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412)


class S3CheckpointStore(CheckpointStore):
    def __init__(self, uri: str, *, endpoint_url: Optional[str] = None, region: Optional[str] = None,
                 addressing_style: Optional[str] = None, request_checksum: Optional[str] = None, **kwargs):
        import boto3
        from botocore.config import Config

        u = urlparse(uri)
        if u.scheme != "s3" or not u.netloc:
            raise ValueError(f"not an s3:// URI: {uri!r}")
        self.bucket = u.netloc
        p = u.path.lstrip("/")
        self.prefix = p if (not p or p.endswith("/")) else p + "/"
        super().__init__(f"s3://{self.bucket}/{self.prefix}", **kwargs)
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        self.region = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or "us-east-1")
        cfg: dict[str, Any] = dict(
            region_name=self.region, retries=self.retry.botocore_retries(),
            s3={"addressing_style": addressing_style or ("path" if self.endpoint_url else "auto")},
            connect_timeout=self.retry.connect_timeout, read_timeout=self.retry.read_timeout,
            max_pool_connections=max(10, self.transfer.max_concurrency * self.transfer.file_concurrency + 4),
        )
        if request_checksum:
            cfg.update(request_checksum_calculation=request_checksum, response_checksum_validation=request_checksum)
        session = boto3.session.Session()  # credentials: env / default chain, never arguments
        self._client = session.client("s3", endpoint_url=self.endpoint_url, config=Config(**cfg))
        self._tc = self.transfer.transfer_config()
        self._sdk_retries = 0
        self._retries_lock = threading.Lock()
        self._client.meta.events.register("after-call.s3", self._count_retries)
        self._client.meta.events.register("after-call-error.s3", self._count_retries_error)

    def __repr__(self) -> str:
        return f"S3CheckpointStore({self.uri!r}, endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    @property
    def client(self):
        return self._client

    def _count_retries(self, parsed=None, **_):
        n = int(((parsed or {}).get("ResponseMetadata") or {}).get("RetryAttempts") or 0)
        if n:
            with self._retries_lock:
                self._sdk_retries += n

    def _count_retries_error(self, exception=None, **_):
        # a request that failed for good: botocore counted its retries in the error's response
        resp = getattr(exception, "response", None)
        if isinstance(resp, dict):
            self._count_retries(parsed=resp)

    def _sdk_retry_count(self) -> int:
        with self._retries_lock:
            return self._sdk_retries

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _list(self, prefix: str) -> dict[str, int]:
        out = {}
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
            for o in page.get("Contents", []) or []:
                out[o["Key"][len(self.prefix):]] = int(o["Size"])
        return out

    def _put_file(self, local: Path, key: str) -> None:
        self._client.upload_file(str(local), self.bucket, self._k(key), Config=self._tc)

    def _put_exclusive(self, key: str, data: bytes) -> bool:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*",
                                    ContentType="application/json")
            return True
        except Exception as e:
            if _precondition_failed(e):
                return False
            raise  # 409 ConditionalRequestConflict included: the commit fails, the next save retries

    def _put_overwrite(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, ContentType="application/json")

    def _get_bytes(self, key: str) -> Optional[bytes]:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except Exception as e:
            if _not_found(e):
                return None
            raise

    def _get_file(self, key: str, local: Path) -> bool:
        try:
            self._client.download_file(self.bucket, self._k(key), str(local), Config=self._tc)
        except Exception as e:
            if _not_found(e):
                return False
            raise
        return True

    def _hash_object(self, key: str) -> tuple[int, str]:
        try:
            r = self._client.get_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as e:
            if _not_found(e):
                return -1, ""
            raise
        h = hashlib.sha256()
        n = 0
        for chunk in r["Body"].iter_chunks(HASH_CHUNK):
            h.update(chunk)
            n += len(chunk)
        return n, h.hexdigest()

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            if len(batch) == 1:
                self._client.delete_object(Bucket=self.bucket, Key=self._k(batch[0]))
                continue
            r = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": self._k(k)} for k in batch], "Quiet": True})
            errs = r.get("Errors") or []
            if errs:
                raise CheckpointStoreError(f"delete failed for {len(errs)} objects in {self.uri}: "
                                           + ", ".join(f"{e.get('Key')}: {e.get('Code')}" for e in errs[:5]))
