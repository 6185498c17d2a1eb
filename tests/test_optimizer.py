"""The update of a train step against an independent numpy reference (torch's AdamW and
clip_grad_norm_, the EMA, the warmup schedule), and a loss that falls when overfitting one batch."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.config.load import load_config
from fvdm_jax.training.state import TrainState
from fvdm_jax.training.step import apply_gradients, make_optimizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TRAIN = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, schedule="constant",
             warmup_steps=2, num_steps=10, end_lr=0.0, grad_clip=0.5, grad_clip_start_step=1,
             ema_decay=0.9)


def numpy_reference(params, grads_per_step, t):
    """torch.optim.AdamW(lr(step), betas, eps, weight_decay) after clip_grad_norm_(max_norm) from
    grad_clip_start_step on; EMA e = d e + (1 - d) p, initialized to the parameters."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    ema = {k: v.copy() for k, v in p.items()}
    for step, grads in enumerate(grads_per_step):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
        if step >= t["grad_clip_start_step"] and norm > t["grad_clip"]:
            g = {k: x * t["grad_clip"] / (norm + 1e-6) for k, x in g.items()}
        lr = t["lr"] * min(1.0, step / t["warmup_steps"])  # linear warmup from 0
        n = step + 1
        for k in p:
            m[k] = t["b1"] * m[k] + (1 - t["b1"]) * g[k]
            v2[k] = t["b2"] * v2[k] + (1 - t["b2"]) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - t["b1"] ** n), v2[k] / (1 - t["b2"] ** n)
            p[k] = p[k] * (1 - lr * t["weight_decay"])  # torch: decoupled decay first
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + t["eps"])
            ema[k] = t["ema_decay"] * ema[k] + (1 - t["ema_decay"]) * p[k]
    return p, ema


def test_four_steps_match_torch_adamw_clip_and_ema():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    grads = [{k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in params.items()}
             for scale in (0.1, 2.0, 0.05, 3.0)]  # steps 1 and 3 are clipped, 2 is not
    optimizer = make_optimizer(TRAIN)
    jparams = jax.tree_util.tree_map(jnp.asarray, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=jparams, ema_params=jparams,
                       opt_state=optimizer.init(jparams), first_nonfinite_step=jnp.int32(-1))
    update = jax.jit(lambda s, g: apply_gradients(s, g, optimizer, TRAIN))
    for g in grads:
        new_params, ema, opt_state, _, _ = update(state, jax.tree_util.tree_map(jnp.asarray, g))
        state = state.replace(step=state.step + 1, params=new_params, ema_params=ema, opt_state=opt_state)
    want_params, want_ema = numpy_reference(params, grads, TRAIN)
    for k in params:
        np.testing.assert_allclose(np.asarray(state.params[k]), want_params[k], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.ema_params[k]), want_ema[k], rtol=2e-5, atol=1e-6)
    assert not np.allclose(np.asarray(state.params["w"]), params["w"])  # it moved


def test_overfitting_one_batch_lowers_the_loss(tmp_path):
    """The full jitted step on one repeated batch (tiny model): the loss falls."""
    from fvdm_jax.training.loop import build_setup, create_state
    from fvdm_jax.training.step import JittedTrainStep

    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.mesh.shape = (1, 1, 1)
    config.train.lr = 3e-3
    config.ptss.p = 0.0
    setup = build_setup(config, jax.devices()[:1])
    step = JittedTrainStep(setup.model, setup.schedule, setup.optimizer, config.train, config.ptss,
                           setup.state_shardings, setup.batch_shardings, mesh=setup.mesh, rules=setup.rules)
    state = create_state(setup, 0)
    m = config.model
    video = np.random.default_rng(1).uniform(-1, 1, (int(config.train.batch_size), m.num_frames,
                                                      m.input_size, m.input_size, m.in_channels))
    batch = {"video": jnp.asarray(video, jnp.float32),
             "label": jnp.zeros((int(config.train.batch_size),), jnp.int32)}
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["mse"]))
    # The per-step noise and timesteps vary, so compare means of the first and last steps.
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
