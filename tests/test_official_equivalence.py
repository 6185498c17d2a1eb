"""fvdm_jax reproduces every tensor of the official PyTorch FVDM reference vectors.

The vectors file (default: tests/data/fvdm_official_tiny.npz, or $FVDM_REFERENCE_VECTORS) holds
the official model's randomized state_dicts, inputs and outputs; the model shape comes from its
config_json, so any file of this format (other sizes, seeds, frame counts) must pass.
Tolerance for every tensor: max |ours - ref| <= 1e-4 * max(1, max |ref|).
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.convert.official import convert_state_dict, unwrap_state_dict
from fvdm_jax.diffusion import (
    Schedule,
    cfg_model_fn,
    ddim_step,
    p_mean_variance,
    q_sample,
    respaced_alphas_cumprod,
    space_timesteps,
    step_pairs,
    training_losses,
)
from fvdm_jax.models.dit import DiT

DEFAULT_VECTORS = os.path.join(os.path.dirname(__file__), "data", "fvdm_official_tiny.npz")
VECTORS = os.environ.get("FVDM_REFERENCE_VECTORS", DEFAULT_VECTORS)


def to_ours(a):
    """Official (B, F, C, H, W) -> channels-last (B, F, H, W, C)."""
    return np.asarray(a).transpose(0, 1, 3, 4, 2)


def assert_matches(name, ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(ours - ref)))
    tol = 1e-4 * max(1.0, float(np.max(np.abs(ref))))
    print(f"[equivalence] {name}: max abs err {err:.3e} (tol {tol:.1e}, max|ref| {np.max(np.abs(ref)):.3g})")
    assert err <= tol, f"{name}: max abs error {err:.3e} > {tol:.3e}"


def assert_tree_matches(name, ours, ref):
    """The same tolerance for every leaf of two trees of one structure (chex names a leaf that
    differs): each leaf divided by its max(1, max |ref|), then max abs error <= 1e-4."""
    scale = jax.tree.map(lambda r: max(1.0, float(np.max(np.abs(r)))), ref)
    scaled = lambda tree: jax.tree.map(lambda a, s: np.asarray(a, np.float64) / s, tree, scale)
    chex.assert_trees_all_equal_shapes(ours, ref)
    for key in sorted(ref):
        err = float(np.max(np.abs(np.asarray(ours[key], np.float64) - np.asarray(ref[key]))))
        print(f"[equivalence] {name}/{key}: max abs err {err:.3e} (tol {1e-4 * scale[key]:.1e})")
    chex.assert_trees_all_close(scaled(ours), scaled(ref), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def ref():
    with np.load(VECTORS, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def cfg(ref):
    return json.loads(str(ref["config_json"]))


def _model(cfg, conditional: bool) -> DiT:
    return DiT(
        input_size=cfg["input_size"],
        patch_size=cfg["patch_size"],
        in_channels=cfg["in_channels"],
        hidden_size=cfg["hidden_size"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        num_frames=cfg["num_frames"],
        num_classes=cfg["num_classes"] if conditional else 0,
        class_dropout_prob=cfg["class_dropout_prob"],
        learn_sigma=cfg["learn_sigma"],
    )


def _state_dict(ref, prefix):
    return unwrap_state_dict({k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)})


@pytest.fixture(scope="module")
def uncond(ref, cfg):
    model = _model(cfg, conditional=False)
    params = convert_state_dict(_state_dict(ref, "uncond_sd/"), model)
    apply = jax.jit(lambda x, t: model.apply(params, x, t))
    return model, params, apply


@pytest.fixture(scope="module")
def schedule():
    return Schedule()  # the official 1000-step linear schedule


def test_model_unconditional(ref, uncond):
    _, _, apply = uncond
    out = apply(to_ours(ref["x0"]), ref["t"])
    assert_matches("model_uncond_out", out, to_ours(ref["model_uncond_out"]))


def test_model_class_conditional_and_cfg(ref, cfg):
    if not any(k.startswith("cond_sd/") for k in ref):
        pytest.skip("this vectors file has no class-conditional model")
    model = _model(cfg, conditional=True)
    params = convert_state_dict(_state_dict(ref, "cond_sd/"), model)
    x0, t, y = to_ours(ref["x0"]), ref["t"], ref["y"]
    out = jax.jit(model.apply)(params, x0, t, y)
    assert_matches("model_cond_out", out, to_ours(ref["model_cond_out"]))

    # The official forward_with_cfg on [x0; x0] with labels [y; null]: its first half is the
    # guided eps with the conditional variance channels, which is what the sampler's CFG returns.
    def apply(x, tau, labels):
        return model.apply(params, x, tau, labels)

    guided = jax.jit(lambda x, tau: cfg_model_fn(apply, y, cfg["num_classes"], cfg["cfg_scale"],
                                                 model.in_channels)(x, tau))(x0, t)
    official = to_ours(ref["model_cfg_out"])
    assert_matches("model_cfg_out", guided, official[: len(y)])


def test_q_sample(ref, schedule):
    out = q_sample(schedule, to_ours(ref["x0"]), ref["t"], to_ours(ref["noise"]))
    assert_matches("q_sample", out, to_ours(ref["q_sample"]))


def test_training_loss_terms(ref, uncond, schedule, cfg):
    _, _, apply = uncond
    terms = training_losses(
        schedule,
        apply,
        to_ours(ref["x0"]),
        ref["t"],
        to_ours(ref["noise"]),
        learn_sigma=cfg["learn_sigma"],
    )
    expected = {"mse": ref["loss_mse"], "loss": ref["loss"],
                "pred_xstart": to_ours(ref["loss_pred_xstart"])}
    if cfg["learn_sigma"]:
        expected["vb"] = ref["loss_vb"]
    assert_tree_matches("loss", {key: terms[key] for key in expected}, expected)


def test_p_mean_variance(ref, uncond, schedule, cfg):
    _, _, apply = uncond
    x_t = to_ours(ref["q_sample"])
    out = p_mean_variance(
        schedule, apply(x_t, ref["t"]), x_t, ref["t"], learn_sigma=cfg["learn_sigma"]
    )
    keys = ("mean", "log_variance", "pred_xstart")
    assert_tree_matches("pmv", {key: out[key] for key in keys},
                        {key: to_ours(ref[f"pmv_{key}"]) for key in keys})


def test_respaced_schedules(ref, schedule):
    counts = sorted(int(k.rsplit("_", 1)[1]) for k in ref if k.startswith("timestep_map_"))
    assert counts, "the vectors file holds no respaced schedules"
    for n in counts:
        timestep_map = space_timesteps(schedule.num_timesteps, str(n))
        np.testing.assert_array_equal(timestep_map, ref[f"timestep_map_{n}"])
        assert_matches(
            f"alphas_cumprod_{n}",
            respaced_alphas_cumprod(schedule, timestep_map),
            ref[f"alphas_cumprod_{n}"],
        )


def _respaced_to_original(timestep_map, indices):
    """Official respaced indices -> (tau, tau_next) in original units (tau_next = -1 at index 0)."""
    timestep_map = np.asarray(timestep_map)
    tau = timestep_map[indices]
    tau_next = np.where(indices > 0, timestep_map[np.maximum(indices - 1, 0)], -1)
    return tau, tau_next


def test_ddim_step(ref, uncond, schedule):
    _, _, apply = uncond
    timestep_map = space_timesteps(schedule.num_timesteps, "10")
    tau, tau_next = _respaced_to_original(timestep_map, ref["ddim_step_t"])
    x = to_ours(ref["ddim_step_x"])
    out, _ = ddim_step(schedule, apply(x, tau), x, tau, tau_next, eta=0.0)
    assert_matches("ddim_step_out", out, to_ours(ref["ddim_step_out"]))


def _ddim_loop(apply, schedule, x, clean_frame=None):
    """DDIM-10 (eta=0) with uniform per-frame timesteps; optionally one frame held at t=0."""
    batch, frames = x.shape[:2]
    taus, nexts = step_pairs(space_timesteps(schedule.num_timesteps, "10"))
    step = jax.jit(lambda x, tau, tau_next: ddim_step(schedule, apply(x, tau), x, tau, tau_next)[0])
    for tau, tau_next in zip(taus, nexts):
        tau = np.full((batch, frames), tau)
        tau_next = np.full((batch, frames), tau_next)
        if clean_frame is not None:
            tau[:, clean_frame], tau_next[:, clean_frame] = 0, -1
        x = step(x, jnp.asarray(tau), jnp.asarray(tau_next))
    return x


def test_ddim_loop(ref, uncond, schedule):
    _, _, apply = uncond
    out = _ddim_loop(apply, schedule, to_ours(ref["ddim_loop_noise"]))
    assert_matches("ddim_loop_out", out, to_ours(ref["ddim_loop_out"]))


def test_ddim_i2v_loop_replace_semantics(ref, uncond, schedule):
    _, _, apply = uncond
    x = to_ours(ref["ddim_loop_noise"]).copy()
    x[:, 0] = to_ours(ref["x0"])[:, 0]
    out = _ddim_loop(apply, schedule, x, clean_frame=0)
    assert_matches("ddim_i2v_loop_out", out, to_ours(ref["ddim_i2v_loop_out"]))


def test_frozen_tables_match_checkpoint(ref, cfg, uncond):
    """The recomputed sin-cos tables equal the ones stored in the official state_dict."""
    from fvdm_jax.models.embeddings import sincos_1d, sincos_2d

    grid = cfg["input_size"] // cfg["patch_size"]
    ours = {"pos_embed": sincos_2d(cfg["hidden_size"], grid)[None],
            "temp_embed": sincos_1d(cfg["hidden_size"], np.arange(cfg["num_frames"]))[None]}
    assert_tree_matches("tables", ours, {key: ref[f"uncond_sd/{key}"] for key in ours})
