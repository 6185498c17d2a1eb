"""Per-frame (vectorized-timestep) diffusion: schedules, PTSS, losses and sampling steps."""

from fvdm_jax.diffusion import tasks
from fvdm_jax.diffusion.gaussian import (
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_posterior_mean_variance,
    q_sample,
)
from fvdm_jax.diffusion.losses import loss_terms, training_losses
from fvdm_jax.diffusion.ptss import ptss_timesteps
from fvdm_jax.diffusion.samplers import (
    SAMPLERS,
    Conditioning,
    cfg_model_fn,
    ddim_step,
    ddpm_step,
    make_sampler,
    sample,
)
from fvdm_jax.diffusion.schedule import (
    VPSDE,
    Schedule,
    respaced_alphas_cumprod,
    space_timesteps,
    step_pairs,
)

__all__ = [
    "SAMPLERS",
    "Conditioning",
    "Schedule",
    "cfg_model_fn",
    "make_sampler",
    "sample",
    "tasks",
    "VPSDE",
    "ddim_step",
    "ddpm_step",
    "loss_terms",
    "p_mean_variance",
    "predict_eps_from_xstart",
    "predict_xstart_from_eps",
    "q_posterior_mean_variance",
    "q_sample",
    "respaced_alphas_cumprod",
    "ptss_timesteps",
    "space_timesteps",
    "step_pairs",
    "training_losses",
]
