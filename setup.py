"""clipdistill's package layout and requirements; the metadata lives in pyproject.toml.

The three code folders at the top of the repository install as subpackages of
``clipdistill`` (``clipdistill.engine``, ``clipdistill.kernels``,
``clipdistill.loaders``); ``src/clipdistill`` holds the top-level package itself (its
``__init__.py`` with ``__version__`` and the lazy public API, and ``py.typed``). Nothing is
installed under a top-level name such as ``kernels`` or ``engine``, which would shadow other
packages.

Requirements are deliberately loose: users on GPUs bring their own CUDA build of torch. The
CPU pins used by CI live in ``.ci/constraints-cpu.txt``. This file stays (pyproject.toml alone
cannot list the subpackages of a mapped folder, nor narrow torchvision at build time).
"""
import os
import re
import sysconfig
from importlib import metadata

from setuptools import find_packages, setup

REQUIREMENTS = [
    "torch>=2.4",
    "numpy>=1.24",
    "open_clip_torch>=2.24",
    "safetensors>=0.4",
    "pyyaml>=6",
    "pillow>=10.3",  # before 10.3 PIL opens 16-bit grey PNG as mode I, which the loaders refuse
    "tqdm>=4.60",
    'triton>=3.0; platform_system == "Linux"',
]


def _torchvision_for_installed_torch() -> list[str]:
    """Keep the user's torch in an editable install: torchvision narrowed to the release built for it.

    Only when ``_build_backend`` runs an editable hook (``pip install -e .``): that metadata is
    built for, and stays in, the environment it goes into. Where that environment already has
    torch 2.x, torchvision is narrowed to the matching 0.(x+15) release, so pip keeps that torch.
    pip runs this file with the target environment's interpreter, whose sysconfig paths name that
    environment even inside build isolation. CLIPDISTILL_LOOSE_REQUIREMENTS=1 turns it off.
    Wheels and sdists never get it (see _build_backend.py).
    """
    if os.environ.get("CLIPDISTILL_BUILD_FOR_THIS_ENVIRONMENT") != "1":
        return []
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
    packages=["clipdistill"] + [
        f"clipdistill.{name}{'.' + sub if sub else ''}"
        for name in SUBPACKAGES
        for sub in ["", *find_packages(where=name)]
    ],
    package_dir={"clipdistill": "src/clipdistill", **{f"clipdistill.{name}": name for name in SUBPACKAGES}},
    install_requires=REQUIREMENTS + _torchvision_for_installed_torch(),
)
