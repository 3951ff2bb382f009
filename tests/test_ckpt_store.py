"""Checkpoint store against a real HTTP S3 endpoint (moto's ThreadedMotoServer) and a
local directory; S3 faults come from a small fault-injecting HTTP proxy in front of moto."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
import time
import uuid
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from tests.support.ckpt_faults import corrupt, raw_key, remove  # noqa: E402
from tests.support.s3 import FAKE_SECRET, FaultProxy  # noqa: E402
from tests.support.s3 import new_bucket as _new_bucket  # noqa: E402
from vlm_trainer.checkpoint import (  # noqa: E402
    MANIFEST_NAME,
    CheckpointCommitConflict,
    CheckpointUploadError,
    CheckpointVerifyError,
    RetrySettings,
    TransferSettings,
    open_store,
    parse_step_dirname,
    step_dirname,
)

MiB = 1024 * 1024
SMALL_TRANSFER = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
                                  max_concurrency=4, file_concurrency=3)
FAST_RETRY = RetrySettings(mode="standard", max_attempts=5, connect_timeout=5, read_timeout=10)


# --------------------------------------------------------------------------- fixtures

pytestmark = pytest.mark.usefixtures("aws_env")


@pytest.fixture(params=["s3", "local"])
def store(request, tmp_path):
    if request.param == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        bucket = _new_bucket(endpoint)
        return open_store(f"s3://{bucket}/runs/r1", endpoint_url=endpoint,
                          transfer=SMALL_TRANSFER, retry=FAST_RETRY)
    return open_store(str(tmp_path / "store"), transfer=SMALL_TRANSFER, retry=FAST_RETRY)


def make_ckpt(path: Path, *, world_size: int = 2, shard_bytes: int = 100_000, seed: int = 0) -> Path:
    """A directory shaped like a torch.distributed.checkpoint save (+ an extra file)."""
    path.mkdir(parents=True, exist_ok=True)
    rnd = __import__("random").Random(seed)
    (path / ".metadata").write_bytes(rnd.randbytes(1234))
    for r in range(world_size):
        (path / f"__{r}_0.distcp").write_bytes(rnd.randbytes(shard_bytes + r))
    (path / "extra").mkdir(exist_ok=True)
    (path / "extra" / "trainer_state.json").write_text('{"data_pos": {"a": 1}}')
    return path


def upload_uncommitted(store, src: Path, stage: str, step: int):
    """What a killed upload leaves behind: the shards but no marker."""
    for p in sorted(src.rglob("*")):
        if p.is_file():
            store._put_file(p, store.step_key(stage, step) + p.relative_to(src).as_posix())


# --------------------------------------------------------------------------- basics


def test_step_dirnames_parse_robustly():
    assert step_dirname(12) == "step-000000012"
    assert parse_step_dirname("step-000000012") == 12
    assert parse_step_dirname("step-12/") == 12
    assert parse_step_dirname("step-1234567890") == 1234567890
    assert parse_step_dirname("step-x") is None and parse_step_dirname("foo") is None


def test_round_trip(store, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="vlm_trainer.checkpoint.store")
    src = make_ckpt(tmp_path / "src")
    res = store.upload(src, "pretrain", 120, world_size=2, extra={"tokens": 123})
    st = res.stats
    assert st.files == 4 and st.bytes == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert st.upload_seconds > 0 and st.commit_seconds > 0 and st.total_seconds >= st.upload_seconds

    [ref] = store.committed("pretrain")
    assert ref.uri.endswith("/pretrain/step-000000120/") and ref.uri == res.ref.uri
    m = ref.manifest
    assert (m["step"], m["stage"], m["world_size"], m["final"], m["extra"]) == (120, "pretrain", 2, False,
                                                                               {"tokens": 123})
    assert sorted(f["path"] for f in m["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                     "extra/trainer_state.json"]
    assert all(len(f["sha256"]) == 64 for f in m["files"])
    assert store.latest_committed("pretrain").step == 120
    assert store.verify(ref) == []

    dst = tmp_path / "dst"
    dl = store.download(ref, dst)
    assert dl.bytes == st.bytes and dl.files == 4
    for p in src.rglob("*"):
        if p.is_file():
            assert (dst / p.relative_to(src)).read_bytes() == p.read_bytes()
    # corrupt the stored copy: download refuses it
    corrupt(store, "pretrain", 120, "__1_0.distcp")
    with pytest.raises(CheckpointVerifyError, match="sha256 mismatch __1_0.distcp"):
        store.download(ref, tmp_path / "dst2")
    # credentials never logged nor in the repr
    assert FAKE_SECRET not in caplog.text and FAKE_SECRET not in repr(store)


def test_download_of_some_files_places_only_verified_ones(store, tmp_path):
    """A node fetches the files its ranks read (checkpoint._NodeFiles): only those arrive, each
    under its name once its sha256 matched; a corrupt one leaves nothing behind (no temp
    file, no partial file a later reader would take for complete); names outside the
    manifest are refused."""
    src = make_ckpt(tmp_path / "src")
    ref = store.upload(src, "pretrain", 7, world_size=2).ref
    dst = tmp_path / "dst"
    stats = store.download(ref, dst, files=[".metadata", "__1_0.distcp"])
    assert sorted(p.name for p in dst.iterdir()) == [".metadata", "__1_0.distcp"]
    assert stats.files == 2 and (dst / "__1_0.distcp").read_bytes() == (src / "__1_0.distcp").read_bytes()
    corrupt(store, "pretrain", 7, "__0_0.distcp")
    with pytest.raises(CheckpointVerifyError, match="sha256 mismatch __0_0.distcp") as err:
        store.download(ref, dst, files=["__0_0.distcp"])
    assert sorted(p.name for p in dst.iterdir()) == [".metadata", "__1_0.distcp"]
    sent = pickle.loads(pickle.dumps(err.value))  # as DCP sends a rank's read error to the others
    assert (str(sent), sent.problems) == (str(err.value), ["sha256 mismatch __0_0.distcp"])
    with pytest.raises(CheckpointVerifyError, match="not in the manifest: __9_0.distcp"):
        store.download(ref, dst, files=["__9_0.distcp"])


@pytest.mark.parametrize("checksum", [None, "when_required"])
def test_multipart_used_above_threshold(moto_endpoint, tmp_path, checksum):
    bucket = _new_bucket(moto_endpoint)
    store = open_store(f"s3://{bucket}/mp/", endpoint_url=moto_endpoint, transfer=SMALL_TRANSFER,
                       retry=FAST_RETRY, request_checksum=checksum)
    src = make_ckpt(tmp_path / "src", world_size=1, shard_bytes=11 * MiB)
    store.upload(src, "s", 1, world_size=1)
    big = store.client.head_object(Bucket=bucket, Key=raw_key(store, "s", 1, "__0_0.distcp"))
    small = store.client.head_object(Bucket=bucket, Key=raw_key(store, "s", 1, ".metadata"))
    assert big["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB parts
    assert "-" not in small["ETag"]
    store.download(store.latest_committed("s"), tmp_path / "dst")
    data = (tmp_path / "dst" / "__0_0.distcp").read_bytes()
    assert data == (src / "__0_0.distcp").read_bytes()
    # the manifest's checksum (computed while the file uploaded) is that of the bytes stored
    assert hashlib.sha256(data).hexdigest() == next(f["sha256"] for f in store.latest_committed("s").files
                                                    if f["path"] == "__0_0.distcp")


def test_second_commit_of_a_step_fails_cleanly(store, tmp_path):
    first = store.upload(make_ckpt(tmp_path / "a", seed=1), "pretrain", 7, world_size=2)
    with pytest.raises(CheckpointCommitConflict, match="already committed"):
        store.upload(make_ckpt(tmp_path / "b", seed=2), "pretrain", 7, world_size=2)
    [ref] = store.committed("pretrain")
    assert ref.manifest["id"] == first.ref.manifest["id"]  # the first commit stands
    if store.uri.startswith("s3://"):  # the server itself honours IfNoneMatch
        from botocore.exceptions import ClientError

        with pytest.raises(ClientError) as ei:
            store.client.put_object(Bucket=store.bucket, Key=raw_key(store, "pretrain", 7, MANIFEST_NAME),
                                    Body=b"{}", IfNoneMatch="*")
        assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


# --------------------------------------------------------------------------- resume


def test_resume_skips_incomplete(store, tmp_path, caplog):
    for step in (10, 20, 30, 40):
        store.upload(make_ckpt(tmp_path / f"c{step}", seed=step), "pretrain", step, world_size=2)
    upload_uncommitted(store, make_ckpt(tmp_path / "c50", seed=50), "pretrain", 50)  # killed upload
    remove(store, "pretrain", 40, "__1_0.distcp")  # missing shard
    corrupt(store, "pretrain", 30, "__0_0.distcp")  # corrupted (same size)
    assert [r.step for r in store.committed("pretrain")] == [40, 30, 20, 10]

    caplog.set_level(logging.WARNING, logger="vlm_trainer.checkpoint.store")
    # one listing: the killed upload and the missing shard are seen; a same-size corruption is not
    chosen = store.resolve_resume("pretrain")
    assert chosen.step == 30
    text = caplog.text
    assert "step-000000050" in text and "no valid COMMITTED" in text and "missing file __1_0.distcp" in text
    # ...its reader finds it (sha256 while downloading) and names it: the next one is chosen
    with pytest.raises(CheckpointVerifyError, match="sha256 mismatch __0_0.distcp"):
        store.download(chosen, tmp_path / "resume")
    ref = store.resolve_resume("pretrain", skip=[chosen.uri])
    assert ref.step == 20
    store.download(ref, tmp_path / "resume20")
    assert (tmp_path / "resume20" / "__0_0.distcp").read_bytes() == (tmp_path / "c20" / "__0_0.distcp").read_bytes()

    # a truncated marker does not count
    corrupt(store, "pretrain", 20, MANIFEST_NAME, same_size=False)
    corrupt(store, "pretrain", 10, "__0_0.distcp", same_size=False)
    assert store.resolve_resume("pretrain", skip=[chosen.uri]) is None


def test_prev_stage_final_fallback(store, tmp_path):
    assert store.resolve_resume("sft", "pretrain") is None
    store.upload(make_ckpt(tmp_path / "a", seed=1), "pretrain", 90, world_size=2)
    assert store.resolve_resume("sft", "pretrain") is None  # not final: not a stage result
    store.upload(make_ckpt(tmp_path / "b", seed=2), "pretrain", 100, world_size=2, final=True)
    ref = store.resolve_resume("sft", "pretrain")
    assert (ref.stage, ref.step, ref.final) == ("pretrain", 100, True)
    store.upload(make_ckpt(tmp_path / "c", seed=3), "sft", 5, world_size=1)
    assert (store.resolve_resume("sft", "pretrain").stage, store.resolve_resume("sft", "pretrain").step) == ("sft", 5)
    # the final one damaged and sft empty -> nothing valid
    remove(store, "sft", 5, MANIFEST_NAME)
    corrupt(store, "pretrain", 100, ".metadata", same_size=False)
    assert store.resolve_resume("sft", "pretrain") is None


# --------------------------------------------------------------------------- retention


def _steps_present(store, stage):
    return sorted(r.step for r in store.checkpoints(stage))


def test_prune_keeps_exactly_keep(store, tmp_path):
    src = make_ckpt(tmp_path / "src", shard_bytes=1000)
    for step in (10, 20, 30, 40, 50, 60):
        store.upload(src, "pretrain", step, world_size=2, final=(step == 20))
    upload_uncommitted(store, src, "pretrain", 35)  # garbage: older than newest committed
    upload_uncommitted(store, src, "pretrain", 70)  # maybe in flight: left alone

    res = store.prune("pretrain", keep=2)
    assert sorted(res.deleted) == [10, 30, 40] and res.garbage == [35] and res.skipped_inflight == [70]
    assert [r.step for r in store.committed("pretrain")] == [60, 50, 20]  # 2 newest + the final one
    assert _steps_present(store, "pretrain") == [20, 50, 60, 70]
    # keep=0 still never deletes the newest committed one
    res = store.prune("pretrain", keep=0)
    assert [r.step for r in store.committed("pretrain")] == [60, 20]
    assert store.resolve_resume("pretrain").step == 60
    if not store.uri.startswith("s3://"):  # no empty directories left behind
        assert sorted(p.name for p in (store.root / "pretrain").iterdir()) == [
            "step-000000020", "step-000000060", "step-000000070"]


def test_prune_deletes_marker_first(store, tmp_path):
    src = make_ckpt(tmp_path / "src", shard_bytes=1000)
    for step in (1, 2, 3):
        store.upload(src, "pretrain", step, world_size=2)
    calls = []
    real = store._delete_keys

    def failing(keys):
        calls.append(list(keys))
        if len(calls) == 2:
            raise OSError("injected failure between marker and shard deletion")
        real(keys)

    store._delete_keys = failing
    with pytest.raises(OSError, match="injected"):
        store.prune("pretrain", keep=1)
    assert calls[0] == [store.step_key("pretrain", 2) + MANIFEST_NAME]  # the marker alone, first
    assert all(not k.endswith(MANIFEST_NAME) for k in calls[1])
    # the half-deleted checkpoint is left uncommitted: never valid for resume
    half = parse_step_dirname(calls[0][0].split("/")[1])
    refs = {r.step: r for r in store.checkpoints("pretrain")}
    assert half in refs and not refs[half].committed
    assert half not in [r.step for r in store.committed("pretrain")]
    store._delete_keys = real
    assert store.resolve_resume("pretrain").step == 3
    res = store.prune("pretrain", keep=1)  # finishes the job: the leftover is garbage now
    assert _steps_present(store, "pretrain") == [3] and half in res.garbage + res.deleted


# --------------------------------------------------------------------------- S3 faults


@pytest.fixture
def proxy(moto_endpoint):
    p = FaultProxy(moto_endpoint)
    yield p
    p.close()


def test_transient_faults_are_retried(proxy, moto_endpoint, tmp_path):
    bucket = _new_bucket(moto_endpoint)
    store = open_store(f"s3://{bucket}/faults/", endpoint_url=proxy.url, transfer=SMALL_TRANSFER,
                       retry=FAST_RETRY)
    src = make_ckpt(tmp_path / "src", world_size=2, shard_bytes=11 * MiB)  # multipart shards
    proxy.fail("UploadPart", 500, 2)
    proxy.fail("UploadPart", "drop", 2)  # connection reset in the middle of an UploadPart
    proxy.fail("UploadPart", 503, 1)
    proxy.fail("PutObject", 503, 1)  # SlowDown on a small file
    proxy.fail("PutObject", "drop", 1)
    proxy.fail("CompleteMultipartUpload", 500, 1)
    proxy.fail("PutCommitted", 503, 1)
    res = store.upload(src, "pretrain", 1, world_size=2)

    assert set(proxy.injected) == {("UploadPart", 500), ("UploadPart", "drop"), ("UploadPart", 503),
                                   ("PutObject", 503), ("PutObject", "drop"),
                                   ("CompleteMultipartUpload", 500), ("PutCommitted", 503)}
    assert len(proxy.injected) == 9
    assert res.stats.sdk_retries >= 7  # botocore retried them: there is no other retry loop
    # the data verifies, read back around the proxy too
    direct = open_store(f"s3://{bucket}/faults/", endpoint_url=moto_endpoint)
    assert direct.verify(direct.latest_committed("pretrain")) == []
    store.download(res.ref, tmp_path / "dst")
    assert (tmp_path / "dst" / "__1_0.distcp").read_bytes() == (src / "__1_0.distcp").read_bytes()


def test_adaptive_retry_mode(proxy, moto_endpoint, tmp_path):
    """botocore's adaptive mode (client-side rate limiting after throttling) also works;
    it slows the client down after a SlowDown, so the fault set is kept small here."""
    bucket = _new_bucket(moto_endpoint)
    store = open_store(f"s3://{bucket}/a/", endpoint_url=proxy.url, transfer=SMALL_TRANSFER,
                       retry=dataclasses.replace(FAST_RETRY, mode="adaptive"))
    src = make_ckpt(tmp_path / "src", world_size=1, shard_bytes=6 * MiB)
    proxy.fail("UploadPart", 500, 1)
    proxy.fail("PutObject", 503, 1)
    res = store.upload(src, "s", 1, world_size=1)
    assert len(proxy.injected) == 2 and res.stats.sdk_retries == 2
    assert store.verify(res.ref) == []


def test_botocore_is_the_only_retry_policy(proxy, moto_endpoint, tmp_path):
    """With botocore's retries off (max_attempts=1) one transient fault fails the upload:
    nothing retries on top of botocore; the same fault with retries on is absorbed."""
    bucket = _new_bucket(moto_endpoint)
    src = make_ckpt(tmp_path / "src", world_size=1, shard_bytes=1000)
    once = open_store(f"s3://{bucket}/p/", endpoint_url=proxy.url, transfer=SMALL_TRANSFER,
                      retry=RetrySettings(max_attempts=1))
    proxy.fail("PutObject", 500, 1)
    with pytest.raises(CheckpointUploadError) as ei:
        once.upload(src, "s", 3, world_size=1)
    assert proxy.injected == [("PutObject", 500)] and ei.value.stats.sdk_retries == 0
    assert once.committed("s") == []
    twice = open_store(f"s3://{bucket}/p/", endpoint_url=proxy.url, transfer=SMALL_TRANSFER,
                       retry=RetrySettings(max_attempts=2))
    proxy.fail("PutObject", 500, 1)
    res = twice.upload(src, "s", 3, world_size=1)
    assert res.stats.sdk_retries == 1 and twice.verify(res.ref) == []


def test_persistent_failure_raises(proxy, moto_endpoint, tmp_path):
    bucket = _new_bucket(moto_endpoint)
    rs = RetrySettings(max_attempts=2)
    store = open_store(f"s3://{bucket}/p/", endpoint_url=proxy.url, transfer=SMALL_TRANSFER, retry=rs)
    src = make_ckpt(tmp_path / "src", world_size=1, shard_bytes=1000)
    proxy.fail("PutObject", 500, -1)
    t0 = time.monotonic()
    with pytest.raises(CheckpointUploadError, match="upload of s step 4") as ei:
        store.upload(src, "s", 4, world_size=1)
    assert time.monotonic() - t0 < 10
    assert ei.value.stats is not None and ei.value.stats.sdk_retries >= 1
    assert "PutCommitted" not in proxy.seen  # nothing committed
    assert store.committed("s") == [] and store.resolve_resume("s") is None

    # non-transient errors fail fast, without retries: a bucket that does not exist
    missing = open_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x/", endpoint_url=moto_endpoint,
                         retry=rs)
    with pytest.raises(CheckpointUploadError) as ei:
        missing.upload(src, "s", 1, world_size=1)
    assert ei.value.stats.sdk_retries == 0


# --------------------------------------------------------------------------- multi-uploader commit, final, URIs


def test_upload_files_by_several_uploaders_then_one_commit(store, tmp_path):
    """Per-node uploads (each node its own files) and one commit over all of them."""
    src = make_ckpt(tmp_path / "src", world_size=2)
    node0 = tmp_path / "node0"
    node1 = tmp_path / "node1"
    node0.mkdir()
    node1.mkdir()
    for name in (".metadata", "__0_0.distcp"):
        (node0 / name).write_bytes((src / name).read_bytes())
    (node1 / "__1_0.distcp").write_bytes((src / "__1_0.distcp").read_bytes())
    e0, s0 = store.upload_files(node0, "pretrain", 5)
    assert store.committed("pretrain") == [] and s0.files == 2  # uploaded, not committed
    with pytest.raises(CheckpointUploadError, match="not uploaded as listed"):
        # node 1's file is not there yet: the listing check refuses to commit
        store.commit("pretrain", 5, e0 + [{"path": "__1_0.distcp", "size": 1, "sha256": "0" * 64}], world_size=2)
    e1, _ = store.upload_files(node1, "pretrain", 5)
    with pytest.raises(CheckpointUploadError, match="two different files"):
        store.commit("pretrain", 5, e0 + e1 + [dict(e1[0], sha256="1" * 64)], world_size=2)
    with pytest.raises(CheckpointUploadError, match="files missing"):
        store.upload_files(node1, "pretrain", 5, files=["nope"])
    res = store.commit("pretrain", 5, e0 + e1 + e0[:1], world_size=2, extra={"nodes": 2})
    assert res.ref.committed and res.ref.world_size == 2 and res.ref.extra == {"nodes": 2}
    assert sorted(f["path"] for f in res.ref.files) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    got = store.resolve_resume("pretrain")
    assert got.step == 5
    store.download(got, tmp_path / "dl")
    assert (tmp_path / "dl" / "__1_0.distcp").read_bytes() == (src / "__1_0.distcp").read_bytes()


def test_mark_final_and_refs_from_uris(store, tmp_path):
    from vlm_trainer.checkpoint import open_step_uri

    src = make_ckpt(tmp_path / "src", world_size=1)
    ref = store.upload(src, "pretrain", 7, world_size=1).ref
    assert not ref.final
    final = store.mark_final(ref)
    assert final.final and final.step == 7
    again = store.latest_committed("pretrain")
    assert again.final and again.manifest["id"] == ref.manifest["id"] and store.verify(again) == []
    assert store.prune("pretrain", keep=1).kept == [7]
    assert store.resolve_resume("sft", prev_stage="pretrain").step == 7  # usable to initialise the next stage
    # a step directory URI (TrainerConfig.init_from) -> the checkpoint
    uri = store.step_uri("pretrain", 7)
    got = store.ref_from_uri(uri)
    assert got.committed and got.final and got.step == 7 and got.stage == "pretrain"
    assert store.ref_from_uri(store.step_uri("pretrain", 8)).committed is False
    with pytest.raises(ValueError):
        store.ref_from_uri(store.uri + "pretrain/")
    other, got2 = open_step_uri(uri, **({"endpoint_url": store.endpoint_url} if store.uri.startswith("s3://") else {}))
    assert other.uri == store.uri and got2.step == 7 and got2.final
