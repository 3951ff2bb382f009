"""How the trainer reaches its data and models on a shared cluster (issue 17): each S3
source reads with its own credentialsSecret (else the data spec's, else boto3's default
chain), and pvc://CLAIM/path is read from where the claim is mounted (VLM_PVC_DIRS, which
`vlmpretrain local --pvc CLAIM=DIR` sets the same way). Real boto3 against moto's S3 server,
real shards."""

from __future__ import annotations

import pytest

from vlm_api import cli, cluster
from vlm_api.schema import DataSpec
from vlm_trainer.data import synthdata
from vlm_trainer.data.loader import open_sources
from vlm_trainer.data.shards import s3_client

pytestmark = pytest.mark.integration

OWN_ID, OWN_KEY = "AKIDCAPSREADER000001", "caps-reader-secret-key-0000000000000000"


def _used_key(source) -> str:
    return source._client._request_signer._credentials.access_key


def test_sources_read_with_their_own_secret_else_the_default_chain_and_pvc_locally(tmp_path, moto_endpoint,
                                                                                      monkeypatch, aws_env):
    data = synthdata.generate(tmp_path, seed=5, samples_per_shard=4, shards={"text": 1, "captions": 2}, image_size=16)
    admin = s3_client(moto_endpoint)
    admin.create_bucket(Bucket="corpora")
    for i in range(2):
        admin.upload_file(str(tmp_path / "captions" / f"train-{i:04d}.tar"), "corpora", f"caps/train-{i:04d}.tar")
        admin.upload_file(str(tmp_path / "captions" / f"train-{i:04d}.tar"), "corpora", f"more/train-{i:04d}.tar")
    spec = DataSpec.model_validate({"sources": [
        {"name": "text", "modality": "text", "uri": "pvc://shards/text/train-{0000..0000}.tar"},
        {"name": "caps", "modality": "image-text", "uri": "s3://corpora/caps/train-{0000..0001}.tar",
         "credentialsSecret": "caps-reader"},
        {"name": "more", "modality": "image-text", "uri": "s3://corpora/more/train-{0000..0001}.tar"},
    ]})
    # what render.py puts in the pod: the claim's mount and the Secret's keys under its prefix
    monkeypatch.setenv(cluster.PVC_ENV, f"shards={tmp_path}")
    monkeypatch.setenv("VLM_S3_CAPS_READER_AWS_ACCESS_KEY_ID", OWN_ID)
    monkeypatch.setenv("VLM_S3_CAPS_READER_AWS_SECRET_ACCESS_KEY", OWN_KEY)
    sources = open_sources(spec, ["text", "caps", "more"], image=None, seed=0, endpoint_url=moto_endpoint)
    assert sources["text"].shards == [str(tmp_path / "text" / "train-0000.tar")]
    assert [src.epoch_length() for src in sources.values()] == [4, 8, 8]  # every shard read
    assert all(next(src.samples()).segments for src in sources.values())
    assert _used_key(sources["caps"]) == OWN_ID
    assert _used_key(sources["more"]) == aws_env["AWS_ACCESS_KEY_ID"]  # no Secret: the default chain
    assert OWN_KEY not in repr(sources["caps"])
    # a Secret named but not mounted: one clear line naming the variables, not a silent fallback
    monkeypatch.delenv("VLM_S3_CAPS_READER_AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ValueError, match="VLM_S3_CAPS_READER_AWS_SECRET_ACCESS_KEY"):
        open_sources(spec, ["caps"], image=None, seed=0, endpoint_url=moto_endpoint)


def test_local_runs_map_a_claim_to_a_directory(tmp_path):
    """The same claim outside a pod: `vlmpretrain local --pvc shards=DIR`."""
    from tests.support.operator_harness import spec as run_spec
    from vlm_api.schema import parse_spec
    from vlm_local.options import LocalOptions, missing_shards

    synthdata.generate(tmp_path, seed=5, samples_per_shard=4, shards={"text": 1, "captions": 2}, image_size=16)
    args = cli.build_parser().parse_args(["local", "run.yaml", "--pvc", f"shards={tmp_path}"])
    opts = LocalOptions.from_args(args)
    assert opts.env == {cluster.PVC_ENV: f"shards={tmp_path}"}
    full = parse_spec(run_spec(data={"seqLength": 128, "sources": [
        {"name": "text", "modality": "text", "uri": "pvc://shards/text/train-{0000..0000}.tar"},
        {"name": "caps", "modality": "image-text", "uri": "pvc://shards/captions/train-{0000..0001}.tar"}]}))
    stage = full.stages[0]
    assert missing_shards(full, stage, tmp_path, cluster.parse_pvc_dirs(opts.env[cluster.PVC_ENV])) == []
    assert "--pvc shards=DIR" in missing_shards(full, stage, tmp_path, {})[0]
    with pytest.raises(ValueError, match="CLAIM=DIR"):
        cluster.local_pvc_env(["no-directory"])
