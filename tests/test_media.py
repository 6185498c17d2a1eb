"""Video files in and out: quantization, MP4 / GIF / PNG writers, and sampling inputs."""

import os

import numpy as np
import pytest
from PIL import Image

from fvdm_jax.data import media
from fvdm_jax.data.clips import to_signed_unit
from fvdm_jax.data.video import read_video


def smooth_video(frames=6, height=24, width=40):
    y, x = np.mgrid[0:height, 0:width]
    video = np.zeros((frames, height, width, 3), np.uint8)
    for t in range(frames):
        video[t, ..., 0] = (x * 255 // (width - 1)).astype(np.uint8)
        video[t, ..., 1] = (y * 255 // (height - 1)).astype(np.uint8)
        video[t, ..., 2] = 25 * t
    return video


def test_to_uint8_is_stylegan_v_quantization():
    pixels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(media.to_uint8(to_signed_unit(pixels)), pixels)
    np.testing.assert_array_equal(
        media.to_uint8(np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])), [0, 0, 128, 255, 255, 255]
    )
    assert media.to_rgb(np.zeros((2, 5, 1))).shape == (2, 5, 3)
    assert media.to_rgb(np.zeros((2, 5, 4))).shape == (2, 5, 3)


def test_mp4_gif_png_round_trip(tmp_path):
    video = smooth_video()
    mp4 = media.write_mp4(str(tmp_path / "a.mp4"), video, fps=5)
    decoded = read_video(mp4)
    assert decoded.shape == video.shape
    assert np.abs(decoded.astype(int) - video.astype(int)).mean() < 3
    odd = media.write_mp4(str(tmp_path / "odd.mp4"), video[:, :23, :39], fps=5)
    assert read_video(odd).shape == (6, 24, 40, 3)  # padded to even sides for yuv420p

    gif = media.write_gif(str(tmp_path / "a.gif"), video, fps=5)
    with Image.open(gif) as image:
        assert image.n_frames == 6 and image.size == (40, 24)
        assert image.info["duration"] == 200
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    grid = media.frame_grid(np.stack([video, video[::-1]]), pad=2)
    assert grid.shape == (2 * 26 + 2, 6 * 42 + 2, 3)
    np.testing.assert_array_equal(grid[2:26, 2:42], video[0])
    np.testing.assert_array_equal(grid[28:52, 2:42], video[-1])
    big = media.frame_grid(np.stack([video, video[::-1]]), pad=2, scale=3)
    assert big.shape == (2 * (3 * 24 + 2) + 2, 6 * (3 * 40 + 2) + 2, 3)
    np.testing.assert_array_equal(big[2:74:3, 2:122:3], video[0])  # nearest: every pixel kept
    np.testing.assert_array_equal(big[4:74:3, 4:122:3], video[0])
    assert media.sheet_scale(16, 96) == 6 and media.sheet_scale(256, 96) == 1
    with pytest.raises(ValueError, match="scale=0"):
        media.frame_grid(video[None], scale=0)
    png = media.write_png(str(tmp_path / "g.png"), grid)
    np.testing.assert_array_equal(np.asarray(Image.open(png)), grid)

    with pytest.raises(ValueError, match="uint8"):
        media.write_gif(str(tmp_path / "b.gif"), video.astype(np.float32))


def test_load_input_images_and_videos(tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 30:] = 255
    Image.fromarray(image).save(tmp_path / "i.png")
    clip = media.load_input(str(tmp_path / "i.png"), 16)
    assert clip.shape == (1, 16, 16, 3) and clip.dtype == np.float32
    assert clip.min() == -1.0 and clip.max() == 1.0  # the center crop keeps both halves
    media.write_mp4(str(tmp_path / "v.mp4"), smooth_video(frames=10), fps=5)
    clip = media.load_input(str(tmp_path / "v.mp4"), 12, max_frames=4)
    assert clip.shape == (4, 12, 12, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        media.load_input(str(tmp_path / "missing.png"), 16)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither an image"):
        media.load_input(str(tmp_path / "notes.txt"), 16)


def test_unreadable_inputs_fail_with_one_line(tmp_path):
    from fvdm_jax.errors import ConfigError

    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01 not a video")
    (tmp_path / "notes.txt").write_text("text")
    for name, message in (("fake.png", "not a readable image"), ("broken.mp4", "cannot be decoded"),
                          ("notes.txt", "neither an image")):
        with pytest.raises(ConfigError, match=message) as info:
            media.load_input(str(tmp_path / name), 16)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        media.load_input(str(tmp_path / "missing.png"), 16)
