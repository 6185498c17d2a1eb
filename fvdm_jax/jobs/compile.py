"""--mode=compile: compile the real train step for a named TPU slice on this (CPU) machine.

    python -m fvdm_jax.main --config=configs/ffs_xl.py --workdir=W --mode=compile \\
        --config.compile.topology=v5e-16 [--config.compile.num_slices=2]

As MaxText's train_compile: libtpu describes the target slice (`jax.experimental.topologies`,
compile-only devices, no TPU needed), the mesh and the abstract train state and batch get the
target's shardings (nothing is allocated), and the jitted train step (state donation and shardings
as in training) is lowered and compiled by the TPU compiler. Reported per program: XLA's per-chip
memory plan against the chip's HBM, the compile time, the collectives of the compiled HLO, and
whether it fits. A program that does not fit fails to compile in seconds (RESOURCE_EXHAUSTED): one
line with the need and the HBM, recorded with fits=false. Printed as a table and written to
WORKDIR/compile.json (a list, one record per program).

A Wan config (model.architecture='wan') compiles its own encoders as --mode=encode and
--mode=sample run them, each on one chip: `vae_encode` (the Wan VAE's encode_video of one video
of 1 + 4 (model.num_frames - 1) frames at model.wan.latent_size x 8 pixels), `vae_decode` (the
latents of sample.batch_size videos back to pixels, as --mode=sample decodes a batch) and
`text_encode` (UMT5 on one prompt of encoders.text_length tokens). The architectures come from
the config.json of encoders.vae / encoders.text (no weights are read), else the Wan 2.1 VAE and
UMT5-XXL; matmuls in encoders.dtype. `fvd_features` is DiT-only.

Topology names: `v5e-16` / `v6e-256` (chips), `v4-8` / `v5p-128` (TensorCores, 2 per chip, as
Cloud TPU accelerator types count them), or explicit `v5e:4x4`, `v5p:4x4x4`. model.remat=auto
and model.attention=auto resolve for the TPU, not for this machine's backend.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime.topology import Target, parse_topology, target_devices  # noqa: F401
from fvdm_jax.sampling.wan_compile import (
    build_umt5,
    build_wan_vae,
    text_encode_record,
    vae_decode_record,
    wan_vae_encode_record,
)


def for_target(config, platform: str = "tpu"):
    """A copy of config with model.remat and model.attention 'auto' resolved for `platform`
    (a jax backend name: tpu, gpu, cpu)."""
    from fvdm_jax.models.dit import resolve_remat
    from fvdm_jax.models.layers import resolve_attention

    config = config.copy_and_resolve_references()
    config.model.remat = resolve_remat(str(config.model.remat), platform)
    config.model.attention = resolve_attention(
        str(config.model.attention), str(config.model.dtype), platform, _tokens(config))
    return config


def _tokens(config) -> int | None:
    """The self-attention length of a Wan model at its training window (all F x h x w patches);
    None for the DiT (its spatial and temporal attentions are short)."""
    if not _is_wan(config):
        return None
    _, ph, pw = (int(p) for p in config.model.wan.patch_size)
    h, w = (int(v) for v in config.model.wan.latent_size)
    return int(config.model.num_frames) * (h // ph) * (w // pw)


def _model_summary(config) -> dict:
    from fvdm_jax.models.build import architecture_of, flat_model_config

    if architecture_of(config.model) == "wan":
        flat = flat_model_config(config.model)
        return {"architecture": "wan", "size": config.model.wan.size,
                **{k: flat.get(k) for k in ("dim", "num_layers", "num_heads", "patch_size", "dtype",
                                            "remat", "attention", "scan_layers")}}
    return {k: config.model[k] for k in ("size", "hidden_size", "depth", "patch_size", "dtype",
                                         "remat", "attention", "scan_layers")}


def train_step_record(config, devices, hbm_gib: float, where: str, options=None) -> dict:
    """The train step as configured, or, with config.mesh.fit, the first layout that fits;
    with config.compile.fit, the cheapest that fits (training/fit.py), its search attached."""
    from fvdm_jax.training import fit

    search = None
    if bool(config.compile.fit):
        best, tried = fit.search(config, devices, hbm_gib, where, options)
        search = [_trial(r) for r in tried]
        record = best or min(tried, key=lambda r: r.get("need_gib", math.inf))
        how = "cheapest that fits (compile.fit)" if best else "none fits (compile.fit)"
    elif bool(config.mesh.get("fit", False)):
        layout, tried = fit.first_fit(config, devices, hbm_gib, where, options)
        search = [_trial(r) for r in tried]
        record = tried[-1]
        how = ("configured, fits" if layout == fit.configured(config, devices)
               else f"first fit (mesh.fit), {len(tried)} compiled")
    else:
        record = fit.measure_layout(config, fit.configured(config, devices), devices, hbm_gib,
                                    where, options)
        how = "configured"
    layout = fit.Layout(**dict(record["layout"], mesh_shape=tuple(record["layout"]["mesh_shape"])))
    chosen = layout.apply(config)
    record = dict(record, program="train_step", layout_choice=how,
                  batch_size=int(config.train.batch_size), model=_model_summary(chosen))
    if search is not None:
        record["search"] = search
    return record


def _trial(record: dict) -> dict:
    """One layout the search compiled: its flags, fit, per-chip GiB and collective bytes."""
    from fvdm_jax.runtime.compiled import collective_bytes

    total = record["memory_gib"]["total"] if "memory_gib" in record else record.get("need_gib")
    return {"flags": record["flags"], "fits": record["fits"], "total_gib": total,
            "collective_bytes": collective_bytes(record), "compile_s": record["compile_s"]}


def sample_record(config, devices, hbm_gib: float, where: str, options=None) -> dict:
    """The sampler's scan (config.sample: sampler, steps, guidance) of one batch of the
    'generate' task, sample.batch_size videos, on abstract EMA weights."""
    from fvdm_jax.runtime import sharding as shd
    from fvdm_jax.runtime.compiled import measure
    from fvdm_jax.sampling.sampler import VideoSampler

    mesh = shd.make_mesh(config.mesh, devices)
    batch = int(config.sample.batch_size)
    if _is_wan(config):
        sampler = _wan_sampler(config, mesh)
        from fvdm_jax.training.fit import WAN_TEXT_LENGTH

        text = int(config.data.get("text_length") or WAN_TEXT_LENGTH)
        lowered = sampler.lower("generate", batch, context_len=text)
    else:
        sampler = VideoSampler(config.model, _schedule(config), config.sample, mesh=mesh,
                               rules=shd.rules_from_config(config.mesh))
        lowered = sampler.lower("generate", batch)
    record, _ = measure(lowered, "sample", where, hbm_gib, options)
    return dict(record, program="sample", mesh=dict(mesh.shape), task="generate",
                sampler=str(config.sample.sampler), num_steps=int(config.sample.num_steps),
                batch_size=batch, padded_batch=sampler.padded(batch))


def _is_wan(config) -> bool:
    from fvdm_jax.models.build import architecture_of

    return architecture_of(config.model) == "wan"


def _wan_sampler(config, mesh):
    """The WanSampler of config.sample (Euler steps, text guidance) over the training window."""
    from fvdm_jax.diffusion.flow import FlowSchedule
    from fvdm_jax.models.build import flat_model_config
    from fvdm_jax.runtime import sharding as shd
    from fvdm_jax.sampling.wan_sampler import WanSampler

    s = config.sample
    return WanSampler(flat_model_config(config.model), FlowSchedule.from_config(config.diffusion),
                      mesh=mesh, rules=shd.rules_from_config(config.mesh),
                      num_steps=int(s.num_steps), cfg_scale=float(s.cfg_scale),
                      num_frames=int(config.model.num_frames),
                      latent_hw=tuple(config.model.wan.latent_size))


def _schedule(config):
    from fvdm_jax.diffusion.schedule import Schedule

    return Schedule.from_config(config.diffusion)


def vae_config_path(config) -> str | None:
    """The VAE architecture the encode program compiles: vae.checkpoint's config.json, else
    config.compile.vae_config (a relative path not found from here is read from the source
    checkout, where configs/ is); None when neither is given."""
    folder = (config.get("vae") or {}).get("checkpoint")
    if folder:
        return os.path.join(folder, "config.json")
    path = str(config.compile.get("vae_config") or "")
    if path and not os.path.isabs(path) and not os.path.exists(path):
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if os.path.exists(os.path.join(repo, path)):
            return os.path.join(repo, path)
    return path or None


def vae_encode_record(config, devices, hbm_gib: float, where: str, options=None) -> dict:
    """One --mode=encode call: vae.encode_batch_size frames per chip, encoded by the VAE of
    `vae_config_path` (posterior mean and log-variance), the frames sharded over all chips."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from fvdm_jax.models.dit import DTYPES
    from fvdm_jax.models.vae import AutoencoderKL, vae_from_config
    from fvdm_jax.runtime import files
    from fvdm_jax.runtime.compiled import measure

    path = vae_config_path(config)
    if not files.isfile(path):
        raise ConfigError(f"VAE config {path} does not exist: set config.compile.vae_config to a "
                          f"diffusers AutoencoderKL config.json or vae.checkpoint to its folder")
    with files.open_file(path) as f:
        architecture = json.load(f)
    dtype = DTYPES[str(config.vae.dtype)]
    vae = vae_from_config(architecture, dtype=dtype, param_dtype=dtype)
    mesh = Mesh(np.array(devices), ("batch",))
    frames = int(config.vae.encode_batch_size) * len(devices)
    size = int(config.model.input_size) * vae.downsample_factor
    images = jax.ShapeDtypeStruct((frames, size, size, 3), np.float32,
                                  sharding=NamedSharding(mesh, PartitionSpec("batch")))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.eval_shape(vae.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
    params = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params)
    encode = jax.jit(lambda p, x: vae.apply(p, x, method=AutoencoderKL.encode))
    record, _ = measure(encode.lower(params, images), "vae_encode", where, hbm_gib, options)
    return dict(record, program="vae_encode", mesh={"batch": len(devices)}, vae_config=path,
                frames=frames, image_size=size, dtype=str(config.vae.dtype))


