"""Wheels for the GPU machine: split to fit its per-call carry, checksummed, joined there.

The GPU machine has no network; each device call carries at most 64 MiB, the working
tree included. Wheels too large for one call (DALI's is 199 MB) are cut here into parts,
dealt over folders ``.dali1`` .. ``.daliN`` of at most ``--limit-mib`` each *with the tree*,
and every folder gets the same ``MANIFEST.json``: for each wheel its size and sha256, and
for each part its folder, size and sha256. On the machine :func:`join_split_wheels` refuses
a missing part or a wrong checksum with the file named, and checks every joined wheel.

Standard library only: it runs on the CPU machine (prepare_gpu_wheels.sh) and on the GPU
machine before anything is installed.

    python benchmarks/gpu_wheels.py split --limit-mib 55 --prefix .dali WHEEL ...
    python benchmarks/gpu_wheels.py sizes [FOLDER ...]      # tree + each folder, MiB, as JSON
    python benchmarks/gpu_wheels.py requirements --have benchmarks/wheelsets/gpu_machine.txt WHEEL ...
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

MIB = 2**20
CARRY_LIMIT_BYTES = 64 * MIB  # the device tool's limit per call: working tree + carried paths
MANIFEST = "MANIFEST.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(path: Path) -> int:
    """Bytes of every regular file under ``path`` (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def tree_bytes(repo_root: Path = REPO_ROOT) -> int:
    """Bytes the device tool sends for the tree: tracked plus untracked-not-ignored files, and shared/."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=repo_root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # no git here: every file but the usual ignored ones
        skip = (".git", ".venv", ".whl", ".dali", "__pycache__", ".pytest_cache", ".benchmarks")
        return sum(p.stat().st_size for p in Path(repo_root).rglob("*")
                   if p.is_file() and not p.is_symlink()
                   and not any(part.startswith(skip) or part.endswith(".egg-info")
                               for part in p.relative_to(repo_root).parts))
    total = 0
    for name in filter(None, out.decode().split("\0")):
        path = repo_root / name
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    shared = repo_root / "shared"
    if shared.is_dir() and not any(n.startswith("shared/") for n in out.decode().split("\0")):
        total += folder_bytes(shared)
    return total


def split_wheels(wheels: list[Path], dest_root: Path, *, folder_budget_bytes: int,
                 prefix: str = ".dali") -> list[Path]:
    """Cut ``wheels`` into parts and deal them over ``dest_root/<prefix>1 ..`` of at most ``folder_budget_bytes``.

    Parts are cut to the room left in the current folder (so no folder is left half empty),
    in the order given; a wheel may span folders. Every folder gets the full manifest.
    Returns the folders, in order.
    """
    if folder_budget_bytes < MIB:
        raise ValueError(f"split_wheels: folder_budget_bytes must be at least 1 MiB, got {folder_budget_bytes}")
    dest_root = Path(dest_root)
    folders: list[Path] = []
    used = folder_budget_bytes  # forces a first folder
    manifest: dict = {"folders": 0, "wheels": {}}
    reserve = 64 * 1024  # room for the manifest itself in every folder
    for wheel in wheels:
        wheel = Path(wheel)
        entry = {"sha256": sha256(wheel), "size": wheel.stat().st_size, "parts": []}
        with open(wheel, "rb") as fh:
            index = 0
            while True:
                room = folder_budget_bytes - reserve - used
                if room < MIB:  # start a new folder rather than carry a sliver
                    folders.append(dest_root / f"{prefix}{len(folders) + 1}")
                    folders[-1].mkdir(parents=True, exist_ok=False)
                    used, room = 0, folder_budget_bytes - reserve
                chunk = fh.read(room)
                if not chunk:
                    break
                part = folders[-1] / f"{wheel.name}.part{index:02d}"
                part.write_bytes(chunk)
                used += len(chunk)
                entry["parts"].append({"name": part.name, "folder": folders[-1].name, "size": len(chunk),
                                       "sha256": hashlib.sha256(chunk).hexdigest()})
                index += 1
        manifest["wheels"][wheel.name] = entry
    manifest["folders"] = len(folders)
    text = json.dumps(manifest, indent=1, sort_keys=True)
    for folder in folders:
        (folder / MANIFEST).write_text(text)
    return folders


def join_split_wheels(part_dirs: list[Path], dest: Path) -> list[Path]:
    """Reassemble the wheels of a :func:`split_wheels` manifest from parts spread over ``part_dirs``.

    Every part must be present (in any of the folders) with its checksum, and every joined
    wheel must match its own; otherwise a ``ValueError`` names what is missing or wrong.
    """
    part_dirs = [Path(p) for p in part_dirs]
    manifests = [json.loads((d / MANIFEST).read_text()) for d in part_dirs if (d / MANIFEST).is_file()]
    if not manifests:
        raise ValueError(f"no {MANIFEST} in {', '.join(map(str, part_dirs)) or '(no folders)'}: "
                         "carry the folders made by benchmarks/prepare_gpu_wheels.sh dali")
    manifest = manifests[0]
    if any(m != manifest for m in manifests[1:]):
        raise ValueError("the part folders come from different prepare runs (their manifests differ)")
    found: dict[str, Path] = {}
    for folder in part_dirs:
        for path in folder.glob("*.whl.part*"):
            found.setdefault(path.name, path)
    missing = [p["name"] for w in manifest["wheels"].values() for p in w["parts"] if p["name"] not in found]
    if missing:
        folders = sorted({p["folder"] for w in manifest["wheels"].values() for p in w["parts"]
                          if p["name"] in missing})
        raise ValueError(f"parts missing: {', '.join(missing)} (carry {', '.join(folders)})")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, entry in manifest["wheels"].items():
        target = dest / name
        digest = hashlib.sha256()
        with open(target, "wb") as out:
            for part in entry["parts"]:
                data = found[part["name"]].read_bytes()
                if hashlib.sha256(data).hexdigest() != part["sha256"]:
                    raise ValueError(f"{found[part['name']]}: checksum differs from the manifest (a broken copy?)")
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != entry["sha256"]:
            raise ValueError(f"{name}: the joined wheel's checksum differs from the manifest")
        wheels.append(target)
    return wheels


def verify_wheels(folder: Path, requirements: Path) -> list[str]:
    """Problems with ``folder``'s wheels against a hashed requirements file ([] when all match)."""
    wanted = {}
    for line in Path(requirements).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, digest = line.partition("--hash=sha256:")
        name = spec.strip().split("==")[0].lower().replace("-", "_")
        wanted[name] = digest.strip()
    have = {p.name.split("-")[0].lower(): p for p in Path(folder).glob("*.whl")}
    problems = [f"{name}: no wheel" for name in wanted if name not in have]
    problems += [f"{p.name}: sha256 differs from {requirements}" for name, p in have.items()
                 if name in wanted and sha256(p) != wanted[name]]
    problems += [f"{p.name}: not in {requirements}" for name, p in have.items() if name not in wanted]
    return problems


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    """The distribution name of a wheel file, normalized (``nvidia_dali_cuda130-2.4.0-...`` -> ``nvidia-dali-cuda130``)."""
    return _normalize(Path(path).name.split("-")[0])


def unmet_requirements(wheels: list[Path], have: set[str], python_version: str = "3.12") -> list[str]:
    """Requirements of ``wheels`` (no extras, markers for CPython ``python_version`` on Linux x86-64) met neither
    by another of the wheels nor by a distribution named in ``have``. Versions are not compared: the set is
    installed with ``--no-deps`` next to what the machine has, so a missing name is what breaks an import."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # the GPU machine has packaging; pip vendors it everywhere
        from pip._vendor.packaging.requirements import Requirement
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    present = {_normalize(n) for n in have} | {wheel_name(w) for w in wheels}
    requires: dict[str, list] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            lines = zf.read(meta).decode("utf-8", "replace").splitlines()
        requires[wheel_name(wheel)] = [Requirement(ln.split(":", 1)[1].strip()) for ln in lines
                                       if ln.startswith("Requires-Dist:")]
    # Extras asked of a wheel (``nvidia-nvimgcodec-cu13[nvjpeg]``) switch on its ``extra == ...`` requirements.
    extras: dict[str, set[str]] = {name: {""} for name in requires}
    unmet: list[str] = []
    for _ in range(len(requires) + 1):  # to a fixed point: an extra may ask for more extras
        unmet, changed = [], False
        for name, reqs in requires.items():
            for req in reqs:
                if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in extras[name]):
                    continue
                target = _normalize(req.name)
                if target not in present:
                    unmet.append(f"{name} needs {req}")
                elif target in extras and not set(req.extras) <= extras[target]:
                    extras[target] |= set(req.extras)
                    changed = True
        if not changed:
            break
    return sorted(set(unmet))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    split = sub.add_parser("split", help="split wheels into carry-sized folders")
    split.add_argument("wheels", nargs="+", type=Path)
    split.add_argument("--limit-mib", type=float, default=55.0, help="per carry, the working tree included")
    split.add_argument("--headroom-mib", type=float, default=2.0,
                       help="room left for the tree to grow between this split and the device calls")
    split.add_argument("--prefix", default=".dali")
    split.add_argument("--dest", type=Path, default=REPO_ROOT)
    sizes = sub.add_parser("sizes", help="the tree's and each folder's size, and each carry's total")
    sizes.add_argument("folders", nargs="*", type=Path)
    reqs = sub.add_parser("requirements", help="requirements the wheels leave unmet (exit 1 if any)")
    reqs.add_argument("wheels", nargs="+", type=Path)
    reqs.add_argument("--have", type=Path, required=True, help="a file naming the packages already there, one a line")
    args = parser.parse_args(argv)

    if args.command == "requirements":
        have = {ln.split("#")[0].strip() for ln in args.have.read_text().splitlines()} - {""}
        unmet = unmet_requirements(args.wheels, have)
        print("\n".join(unmet) if unmet else f"all requirements of {len(args.wheels)} wheels are met")
        return 1 if unmet else 0

    tree = tree_bytes()
    if args.command == "split":
        budget = int((args.limit_mib - args.headroom_mib) * MIB) - tree
        folders = split_wheels(args.wheels, args.dest, folder_budget_bytes=budget, prefix=args.prefix)
        report = {"tree_mib": round(tree / MIB, 2), "limit_mib": args.limit_mib, "headroom_mib": args.headroom_mib,
                  "folders": {f.name: round(folder_bytes(f) / MIB, 2) for f in folders}}
    else:
        report = {"tree_mib": round(tree / MIB, 2),
                  "carries_mib": {str(f): round((tree + folder_bytes(f)) / MIB, 2) for f in args.folders}}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
