"""Shard reading (local path, file://, s3:// via moto's HTTP server) and the synthetic dataset."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import re
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter

from vlm_api.quantities import expand_braces
from vlm_trainer.data import shards as shards_mod
from vlm_trainer.data import synthdata
from vlm_trainer.data.shards import ImageSeg, ImageTransform, ShardedSource, TextSeg

SIZE = 64
PLAIN = ImageTransform(size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # pixels = RGB / 255
PER_SHARD = 10
SHARDS = {"captions": 3, "text": 2, "interleaved": 2, "instruct": 1, "text-instruct": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return synthdata.generate(root, seed=3, samples_per_shard=PER_SHARD, shards=SHARDS, image_size=SIZE)


def source(data, name, **kw) -> ShardedSource:
    kw.setdefault("image", PLAIN)
    return ShardedSource(name, data[name]["modality"], data[name]["uri"], **kw)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def png(colour, size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def write_tar(path: Path, samples: list[dict]) -> str:
    with TarWriter(str(path), mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def rgb_at(seg: ImageSeg, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.rint(seg.pixels[:, y, x] * 255))


# ----------------------------------------------------------------------------- round trips


def test_generate_returns_data_sources_and_manifest(data):
    assert set(data) == set(SHARDS)
    for name, spec in data.items():
        assert spec["modality"] == synthdata.SOURCES[name]
        assert spec["uri"].endswith(f"train-{{0000..{SHARDS[name] - 1:04d}}}.tar")
        assert [Path(p).is_file() for p in expand_braces(spec["validationUri"])] == [True]
    manifest = json.loads((Path(data["text"]["uri"]).parents[1] / "synthdata.json").read_text())
    assert manifest["sources"] == data


@pytest.mark.parametrize("name", list(SHARDS))
def test_round_trip_per_source(data, name):
    src = source(data, name)
    n = src.epoch_length()
    assert n == SHARDS[name] * PER_SHARD
    samples = take(src.samples(), n)
    assert [s.index for s in samples] == list(range(n))
    assert len({s.key for s in samples}) == n and {s.source for s in samples} == {name}
    assert not src.skipped
    for s in samples:
        kinds = "".join("I" if isinstance(seg, ImageSeg) else "T" for seg in s.segments)
        texts = [seg.text for seg in s.segments if isinstance(seg, TextSeg)]
        if name in ("text", "text-instruct"):
            assert kinds == "T" and texts[0]
        if name == "text-instruct":
            assert re.fullmatch(r"USER: .+\? ASSISTANT: .+|USER: count .+ ASSISTANT: .+", texts[0])
        if name == "captions":
            assert kinds == "IT" and re.fullmatch(r"an? \w+ \w+ (on|at|in) the \w+( and .+)?", texts[0])
        if name == "interleaved":  # every image is followed by its description
            assert kinds[0] == "T" and "I" in kinds
            for i, seg in enumerate(s.segments):
                if isinstance(seg, ImageSeg):
                    assert s.segments[i + 1].text.startswith("this one shows ")
        if name == "instruct":
            assert kinds == "TIT" and texts[0] == "USER: " and " ASSISTANT: " in texts[1]
        for seg in s.segments:
            if isinstance(seg, ImageSeg):
                assert seg.pixels.shape == (3, SIZE, SIZE) and seg.pixels.dtype == np.float32
                assert 0.0 <= seg.pixels.min() and seg.pixels.max() <= 1.0


def test_interleaved_json_styles(tmp_path, data):
    red, blue = (255, 0, 0), (0, 0, 255)
    url = write_tar(tmp_path / "i.tar", [
        {"__key__": "seg", "0.png": png(red), "1.png": png(blue), "json": json.dumps({"segments": [
            {"type": "text", "text": "hello"}, {"type": "image", "image": "0.png"},
            {"type": "text", "text": "bye"}, {"type": "image", "image": "1.png"}]})},
        {"__key__": "obelics", "0.png": png(blue), "json": json.dumps(
            {"texts": ["x", None, None, "y"], "images": [None, "0.png", None, None]})},
    ])
    got = take(ShardedSource("i", "interleaved", url, image=ImageTransform(4, (0, 0, 0), (1, 1, 1))).samples(), 2)
    shown = [[seg.text if isinstance(seg, TextSeg) else rgb_at(seg, 1, 1) for seg in s.segments] for s in got]
    assert shown == [["hello", red, "bye", blue], ["x", blue, "y"]]
    # The synthetic interleaved source uses both styles too.
    raws = take(source(data, "interleaved").raw(), 4)
    assert {next(iter(json.loads(r.members["json"]))) for r in raws} == {"segments", "texts"}


def test_plain_path_and_file_uri_agree(data):
    plain = take(source(data, "captions").samples(), 12)
    uri = take(ShardedSource("captions", "image-text", "file://" + data["captions"]["uri"], image=PLAIN).samples(), 12)
    assert [s.key for s in plain] == [s.key for s in uri]
    assert all(np.array_equal(a.segments[0].pixels, b.segments[0].pixels) for a, b in zip(plain, uri))


@pytest.fixture()
def moto_endpoint(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    for var, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_s3_matches_local(data, moto_endpoint, monkeypatch):
    client = shards_mod.s3_client(moto_endpoint)
    client.create_bucket(Bucket="data")
    for path in sorted(Path(data["captions"]["uri"]).parent.glob("train-*.tar")):
        client.upload_file(str(path), "data", f"captions/{path.name}")
    uri = "s3://data/captions/train-{0000..0002}.tar"
    local = take(source(data, "captions").samples(), 25)
    by_arg = ShardedSource("captions", "image-text", uri, image=PLAIN, endpoint_url=moto_endpoint)
    remote = take(by_arg.samples(3), 22)  # a resume: seeks within a shard over HTTP
    assert [s.key for s in remote] == [s.key for s in local[3:]]
    assert all(np.array_equal(a.segments[0].pixels, b.segments[0].pixels) for a, b in zip(local[3:], remote))
    assert pickle.loads(pickle.dumps(by_arg)).epoch_length() == 30  # the client is not pickled
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    by_env = ShardedSource("captions", "image-text", uri, image=PLAIN)
    assert [s.key for s in take(by_env.samples(), 5)] == [s.key for s in local[:5]]


# ----------------------------------------------------------------------------- bad data


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    url = write_tar(tmp_path / "bad.tar", [
        {"__key__": "good0", "png": png((0, 255, 0)), "txt": "a green square"},
        {"__key__": "broken", "png": b"\x89PNG\r\n\x1a\nnot really", "txt": "x"},
        {"__key__": "noimage", "txt": "caption without image"},
        {"__key__": "good1", "jpg": png((0, 255, 0)), "txt": "PIL sniffs the format, not the name"},
    ])
    src = ShardedSource("bad", "image-text", url, image=ImageTransform(8))
    got = take(src.samples(), 4)  # cycles: good ones of two epochs
    assert [(s.key, s.index) for s in got] == [("good0", 0), ("good1", 3), ("good0", 4), ("good1", 7)]
    assert sum(src.skipped.values()) == 4 and "skipped sample 'noimage'" in caplog.text

    url = write_tar(tmp_path / "badjson.tar", [
        {"__key__": "notjson", "json": "{oops"},
        {"__key__": "dangling", "json": json.dumps({"segments": [{"type": "image", "image": "0.png"}]})},
        {"__key__": "both", "0.png": png((1, 2, 3)), "json": json.dumps({"texts": ["t"], "images": ["0.png"]})},
        {"__key__": "neither", "json": json.dumps({"text": "no"})},
        {"__key__": "ok", "json": json.dumps({"segments": [{"type": "text", "text": "fine"}]})},
    ])
    src = ShardedSource("bad", "interleaved", url)
    assert [s.key for s in take(src.samples(), 1)] == ["ok"]
    assert sum(src.skipped.values()) == 4


def test_truncated_shard_ends_early_but_stably(tmp_path, data):
    shard = expand_braces(data["captions"]["uri"])[0]
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[9]  # the 5th sample's caption
    path = tmp_path / "cut.tar"
    path.write_bytes(Path(shard).read_bytes()[: member.offset_data + member.size // 2])
    src = ShardedSource("cut", "image-text", str(path), image=PLAIN)
    n = src.epoch_length()
    assert n == 4 and src.skipped["corrupt shard"] == 1  # the cut sample is dropped
    assert [s.index for s in take(src.samples(), n + 1)] == list(range(n + 1))


def test_transient_read_error_resumes_in_place(data, monkeypatch):
    clean = [(r.index, r.key) for r in take(source(data, "captions").raw(), 30)]
    src = source(data, "captions")
    failures = []

    class Flaky(io.BufferedReader):
        def read(self, n=-1):
            if not failures and self.tell() > 5_000:
                failures.append(1)
                raise ConnectionError("connection reset")
            return super().read(n)

    monkeypatch.setattr(src, "_open", lambda url: Flaky(io.FileIO(url)))
    monkeypatch.setattr(shards_mod.time, "sleep", lambda s: None)
    assert [(r.index, r.key) for r in take(src.raw(), 30)] == clean and failures


# ----------------------------------------------------------------------------- addressing


def test_resume_at_any_position_matches_sequential(data):
    def fresh(**kw):
        return source(data, "captions", seed=5, **kw)

    epoch = 3 * PER_SHARD
    sequential = [(r.index, r.key, r.shard) for r in take(fresh().raw(), 3 * epoch)]
    assert [i for i, _, _ in sequential] == list(range(3 * epoch))
    for e in range(3):  # every epoch visits every sample once
        assert sorted(k for _, k, _ in sequential[e * epoch:(e + 1) * epoch]) == sorted(k for _, k, _ in sequential[:epoch])
    orders = [tuple(fresh().epoch_order(e)) for e in range(6)]
    assert len(set(orders)) > 1 and orders == [tuple(fresh().epoch_order(e)) for e in range(6)]
    assert fresh(shuffle=False).epoch_order(4) == sorted(fresh().shards)
    for i in (0, 7, 10, 29, 30, 31, 44, 59, 60, 89):
        for src in (fresh(), fresh(samples_per_shard=PER_SHARD)):
            first = next(src.raw(i))
            assert (first.index, first.key, first.shard) == sequential[i]
    seq = take(fresh().samples(), 33)
    resumed = take(fresh().samples(28), 5)  # decoded samples across the epoch boundary
    assert [s.key for s in resumed] == [s.key for s in seq[28:]]
    assert all(np.array_equal(a.segments[0].pixels, b.segments[0].pixels) for a, b in zip(resumed, seq[28:]))


def test_wrong_samples_per_shard_hint_is_an_error(data):
    with pytest.raises(ValueError, match="holds 10 samples, expected 11"):
        take(source(data, "captions", samples_per_shard=PER_SHARD + 1).raw(), 12)


# ----------------------------------------------------------------------------- images


def test_image_transform_shape_and_normalisation():
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    colour = (10, 128, 250)
    x = ImageTransform(size=32, mean=mean, std=std)(png(colour, size=(20, 10)))
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = (np.array(colour) / 255 - mean) / std
    assert np.allclose(x.reshape(3, -1).T, expected, atol=1e-5)
    grey = io.BytesIO()
    Image.new("L", (5, 5), 100).save(grey, format="JPEG")
    assert ImageTransform(size=7)(grey.getvalue()).shape == (3, 7, 7)


def test_captions_describe_the_image(data):
    """Each described shape has its colour at its position with the area of its kind;
    undescribed positions are background."""
    area = {"triangle": (70, 115), "circle": (115, 160), "square": (160, 200)}
    pattern = re.compile(r"an? (\w+) (\w+) (?:on|at|in) the (\w+)")
    for s in take(source(data, "captions").samples(), 3 * PER_SHARD):
        image, caption = s.segments[0], s.segments[1].text
        rgb = np.rint(image.pixels.transpose(1, 2, 0) * 255).astype(int)
        described = pattern.findall(caption)
        assert described and " and ".join(f"{'an' if c[0] in 'aeiou' else 'a'} {c} {sh} {synthdata.POSITIONS[p][0]}"
                                          for c, sh, p in described) == caption
        for colour, shape, pos in described:
            cx, cy = synthdata.centre(pos, SIZE)
            assert rgb_at(image, cx, cy) == synthdata.COLOURS[colour]
            window = rgb[cy - SIZE // 8:cy + SIZE // 8, cx - SIZE // 8:cx + SIZE // 8]
            filled = int(np.all(window == synthdata.COLOURS[colour], axis=-1).sum())
            assert area[shape][0] <= filled < area[shape][1], (caption, shape, filled)
        for pos in set(synthdata.POSITIONS) - {p for _, _, p in described}:
            assert rgb_at(image, *synthdata.centre(pos, SIZE)) == synthdata.BACKGROUND


# ----------------------------------------------------------------------------- generator


def test_generation_is_deterministic(tmp_path):
    kw = dict(samples_per_shard=4, shards={"interleaved": 1, "captions": 1})
    a = synthdata.generate(tmp_path / "a", seed=1, **kw)
    synthdata.generate(tmp_path / "b", seed=1, **kw)
    synthdata.generate(tmp_path / "c", seed=2, **kw)
    for name in kw["shards"]:
        rel = Path(a[name]["uri"].replace("{0000..0000}", "0000")).relative_to(tmp_path / "a")
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
        assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()
    with pytest.raises(ValueError, match="unknown synthetic sources"):
        synthdata.generate(tmp_path / "d", shards={"nope": 1})


def test_cli(tmp_path, capsys):
    synthdata.main([str(tmp_path), "--samples-per-shard", "2", "--image-size", "32"])
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == set(synthdata.SOURCES)
    src = ShardedSource("c", "image-text", printed["captions"]["validationUri"], image=ImageTransform(32))
    assert next(src.samples()).segments[0].pixels.shape == (3, 32, 32)
