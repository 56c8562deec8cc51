"""mm1-moe: mixture-of-experts scaling for multimodal LLMs (MM1) on Megatron-core.

``kernels/`` is installed as ``mm1_moe.kernels``: a top-level package named ``kernels`` would
clash with an existing PyPI package of that name.
"""

from setuptools import find_packages, setup

# torch==2.13.0 exactly: a range would let pip pull a multi-GB CUDA build on CPU machines.
# megatron-core 0.16.1 is the newest release that installs on Python 3.11 (0.17+ need 3.12).
# psutil: Megatron's checkpoint saving needs it but does not declare it (a save hangs without).
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "triton>=3.7",
    "numpy",
    "einops",
    "pyyaml",
    "psutil",
    "pillow",  # image decoding in the data pipeline
    "tokenizers",  # Hugging Face tokenizers JSON files
]

EXTRAS = {
    # transformers < 5.25: 5.25 requires Hugging Face's ``kernels`` package and imports it by
    # name, and a source checkout's own top-level kernels/ folder (on sys.path under
    # ``python -m``) shadows it: every transformers model then fails to import.
    "test": ["pytest", "transformers>=5.0,<5.25", "safetensors"],
    "hf": ["transformers>=5.0,<5.25", "safetensors"],  # Hugging Face folders (upcycle, interop)
    "gpu": ["flash-attn"],  # optional benchmark baseline; cannot build without CUDA
    "sentencepiece": ["sentencepiece"],  # SentencePiece .model tokenizers
    "bench": ["matplotlib"],  # benchmarks/plot.py
}

setup(
    name="mm1-moe",
    version="0.1.0",
    description="Mixture-of-experts scaling library for MM1 multimodal LLMs on Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mm1_moe", "mm1_moe.*"])
    + ["mm1_moe.kernels"]
    + [f"mm1_moe.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"mm1_moe.kernels": "kernels"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    package_data={"mm1_moe": ["default.yaml"]},
    entry_points={"console_scripts": ["mm1-moe=mm1_moe.cli:main"]},
    license="Apache-2.0",
)