def fvd_features_record(config, devices, hbm_gib: float, where: str, options=None) -> dict:
    """One batch of the FVD detector (the JAX I3D, logits) on eval.batch_size generated videos
    of the model's frames at its pixel resolution, sharded as in evaluation."""
    from fvdm_jax.evaluation.fvd import lower_i3d
    from fvdm_jax.runtime import sharding as shd
    from fvdm_jax.runtime.compiled import measure

    mesh = shd.make_mesh(config.mesh, devices)
    rules = shd.rules_from_config(config.mesh)
    factor = 8 if str(config.data.source) == "latents" else 1
    size = int(config.model.input_size) * factor
    frames, batch = int(config.model.num_frames), int(config.eval.batch_size)
    lowered = lower_i3d(mesh, rules, batch, frames, size)
    record, _ = measure(lowered, "fvd_features", where, hbm_gib, options)
    return dict(record, program="fvd_features", mesh=dict(mesh.shape), batch_size=batch,
                video_shape=[frames, size, size, 3])


def vae_encode_or_wan(config, devices, hbm_gib: float, where: str, options=None) -> dict:
    """vae_encode: the Wan VAE's (`wan_vae_encode_record`) for a Wan config, else the
    AutoencoderKL's frames of one --mode=encode call (`vae_encode_record`)."""
    program = wan_vae_encode_record if _is_wan(config) else vae_encode_record
    return program(config, devices, hbm_gib, where, options)


