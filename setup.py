from setuptools import setup

# The Triton kernels live in kernels/ but are installed as the subpackage
# cpattn.kernels: a top-level module named "kernels" belongs to another PyPI package.
setup(
    name="cpattn",
    version="0.1.0",
    description="Context-parallel attention for PyTorch: Triton flash-attention kernels with LSE, "
                "ring / zigzag / Ulysses / USP, and sequence-sharded inference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["cpattn", "cpattn.kernels", "cpattn.integrations", "cpattn.examples"],
    package_dir={"cpattn": "cpattn", "cpattn.kernels": "kernels"},
    # README, "Supported versions": the oldest pair CI tests is torch 2.8 with the triton it pins.
    install_requires=["torch>=2.8", "triton>=3.4", "numpy"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6",
                 "transformers>=5.0,<6; python_version >= '3.10'"],  # transformers 5 needs Python 3.10
        "transformers": ["transformers>=5.0,<6"],  # tested with 5.0.0 and 5.24.0
        "bench": ["matplotlib"],
    },
)
