"""Statistics of the training timestep schemes (PTSS and its coin modes, independent, FoPP,
PTSS over FoPP), the default's bit-for-bit equality with the PTSS of earlier versions, and every
scheme inside the real jitted train step on the 8-device CPU mesh."""

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from fvdm_jax.config.load import load_config
from fvdm_jax.diffusion import schemes
from fvdm_jax.diffusion.ptss import PTSS_MODES, ptss_timesteps
from fvdm_jax.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

T, F = 1000, 4


def _draw(keys, batch, p, mode):
    fn = jax.jit(
        jax.vmap(lambda k: ptss_timesteps(k, batch, F, T, p, mode)), static_argnums=()
    )
    return np.asarray(fn(keys))  # (draws, B, F)


def _independent_rows(t):
    """Rows whose frames are not all equal (a truly independent row is all-equal w.p. 1e-9)."""
    return np.any(t != t[..., :1], axis=-1)


@pytest.mark.parametrize("mode", ["per_batch", "per_sample"])
def test_p0_shares_one_timestep_per_video(mode):
    t = _draw(jax.random.split(jax.random.key(0), 200), 8, 0.0, mode)
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
    assert not _independent_rows(t).any()
    # The shared timesteps are still spread over the whole range.
    assert t.min() < 50 and t.max() > T - 50


