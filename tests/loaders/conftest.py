"""Fixtures of generated images for the loader tests (small, so the tier stays fast on 2 cores)."""
from __future__ import annotations

import pytest

from clipdistill.loaders.loader import dali_available
from clipdistill.loaders.synthetic import write_bad_files, write_dataset

# CPU backends every test of the contract runs on; DALI's is skipped, with a reason, where DALI is missing.
CPU_BACKENDS = [
    "torch",
    pytest.param("dali-cpu", marks=pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")),
]

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """23 natural-looking JPEGs of varied sizes (around 120x90) in nested folders (23: a prime)."""
    root = tmp_path_factory.mktemp("images")
    write_dataset(root, 23, size=(120, 90), jitter=0.4, seed=1, subfolders=3)
    return root


@pytest.fixture(scope="session")
def bad_folder(tmp_path_factory):
    """12 good JPEGs plus one file of every bad kind (see synthetic.write_bad_files)."""
    root = tmp_path_factory.mktemp("bad")
    write_dataset(root, 12, size=(100, 80), jitter=0.3, seed=2)
    kinds = write_bad_files(root, seed=3)
    return root, kinds


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request) -> str:
    """Each CPU backend in turn ("torch", "dali-cpu")."""
    return request.param


@pytest.fixture
def require_dali():
    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
