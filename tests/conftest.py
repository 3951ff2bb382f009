"""Shared fixtures."""

from __future__ import annotations

import pytest


# --------------------------------------------------------------------------- S3 (moto over HTTP)


@pytest.fixture(scope="session")
def aws_env():
    """Fake AWS credentials for the session (boto3 clients here and in worker processes);
    no profile, endpoint or region leaks in from the machine."""
    from tests.support.s3 import AWS_ENV_UNSET, fake_aws_env

    with pytest.MonkeyPatch.context() as mp:
        for k, v in fake_aws_env().items():
            mp.setenv(k, v)
        for k in AWS_ENV_UNSET:
            mp.delenv(k, raising=False)
        yield fake_aws_env()


@pytest.fixture(scope="session")
def moto_endpoint(aws_env):
    """A real HTTP S3 endpoint: moto's ThreadedMotoServer on a free local port."""
    moto_server = pytest.importorskip("moto.server")
    from tests.support.s3 import free_port

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
