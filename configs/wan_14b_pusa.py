"""LoRA fine-tuning of Wan 2.1 T2V 14B the Pusa way (Pusa V1: rank 512, alpha 512, AdamW 1e-5,
independent per-frame levels): configs/wan_14b.py with the adapters of configs/wan_1_3b_pusa.py.
Give the converted base weights with --config.train.init_from=DIR and the text latents with
--config.data.path=DIR."""

from fvdm_jax.config.load import load_sibling

base = load_sibling(__file__, "wan_14b")
pusa = load_sibling(__file__, "wan_1_3b_pusa")


def get_config():
    config = base.get_config()
    adapters = pusa.get_config()
    config.model.param_dtype = adapters.model.param_dtype
    config.lora = adapters.lora
    config.lora.rank, config.lora.alpha = 512, 512.0  # Pusa V1
    config.ptss.scheme = adapters.ptss.scheme
    config.train.lr = adapters.train.lr
    config.train.text_dropout_prob = adapters.train.text_dropout_prob
    return config
