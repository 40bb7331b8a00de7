"""cvjax: a JAX/Flax research codebase for computer vision."""

from setuptools import find_packages, setup

setup(
    name="cvjax",
    version="0.1.0",
    description="JAX/Flax computer-vision models, exact custom ops and one launcher.",
    python_requires=">=3.11",
    packages=find_packages(include=["cvjax", "cvjax.*"]),
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.6.0",
        "grain>=0.2.10",
        "ml-collections>=1.0.0",
        "absl-py>=2.1.0",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pillow>=10.0",
        "pycocotools>=2.0.7",
        "scipy>=1.11",
        "numpy>=1.26",
    ],
    extras_require={
        # torch is pinned to the CPU build that the project's machines carry as a local wheel.
        "test": ["pytest>=8.0", "torch==2.13.0", "torchvision==0.28.0", "transformers>=4.45"],
    },
)