PROGRAMS = {"train_step": train_step_record, "sample": sample_record,
            "vae_encode": vae_encode_or_wan, "fvd_features": fvd_features_record,
            "vae_decode": vae_decode_record, "text_encode": text_encode_record}
# Programs of Wan's own encoders (model.architecture='wan' only).
WAN_ONLY = ("vae_decode", "text_encode")


# ---- the job -----------------------------------------------------------------------------------

def report(records: list[dict]) -> str:
    """The table (one row per program), the layout search if any, and a line for each program
    that does not fit or was skipped."""
    head = (f"{'program':<12} {'topology':<14} {'chips':>5} {'args':>8} {'outputs':>8} "
            f"{'temps':>8} {'code':>7} {'total':>8} {'HBM':>6} {'compile_s':>9}  fits  collectives")
    lines = [head, "-" * len(head)]
    for r in records:
        if r.get("skipped"):
            continue
        name = r["topology"] + (f" x{r['num_slices']}" if r["num_slices"] > 1 else "")
        m = r.get("memory_gib")
        if m:
            sizes = (f"{m['arguments']:8.3f} {m['outputs']:8.3f} {m['temporaries']:8.3f} "
                     f"{m['generated_code']:7.3f} {m['total']:8.3f}")
        else:
            sizes = f"{'-':>8} {'-':>8} {'-':>8} {'-':>7} {r['need_gib']:8.3f}"
        coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / 2**20:.2f} MiB)"
                         for k, v in r.get("collectives", {}).items() if v["count"]) or "-"
        lines.append(f"{r['program']:<12} {name:<14} {r['chips']:>5} {sizes} "
                     f"{r['hbm_gib_per_chip']:6.1f} {r['compile_s']:9.2f}  "
                     f"{'yes' if r['fits'] else 'NO ':<4}  {coll}")
    lines.append("per-chip GiB (XLA's memory plan; total = args + outputs - donated + temps + code)")
    for r in records:
        if r["program"] == "train_step" and "layout" in r:
            lines.append(f"train_step layout ({r['layout_choice']}): mesh {r['mesh']}; "
                         f"flags: {r['flags']}")
        for trial in r.get("search", []) if len(r.get("search", [])) > 1 else []:
            total = "-" if trial["total_gib"] is None else f"{trial['total_gib']:.3f} GiB"
            comm = f", {trial['collective_bytes'] / 2**20:.1f} MiB collectives" if trial["fits"] else ""
            lines.append(f"  tried {trial['flags']}: {'fits' if trial['fits'] else 'does not fit'}"
                         f", {total}{comm}")
    lines += [f"{r['program']}: {r['placement']}" for r in records
              if r.get("placement") and not r.get("skipped")]
    lines += [r["error"] for r in records if r["fits"] is False and r.get("error")]
    lines += [f"{r['program']}: skipped, {r['skipped']}" for r in records if r.get("skipped")]
    return "\n".join(lines)