@pytest.mark.parametrize("mode", ["per_batch", "per_sample"])
def test_p1_draws_every_frame_independently(mode):
    t = _draw(jax.random.split(jax.random.key(1), 500), 8, 1.0, mode).reshape(-1, F)
    assert _independent_rows(t).all()
    # Uniform marginals: each tenth of [0, T) holds 10% of the draws (5-sigma binomial bound).
    n = t.size
    hist = np.bincount(t.reshape(-1) // (T // 10), minlength=10) / n
    assert np.all(np.abs(hist - 0.1) < 5 * np.sqrt(0.1 * 0.9 / n))
    # Frames are uncorrelated with each other.
    corr = np.corrcoef(t.T.astype(np.float64))
    off_diag = corr[~np.eye(F, dtype=bool)]
    assert np.all(np.abs(off_diag) < 5 / np.sqrt(t.shape[0]))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_per_sample_fraction_of_independent_rows_is_p(p):
    draws, batch = 400, 16
    t = _draw(jax.random.split(jax.random.key(2), draws), batch, p, "per_sample")
    rows = _independent_rows(t)
    n = rows.size
    assert abs(rows.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    # Coins differ within a batch: some batches mix shared and independent rows.
    assert np.any(rows.any(axis=1) & ~rows.all(axis=1))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_per_batch_one_coin_for_the_whole_batch(p):
    draws, batch = 4000, 4
    t = _draw(jax.random.split(jax.random.key(3), draws), batch, p, "per_batch")
    rows = _independent_rows(t)
    # Every batch is all-independent or all-shared: one coin per call.
    assert np.all(rows.all(axis=1) | ~rows.any(axis=1))
    frac = rows.all(axis=1).mean()
    assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / draws)


def test_traced_p_and_bad_arguments():
    fn = jax.jit(lambda k, p: ptss_timesteps(k, 4, F, T, p, "per_sample"))
    assert fn(jax.random.key(0), jnp.float32(0.0)).shape == (4, F)
    with pytest.raises(ValueError, match="ptss.mode"):
        ptss_timesteps(jax.random.key(0), 2, F, T, 0.2, "per_frame")
    with pytest.raises(ValueError, match="ptss.p"):
        ptss_timesteps(jax.random.key(0), 2, F, T, 1.5)


# ---------------------------------------------------------------------------------------------
# The default scheme is the PTSS of earlier versions, bit for bit.


def _earlier_ptss(rng, batch, frames, num_timesteps, p, mode):
    """PTSS as every earlier version drew it (kept here as the reference the default must equal)."""
    key_shared, key_frames, key_coin = jax.random.split(rng, 3)
    shared = jax.random.randint(key_shared, (batch, 1), 0, num_timesteps)
    independent = jax.random.randint(key_frames, (batch, frames), 0, num_timesteps)
    coin = jax.random.uniform(key_coin, () if mode == "per_batch" else (batch, 1)) < p
    return jnp.where(coin, independent, jnp.broadcast_to(shared, (batch, frames))).astype(jnp.int32)


@pytest.mark.parametrize("mode", ["per_batch", "per_sample"])
def test_the_default_scheme_draws_the_timesteps_of_earlier_versions(mode):
    ptss = load_config(os.path.join(CONFIGS, "default.py")).ptss
    assert ptss.scheme == "ptss" and ptss.mode == "per_batch"
    ptss.mode = mode
    for seed, p in itertools.product(range(6), (0.2, 0.7)):
        ptss.p = p
        key = jax.random.fold_in(jax.random.key(3407), seed)
        want = np.asarray(_earlier_ptss(key, 6, 16, 1000, p, mode))
        assert np.array_equal(np.asarray(schemes.draw_frame_timesteps(key, 6, 16, 1000, ptss)), want)
        assert np.array_equal(np.asarray(ptss_timesteps(key, 6, 16, 1000, p, mode)), want)


# ---------------------------------------------------------------------------------------------
# per_device: one coin per data shard.


def test_per_device_flips_one_coin_per_data_shard():
    draws, batch, shards, p = 2000, 8, 4, 0.5
    fn = jax.jit(jax.vmap(lambda k: ptss_timesteps(k, batch, F, T, p, "per_device", shards)))
    rows = _independent_rows(np.asarray(fn(jax.random.split(jax.random.key(5), draws))))
    by_shard = rows.reshape(draws, shards, batch // shards)  # rows 0-1 are shard 0, 2-3 shard 1...
    # The videos of a shard share its coin; the shards' coins are independent of each other.
    assert np.all(by_shard.all(axis=2) | ~by_shard.any(axis=2))
    coins = by_shard[:, :, 0]
    assert abs(coins.mean() - p) < 5 * np.sqrt(p * (1 - p) / coins.size)
    mixed = np.mean(coins.any(axis=1) & ~coins.all(axis=1))  # 1 - 2 / 2**4 if independent
    assert abs(mixed - 0.875) < 5 * np.sqrt(0.875 * 0.125 / draws)
    corr = np.corrcoef(coins.T.astype(np.float64))[~np.eye(shards, dtype=bool)]
    assert np.all(np.abs(corr) < 5 / np.sqrt(draws))
    with pytest.raises(ValueError, match="batch of 6 does not split into 4 equal data shards"):
        ptss_timesteps(jax.random.key(0), 6, F, T, p, "per_device", 4)
    assert "per_device" in PTSS_MODES


# ---------------------------------------------------------------------------------------------
# independent (Diffusion Forcing).


def test_independent_scheme_is_uniform_and_uncorrelated_per_frame():
    t = np.asarray(jax.jit(lambda k: schemes.SCHEMES["independent"](k, 20000, F, T, {}))(jax.random.key(6)))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
    for frame in range(F):  # chi-square of each frame's marginal over 20 bins
        counts = np.bincount(t[:, frame] // (T // 20), minlength=20)
        assert chisquare(counts).pvalue > 1e-4
    corr = np.corrcoef(t.T.astype(np.float64))[~np.eye(F, dtype=bool)]
    assert np.all(np.abs(corr) < 5 / np.sqrt(len(t)))


# ---------------------------------------------------------------------------------------------
# FoPP: checked against brute-force enumeration of every non-decreasing path.


def _monotone_paths(frames, num_timesteps):
    return [s for s in itertools.product(range(num_timesteps), repeat=frames)
            if all(a <= b for a, b in zip(s, s[1:]))]


def _fopp_probability(path, num_timesteps):
    """FoPP's probability of a path: (1/F)(1/T) sum over anchors f of 1 / #paths through (f, t_f)."""
    n = len(path)
    through = [math.comb(a + f, f) * math.comb(num_timesteps - 1 - a + n - 1 - f, n - 1 - f)
               for f, a in enumerate(path)]
    return sum(1.0 / c for c in through) / (n * num_timesteps)


def test_fopp_draws_the_exact_joint_distribution_of_the_construction():
    n, t_count, draws = 4, 6, 200_000
    paths = _monotone_paths(n, t_count)
    probability = np.array([_fopp_probability(s, t_count) for s in paths])
    assert abs(probability.sum() - 1.0) < 1e-12
    t = np.asarray(jax.jit(lambda k: schemes.fopp_timesteps(k, draws, n, t_count))(jax.random.key(7)))
    assert np.all(np.diff(t, axis=1) >= 0) and t.min() >= 0 and t.max() <= t_count - 1
    index = {s: i for i, s in enumerate(paths)}
    counts = np.bincount([index[tuple(row)] for row in t.tolist()], minlength=len(paths))
    assert chisquare(counts, probability * draws).pvalue > 1e-4


@pytest.mark.parametrize("n, t_count", [(4, 6), (3, 9), (5, 4), (1, 7)])
def test_fopp_marginals_equal_the_enumerated_ones(n, t_count):
    want = np.zeros((n, t_count))
    for path in _monotone_paths(n, t_count):
        for frame, value in enumerate(path):
            want[frame, value] += _fopp_probability(path, t_count)
    np.testing.assert_allclose(schemes.fopp_marginals(n, t_count), want, rtol=1e-10, atol=1e-14)


def test_fopp_paths_through_a_fixed_anchor_are_uniform():
    n, t_count, draws, frame, value = 4, 6, 60_000, 1, 3
    fn = jax.jit(lambda k: schemes.fopp_paths(k, jnp.full((draws,), frame), jnp.full((draws,), value),
                                              n, t_count))
    t = np.asarray(fn(jax.random.key(8)))
    assert np.all(t[:, frame] == value) and np.all(np.diff(t, axis=1) >= 0)
    through = [s for s in _monotone_paths(n, t_count) if s[frame] == value]
    assert len(through) == math.comb(value + frame, frame) * math.comb(t_count - 1 - value + 2, 2)
    index = {s: i for i, s in enumerate(through)}
    counts = np.bincount([index[tuple(row)] for row in t.tolist()], minlength=len(through))
    assert chisquare(counts).pvalue > 1e-4


def test_fopp_at_full_size_is_monotone_with_its_exact_marginals():
    draws = 4096
    t = np.asarray(jax.jit(lambda k: schemes.fopp_timesteps(k, draws, 16, 1000))(jax.random.key(9)))
    assert t.dtype == np.int32 and np.all(np.diff(t, axis=1) >= 0)
    assert t.min() >= 0 and t.max() <= 999
    exact = schemes.fopp_marginals(16, 1000)
    k = np.arange(1000, dtype=np.float64)
    mean = exact @ k
    var = exact @ k**2 - mean**2
    fourth = np.einsum("jk,jk->j", exact, (k[None, :] - mean[:, None]) ** 4)  # central moment
    assert np.all(np.abs(t.mean(0) - mean) < 5 * np.sqrt(var / draws))
    assert np.all(np.abs(t.var(0) - var) < 5 * np.sqrt((fourth - var**2) / draws))
    # What the construction guarantees, on the exact marginals: each frame is the uniform anchor
    # 1/F of the time, so no timestep has less than 1/(F T); early frames lean to small t, late
    # ones to large t, symmetrically about (T - 1) / 2.
    assert np.all(exact >= 1 / (16 * 1000) - 1e-15)
    np.testing.assert_allclose(mean + mean[::-1], 999.0, rtol=1e-12)
    assert np.all(np.diff(mean) > 0) and mean[0] < 200 and mean[-1] > 800


# ---------------------------------------------------------------------------------------------
# PTSS over FoPP.


@pytest.mark.parametrize("mode", ["per_batch", "per_sample", "per_device"])
def test_ptss_fopp_mixes_shared_rows_and_fopp_rows(mode):
    cfg = {"p": 0.5, "mode": mode, "coin_groups": 4}
    fn = jax.jit(jax.vmap(lambda k: schemes.SCHEMES["ptss_fopp"](k, 8, 16, 1000, cfg)))
    t = np.asarray(fn(jax.random.split(jax.random.key(10), 400)))  # (draws, B, F)
    assert np.all(np.diff(t, axis=-1) >= 0)
    rows = _independent_rows(t)  # a FoPP row is constant with probability ~1e-30 here
    assert abs(rows.mean() - 0.5) < 5 * np.sqrt(0.25 / (rows.shape[0] if mode == "per_batch" else rows.size))
    groups = {"per_batch": 1, "per_sample": 8, "per_device": 4}[mode]
    shards = rows.reshape(len(rows), groups, -1)
    assert np.all(shards.all(axis=2) | ~shards.any(axis=2))
    for p, want in ((0.0, False), (1.0, True)):
        t = np.asarray(schemes.SCHEMES["ptss_fopp"](jax.random.key(11), 16, 16, 1000, {**cfg, "p": p}))
        assert np.all(_independent_rows(t) == want) and np.all(np.diff(t, axis=-1) >= 0)


# ---------------------------------------------------------------------------------------------
# The registry and the config.


def test_the_registry_and_its_config_checks():
    from fvdm_jax.config import schema as config_schema
    from fvdm_jax.training.step import validate_train_config

    assert tuple(schemes.SCHEMES) == ("ptss", "independent", "fopp", "ptss_fopp")
    assert config_schema.CHOICES["ptss.scheme"] == tuple(schemes.SCHEMES)
    config = load_config(os.path.join(CONFIGS, "tiny.py"))
    config.ptss.scheme = "fop"
    with pytest.raises(ConfigError, match=r"ptss.scheme='fop' is not one of \('ptss', 'independent'"):
        validate_train_config(config.train, config.ptss)
    with pytest.raises(ValueError, match="ptss.scheme='fop' is not one of"):
        schemes.draw_frame_timesteps(jax.random.key(0), 2, F, T, config.ptss)
    config.ptss.scheme, config.ptss.mode = "fopp", "per_video"
    with pytest.raises(ConfigError, match="ptss.mode='per_video' is not one of"):
        validate_train_config(config.train, config.ptss)


# ---------------------------------------------------------------------------------------------
# Every scheme inside the real jitted train step, on the 8-device CPU mesh.

RECORDED = []


def _recording_dit(**kwargs):
    """The real DiT, recording the frame timesteps each call receives (host callback)."""
    from fvdm_jax.models.dit import DiT

    class RecordingDiT(DiT):
        def __call__(self, x, frame_timesteps, labels=None):
            jax.debug.callback(lambda t: RECORDED.append(np.asarray(t)), frame_timesteps)
            return super().__call__(x, frame_timesteps, labels)

    return RecordingDiT(**kwargs)


# Two schemes in the default suite; the other two (their draws are tested above without the
# train step) with the slow tests, ~15 s each on 2 cores.
@pytest.mark.parametrize("scheme, mode", [
    ("ptss", "per_device"),
    pytest.param("independent", "per_batch", marks=pytest.mark.slow),
    ("fopp", "per_batch"),
    pytest.param("ptss_fopp", "per_sample", marks=pytest.mark.slow),
])
def test_every_scheme_trains_in_the_jitted_step_on_the_mesh(scheme, mode):
    from fvdm_jax.diffusion.schedule import Schedule
    from fvdm_jax.runtime import sharding as shd
    from fvdm_jax.training.state import init_state
    from fvdm_jax.training.step import JittedTrainStep, make_optimizer

    config = load_config(os.path.join(CONFIGS, "tiny.py"))
    config.ptss.scheme, config.ptss.mode, config.ptss.p = scheme, mode, 0.5
    model = _recording_dit(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                           num_heads=2, num_frames=4, num_classes=0)
    optimizer = make_optimizer(config.train)
    mesh = shd.make_mesh({"shape": (2, 2, 2), "axes": ("data", "fsdp", "tensor")})
    rules = shd.rules_from_config(config.mesh)
    boxed = jax.eval_shape(lambda r: init_state(r, model, optimizer, boxed=True), jax.random.key(0))
    state_shardings = shd.logical_shardings(boxed, mesh, rules)
    batch_shardings = {"video": shd.batch_sharding(mesh, rules, 5),
                       "label": shd.batch_sharding(mesh, rules, 1)}
    state = jax.jit(lambda r: init_state(r, model, optimizer, boxed=False),
                    out_shardings=state_shardings)(jax.random.key(0))
    schedule = Schedule.from_config(config.diffusion)
    step = JittedTrainStep(model, schedule, optimizer, config.train, config.ptss, state_shardings,
                           batch_shardings, rules=rules)
    assert step.coin_groups == 4  # batch 8 over data 2 x fsdp 2; the tensor pairs share a slice
    video = np.random.default_rng(0).standard_normal((8, 4, 8, 8, 4)).astype(np.float32)
    batch = {"video": jax.device_put(video, batch_shardings["video"]),
             "label": jax.device_put(np.zeros(8, np.int32), batch_shardings["label"])}
    RECORDED.clear()
    num_steps = 4
    for _ in range(num_steps):
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    jax.effects_barrier()
    assert int(state.first_nonfinite_step) == -1 and int(state.step) == num_steps
    taus = np.stack([t for t in RECORDED if t.shape == (8, 4)])  # (steps, B, F): init's are (1, F)
    assert taus.shape == (num_steps, 8, 4) and step.traces == 1
    assert taus.min() >= 0 and taus.max() <= schedule.num_timesteps - 1
    # What the step drew is the registry's draw for its key (fold_in(train.seed, step)), with the
    # mesh's 4 data shards as coin groups.
    for i, tau in enumerate(taus):
        key_t = jax.random.split(jax.random.fold_in(jax.random.key(int(config.train.seed)), i), 3)[0]
        want = schemes.draw_frame_timesteps(key_t, 8, 4, schedule.num_timesteps, config.ptss, 4)
        assert np.array_equal(tau, np.asarray(want))
    rows = _independent_rows(taus)  # (steps, B)
    if scheme in ("fopp", "ptss_fopp"):
        assert np.all(np.diff(taus, axis=-1) >= 0)
    if scheme in ("independent", "fopp"):
        assert rows.all()
    if scheme == "ptss":  # per_device: the 2 videos of a data shard share its coin...
        shards = rows.reshape(num_steps, 4, 2)
        assert np.all(shards.all(axis=2) | ~shards.any(axis=2))
        coins = shards[:, :, 0]
        assert (coins.any(axis=1) & ~coins.all(axis=1)).any()  # ...and the shards' coins differ
    if scheme == "ptss_fopp":  # per_sample: shared and FoPP videos in the same batch
        assert (rows.any(axis=1) & ~rows.all(axis=1)).any()
