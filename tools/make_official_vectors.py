"""Writes tests/data/fvdm_official_tiny.npz, the official FVDM reference vectors that
tests/test_official_equivalence.py (and test_convert.py, test_samplers.py) check against.

    python3 -m venv /tmp/venvs/official
    /tmp/venvs/official/bin/pip install torch==2.13.0 timm==1.0.29 einops==0.8.2 numpy==2.4.6
    /tmp/venvs/official/bin/python tools/make_official_vectors.py --official=/path/to/FVDM \
        [--out tests/data/fvdm_official_tiny.npz] [--check tests/data/fvdm_official_tiny.npz]

`--official` is a checkout of github.com/Yaofang-Liu/FVDM (the shipped file: commit
9373f9987e7d3f00e72a238583efdbfdb5231ac4). Its own code does all the work, in float32 on CPU:
`models/latte_video.py` (LatteVIDEO; it imports timm's Mlp and PatchEmbed) and the `diffusion`
package (create_diffusion, gaussian_diffusion, respace). Nothing of fvdm_jax is imported. The
models package's __init__ is never run (it imports diffusers and the text-to-video model): only
latte_video.py is loaded, as a standalone module. `ipdb`, imported there but never called, is
replaced by an empty module when it is not installed.

Every random tensor comes from ONE torch generator, `torch.manual_seed(seed)`, in this order
(the order is the file's definition: another order gives other numbers):
  1. LatteVIDEO(extras=1) is built (its own init draws), then every trainable tensor, in
     named_parameters() order, is replaced: weights by randn * fan_in ** -0.5 (fan_in = numel
     of one output row), vectors by randn * 0.1. The frozen sin-cos tables stay.
  2. The same for the class-conditional LatteVIDEO(extras=2, num_classes + 1 label rows).
  3. x0 = randn(B, F, C, H, W); noise = randn(same); t = randint(0, 1000, (B, F)) with
     t[0, 0] = 0 and t[-1, -1] = 999 (both ends of the range); y = [1, 3] (not drawn).
  4. ddim_step_t = randint(0, 10, (B, F)) with [0, 0] and [1, 1] set to 0; the DDIM step
     (which draws randn_like(x) even at eta = 0, as the official ddim_sample does).
  5. ddim_loop_noise = randn(B, F, C, H, W); the DDIM-10 loops (each step draws again).
Models run in eval mode (no label dropout); clip_denoised=False everywhere.

Keys: tests/data/README.md has the table. This script adds three provenance keys:
  versions              "torch X timm Y numpy Z"
  official_commit       the --official-commit value (the checkout is not asked: it may not be
                        a git repository)
  official_sources_json JSON {path: sha256} of the official files that ran

`--check FILE` regenerates in memory and compares every tensor FILE holds with allclose
(rtol 1e-5, atol 1e-6 x max |value|), printing the largest difference of each; it exits 1 if
any tensor differs (or is missing) and writes nothing unless --out is given too.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import types

import numpy as np

OFFICIAL_COMMIT = "9373f9987e7d3f00e72a238583efdbfdb5231ac4"
CONFIG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
              num_frames=4, num_classes=5, class_dropout_prob=0.1, learn_sigma=True, cfg_scale=4.0,
              batch=2)
SEED = 0
LABELS = (1, 3)
RESPACINGS = (10, 50, 250)
DDIM_STEPS = "10"
OFFICIAL_FILES = ("models/latte_video.py", "diffusion/__init__.py", "diffusion/gaussian_diffusion.py",
                  "diffusion/respace.py", "diffusion/diffusion_utils.py")


def _allow_timm_import(torch):
    """timm imports torchvision. A torchvision wheel built for the CUDA build of torch cannot load
    its C++ ops under the CPU build, and then its import fails on the two ops whose fake kernels
    it registers unconditionally (nms, qnms). Declaring those two schemas first lets it import;
    neither op is ever called here. Nothing is done when torchvision's ops load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return None
    library = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
    try:
        torch.ops.load_library(library)
        return None
    except (OSError, RuntimeError):
        pass
    declared = torch.library.Library("torchvision", "DEF")  # kept alive by the caller
    declared.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    declared.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return declared


