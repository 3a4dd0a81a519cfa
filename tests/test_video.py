"""Video: hardened decoding, frame sampling, the per-video token budget and the temporal patch layout."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data.media import MediaError
from vlm.data.processor import ImageProcessor, patchify, smart_resize
from vlm.data.video import (
    VideoProcessor,
    decode_video,
    encode_video,
    frames_from_images,
    patchify_video,
    probe_video,
    repeat_temporal,
    sample_frames,
    unpatchify_video,
)
from vlm.model.projector import visual_token_count

av = pytest.importorskip("av")


def _frames(n=9, w=80, h=48, seed=0):
    """A red block moving right on a light background, plus noise so frames are distinct."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = rng.integers(200, 256, (h, w, 3), dtype=np.uint8)
        a[10:20, 4 + 6 * i : 14 + 6 * i] = (220, 30, 30)
        out.append(Image.fromarray(a))
    return out


@pytest.fixture(scope="module")
def clip():
    frames = _frames()
    return frames, encode_video(frames, fps=3.0)


# ------------------------------------------------------------------------------------- decoding


def test_mp4_round_trip_is_lossless_and_deterministic(clip):
    frames, mp4 = clip
    assert mp4[4:8] == b"ftyp" and encode_video(frames, fps=3.0) == mp4
    info = probe_video(mp4)
    assert (info.width, info.height, info.n_frames, info.fps) == (80, 48, 9, 3.0)
    got, fps = decode_video(mp4)
    assert fps == 3.0 and len(got) == 9 and all(g.mode == "RGB" and g.size == (80, 48) for g in got)
    assert all(np.array_equal(np.asarray(g), np.asarray(f)) for g, f in zip(got, frames))
    # a subset, in the given order, repeats allowed
    sub, _ = decode_video(mp4, indices=[0, 4, 4, 8])
    assert [np.array_equal(np.asarray(s), np.asarray(frames[i])) for s, i in zip(sub, [0, 4, 4, 8])] == [True] * 4


def test_apng_and_other_containers_decode(clip):
    frames, _ = clip
    apng = encode_video(frames, fps=4.0, format="apng")
    got, fps = decode_video(apng)
    assert fps == 4.0 and all(np.array_equal(np.asarray(g), np.asarray(f)) for g, f in zip(got, frames))
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=250, loop=0)
    got, fps = decode_video(gif.getvalue())
    assert len(got) == 9 and fps == 4.0 and got[0].mode == "RGB" and got[0].size == (80, 48)
    buf = io.BytesIO()  # WebM (Matroska: no frame count in the header; counted from packets)
    with av.open(buf, "w", format="webm") as c:
        s = c.add_stream("libvpx", rate=5)
        s.width, s.height, s.pix_fmt = 80, 48, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_image(f)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    webm = buf.getvalue()
    assert probe_video(webm).n_frames == 9
    got, fps = decode_video(webm, indices=[0, 8])
    assert fps == 5.0 and len(got) == 2