def _programs(config) -> list[str]:
    names = [str(p) for p in config.compile.programs]
    unknown = sorted(set(names) - set(PROGRAMS))
    if unknown:
        raise ConfigError(f"config.compile.programs has {unknown}; choose from {sorted(PROGRAMS)}")
    return names


def _skip_reason(name: str, config) -> str | None:
    from fvdm_jax.models.i3d import I3D_MIN_FRAMES

    if _is_wan(config):
        return _wan_skip_reason(name, config)
    if name in WAN_ONLY:
        return f"{name} compiles Wan's encoders: the model is not a Wan model"
    if name == "fvd_features" and int(config.model.num_frames) < I3D_MIN_FRAMES:
        return (f"FVD's I3D needs at least {I3D_MIN_FRAMES} frames; the model makes "
                f"{config.model.num_frames}")
    if name == "vae_encode" and str(config.data.source) != "latents":
        return "the model trains on pixels (data.source is not 'latents'): no VAE"
    if name == "vae_encode" and vae_config_path(config) is None:
        return ("no VAE architecture: set vae.checkpoint or config.compile.vae_config (a diffusers "
                "AutoencoderKL config.json, e.g. configs/vae/sd-vae-ft-ema.json)")
    return None


def _wan_skip_reason(name: str, config) -> str | None:
    if name == "fvd_features":
        return "a Wan model: FVD (the I3D on pixels) is DiT-only"
    if name in ("vae_encode", "vae_decode"):
        vae, source = build_wan_vae(config)
        if vae.z_dim != int(config.model.in_channels):
            return (f"the Wan VAE of {source} makes {vae.z_dim}-channel latents, "
                    f"model.in_channels={config.model.in_channels}: set encoders.vae")
    if name == "text_encode":
        from fvdm_jax.models.build import flat_model_config

        model, _, source = build_umt5(config)
        text_dim = int(flat_model_config(config.model)["text_dim"])
        if int(model.d_model) != text_dim:
            return (f"the UMT5 of {source} gives {model.d_model}-wide contexts, "
                    f"model.wan.text_dim={text_dim}: set encoders.text")
    return None


def compile_job(config, workdir: str, devices=None) -> tuple[list[dict], str]:
    """Compiles config.compile.programs for config.compile.topology; writes WORKDIR/compile.json
    (one record per program) and returns (records, the printed report)."""
    from fvdm_jax.runtime import files

    section = config.get("compile") or {}
    target = parse_topology(section.get("topology", ""), int(section.get("num_slices", 1)))
    programs = _programs(config)
    devices = target_devices(target) if devices is None else devices
    config = for_target(config, target.platform)
    where = f"{target.name} ({devices[0].device_kind})"
    base = {"topology": target.name, "topology_name": target.topology,
            "num_slices": target.num_slices, "chips": target.chips,
            "device_kind": devices[0].device_kind, "hbm_gib_per_chip": target.hbm_gib}
    records = []
    with _no_persistent_cache():
        _compile_programs(config, programs, devices, target, where, base, records)
    path = files.write_json(files.join(files.resolve(workdir), "compile.json"), records,
                            sort_keys=False)
    return records, report(records) + f"\nwritten to {path}"


@contextlib.contextmanager
def _no_persistent_cache():
    """Executables for compile-only devices cannot be loaded back from jax's persistent cache
    (no TPU client): do not write them there."""
    import jax

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def _compile_programs(config, programs, devices, target, where, base, records):
    for name in programs:
        reason = _skip_reason(name, config)
        if reason:
            records.append(dict(base, program=name, fits=None, skipped=reason))
            continue
        record = PROGRAMS[name](config, devices, target.hbm_gib, where, target.compiler_options)
        records.append({**base, "program": name, **record})
        if name == "train_step":  # the other programs run on the layout chosen for training
            layout = record["layout"]
            config = config.copy_and_resolve_references()
            config.mesh.shape = tuple(layout["mesh_shape"])
            config.model.scan_layers = bool(layout["scan_layers"])