def load_official(root: str):
    """(latte_video module, diffusion package) from the official checkout at `root`."""
    import torch

    missing = [p for p in OFFICIAL_FILES if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise SystemExit(f"--official={root} is not an FVDM checkout: {missing} missing")
    if importlib.util.find_spec("ipdb") is None:
        sys.modules["ipdb"] = types.ModuleType("ipdb")  # imported by the official files, unused
    keep = _allow_timm_import(torch)
    spec = importlib.util.spec_from_file_location(
        "official_latte_video", os.path.join(root, "models", "latte_video.py"))
    latte_video = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(latte_video)
    latte_video._torchvision_schemas = keep
    sys.path.insert(0, root)
    try:
        import diffusion  # the official package (fvdm_jax's lives under fvdm_jax.diffusion)
    finally:
        sys.path.remove(root)
    if os.path.dirname(os.path.abspath(diffusion.__file__)) != os.path.join(os.path.abspath(root), "diffusion"):
        raise SystemExit(f"imported {diffusion.__file__}, not the official diffusion package")
    return latte_video, diffusion


def randomize(model, torch):
    """Every trainable tensor in named_parameters() order: weights randn * fan_in ** -0.5,
    vectors randn * 0.1 (step 1 of the module docstring)."""
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            if parameter.ndim >= 2:
                scale = parameter[0].numel() ** -0.5
            else:
                scale = 0.1
            parameter.copy_(torch.randn(parameter.shape) * scale)


def build_model(latte_video, torch, conditional: bool):
    c = CONFIG
    model = latte_video.LatteVIDEO(
        input_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
        hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"],
        num_frames=c["num_frames"], class_dropout_prob=c["class_dropout_prob"],
        num_classes=c["num_classes"], learn_sigma=c["learn_sigma"], extras=2 if conditional else 1,
    )
    randomize(model, torch)
    return model.eval()


def generate(root: str, official_commit: str) -> dict[str, np.ndarray]:
    import torch

    latte_video, diffusion = load_official(root)
    torch.manual_seed(SEED)
    torch.set_grad_enabled(False)
    c = CONFIG
    uncond = build_model(latte_video, torch, conditional=False)
    cond = build_model(latte_video, torch, conditional=True)
    shape = (c["batch"], c["num_frames"], c["in_channels"], c["input_size"], c["input_size"])
    x0, noise = torch.randn(shape), torch.randn(shape)
    t = torch.randint(0, 1000, shape[:2])
    t[0, 0], t[-1, -1] = 0, 999
    y = torch.tensor(LABELS)
    null = torch.full_like(y, c["num_classes"])

    full = diffusion.create_diffusion(timestep_respacing="")
    out = {
        "config_json": np.asarray(json.dumps(c)),
        "x0": x0, "noise": noise, "t": t, "y": y,
        "model_uncond_out": uncond(x0, t),
        "model_cond_out": cond(x0, t, y=y),
        "model_cfg_out": cond.forward_with_cfg(torch.cat([x0, x0]), torch.cat([t, t]),
                                               y=torch.cat([y, null]), cfg_scale=c["cfg_scale"]),
    }
    x_t = full.q_sample(x0, t, noise=noise)
    out["q_sample"] = x_t
    terms, _, pred_xstart, _ = full.training_losses_video(uncond, x0, t, noise=noise)
    out.update(loss_mse=terms["mse"], loss_vb=terms["vb"], loss=terms["loss"],
               loss_pred_xstart=pred_xstart)
    pmv = full.p_mean_variance(uncond, x_t, t, clip_denoised=False)
    out.update(pmv_mean=pmv["mean"], pmv_log_variance=pmv["log_variance"],
               pmv_pred_xstart=pmv["pred_xstart"])
    for n in RESPACINGS:
        spaced = diffusion.create_diffusion(timestep_respacing=str(n))
        out[f"timestep_map_{n}"] = np.asarray(spaced.timestep_map, np.int64)
        out[f"alphas_cumprod_{n}"] = np.asarray(spaced.alphas_cumprod, np.float64)

    ddim = diffusion.create_diffusion(timestep_respacing=DDIM_STEPS)
    step_t = torch.randint(0, ddim.num_timesteps, shape[:2])
    step_t[0, 0], step_t[1, 1] = 0, 0  # frames that end clean
    out.update(ddim_step_t=step_t, ddim_step_x=x_t,
               ddim_step_out=ddim.ddim_sample(uncond, x_t, step_t, clip_denoised=False, eta=0.0)["sample"])

    loop_noise = torch.randn(shape)
    out["ddim_loop_noise"] = loop_noise

    def ddim_loop(x, clean_frame=None):
        for index in reversed(range(ddim.num_timesteps)):
            step = torch.full(shape[:2], index, dtype=torch.long)
            if clean_frame is not None:
                step[:, clean_frame] = 0  # the official "replace": the frame's index stays 0
            x = ddim.ddim_sample(uncond, x, step, clip_denoised=False, eta=0.0)["sample"]
        return x

    out["ddim_loop_out"] = ddim_loop(loop_noise)
    start = loop_noise.clone()
    start[:, 0] = x0[:, 0]
    out["ddim_i2v_loop_out"] = ddim_loop(start, clean_frame=0)

    for prefix, model in (("uncond_sd/", uncond), ("cond_sd/", cond)):
        for name, value in model.state_dict().items():
            out[prefix + name] = value
    arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
              for k, v in out.items()}
    versions = " ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "timm", "numpy"))
    sources = {}
    for path in OFFICIAL_FILES:
        with open(os.path.join(root, path), "rb") as f:
            sources[path] = hashlib.sha256(f.read()).hexdigest()
    arrays["versions"] = np.asarray(versions)
    arrays["official_commit"] = np.asarray(official_commit)
    arrays["official_sources_json"] = np.asarray(json.dumps(sources, sort_keys=True))
    return arrays


