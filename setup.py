"""cvjax: a JAX/Flax research codebase for computer vision."""

from setuptools import find_packages, setup

setup(
    name="cvjax",
    version="0.1.0",
    description="JAX/Flax computer-vision models, exact custom ops and one launcher.",
    python_requires=">=3.11",
    packages=find_packages(include=["cvjax", "cvjax.*"]),
    # Floors verified together in a fresh Python 3.11 venv (pip install -e . --no-deps, then exactly these
    # versions of the dependencies): jax 0.8.0 (jaxlib 0.8.0), flax 0.10.4, optax 0.2.4, orbax-checkpoint 0.11.17,
    # tensorflow-datasets 4.9.8, array-record 0.6.0, grain 0.2.10, ml-collections 1.0.0, absl-py 2.1.0,
    # tensorboardX 2.6, tqdm 4.66.0, matplotlib 3.9.0, pillow 10.0.0, pycocotools 2.0.8, scipy 1.13.0,
    # numpy 2.0.0; test extra: pytest 8.0.0, torch 2.13.0, torchvision 0.28.0, transformers 5.9.0. With them
    # tests/convert, tests/models and tests/ops pass, and launch.py runs the resnet and detr tiny presets
    # (data generation, training, evaluation, checkpoints, resume). Why these floors: jax.shard_map is in
    # jax >= 0.6.1, jax.sharding.use_abstract_mesh in >= 0.7.2, jax.enable_x64 (RoI tests) in >= 0.8.0, which
    # needs numpy >= 2.0 and scipy >= 1.13; orbax < 0.11.17 imports jax.experimental.layout.DeviceLocalLayout,
    # which these jax versions lack; tensorflow-datasets 4.9.7 imports TensorFlow when its GCS probe fails
    # (offline); matplotlib < 3.9 and pycocotools < 2.0.8 are built for numpy 1. The converters also read
    # transformers 4.x models (tests/convert pass with transformers 4.45.0); the rest of the suite uses
    # transformers >= 5.9 APIs (DETR's sine embedding with a mask argument, Swin's relative_position_bias).
    install_requires=[
        "jax>=0.8.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.17",
        "tensorflow-datasets>=4.9.8",
        "array-record>=0.6.0",
        "grain>=0.2.10",
        "ml-collections>=1.0.0",
        "absl-py>=2.1.0",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.9",
        "pillow>=10.0",
        "pycocotools>=2.0.8",
        "scipy>=1.13",
        "numpy>=2.0",
    ],
    extras_require={
        # torch is pinned to the CPU build that the project's machines carry as a local wheel.
        # torchmetrics: the segmentation metrics' reference (tests/evaluation/test_segmentation_metrics.py).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "torch==2.13.0", "torchvision==0.28.0", "transformers>=5.9",
                 "torchmetrics==1.9.0"],
    },
)