def test_bad_videos_are_refused_with_a_reason(clip):
    frames, mp4 = clip

    def reason(data, **kw):
        with pytest.raises(MediaError) as e:
            decode_video(data, **kw)
        return e.value.reason

    assert reason(b"") == "empty"
    assert reason(b"definitely not a video, just some text") == "unidentified"
    png = io.BytesIO()
    frames[0].save(png, format="JPEG")
    assert reason(png.getvalue()) == "unidentified"  # JPEG is not a video
    assert reason(mp4[: len(mp4) // 2]) == "corrupt"  # truncated
    assert reason(mp4[:100]) == "corrupt"
    assert reason(b"\x00\x00\x00\x18ftypmp42" + bytes(64)) == "corrupt"
    assert reason(mp4[:40] + bytes(len(mp4) - 40)) == "corrupt"
    assert reason(mp4, max_pixels=80 * 48 - 1) == "too_many_pixels"  # from the header
    assert reason(mp4, max_frames_decoded=8) == "too_many_frames"
    assert reason(mp4, max_total_pixels=80 * 48 * 8) == "too_many_pixels"  # keep-everything guard
    assert reason(encode_video(frames, format="apng"), max_pixels=100) == "too_many_pixels"
    with pytest.raises(MediaError) as e:
        probe_video(b"\x1a\x45\xdf\xa3 broken matroska")
    assert e.value.reason == "corrupt"
    with pytest.raises(ValueError) as e:  # a caller bug is not bad media
        decode_video(mp4, indices=[0, 9])
    assert not isinstance(e.value, MediaError)


def test_frames_from_images():
    frames = _frames(3)
    encoded = []
    for f in frames:
        b = io.BytesIO()
        f.save(b, format="PNG")
        encoded.append(b.getvalue())
    got = frames_from_images(encoded)
    assert all(np.array_equal(np.asarray(g), np.asarray(f)) for g, f in zip(got, frames))
    with pytest.raises(MediaError) as e:
        frames_from_images([])
    assert e.value.reason == "empty"
    with pytest.raises(MediaError) as e:
        frames_from_images([frames[0], frames[1].resize((40, 40))])
    assert e.value.reason == "bad_size"
    with pytest.raises(MediaError) as e:
        frames_from_images([encoded[0], encoded[1][:50]])
    assert e.value.reason == "corrupt" and "frame 1" in str(e.value)


# ------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "n, fps, target, cap, T, expected",
    [
        (30, 30.0, 2.0, 16, 2, [0, 29]),  # 1 s at 2 fps
        (9, 3.0, 2.0, 16, 2, [0, 2, 3, 5, 6, 8]),  # 3 s at 2 fps = 6 frames
        (5, 2.0, 2.0, 16, 2, [0, 1, 2, 3, 4, 4]),  # 5 -> 6: the last frame repeats
        (1, 30.0, 2.0, 16, 2, [0, 0]),  # one frame still fills a temporal patch
        (300, 30.0, 2.0, 16, 2, [round(i * 299 / 15 + 1e-9) for i in range(16)]),  # capped, evenly spread
        (100, 0.0, 2.0, 5, 2, [0, 33, 66, 99]),  # unknown fps: every frame up to the cap (5 -> 4)
        (7, 25.0, None, 16, 1, list(range(7))),
        (10, 10.0, 2.0, 16, 4, [0, 3, 6, 9]),  # 2 frames -> at least one temporal patch of 4
    ],
)
def test_sample_frames(n, fps, target, cap, T, expected):
    got = sample_frames(n, fps, target, cap, T)
    assert got == expected
    assert len(got) % T == 0 and len(got) >= T and got == sorted(got)


def test_sample_frames_counts_everywhere():
    for n in range(1, 70, 3):
        for fps in (1.0, 2.0, 7.5, 30.0):
            for cap in (2, 3, 8, 16):
                for T in (1, 2, 3):
                    idx = sample_frames(n, fps, 2.0, cap, T)
                    assert len(idx) % T == 0 and T <= len(idx) <= max(T, cap // T * T)
                    assert idx[0] == 0 and idx[-1] <= n - 1 and idx == sorted(idx)
                    distinct = sorted(set(idx))
                    assert idx[: len(distinct)] == distinct  # repeats only as end padding
    with pytest.raises(ValueError):
        sample_frames(0, 30.0)


# -------------------------------------------------------------------------------------- budget


def test_budget_lowers_resolution_before_dropping_frames():
    kw = dict(patch_size=14, merge_size=2, min_pixels=112 * 112, max_pixels=448 * 448, max_frames=16)
    free = VideoProcessor(**kw, max_video_tokens=None).plan(600, 30.0, 720, 1280)
    assert len(free.indices) == 16 and free.size == smart_resize(720, 1280, 28, 112 * 112, 448 * 448)
    ip = ImageProcessor(patch_size=14, merge_size=2, resolution="dynamic", max_pixels=112 * 112, min_pixels=112 * 112)
    per_min = visual_token_count(ip.grid_for(720, 1280), 2)  # tokens per temporal patch at min resolution
    prev_frames, prev_tokens = 16, free.tokens
    for budget in [5000, 2016, 1500, 896, 500, 8 * per_min, 8 * per_min - 1, 100, 50, 20, 8, 3, 1]:
        plan = VideoProcessor(**kw, max_video_tokens=budget).plan(600, 30.0, 720, 1280)
        t = plan.grid[0]
        assert plan.tokens == visual_token_count(plan.grid, 2) <= budget  # never above the budget
        assert (plan.grid[1] * 14, plan.grid[2] * 14) == plan.size and len(plan.indices) == 2 * t
        if budget >= 8 * per_min:  # the minimum resolution still fits all 8 temporal patches: keep them
            assert len(plan.indices) == 16 and not plan.dropped_frames
            assert plan.lowered_resolution == (budget < free.tokens)
        else:  # frames go only when even the minimum resolution is over the budget
            assert plan.dropped_frames and plan.lowered_resolution
            assert (t + 1) * per_min > budget or t == 1
        assert len(plan.indices) <= prev_frames and plan.tokens <= prev_tokens
        prev_frames, prev_tokens = len(plan.indices), plan.tokens
    tiny = VideoProcessor(**kw, max_video_tokens=1).plan(600, 30.0, 720, 1280)
    assert tiny.grid == (1, 2, 2) and tiny.tokens == 1  # below min_pixels: the budget is the hard cap


def test_budget_never_exceeded_random():
    rng = np.random.default_rng(0)
    for _ in range(300):
        P, m, T = int(rng.choice([8, 14, 16])), int(rng.choice([1, 2])), int(rng.choice([1, 2, 4]))
        f = P * m
        budget = int(rng.integers(1, 3000))
        vp = VideoProcessor(
            patch_size=P,
            merge_size=m,
            temporal_patch=T,
            max_frames=int(rng.integers(T, 33)),
            min_pixels=int(rng.integers(1, 9)) * f * f,
            max_pixels=int(rng.integers(9, 400)) * f * f,
            max_video_tokens=budget,
            target_fps=float(rng.choice([0.5, 1.0, 2.0, 4.0])),
        )
        h, w = int(rng.integers(1, 3000)), int(rng.integers(1, 3000))
        if max(h, w) / min(h, w) > 200:
            continue
        n, fps = int(rng.integers(1, 2000)), float(rng.choice([10.0, 24.0, 30.0, 60.0]))
        plan = vp.plan(n, fps, h, w)
        assert plan.tokens == visual_token_count(plan.grid, m) <= budget
        assert len(plan.indices) == plan.grid[0] * T
        free = VideoProcessor.from_config({**vp.to_config(), "max_video_tokens": None}).plan(n, fps, h, w)
        hm, wm = vp._min_size(h, w)
        per_min = visual_token_count((1, hm // P, wm // P), m)
        t = plan.grid[0]
        if len(plan.indices) < len(free.indices):  # frames dropped only when the minimum size is over
            assert (t + 1) * per_min > budget
        elif t * per_min <= budget:  # frames kept: resolution not below the minimum unless it must
            assert plan.size[0] * plan.size[1] >= min(hm * wm, free.size[0] * free.size[1])


def test_fixed_resolution_drops_frames_only():
    vp = VideoProcessor(patch_size=8, resolution="fixed", image_size=64, max_video_tokens=200, max_frames=16)
    plan = vp.plan(100, 10.0, 48, 80)  # 64 tokens per temporal patch -> 3 fit
    assert plan.size == (64, 64) and plan.grid == (3, 8, 8) and plan.tokens == 192 and plan.dropped_frames
    with pytest.raises(ValueError, match="cannot hold one temporal patch"):
        VideoProcessor(patch_size=8, resolution="fixed", image_size=64, max_video_tokens=63)


# -------------------------------------------------------------------------------------- layout


def test_temporal_patch_layout(clip):
    frames, mp4 = clip
    P, T = 8, 2
    vp = VideoProcessor(
        patch_size=P,
        temporal_patch=T,
        target_fps=None,
        max_frames=8,
        max_video_tokens=None,
        interpolation="nearest",
        min_pixels=64,
        max_pixels=48 * 80,
    )
    out = vp(frames, fps=3.0)
    assert out.frame_indices == (0, 1, 2, 3, 5, 6, 7, 8)  # 9 frames, cap 8, evenly spread
    assert out.size == (48, 80) and out.grid == (4, 6, 10) and out.patches.shape == (4 * 60, 3 * T * P * P)
    x = torch.stack([torch.from_numpy(np.array(frames[i])).permute(2, 0, 1).float() / 255 for i in out.frame_indices])
    x = (x - 0.5) / 0.5  # [n, C, H, W] normalised
    for g, i, j in [(0, 0, 0), (1, 2, 3), (3, 5, 9), (2, 4, 0)]:
        vec = out.patches[(g * 6 + i) * 10 + j]
        want = x[g * T : (g + 1) * T, :, i * P : (i + 1) * P, j * P : (j + 1) * P].permute(1, 0, 2, 3)  # [C, T, P, P]
        torch.testing.assert_close(vec, want.reshape(-1), atol=1e-6, rtol=0)
        # the first P*P values of each channel block are frame g*T, the next frame g*T+1
        torch.testing.assert_close(
            vec.view(3, T, P, P)[:, 1], x[g * T + 1, :, i * P : (i + 1) * P, j * P : (j + 1) * P]
        )
    torch.testing.assert_close(patchify_video(x, P, T), out.patches, atol=1e-6, rtol=0)
    torch.testing.assert_close(unpatchify_video(out.patches, out.grid, P, T), x, atol=1e-6, rtol=0)
    back = vp.to_pil(out.patches, out.grid)
    assert np.array_equal(np.asarray(back[2]), np.asarray(frames[out.frame_indices[2]]))
    # bytes and the frame list give the same patches (the mp4 is lossless)
    from_bytes = vp(mp4)
    assert from_bytes.grid == out.grid and torch.equal(from_bytes.patches, out.patches) and from_bytes.fps == 3.0


def test_t1_is_the_image_layout_and_repeat_temporal():
    x = torch.randn(1, 3, 32, 48)
    assert torch.equal(patchify_video(x, 8, 1), patchify(x[0], 8))
    img = patchify(x[0], 8)
    torch.testing.assert_close(repeat_temporal(img, 2), patchify_video(torch.cat([x, x]), 8, 2))


def test_video_processor_config_round_trip():
    ip = ImageProcessor(patch_size=14, merge_size=2, resolution="dynamic", max_pixels=448 * 448)
    vp = VideoProcessor.from_image_processor(ip, temporal_patch=2, max_video_tokens=768, target_fps=1.0)
    assert vp.patch_dim == 3 * 2 * 14 * 14 and vp.image == ip
    cfg = vp.to_config()
    assert VideoProcessor.from_config(cfg) == vp and cfg["max_video_tokens"] == 768
    assert VideoProcessor.from_config({**cfg, "_target_": "x"}) == vp
    with pytest.raises(ValueError, match="unknown"):
        VideoProcessor.from_config({**cfg, "fps_typo": 1})
    with pytest.raises(ValueError):
        VideoProcessor(max_frames=1, temporal_patch=2)
    with pytest.raises(ValueError):
        VideoProcessor(target_fps=math.nan)
