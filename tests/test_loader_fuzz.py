"""Property-based: arbitrary JSON in every field of a sample, arbitrary bytes as media and as whole
shards, through the real loader in training and in evaluation mode. Nothing raises out of the
loader and nothing hangs (the test bounds its own time); every sample is either accepted or
counted by reason; an accepted training sample has a label token, an accepted evaluation sample a
reference answer."""

from __future__ import annotations

import copy
import io
import json
import signal
import tarfile
from collections import Counter
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm.build.model import build_processor, build_template
from vlm.data.sample import SampleTransform
from vlm.data.webdataset import DataError, ShardDataset
from vlm.tokenizer import TextTokenizer

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

GOOD = {
    "messages": [
        {"role": "user", "content": [{"type": "image", "media": 0}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ],
    "meta": {"qtypes": ["color"]},
}
# Every place a hostile value can stand in a chat sample (a document sample is one of them: `document`).
PATHS = [
    (),
    ("messages",),
    ("messages", 0),
    ("messages", 0, "role"),
    ("messages", 0, "content"),
    ("messages", 0, "content", 0),
    ("messages", 0, "content", 0, "type"),
    ("messages", 0, "content", 0, "media"),
    ("messages", 0, "content", 1),
    ("messages", 0, "content", 1, "text"),
    ("messages", 1),
    ("messages", 1, "role"),
    ("messages", 1, "content"),
    ("messages", 1, "content", 0, "text"),
    ("meta",),
    ("meta", "qtypes"),
    ("document",),
    ("extra",),
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["user", "assistant", "system", "image", "video", "text", "<image>", "\ud800"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["type", "text", "media", "role", "content"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)


def png() -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 30, 30)).save(b, "PNG")
    return b.getvalue()


PNG = png()


def put(obj: dict, path: tuple, value) -> dict:
    """`obj` with `value` at `path` (created where missing; a path through a non-container replaces it)."""
    out = copy.deepcopy(obj)
    if not path:
        return value
    cur = out
    for i, k in enumerate(path[:-1]):
        nxt = (
            cur[k]
            if (isinstance(cur, dict) and k in cur) or (isinstance(cur, list) and isinstance(k, int) and k < len(cur))
            else None
        )
        if not isinstance(nxt, (dict, list)):
            nxt = {} if isinstance(path[i + 1], str) else [None] * (path[i + 1] + 1)
            cur[k] = nxt
        cur = nxt
    last = path[-1]
    if isinstance(cur, list) and isinstance(last, int) and last >= len(cur):
        cur.extend([None] * (last + 1 - len(cur)))
    cur[last] = value
    return out


@st.composite
def hostile_sample(draw) -> list[tuple[str, bytes]]:
    """One sample's members (without the key): a JSON with a hostile value somewhere (or raw bytes),
    and media that are a good PNG, arbitrary bytes, absent, or one more than referenced."""
    kind = draw(st.sampled_from(["field", "field", "field", "raw_json"]))
    if kind == "raw_json":
        body = draw(st.binary(max_size=200))
    else:
        obj = put(GOOD, draw(st.sampled_from(PATHS)), draw(json_values))
        body = json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")
    members = [("json", body)]
    media = draw(st.sampled_from(["png", "png", "bytes", "none", "two"]))
    if media in ("png", "two"):
        members.append(("0.png", PNG))
    if media == "bytes":
        members.append((draw(st.sampled_from(["0.png", "0.jpg", "0.mp4", "0.gif"])), draw(st.binary(max_size=300))))
    if media == "two":
        members.append(("1.png", PNG))
    return members


@contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging CI) when the block runs longer than `seconds`."""

    def boom(*_):
        raise TimeoutError(f"the loader ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def parts(synth_dir):
    tok = TextTokenizer.from_file(synth_dir / "synthvqa" / "tokenizer.json")
    processor = build_processor({"patch_size": 8, "image_size": 32})
    template = build_template({"max_length": 256}, tok)
    return processor, template


def write_shard(path, samples: list[list[tuple[str, bytes]]]) -> int:
    """Samples k0, k1, … then one known-good sample (so a training stream always reaches a good one)."""
    samples = [*samples, [("json", json.dumps(GOOD).encode()), ("0.png", PNG)]]
    with tarfile.open(path, "w") as t:
        for i, members in enumerate(samples):
            for ext, data in members:
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return len(samples)


def eval_pass(ds) -> tuple[list, Counter]:
    good, skipped = [], Counter()
    for s in ds:
        skipped.update(s.skipped or {})
        if not s.report_only:
            good.append(s)
    return good, skipped


def train_pass(ds, n: int) -> tuple[list, Counter]:
    """An unshuffled training stream over one shard, until all `n` samples are accounted for."""
    good, skipped = [], Counter()
    for s in ds:
        skipped.update(s.skipped or {})
        good.append(s)
        if len(good) + sum(skipped.values()) >= n:
            return good, skipped
    raise AssertionError("a training stream ended")


@FUZZ
@given(samples=st.lists(hostile_sample(), min_size=1, max_size=5))
def test_arbitrary_samples_are_accepted_or_counted(parts, tmp_path_factory, samples):
    processor, template = parts
    shard = tmp_path_factory.mktemp("fuzz") / "s.tar"
    n = write_shard(shard, samples)
    with time_limit(60):
        ds = ShardDataset(str(shard), SampleTransform(processor, template, mode="eval"), train=False)
        good, skipped = eval_pass(ds)
        assert len(good) + sum(skipped.values()) == n, (len(good), skipped)
        assert all(isinstance(s.answer, str) and s.answer.strip() for s in good)
        assert all(reason and " " not in reason for reason in skipped)

        ds = ShardDataset(str(shard), SampleTransform(processor, template, mode="train"), train=True, shuffle_buffer=1)
        good, skipped = train_pass(ds, n)
        assert len(good) + sum(skipped.values()) == n, (len(good), skipped)
        assert all((s.labels >= 0).any() for s in good)


@FUZZ
@given(data=st.binary(max_size=4096), prefix=st.sampled_from([b"", b"ustar", None]))
def test_arbitrary_bytes_as_a_shard(parts, tmp_path_factory, data, prefix):
    """Random bytes (optionally the first part of a real shard) as a whole shard: evaluation reads
    nothing and counts the damage; training beside a good shard goes on; training on it alone
    stops with a DataError instead of spinning."""
    processor, template = parts
    d = tmp_path_factory.mktemp("bytes")
    good = d / "good.tar"
    write_shard(good, [])
    bad = d / "bad.tar"
    bad.write_bytes(good.read_bytes()[: len(data)] if prefix is None else prefix + data)
    with time_limit(60):
        ds = ShardDataset(str(bad), SampleTransform(processor, template, mode="eval"), train=False)
        accepted, skipped = eval_pass(ds)
        assert all(s.answer for s in accepted)
        ds = ShardDataset([str(bad), str(good)], SampleTransform(processor, template), train=True, shuffle_buffer=1)
        accepted = [s for _, s in zip(range(20), ds)]
        assert len(accepted) == 20 and all((s.labels >= 0).any() for s in accepted)
        ds = ShardDataset(str(bad), SampleTransform(processor, template), train=True, shuffle_buffer=1)
        try:
            for _ in zip(range(20), ds):
                pass
        except DataError as e:
            assert "no training shard yields a sample" in str(e) or "bad samples in a row" in str(e)
