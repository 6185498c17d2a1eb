"""Per-frame diffusion math against an independent float64 numpy implementation of the
improved-DDPM tables (full and respaced processes), plus the rules the official vectors do not
reach: DDPM steps, eta > 0, the all-frames-at-zero decoder NLL, off-grid and degenerate steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.diffusion import (
    Schedule,
    ddim_step,
    ddpm_step,
    loss_terms,
    p_mean_variance,
    q_sample,
    space_timesteps,
)
from fvdm_jax.diffusion.losses import discretized_gaussian_log_likelihood, vb_terms_bpd

SHAPE = (2, 4, 3, 3, 2)  # (B, F, H, W, C)


class RefDiffusion:
    """Tables of a (possibly respaced) process indexed by its own step index, float64."""

    def __init__(self, betas):
        self.betas = betas = np.asarray(betas, np.float64)
        self.ac = np.cumprod(1 - betas)
        self.ac_prev = np.append(1.0, self.ac[:-1])
        self.post_var = betas * (1 - self.ac_prev) / (1 - self.ac)
        self.post_logvar = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.c1 = betas * np.sqrt(self.ac_prev) / (1 - self.ac)
        self.c2 = (1 - self.ac_prev) * np.sqrt(1 - betas) / (1 - self.ac)

    @classmethod
    def respaced(cls, schedule, kept):
        ac = schedule.alphas_cumprod[kept]
        return cls(1 - ac / np.append(1.0, ac[:-1]))

    def g(self, table, k):
        return table[k][..., None, None, None]

    def p_mean_var(self, out, x, k):
        c = x.shape[-1]
        eps, v = out[..., :c], out[..., c:]
        frac = (v + 1) / 2
        logvar = frac * self.g(np.log(self.betas), k) + (1 - frac) * self.g(self.post_logvar, k)
        x0 = x / np.sqrt(self.g(self.ac, k)) - np.sqrt(1 / self.g(self.ac, k) - 1) * eps
        mean = self.g(self.c1, k) * x0 + self.g(self.c2, k) * x
        return mean, logvar, x0


def _rand(seed, shape=SHAPE, scale=1.0):
    return scale * np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float64)


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


@pytest.fixture(scope="module")
def schedule():
    return Schedule()


@pytest.mark.parametrize("respacing", [None, "10", "ddim25"])
def test_ddpm_step_matches_reference_process(schedule, respacing):
    kept = np.arange(1000) if respacing is None else np.array(space_timesteps(1000, respacing))
    ref = RefDiffusion.respaced(schedule, kept)
    rng = np.random.default_rng(0)
    k = rng.integers(0, len(kept), size=SHAPE[:2])
    k[0, 0] = 0  # a frame landing clean
    x, out, noise = _rand(1), np.tanh(_rand(2, SHAPE[:-1] + (4,))), _rand(3)
    tau = kept[k]
    tau_next = np.where(k > 0, kept[np.maximum(k - 1, 0)], -1)

    mean, logvar, x0 = ref.p_mean_var(out, x, k)
    got = p_mean_variance(schedule, out.astype(np.float32), x.astype(np.float32), tau, tau_next)
    _close(got["mean"], mean)
    # Frames ending clean get no noise; their clipped log variance follows the original grid
    # (tau + 1 -> tau), which is the official rule for the full process only.
    moving = k != 0 if respacing else np.ones_like(k, bool)
    _close(np.asarray(got["log_variance"])[moving], logvar[moving])
    _close(got["pred_xstart"], x0)

    sample, _ = ddpm_step(schedule, out.astype(np.float32), x.astype(np.float32), tau, tau_next,
                          noise.astype(np.float32))
    nonzero = (k != 0)[..., None, None, None]
    _close(sample, mean + nonzero * np.exp(0.5 * logvar) * noise)
    _close(sample[0, 0], mean[0, 0])  # no noise for the frame that ends clean


def test_full_process_clean_end_variance_matches_official(schedule):
    """At t = 0 of the full process the log variance uses posterior_variance[1] (official clip)."""
    ref = RefDiffusion(schedule.betas)
    out, x = np.tanh(_rand(4, SHAPE[:-1] + (4,))), _rand(5)
    t = np.zeros(SHAPE[:2], np.int64)
    _, logvar, _ = ref.p_mean_var(out, x, t)
    _close(p_mean_variance(schedule, out.astype(np.float32), x.astype(np.float32), t)["log_variance"], logvar)


def test_ddim_eta_matches_reference(schedule):
    kept = np.array(space_timesteps(1000, "10"))
    ref = RefDiffusion.respaced(schedule, kept)
    k = np.array([[9, 5, 1, 0], [3, 3, 3, 3]])
    tau, tau_next = kept[k], np.where(k > 0, kept[np.maximum(k - 1, 0)], -1)
    x, eps, noise = _rand(6), _rand(7), _rand(8)
    eta = 0.7
    ab, abp = ref.g(ref.ac, k), ref.g(ref.ac_prev, k)
    x0 = x / np.sqrt(ab) - np.sqrt(1 / ab - 1) * eps
    sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
    want = x0 * np.sqrt(abp) + np.sqrt(1 - abp - sigma**2) * eps + (k != 0)[..., None, None, None] * sigma * noise
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    got, _ = ddim_step(schedule, f32(np.concatenate([eps, eps], -1)), f32(x), tau, tau_next, f32(noise), eta=eta)
    _close(got, want)
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(schedule, f32(eps), f32(x), tau, tau_next, eta=0.5)


def test_uniform_timesteps_reduce_to_scalar_diffusion(schedule):
    """Each frame is noised and denoised by its own tau: a mixed-tau video equals, frame by frame,
    videos run with that tau on every frame."""
    x0, noise = _rand(9), _rand(10)
    tau = np.array([[0, 250, 500, 999], [999, 10, 10, 3]])
    mixed = np.asarray(q_sample(schedule, x0, tau, noise))
    for f in range(4):
        uniform = np.asarray(q_sample(schedule, x0, np.repeat(tau[:, f : f + 1], 4, 1), noise))
        np.testing.assert_allclose(mixed[:, f], uniform[:, f], rtol=1e-6, atol=1e-7)


def test_vb_uses_decoder_nll_only_when_all_frames_are_clean(schedule):
    x0 = np.clip(_rand(11, scale=0.6), -1, 1)
    out = np.concatenate([_rand(12, scale=0.1), np.tanh(_rand(13))], -1).astype(np.float32)
    t = np.array([[0, 0, 0, 0], [0, 0, 0, 1]])
    x_t = np.asarray(q_sample(schedule, x0, t, _rand(14)))
    vb = np.asarray(vb_terms_bpd(schedule, out, x0.astype(np.float32), x_t, t))
    pmv = p_mean_variance(schedule, out, x_t, t)
    nll = -np.asarray(discretized_gaussian_log_likelihood(x0, pmv["mean"], 0.5 * pmv["log_variance"]))
    assert vb[0] == pytest.approx(nll[0].mean() / np.log(2), rel=1e-5)
    assert vb[1] != pytest.approx(nll[1].mean() / np.log(2), rel=1e-3)  # KL for a mixed sample


def test_discretized_likelihood_bins_and_edges():
    from math import erf, pi, sqrt, tanh

    x = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    mean, log_scale = np.full(5, 0.1), np.full(5, -1.0)
    got = np.asarray(discretized_gaussian_log_likelihood(x, mean, log_scale))
    std = np.exp(log_scale[0])
    def reference(cdf):
        want = []
        for xi in x:
            hi, lo = (xi - 0.1 + 1 / 255) / std, (xi - 0.1 - 1 / 255) / std
            p = cdf(hi) if xi < -0.999 else (1 - cdf(lo) if xi > 0.999 else cdf(hi) - cdf(lo))
            want.append(np.log(p))
        return np.array(want)

    # Exactly the improved-DDPM formula (tanh approximation of the normal cdf) ...
    approx = lambda z: 0.5 * (1 + tanh(sqrt(2 / pi) * (z + 0.044715 * z**3)))  # noqa: E731
    np.testing.assert_allclose(got, reference(approx), rtol=1e-5)
    # ... which is close to the exact normal cdf away from the far tails.
    exact = lambda z: 0.5 * (1 + erf(z / sqrt(2)))  # noqa: E731
    np.testing.assert_allclose(got[1:4], reference(exact)[1:4], rtol=2e-3)


def test_vb_trains_only_the_variance(schedule):
    x0, noise = _rand(15, scale=0.5), _rand(16)
    t = np.array([[5, 100, 600, 900], [40, 40, 40, 40]])
    x_t = np.asarray(q_sample(schedule, x0, t, noise))
    out = np.concatenate([_rand(17), np.tanh(_rand(18))], -1).astype(np.float32)

    grad = jax.grad(lambda o: jnp.sum(loss_terms(schedule, o, x0, x_t, t, noise)["vb"]))(out)
    assert np.all(np.asarray(grad)[..., :2] == 0) and np.any(np.asarray(grad)[..., 2:] != 0)
    grad = jax.grad(lambda o: jnp.sum(loss_terms(schedule, o, x0, x_t, t, noise)["mse"]))(out)
    assert np.all(np.asarray(grad)[..., 2:] == 0)
    fixed = loss_terms(schedule, out[..., :2], x0, x_t, t, noise, learn_sigma=False)
    assert "vb" not in fixed and np.allclose(fixed["loss"], fixed["mse"])


def test_fixed_variance_without_learn_sigma(schedule):
    ref = RefDiffusion(schedule.betas)
    x, eps = _rand(19), _rand(20)
    t = np.array([[0, 1, 500, 999], [2, 2, 2, 2]])
    got = p_mean_variance(schedule, eps.astype(np.float32), x.astype(np.float32), t, learn_sigma=False)
    fixed_large = np.log(np.append(ref.post_var[1], ref.betas[1:]))[t][..., None, None, None]
    _close(got["log_variance"], np.broadcast_to(fixed_large, SHAPE))


def test_off_grid_and_degenerate_steps(schedule):
    x, out, noise = _rand(21), np.tanh(_rand(22, SHAPE[:-1] + (4,))), _rand(23)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    # A step to the same level is the identity (DDIM exactly up to rounding; DDPM by rule).
    tau = np.full(SHAPE[:2], 300.5)
    same, _ = ddim_step(schedule, f32(out), f32(x), tau, tau)
    _close(same, x, tol=1e-5)
    held, _ = ddpm_step(schedule, f32(out), f32(x), tau, tau, f32(noise))
    np.testing.assert_array_equal(held, np.asarray(f32(x)))
    assert np.all(np.isfinite(held))
    # Off-grid DDIM lands between the two neighbouring on-grid results.
    lo, _ = ddim_step(schedule, f32(out), f32(x), np.full(SHAPE[:2], 300), np.full(SHAPE[:2], 200))
    hi, _ = ddim_step(schedule, f32(out), f32(x), np.full(SHAPE[:2], 301), np.full(SHAPE[:2], 200))
    mid, _ = ddim_step(schedule, f32(out), f32(x), np.full(SHAPE[:2], 300.5), np.full(SHAPE[:2], 200))
    between = (np.minimum(lo, hi) - 1e-5 <= mid) & (mid <= np.maximum(lo, hi) + 1e-5)
    assert between.all()


def test_v_prediction_is_an_exact_reparameterization(schedule):
    from fvdm_jax.diffusion.gaussian import eps_output, predict_eps_from_v, v_target

    with pytest.raises(ValueError, match="diffusion.prediction='x0' is not one of"):
        Schedule(prediction="x0")
    vsched = Schedule(prediction="v")
    x0, noise = _rand(30, scale=0.5), _rand(31)
    t = np.array([[0, 100, 600, 999], [999, 999, 3, 3]])
    x_t = np.asarray(q_sample(vsched, x0, t, noise), np.float32)
    v = np.asarray(v_target(vsched, x0, t, noise), np.float32)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 against float64 tables; eps comes back from (x_t, v).
    abar = schedule.alphas_cumprod[t][..., None, None, None]
    _close(v, np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0)
    _close(predict_eps_from_v(vsched, x_t, t, v), noise, tol=1e-5)

    var = np.tanh(_rand(32)).astype(np.float32)
    exact_v = loss_terms(vsched, np.concatenate([v, var], -1), x0, x_t, t, noise)
    exact_eps = loss_terms(schedule, np.concatenate([noise, var], -1).astype(np.float32),
                           x0, x_t, t, noise)
    np.testing.assert_allclose(exact_v["mse"], 0.0, atol=1e-10)
    _close(exact_v["pred_xstart"], x0, tol=1e-4)
    # The variance term reads the eps the v output implies: the same bound as the eps model's.
    np.testing.assert_allclose(exact_v["vb"], exact_eps["vb"], rtol=2e-3, atol=1e-6)

    # An imperfect v output: the mse is against v (not eps), and the x_0 error at t = 999 is the
    # v error times sqrt(1 - abar) (~1), not the eps error times sqrt(1 / abar - 1) (~150).
    err = 0.01 * _rand(33).astype(np.float32)
    terms = loss_terms(vsched, np.concatenate([v + err, var], -1), x0, x_t, t, noise)
    np.testing.assert_allclose(terms["mse"], np.mean(np.square(err), axis=(1, 2, 3, 4)),
                               rtol=1e-3)
    x0_err = np.abs(np.asarray(terms["pred_xstart"]) - x0)[0, 3]
    assert x0_err.max() <= 1.01 * np.abs(err[0, 3]).max() + 1e-4

    # Samplers see eps: a DDIM step on the converted v output is the eps model's step.
    out = eps_output(vsched, jnp.concatenate([v, var], -1), x_t, t)
    np.testing.assert_array_equal(np.asarray(out)[..., 2:], var)
    t_next = np.maximum(t - 50, -1)
    from_v, _ = ddim_step(vsched, out, x_t, t, t_next)
    from_eps, _ = ddim_step(schedule, np.concatenate([noise, var], -1).astype(np.float32),
                            x_t, t, t_next)
    _close(from_v, from_eps, tol=1e-4)


@pytest.mark.parametrize("v", [-1.0, 0.0, 1.0, 2.0])
def test_ddpm_jump_from_the_top_to_clean_is_finite(schedule, v):
    """A frame stepping from tau = T-1 straight to clean (tau_next = -1) next to ordinary,
    clean-ending, waiting and finished frames: every output is finite for any variance value v,
    the jumping frame lands on its x_0 prediction, and every other frame is what it is alone."""
    abar = schedule.alphas_cumprod
    tau = np.array([[999, 999, 500, 0], [300, 999, 0, 999]])
    tau_next = np.array([[-1, -1, 400, -1], [300, 999, 0, 0]])  # 300, 999, 0: not moving
    x, eps, noise = _rand(40), _rand(41), _rand(42)
    out = np.concatenate([eps, np.full(SHAPE, v)], -1).astype(np.float32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = p_mean_variance(schedule, out, f32(x), tau, tau_next)
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert np.isfinite(np.asarray(got[key])).all(), key
    step, x0 = ddpm_step(schedule, out, f32(x), tau, tau_next, f32(noise))
    step = np.asarray(step)
    assert np.isfinite(step).all()

    # The jump: the posterior mean at alpha_bar_next = 1 is the x_0 prediction, and no noise.
    want_x0 = x / np.sqrt(abar[999]) - np.sqrt(1 / abar[999] - 1) * eps
    _close(step[0, :2], want_x0[0, :2], tol=1e-5)
    np.testing.assert_array_equal(step[0, :2], np.asarray(x0)[0, :2])
    # Its learned range runs from the last step's posterior variance (v = -1; there is no step
    # T -> T-1 to clip to) to its beta, 1 - alpha_bar_{T-1} (v = +1).
    last_post = (1 - abar[999] / abar[998]) * (1 - abar[998]) / (1 - abar[999])
    frac = (v + 1) / 2
    want_logvar = frac * np.log(1 - abar[999]) + (1 - frac) * np.log(last_post)
    np.testing.assert_allclose(np.asarray(got["log_variance"])[0, :2], want_logvar, rtol=1e-5,
                               atol=1e-7)

    # Frames that do not move are returned exactly; the others equal their own one-frame steps.
    for b, f in ((1, 0), (1, 1), (1, 2)):
        np.testing.assert_array_equal(step[b, f], np.asarray(f32(x))[b, f])
    for b, f in ((0, 2), (0, 3), (1, 3)):
        alone, _ = ddpm_step(schedule, out[b:b + 1, f:f + 1], f32(x[b:b + 1, f:f + 1]),
                             tau[b:b + 1, f:f + 1], tau_next[b:b + 1, f:f + 1],
                             f32(noise[b:b + 1, f:f + 1]))
        np.testing.assert_allclose(step[b, f], np.asarray(alone)[0, 0], rtol=1e-6, atol=1e-6)


def test_ddpm_loop_with_a_jump_to_clean_and_an_overflowing_variance_is_finite(schedule):
    """The same corner inside the scan sampler, with a variance output far outside [-1, 1]
    (v = 60: exp of the extrapolated log variance overflows float32) on a frame that ends clean."""
    from fvdm_jax.diffusion import sample

    def model_fn(x, tau):  # an analytic eps and a fixed variance value
        return jnp.concatenate([0.5 * x, jnp.full_like(x, 60.0)], axis=-1)

    taus = np.array([[[999, 999, 999, 999]] * 2, [[0, 500, 500, 500]] * 2], np.float32)
    nexts = np.array([[[-1, 500, 500, 500]] * 2, [[0, -1, -1, -1]] * 2], np.float32)
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    out = sample(model_fn, schedule, x_T, taus, nexts, sampler="ddpm", rng=jax.random.key(1))
    assert np.isfinite(np.asarray(out)).all()
    abar = schedule.alphas_cumprod[999]
    want = (np.asarray(x_T) / np.sqrt(abar) - np.sqrt(1 / abar - 1) * 0.5 * np.asarray(x_T))
    _close(np.asarray(out)[:, 0], want[:, 0], tol=1e-5)  # the jump, then resting at tau 0