PROVENANCE_KEYS = ("versions", "official_commit", "official_sources_json")


def compare(generated: dict[str, np.ndarray], path: str) -> bool:
    """Prints the largest difference of every tensor of `path`; True if all are allclose."""
    with np.load(path, allow_pickle=False) as data:
        shipped = {k: data[k] for k in data.files}
    good = True
    for key in sorted(shipped):
        want = shipped[key]
        if key not in generated:
            print(f"{key}: missing from the regenerated vectors")
            good = False
            continue
        got = generated[key]
        if key == "config_json":
            same = json.loads(str(got)) == json.loads(str(want))
            print(f"{key}: {'equal' if same else f'differs: {got} vs {want}'}")
            good &= same
            continue
        if want.dtype.kind in "US":
            same = str(got) == str(want)
            print(f"{key}: {'equal' if same else f'{got} (shipped: {want})'}")
            good &= key in PROVENANCE_KEYS or same
            continue
        if got.shape != want.shape:
            print(f"{key}: shape {got.shape}, shipped {want.shape}")
            good = False
            continue
        diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
        scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
        close = np.allclose(got, want, rtol=1e-5, atol=1e-6 * scale)
        exact = np.array_equal(got, want)
        print(f"{key}: max |diff| {diff:.3e} (max |shipped| {scale:.3g})"
              f"{' bit-identical' if exact else ''}{'' if close else '  <-- DIFFERS'}")
        good &= close
    extra = sorted(set(generated) - set(shipped) - set(PROVENANCE_KEYS))
    if extra:
        print(f"only in the regenerated vectors: {extra}")
    return good


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="checkout of github.com/Yaofang-Liu/FVDM")
    parser.add_argument("--official-commit", default=OFFICIAL_COMMIT,
                        help="the commit of that checkout, recorded in the file")
    parser.add_argument("--out", default=None, help="where to write the npz")
    parser.add_argument("--check", default=None, help="compare with this npz instead of writing")
    args = parser.parse_args()
    if args.out is None and args.check is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                                "fvdm_official_tiny.npz")
    arrays = generate(args.official, args.official_commit)
    print(str(arrays["versions"]), "| official", str(arrays["official_commit"]))
    if args.out:
        np.savez(args.out, **arrays)
        print(f"wrote {len(arrays)} arrays to {args.out}")
    if args.check and not compare(arrays, args.check):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
