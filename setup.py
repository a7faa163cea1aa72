"""clipdistill: distill large CLIP teachers into prompt-tuned students.

The three code folders at the top of the repository install as subpackages of
the ``clipdistill`` namespace (``clipdistill.engine``, ``clipdistill.kernels``,
``clipdistill.loaders``); nothing is installed under a top-level name such as
``kernels`` or ``engine``, which would shadow other packages.

Requirements are deliberately loose: users on GPUs bring their own CUDA build
of torch. The CPU pins used by CI live in ``.ci/constraints-cpu.txt``.
"""
import os
import re
import sysconfig
from importlib import metadata

from setuptools import find_packages, setup

VERSION = "0.1.0"


def _torchvision_for_installed_torch() -> list[str]:
    """Keep the user's torch: narrow torchvision to the release built for it.

    open_clip requires torchvision without a version. Where torch is installed
    but torchvision is not, pip would take the newest torchvision, which needs
    a newer torch, and replace the user's (CUDA) torch with it. When this build
    runs for an environment that already has torch 2.x, torchvision is narrowed
    to the matching 0.(x+15) release, so pip keeps that torch. pip runs this file
    with the target environment's interpreter, whose sysconfig paths name that
    environment even inside build isolation. CLIPDISTILL_LOOSE_REQUIREMENTS=1
    turns this off (e.g. to build a wheel for distribution).
    """
    if os.environ.get("CLIPDISTILL_LOOSE_REQUIREMENTS", "") not in ("", "0"):
        return []
    paths = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    for dist in metadata.distributions(path=paths):
        if (dist.metadata["Name"] or "").lower() == "torch":
            match = re.match(r"2\.(\d+)\.", dist.version)
            if match:
                minor = int(match.group(1)) + 15
                return [f"torchvision>=0.{minor},<0.{minor + 1}"]
    return []


SUBPACKAGES = ("engine", "kernels", "loaders")

setup(
    name="clipdistill",
    version=VERSION,
    description=(
        "Distill large CLIP teachers into prompt-tuned students on unlabeled images "
        "(KDPL, PromptKD, data-free prompt diversification)"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        f"clipdistill.{name}{'.' + sub if sub else ''}"
        for name in SUBPACKAGES
        for sub in ["", *find_packages(where=name)]
    ],
    package_dir={f"clipdistill.{name}": name for name in SUBPACKAGES},
    package_data={"clipdistill.engine": ["config/models/*.json", "config/recipes/*.yaml", "data/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "open_clip_torch>=2.24",
        "safetensors>=0.4",
        "pyyaml>=6",
        "pillow>=10",
        "tqdm>=4.60",
        'triton>=3.0; platform_system == "Linux"',
    ]
    + _torchvision_for_installed_torch(),
    extras_require={
        # DALI ships one wheel per CUDA major version; pick the one matching your driver.
        "dali-cuda12": ["nvidia-dali-cuda120>=1.40"],
        "dali-cuda13": ["nvidia-dali-cuda130>=2.0"],
        "deepspeed": ["deepspeed>=0.14"],
        "plots": ["matplotlib>=3.7"],
        # the CLIP-guided VQGAN generator of data-free distillation (diffusers' VQModel)
        "datafree": ["diffusers>=0.30"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-timeout>=2", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["clipdistill = clipdistill.engine.cli:main"]},
)
