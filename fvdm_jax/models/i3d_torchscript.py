"""StyleGAN-V's TorchScript I3D (`i3d_torchscript.pt`) as an optional FVD detector.

StyleGAN-V computes FVD with a TorchScript InceptionI3d called as
`detector(videos, rescale=..., resize=..., return_features=True)` on (B, 3, T, H, W) videos, where
`return_features=True` returns the 400 pre-softmax logits averaged over time. fvdm_jax does the
StyleGAN-V preprocessing itself (`fvdm_jax.models.i3d.preprocess_for_i3d`: uint8 -> [-1, 1],
bilinear resize to 224x224) and calls the detector with `rescale=False, resize=False` on float32
(B, 3, T, 224, 224) in [-1, 1].

torch is optional: it is imported only when this detector is built. Only the calling convention
is tested here (with a small scripted stand-in); agreement of the real file with the JAX I3D has
not been verified offline (see docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np


def file_digest(path: str, length: int = 16) -> str:
    """First `length` hex digits of the file's sha256 (names the detector in cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


class TorchScriptI3D:
    """Feature extractor around a TorchScript I3D file.

    Call with float32 videos (B, T, 224, 224, 3) in [-1, 1] (channels last, as the JAX side
    produces them); returns float32 features (B, D) (D = 400 for StyleGAN-V's file).
    """

    def __init__(self, path: str, device: str | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"eval.detector={path} does not exist; pass the path of i3d_torchscript.pt")
        try:
            import torch  # noqa: PLC0415 (optional dependency)
        except ImportError as error:
            raise ImportError(
                f"eval.detector={path} is a TorchScript file and needs torch: pip install torch "
                "(or leave eval.detector empty for the JAX I3D)"
            ) from error
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = torch.jit.load(path, map_location=self.device).eval()
        self.path = path
        self.name = f"torchscript:{os.path.basename(path)}:{file_digest(path)}"

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        videos = np.asarray(videos, np.float32)
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"TorchScriptI3D: videos of shape {videos.shape}; need (B, T, 224, 224, 3)")
        torch = self._torch
        # (B, T, H, W, 3) -> (B, 3, T, H, W), the layout StyleGAN-V passes.
        x = torch.from_numpy(np.ascontiguousarray(videos.transpose(0, 4, 1, 2, 3))).to(self.device)
        with torch.no_grad():
            features = self.model(x, rescale=False, resize=False, return_features=True)
        return features.detach().float().cpu().numpy().reshape(videos.shape[0], -1)
