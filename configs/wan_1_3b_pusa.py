"""LoRA fine-tuning of Wan 2.1 T2V 1.3B the Pusa way: configs/wan_1_3b.py with adapters (rank
128, alpha 128; Pusa's 14B used 512) on q, k, v, o of self- and cross-attention and both FFN
linears, the base frozen in bf16; per-frame levels drawn independently per latent frame (Pusa's released recipe; set
ptss.scheme=ptss for FVDM's PTSS). Give the converted base weights with
--config.train.init_from=DIR (python -m fvdm_jax.convert wan ...) and the text latents with
--config.data.path=DIR."""

from fvdm_jax.config.load import load_sibling

base = load_sibling(__file__, "wan_1_3b")


def get_config():
    config = base.get_config()
    config.model.param_dtype = "bfloat16"  # the frozen base; adapters and their state are float32
    # Pusa's rank 512 adapts ~0.7 G parameters of the 1.3B (half the model); 128 keeps LoRA a
    # fraction of it. configs/wan_14b_pusa.py restores Pusa's 512.
    config.lora.rank, config.lora.alpha = 128, 128.0
    config.ptss.scheme = "independent"
    config.train.lr = 1e-5
    config.train.text_dropout_prob = 0.0  # Pusa trains without text dropout
    return config
