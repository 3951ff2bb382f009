"""Damage a stored checkpoint the way storage faults do (tests of the checkpoint store, the
manager and the multi-process workers, which import this file by its directory)."""


def raw_key(store, stage, step, rel) -> str:
    """The object key of one stored checkpoint file."""
    return store.prefix + store.step_key(stage, step) + rel


def corrupt(store, stage, step, rel, *, same_size=True):
    """Overwrite one stored file (same size, different bytes) or truncate it."""
    if store.uri.startswith("s3://"):
        key = raw_key(store, stage, step, rel)
        data = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
        new = bytes([data[0] ^ 0xFF]) + data[1:] if same_size else data[:-1]
        store.client.put_object(Bucket=store.bucket, Key=key, Body=new)
    else:
        p = store.root / store.step_key(stage, step) / rel
        data = p.read_bytes()
        p.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:] if same_size else data[:-1])


def remove(store, stage, step, rel):
    if store.uri.startswith("s3://"):
        store.client.delete_object(Bucket=store.bucket, Key=raw_key(store, stage, step, rel))
    else:
        (store.root / store.step_key(stage, step) / rel).unlink()
