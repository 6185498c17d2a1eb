"""A built-in, deterministic, learnable video source for tests, smoke runs and benchmarks.

Each example is a few drifting plane waves: per wave a random direction, spatial frequency, phase,
temporal speed and per-channel colour gain. The content has a handful of degrees of freedom and
moves linearly in time, so a diffusion model's loss drops within a few hundred steps, and a
frame-aware model has real temporal structure to learn. With classes, the class id picks the band
of spatial frequencies, so conditioning visibly changes the video.

numpy only: this runs inside grain worker processes, which must never touch jax.
"""

from __future__ import annotations

import numpy as np

from fvdm_jax.errors import ConfigError


class SyntheticVideoSource:
    """Random-access source of `{'video': float32 (F, H, W, C) in [-1, 1], 'label': int32 ()}`.

    Example `index` is a pure function of `(seed, index)`: it is drawn from
    `np.random.default_rng((seed, index))`, so any process or worker can build any example alone.
    """

    def __init__(
        self,
        num_examples: int,
        num_frames: int,
        image_size: int,
        channels: int,
        num_classes: int = 0,
        seed: int = 0,
        *,
        num_waves: int = 2,
        min_cycles: float = 1.0,
        max_cycles: float | None = None,
        max_speed: float = 0.5,
    ):
        """Args:
        num_examples: length of the source (indices 0 .. num_examples - 1).
        num_frames, image_size, channels: F, H = W, C of every video.
        num_classes: 0 for unconditional (label always 0); otherwise labels lie in
          [0, num_classes) and class c draws its spatial frequencies from the c-th of
          num_classes equal bands of [min_cycles, max_cycles).
        seed: makes a different, equally deterministic data set.
        num_waves: plane waves summed per video; each has amplitude 1 / num_waves, so the sum
          stays in [-1, 1].
        min_cycles, max_cycles: range of spatial frequencies in cycles per image width. The
          default max_cycles, image_size / 4, keeps every wave at or below half the Nyquist rate
          (at least 2 * min_cycles, so tiny latents still get a band).
        max_speed: largest phase advance of a wave in radians per frame (either direction).
        """
        if num_examples <= 0:
            raise ConfigError(f"num_examples={num_examples} must be positive.")
        if min(num_frames, image_size, channels, num_waves) <= 0:
            raise ConfigError(
                f"num_frames={num_frames}, image_size={image_size}, channels={channels} and "
                f"num_waves={num_waves} must all be positive."
            )
        if num_classes < 0:
            raise ConfigError(f"num_classes={num_classes} must be >= 0 (0 = unconditional).")
        if max_cycles is None:
            max_cycles = max(image_size / 4, 2 * min_cycles)
        if not 0 < min_cycles < max_cycles:
            raise ConfigError(
                f"need 0 < min_cycles ({min_cycles}) < max_cycles ({max_cycles}); raise "
                "max_cycles or image_size."
            )
        self.num_examples = num_examples
        self.num_frames = num_frames
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.seed = seed
        self.num_waves = num_waves
        self.min_cycles = min_cycles
        self.max_cycles = max_cycles
        self.max_speed = max_speed

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"SyntheticVideoSource(num_examples={self.num_examples}, num_frames={self.num_frames}, "
            f"image_size={self.image_size}, channels={self.channels}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )

    def _frequency_band(self, label: int) -> tuple[float, float]:
        """Spatial frequency range (cycles per image) that class `label` draws from."""
        if self.num_classes == 0:
            return self.min_cycles, self.max_cycles
        width = (self.max_cycles - self.min_cycles) / self.num_classes
        low = self.min_cycles + label * width
        return low, low + width

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Example `index`: 'video' float32 (F, H, W, C) in [-1, 1], 'label' int32 ()."""
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples.")
        # A tuple seed gives independent streams per (seed, index) without hashing collisions.
        rng = np.random.default_rng((self.seed, index))
        label = int(rng.integers(self.num_classes)) if self.num_classes > 0 else 0
        low, high = self._frequency_band(label)

        waves = self.num_waves
        angle = rng.uniform(0.0, 2 * np.pi, waves)
        cycles = rng.uniform(low, high, waves)
        phase = rng.uniform(0.0, 2 * np.pi, waves)
        speed = rng.uniform(-self.max_speed, self.max_speed, waves)  # radians per frame
        # Per-wave colour: magnitude at least half so every wave is visible in every channel
        # (keeps the data's spread near that of real [-1, 1] videos), random sign.
        sign = rng.choice((-1.0, 1.0), (waves, self.channels))
        gain = sign * rng.uniform(0.5, 1.0, (waves, self.channels))

        # Coordinates in image widths, so `cycles` is resolution independent.
        coords = np.arange(self.image_size, dtype=np.float64) / self.image_size
        frames = np.arange(self.num_frames, dtype=np.float64)
        wave_x = 2 * np.pi * cycles * np.cos(angle)  # (waves,) radians per image width
        wave_y = 2 * np.pi * cycles * np.sin(angle)
        # (F, H, W, waves): the phase of each wave at every pixel of every frame.
        theta = (
            frames[:, None, None, None] * speed
            + coords[None, :, None, None] * wave_y
            + coords[None, None, :, None] * wave_x
            + phase
        )
        # (F, H, W, waves) @ (waves, C) -> (F, H, W, C); |gain| <= 1 and the 1/waves amplitude
        # keep every value in [-1, 1].
        video = np.sin(theta) @ gain / waves
        return {
            "video": video.astype(np.float32),
            "label": np.asarray(label, dtype=np.int32),
        }


class SyntheticTextLatentSource:
    """Text-conditional synthetic latents for a text-to-video model, no files needed:
    `{'video': (F, h, w, C), 'context': (L, D), 'context_mask': bool (L,), 'label': 0}`.

    Each example draws one of `num_prompts` "prompts"; prompt k is a fixed Gaussian context with
    its first `L - k % L` tokens valid (so padding is exercised) and picks the k-th frequency band
    of the moving waves of `SyntheticVideoSource`, so the text decides what the video looks like.
    Like that source, example `index` is a pure function of `(seed, index)`.
    """

    def __init__(self, num_examples: int, num_frames: int, latent_size: tuple[int, int],
                 channels: int, text_length: int, text_dim: int, num_prompts: int, seed: int = 0):
        self.height, self.width = h, w = [int(s) for s in latent_size]
        if min(text_length, text_dim, num_prompts) <= 0:
            raise ConfigError(f"text_length={text_length}, text_dim={text_dim} and "
                              f"num_prompts={num_prompts} must all be positive")
        # Square waves of the longer side, cropped to (h, w).
        self.videos = SyntheticVideoSource(num_examples, num_frames, max(h, w), channels,
                                           num_classes=num_prompts, seed=seed)
        self.text_length, self.text_dim, self.seed = int(text_length), int(text_dim), seed
        rng = np.random.default_rng((seed, 0x7E27))
        self.contexts = rng.standard_normal((num_prompts, self.text_length, self.text_dim))
        self.contexts = self.contexts.astype(np.float32)
        self.lengths = [self.text_length - k % self.text_length for k in range(num_prompts)]

    def __len__(self) -> int:
        return len(self.videos)

    def __repr__(self) -> str:
        return (f"SyntheticTextLatentSource({self.videos!r}, text_length={self.text_length}, "
                f"text_dim={self.text_dim})")

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = self.videos[index]
        k = int(example["label"])
        mask = np.arange(self.text_length) < self.lengths[k]
        video = example["video"][:, :self.height, :self.width]
        return {"video": video, "context": self.contexts[k] * mask[:, None],
                "context_mask": mask, "label": np.int32(0)}
