"""fvdm_jax.data.text_latents: per-clip latents + text contexts (DiffSynth/Pusa .pth, .npz) ->
an ArrayRecord cache -> TextLatentSource -> host_batches."""

import itertools
import os

import numpy as np
import pytest

from fvdm_jax.data import text_latents
from fvdm_jax.data.pipeline import host_batches, make_source
from fvdm_jax.data.text_latents import TextLatentSource, build_text_latent_cache

C, H, W, D, L = 4, 4, 6, 8, 12  # latent channels, latent size, text width, padded prompt length
CLIPS = [(5, 3), (4, 7), (6, 1)]  # (latent frames, real prompt tokens) per clip


def make_clip(frames, tokens, seed):
    """DiffSynth's layout: latents (C, F, h, w), context (1, L, D) zero after the real tokens."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((C, frames, H, W)).astype(np.float32)
    context = np.zeros((1, L, D), np.float32)
    context[0, :tokens] = rng.standard_normal((tokens, D))
    return latents, context


def write_pth(path, latents, context, batch_dim=False):
    torch = pytest.importorskip("torch")
    latents = torch.from_numpy(latents)
    torch.save({"latents": latents[None] if batch_dim else latents,
                "prompt_emb": {"context": torch.from_numpy(context)}, "image_emb": {}}, str(path))


@pytest.fixture(scope="module")
def clips():
    return [make_clip(f, t, seed) for seed, (f, t) in enumerate(CLIPS)]


@pytest.fixture
def pth_dir(tmp_path, clips):
    root = tmp_path / "pth"
    (root / "sub").mkdir(parents=True)
    for i, (latents, context) in enumerate(clips):
        folder = root / "sub" if i == 2 else root  # recursive
        write_pth(folder / f"clip{i}.mp4.tensors.pth", latents, context, batch_dim=i == 1)
    return root


@pytest.fixture
def npz_dir(tmp_path, clips):
    root = tmp_path / "npz"
    (root / "sub").mkdir(parents=True)
    for i, (latents, context) in enumerate(clips):
        folder = root / "sub" if i == 2 else root
        np.savez(folder / f"clip{i}.mp4.tensors.npz", latents=latents, context=context[0])
    return root


def test_cache_round_trip_is_channels_last_padded_and_masked(pth_dir, tmp_path, clips):
    meta = build_text_latent_cache(str(pth_dir), str(tmp_path / "cache"), clips_per_shard=2)
    assert meta["count"] == 3 and len(meta["shards"]) == 2 and meta["text_length"] == 7  # longest
    assert [c["file"] for c in meta["clips"]] == ["clip0.mp4.tensors.pth", "clip1.mp4.tensors.pth",
                                                  os.path.join("sub", "clip2.mp4.tensors.pth")]
    assert [c["context_length"] for c in meta["clips"]] == [3, 7, 1]
    assert (meta["channels"], meta["height"], meta["width"], meta["context_dim"]) == (C, H, W, D)
    source = TextLatentSource(str(tmp_path / "cache"), num_frames=4, seed=0)
    for i, (latents, context) in enumerate(clips):
        record = source.record(i)
        np.testing.assert_array_equal(record["latents"], latents.transpose(1, 2, 3, 0))
        example = source[i]
        assert example["video"].shape == (4, H, W, C) and example["video"].dtype == np.float32
        assert example["context"].shape == (7, D) and example["context_mask"].dtype == bool
        np.testing.assert_array_equal(example["context"], context[0, :7])
        np.testing.assert_array_equal(example["context_mask"], np.arange(7) < CLIPS[i][1])
        assert example["label"] == 0 and example["label"].dtype == np.int32
    # Wan's 512-token padding (here 10), and truncation below the longest prompt (here 5).
    build_text_latent_cache(str(pth_dir), str(tmp_path / "cache"), text_length=10)
    padded = TextLatentSource(str(tmp_path / "cache"), num_frames=4, seed=0)[1]
    np.testing.assert_array_equal(padded["context"], context_pad(clips[1][1][0], 10))
    assert padded["context_mask"].sum() == 7 and padded["context_mask"].shape == (10,)
    meta = build_text_latent_cache(str(pth_dir), str(tmp_path / "cache"), text_length=5)
    assert meta["truncated_clips"] == 1
    cut = TextLatentSource(str(tmp_path / "cache"), num_frames=4, seed=0)[1]
    np.testing.assert_array_equal(cut["context"], clips[1][1][0, :5])
    assert cut["context_mask"].all()


def context_pad(context, length):
    out = np.zeros((length, context.shape[1]), np.float32)
    n = min(length, len(context))
    out[:n] = context[:n]
    return out


def test_windows_are_drawn_per_seed_index_and_epoch(pth_dir, tmp_path, clips):
    build_text_latent_cache(str(pth_dir), str(tmp_path / "cache"))
    source = TextLatentSource(str(tmp_path / "cache"), num_frames=4, seed=3)
    latents = clips[2][0].transpose(1, 2, 3, 0)  # 6 frames: windows start at 0, 1 or 2
    starts = set()
    for epoch in range(8):
        index = 2 + 3 * epoch
        video = source[index]["video"]
        start = int(np.random.default_rng((3, index)).integers(3))
        np.testing.assert_array_equal(video, latents[start:start + 4])
        np.testing.assert_array_equal(source[index]["video"], video)  # deterministic
        starts.add(start)
    assert len(starts) > 1
    with pytest.raises(ValueError, match=r"clip1.mp4.tensors.pth has 4 latent frames.*num_frames=5"):
        TextLatentSource(str(tmp_path / "cache"), num_frames=5, seed=0)
    with pytest.raises(ValueError, match="set model.num_frames"):
        TextLatentSource(str(tmp_path / "cache"), num_frames=None, seed=0)


def test_pth_and_npz_give_the_same_examples(pth_dir, npz_dir, tmp_path):
    build_text_latent_cache(str(pth_dir), str(tmp_path / "a"))
    build_text_latent_cache(str(npz_dir), str(tmp_path / "b"))
    a = TextLatentSource(str(tmp_path / "a"), num_frames=4, seed=1)
    b = TextLatentSource(str(tmp_path / "b"), num_frames=4, seed=1)
    for index in range(6):
        x, y = a[index], b[index]
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_bfloat16_storage_is_exact_for_bfloat16_clips(tmp_path):
    torch = pytest.importorskip("torch")
    latents, context = make_clip(4, 2, seed=9)
    root = tmp_path / "bf16"
    root.mkdir()
    torch.save({"latents": torch.from_numpy(latents).bfloat16(),
                "prompt_emb": {"context": torch.from_numpy(context).bfloat16()}}, str(root / "c.pth"))
    meta = build_text_latent_cache(str(root), str(tmp_path / "cache"), dtype="bfloat16")
    assert meta["dtype"] == "bfloat16"
    example = TextLatentSource(str(tmp_path / "cache"), num_frames=4, seed=0)[0]
    want = torch.from_numpy(latents).bfloat16().float().numpy().transpose(1, 2, 3, 0)
    np.testing.assert_array_equal(example["video"], want)


@pytest.mark.parametrize("problem", ["corrupt", "no_prompt_emb", "no_context_npz", "shape", "mismatch"])
def test_a_bad_clip_is_one_line_naming_the_file(pth_dir, tmp_path, problem):
    torch = pytest.importorskip("torch")
    bad = pth_dir / "sub" / "zbad.pth"
    latents, context = make_clip(4, 2, seed=5)
    if problem == "corrupt":
        bad.write_bytes(b"PK\x03\x04 this is not a torch file")
        expect = "not a readable torch file"
    elif problem == "no_prompt_emb":
        torch.save({"latents": torch.from_numpy(latents)}, str(bad))
        expect = r"no \['prompt_emb'\]"
    elif problem == "no_context_npz":
        bad = bad.with_suffix(".npz")
        np.savez(bad, latents=latents)
        expect = r"no \['context'\]"
    elif problem == "shape":
        write_pth(bad, latents[0], context)
        expect = r"latents have shape \(4, 4, 6\)"
    else:
        write_pth(bad, latents[:2], context)
        expect = "differs from clip0.mp4.tensors.pth"
    with pytest.raises(ValueError, match=expect) as error:
        build_text_latent_cache(str(pth_dir), str(tmp_path / "cache"))
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(bad))
    assert not os.path.exists(tmp_path / "cache" / "cache.json")


def test_an_up_to_date_cache_is_not_rewritten(pth_dir, tmp_path, clips):
    cache = tmp_path / "cache"
    meta = build_text_latent_cache(str(pth_dir), str(cache))
    files = sorted(os.listdir(cache))
    times = {name: os.stat(cache / name).st_mtime_ns for name in files}
    assert build_text_latent_cache(str(pth_dir), str(cache)) == meta
    assert sorted(os.listdir(cache)) == files
    assert {name: os.stat(cache / name).st_mtime_ns for name in files} == times
    # A changed clip set rebuilds: one more clip, and the stale shard layout is replaced.
    write_pth(pth_dir / "clip3.pth", *make_clip(4, 2, seed=7))
    assert build_text_latent_cache(str(pth_dir), str(cache))["count"] == 4
    assert len(TextLatentSource(str(cache), num_frames=4, seed=0)) == 4
    # Another kind of cache in the folder is never overwritten.
    other = tmp_path / "latents"
    other.mkdir()
    (other / "cache.json").write_text('{"dataset": "ffs"}')
    with pytest.raises(ValueError, match="holds another cache"):
        build_text_latent_cache(str(pth_dir), str(other))
    assert (other / "cache.json").read_text() == '{"dataset": "ffs"}'


def wan_model(**overrides):
    return {"architecture": "wan", "in_channels": C, "patch_size": (1, 2, 2), "text_dim": D,
            "num_frames": 4, **overrides}


def test_host_batches_carry_video_context_and_mask(pth_dir, tmp_path):
    data = {"source": "text_latents", "path": str(pth_dir), "seed": 2, "text_length": 9}
    source = make_source(data, wan_model(), workdir=str(tmp_path))
    assert os.path.isfile(tmp_path / "text_latents" / "cache.json")

    def batches(seed):
        iterator = host_batches(source, global_batch_size=4, seed=seed, start_step=0,
                                process_index=1, process_count=2)
        out = list(itertools.islice(iterator, 3))
        iterator.close()
        return out

    first, again, other = batches(5), batches(5), batches(6)
    for batch in first:
        assert set(batch) == {"video", "context", "context_mask", "label"}
        assert batch["video"].shape == (2, 4, H, W, C) and batch["video"].dtype == np.float32
        assert batch["context"].shape == (2, 9, D) and batch["context"].dtype == np.float32
        assert batch["context_mask"].shape == (2, 9) and batch["context_mask"].dtype == bool
        np.testing.assert_array_equal(batch["context"][~batch["context_mask"]], 0)
    for got, want in zip(again, first):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert any(not np.array_equal(a["video"], b["video"]) for a, b in zip(first, other))


@pytest.mark.parametrize("override, expect", [
    ({"in_channels": 16}, "have 4 latent channels but model.in_channels=16; set model.in_channels=4"),
    ({"patch_size": (1, 4, 4)}, r"4 x 6 latents.*not divisible by model.patch_size=\(1, 4, 4\)"),
    ({"text_dim": 4096}, "8-wide text contexts but model.text_dim=4096"),
    ({"num_classes": 3}, "set model.num_classes=0"),
])
def test_a_model_mismatch_is_one_config_error_line(pth_dir, tmp_path, override, expect):
    from fvdm_jax.errors import ConfigError

    data = {"source": "text_latents", "path": str(pth_dir), "seed": 0,
            "cache_path": str(tmp_path / "cache")}
    with pytest.raises(ConfigError, match=expect) as error:
        make_source(data, wan_model(**override))
    assert "\n" not in str(error.value)


def test_reads_a_built_cache_without_the_clip_folder(pth_dir, tmp_path):
    cache = str(tmp_path / "cache")
    build_text_latent_cache(str(pth_dir), cache)
    source = make_source({"source": "text_latents", "cache_path": cache, "seed": 0},
                         {"in_channels": C, "patch_size": 2, "num_frames": 4})
    assert len(source) == 3 and source[0]["video"].shape == (4, H, W, C)
    with pytest.raises(ValueError, match="not a finished text-latent cache"):
        make_source({"source": "text_latents", "cache_path": str(tmp_path / "none"), "seed": 0},
                    {"in_channels": C})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no \*.pth or \*.npz"):
        text_latents.build_text_latent_cache(str(tmp_path / "empty"), cache)
