"""Task schedules: shapes, conditioning, the progressive formula, staggered (pyramid / diagonal)
schedules, and long video (the generate_long driver, and one real run with a tiny model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.diffusion import Schedule, space_timesteps, staggered, step_pairs, tasks
from fvdm_jax.diffusion.samplers import make_sampler
from fvdm_jax.models.dit import DiT

B, N, HW, C = 2, 4, 8, 4
STEPS = "10"


def grid():
    t, t_next = step_pairs(space_timesteps(1000, STEPS))
    return t.astype(np.float32), t_next.astype(np.float32)


def frames(count, seed=0, batch=B, size=HW):
    return np.random.RandomState(seed).normal(size=(batch, count, size, size, C)).astype(np.float32)


def check_task(taus, nexts, cond, clean, values, m=0.0):
    """Frames in `clean` are conditioning frames holding `values` (B, K, ...); others follow t."""
    t, t_next = grid()
    num_frames = taus.shape[2]
    assert taus.shape == nexts.shape == (len(t), B, num_frames)
    assert taus.dtype == nexts.dtype == np.float32
    generated = [i for i in range(num_frames) if i not in clean]
    gen_shape, clean_shape = taus[:, :, generated].shape, taus[:, :, clean].shape
    np.testing.assert_array_equal(
        taus[:, :, generated], np.broadcast_to(t[:, None, None], gen_shape)
    )
    np.testing.assert_array_equal(
        nexts[:, :, generated], np.broadcast_to(t_next[:, None, None], gen_shape)
    )
    want_t = m * t[:, None, None]
    want_next = -1.0 if m == 0 else np.where(t_next < 0, -1.0, m * t_next)[:, None, None]
    np.testing.assert_allclose(taus[:, :, clean], np.broadcast_to(want_t, clean_shape))
    np.testing.assert_allclose(nexts[:, :, clean], np.broadcast_to(want_next, clean_shape))
    assert cond.mask.shape == (B, num_frames) and cond.values.shape == (B, num_frames, HW, HW, C)
    want_mask = np.isin(np.arange(num_frames), clean)[None].repeat(B, 0)
    np.testing.assert_array_equal(np.asarray(cond.mask), want_mask)
    np.testing.assert_array_equal(np.asarray(cond.values)[:, clean], values)


def test_generate():
    taus, nexts, cond = tasks.generate(STEPS, B, N)
    t, t_next = grid()
    assert cond is None and taus.shape == (10, B, N)
    assert (taus == t[:, None, None]).all() and (nexts == t_next[:, None, None]).all()
    assert taus[0, 0, 0] == 999 and nexts[-1, 0, 0] == -1 and taus[-1, 0, 0] == 0


def test_conditioning_tasks():
    image, keys = frames(1, 1), frames(2, 2)
    check_task(*tasks.i2v(STEPS, image[:, 0], N), [0], image)
    check_task(*tasks.interpolate(STEPS, keys, N), [0, N - 1], keys)
    check_task(*tasks.interpolate(STEPS, frames(3), 8, indices=[0, 3, 7]), [0, 3, 7], frames(3))
    check_task(*tasks.any_frame(STEPS, keys, [2, 1], N), [2, 1], keys)
    check_task(*tasks.next_frame(STEPS, frames(N - 1)), [0, 1, 2], frames(N - 1))
    a, b = frames(5, 3), frames(6, 4)
    taus, nexts, cond = tasks.transition(STEPS, a, b, 8, overlap=2)
    check_task(taus, nexts, cond, [0, 1, 6, 7], np.concatenate([a[:, -2:], b[:, :2]], axis=1))
    check_task(*tasks.extend(STEPS, frames(6, 5), N, overlap=2), [0, 1], frames(6, 5)[:, -2:])
    # Pusa's noise multiplier: conditioning frames follow m * t and end clean.
    check_task(*tasks.i2v(STEPS, image[:, 0], N, noise_multiplier=0.2), [0], image, m=0.2)
    assert tasks.i2v(STEPS, image[:, 0], N, policy="replace")[2].policy == "replace"
    assert tasks.i2v(STEPS, image[:, 0], N)[2].policy == "hold"


def test_task_errors():
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\]"):
        tasks.any_frame(STEPS, frames(1), [4], N)
    with pytest.raises(ValueError, match="duplicates"):
        tasks.any_frame(STEPS, frames(2), [1, 1], N)
    with pytest.raises(ValueError, match="2 frame indices"):
        tasks.any_frame(STEPS, frames(3), [0, 1], N)
    with pytest.raises(ValueError, match="without indices"):
        tasks.interpolate(STEPS, frames(3), N)
    with pytest.raises(ValueError, match="2 \\* overlap < num_frames"):
        tasks.transition(STEPS, frames(4), frames(4), N, overlap=2)
    with pytest.raises(ValueError, match="shorter than overlap"):
        tasks.transition(STEPS, frames(1), frames(4), 8, overlap=2)
    with pytest.raises(ValueError, match="overlap=4"):
        tasks.extend(STEPS, frames(8), N, overlap=4)
    with pytest.raises(ValueError, match="noise_multiplier"):
        tasks.i2v(STEPS, frames(1)[:, 0], N, noise_multiplier=1.5)
    with pytest.raises(ValueError, match="expected \\(B, H, W, C\\)"):
        tasks.i2v(STEPS, frames(1), N)
    with pytest.raises(ValueError, match="policy"):
        tasks.i2v(STEPS, frames(1)[:, 0], N, policy="keep")
    with pytest.raises(ValueError, match="multiple of 3"):
        staggered.diagonal(STEPS, B, 3)
    with pytest.raises(ValueError, match="shorter than one chunk"):
        tasks.generate_long(lambda c, k: None, frames(N), 3, overlap=2)
    with pytest.raises(ValueError, match="overlap=4"):
        tasks.generate_long(lambda c, k: None, frames(N), 8, overlap=4)
    with pytest.raises(ValueError, match="respacing"):
        tasks.generate("abc", B, N)


def test_progressive_formula():
    """tau_i(t) = min(0.1 i t, t), i = 1..N for array frames 0..N-1; tau_next -1 at the end."""
    num_frames = 16
    taus, nexts, cond = tasks.progressive(STEPS, num_frames, batch=B)
    t, t_next = grid()
    i = np.arange(1, num_frames + 1)
    want = np.minimum(0.1 * i * t[:, None], t[:, None])[:, None]  # (S, 1, N)
    np.testing.assert_allclose(taus, np.broadcast_to(want, taus.shape), rtol=1e-6)
    want_next = np.minimum(0.1 * i * t_next[:-1, None], t_next[:-1, None])[:, None]
    np.testing.assert_allclose(nexts[:-1], np.broadcast_to(want_next, nexts[:-1].shape), rtol=1e-6)
    assert cond is None and (nexts[-1] == -1).all()
    first = [99.9 * k for k in range(1, 10)] + [999.0] * 7
    np.testing.assert_allclose(taus[0, 0], first, rtol=1e-6)
    assert (np.diff(taus[:, 0], axis=1) >= 0).all()  # later frames are noisier
    image = frames(1)[:, 0]
    taus, nexts, cond = tasks.progressive(STEPS, N, image=image, slope=0.5)
    assert cond.mask[:, 0].all() and not cond.mask[:, 1:].any()
    np.testing.assert_array_equal(np.asarray(cond.values)[:, 0], image)
    np.testing.assert_allclose(taus[:, 0, :2], np.stack([0.5 * t, t], 1), rtol=1e-6)
    # Frames that start below T-1 start from the noised image; frames at T-1 from pure noise.
    noise = frames(N, 9)
    x_T = tasks.start_from(Schedule(), noise, taus, image[:, None])
    np.testing.assert_array_equal(x_T[:, 1:], noise[:, 1:])
    abar = Schedule().alphas_cumprod[499]  # frame 0 starts at 0.5 * 999 = 499.5
    want = np.sqrt(abar) * image[:, None, ...] + np.sqrt(1 - abar) * noise[:, :1]
    np.testing.assert_allclose(x_T[:, :1], want, atol=0.02)


def _progress_checks(taus, nexts):
    assert (nexts <= taus).all()  # no frame ever gains noise within a step
    assert (taus[1:] <= taus[:-1]).all()  # monotone per frame
    # each step starts where the previous one ended (a finished frame rests at 0)
    np.testing.assert_array_equal(taus[1:], np.maximum(nexts[:-1], 0))


def test_pyramid_schedule():
    levels = np.append(grid()[0], -1)
    for delay in (1, 2):
        taus, nexts, cond = staggered.pyramid(STEPS, B, N, delay=delay)
        assert cond is None and taus.shape == (10 + (N - 1) * delay, B, N)
        _progress_checks(taus, nexts)
        for k in range(N):  # frame k waits k * delay steps, then walks the whole grid once
            moves = np.nonzero(nexts[:, 0, k] < taus[:, 0, k])[0]
            np.testing.assert_array_equal(moves, np.arange(10) + k * delay)
            np.testing.assert_array_equal(taus[moves, 0, k], levels[:-1])
            np.testing.assert_array_equal(nexts[moves, 0, k], levels[1:])
        assert (taus[:, :, 1:] >= taus[:, :, :-1]).all()  # staggered: later frames noisier


def test_diagonal_schedule_rolls():
    for steps, num_frames in (("8", 4), ("12", 4)):
        d = int(steps) // num_frames
        taus, nexts, cond = staggered.diagonal(steps, B, num_frames)
        warm_t, warm_next, _ = staggered.diagonal_warmup(steps, B, num_frames)
        assert taus.shape == (d, B, num_frames)
        assert warm_t.shape == ((num_frames - 1) * d, B, num_frames)
        assert (nexts < taus).all() and (taus[:, :, 1:] > taus[:, :, :-1]).all()  # staggered
        assert (taus[0, :, -1] == 999).all() and (nexts[-1, :, 0] == -1).all()
        for k in range(num_frames - 1):  # after a round and a shift, frame k+1 sits where k starts
            assert (taus[1:, :, k] == nexts[:-1, :, k]).all()
            assert (taus[0, :, k] == nexts[-1, :, k + 1]).all()
        np.testing.assert_array_equal(warm_next[-1], taus[0])  # warm-up ends at a round's start
        _progress_checks(warm_t, warm_next)


def test_rolling_generate_driver():
    window = np.zeros((B, N, 1, 1, 1), np.float32)
    rounds = []

    def round_fn(w, r):
        rounds.append(r)
        return w + 1.0  # every frame "advances" once per round

    new_frame = lambda r: np.full((B, 1, 1, 1), -(r + 1.0), np.float32)  # noqa: E731
    out = staggered.rolling_generate(round_fn, window, 6, new_frame)
    assert out.shape == (B, 6, 1, 1, 1) and rounds == list(range(6))
    # frames 0..3 start in the window; frame 4 is the noise appended after round 0, etc.
    np.testing.assert_array_equal(out[0, :, 0, 0, 0], [1, 2, 3, 4, 4 - 1, 4 - 2])


def test_generate_long_driver_128_frames():
    first = np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1, 1)
    contexts, outputs = [], [first]

    def fake_chunk(context, k):
        contexts.append(np.asarray(context))
        new = 1000.0 * k + np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1, 1)
        outputs.append(np.concatenate([context, new], axis=1))
        return outputs[-1]

    video = tasks.generate_long(fake_chunk, first, 128, overlap=8)
    assert video.shape == (1, 128, 1, 1, 1) and len(contexts) == 14  # 16 + 14 * 8
    for k, context in enumerate(contexts):
        np.testing.assert_array_equal(context, outputs[k][:, -8:])  # the previous chunk's output
    np.testing.assert_array_equal(video[:, :16], first)
    np.testing.assert_array_equal(video[0, 16:24, 0, 0, 0], 1000 + np.arange(8))
    # A total that is not 16 + k * 8 is cut from the last chunk.
    assert tasks.generate_long(fake_chunk, first, 30, overlap=8).shape[1] == 30


def test_extend_end_to_end_with_tiny_model():
    """Three real 4-frame chunks (overlap 2) -> 8 frames; every chunk holds its context exactly."""
    model = DiT(
        input_size=HW, patch_size=2, in_channels=C, hidden_size=32, depth=2, num_heads=2,
        num_frames=N,
    )
    dummy = (jnp.zeros((1, N, HW, HW, C)), jnp.zeros((1, N)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), *dummy)
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda s: jnp.asarray(rs.normal(0, 0.1, s.shape), s.dtype), shapes)
    run = make_sampler(lambda p, x, t: model.apply(p, x, t), Schedule(), sampler="ddim")
    overlap, chunks = 2, []

    def sample_chunk(context, k):
        taus, nexts, cond = tasks.extend("5", context, N, overlap)
        x_T = jax.random.normal(jax.random.key(k), (B, N, HW, HW, C))
        out = run(x_T, taus, nexts, cond=cond, params=params)
        chunks.append((np.asarray(context), np.asarray(out)))
        return out

    taus, nexts, _ = tasks.generate("5", B, N)
    first = run(jax.random.normal(jax.random.key(0), (B, N, HW, HW, C)), taus, nexts, params=params)
    video = np.asarray(tasks.generate_long(sample_chunk, first, 8, overlap=overlap))
    assert video.shape == (B, 8, HW, HW, C) and np.isfinite(video).all() and len(chunks) == 2
    previous = np.asarray(first)
    for context, out in chunks:
        np.testing.assert_array_equal(context, previous[:, -overlap:])
        np.testing.assert_array_equal(out[:, :overlap], context)  # 'hold': bit for bit
        previous = out
    np.testing.assert_array_equal(video[:, :N], first)
    np.testing.assert_array_equal(video[:, N:6], chunks[0][1][:, overlap:])
    assert run._cache_size() == 2  # unconditional + conditioned, each compiled once
