"""Sources resolve to a stable, saved, ordered list of samples."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from clipdistill.loaders.sources import (EmptySourceError, SampleList, check_source, expand_braces, resolve_source,
                                         scan_folder, tar_index)


def test_folder_scan_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path):
    for rel in ["b/2.jpg", "a/1.JPG", "a/z/3.png", "c.webp", ".hidden/4.jpg", "a/.5.jpg", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert scan_folder(tmp_path) == ["a/1.JPG", "a/z/3.png", "b/2.jpg", "c.webp"]


def test_folder_source_is_saved_and_a_new_file_is_seen(image_folder, cache_dir):
    first = resolve_source(image_folder, cache_dir=cache_dir)
    assert len(first) == 23
    saved = list((cache_dir / "lists").glob("*.list"))
    assert len(saved) == 1
    # the saved list is checked against the folder: a new file appears without rescan=True
    # (tests/loaders/test_hostile_sources.py covers the notice and a resumed run's own list)
    extra = image_folder / "zz_new.jpg"
    extra.write_bytes((image_folder / first.paths[0]).read_bytes())
    try:
        again = resolve_source(image_folder, cache_dir=cache_dir)
        assert len(again) == 24 and again.paths[-1] == "zz_new.jpg"
        rescanned = resolve_source(image_folder, cache_dir=cache_dir, rescan=True)
        assert rescanned.paths == again.paths
    finally:
        extra.unlink()


def test_list_file_round_trip_and_plain_text_lists(image_folder, tmp_path, cache_dir):
    samples = resolve_source(image_folder, cache_dir=cache_dir)
    samples.save(tmp_path / "all.list")
    loaded = resolve_source(tmp_path / "all.list")
    assert loaded.paths == samples.paths and loaded.root == samples.root
    assert loaded.read(3) == samples.read(3)
    # a plain text file of paths relative to its folder
    plain = image_folder / "some.txt"
    plain.write_text("\n".join(samples.paths[:5]) + "\n\n# a comment\n")
    try:
        listed = resolve_source(plain)
        assert listed.paths == samples.paths[:5]
        assert listed.read(0) == samples.read(0)
    finally:
        plain.unlink()


def _write_shard(path, files):
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards_are_indexed_and_read_by_offset(image_folder, tmp_path, cache_dir):
    samples = resolve_source(image_folder, cache_dir=cache_dir)
    blobs = [samples.read(i) for i in range(len(samples))]
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    _write_shard(shard_dir / "000.tar", [(f"{i:04d}.jpg", blobs[i]) for i in range(10)] + [("0000.json", b"{}")])
    _write_shard(shard_dir / "001.tar", [(f"{i:04d}.jpg", blobs[i]) for i in range(10, 23)])
    shards = resolve_source(str(shard_dir / "*.tar"), cache_dir=cache_dir)
    assert len(shards) == 23
    assert (shard_dir / "000.tar.idx").exists() and (shard_dir / "001.tar.idx").exists()
    assert all(shards.read(i) == blobs[i] for i in range(23))
    assert shards.location(12).endswith("001.tar:0012.jpg")
    assert [n for n, _, _ in tar_index(shard_dir / "000.tar")][:2] == ["0000.jpg", "0001.jpg"]
    # the saved list keeps members and offsets
    shards.save(tmp_path / "shards.list")
    again = SampleList.load(tmp_path / "shards.list")
    assert again.read(20) == blobs[20] and np.array_equal(again.offsets, shards.offsets)
    # a single shard, and a list of shards
    assert len(resolve_source(str(shard_dir / "001.tar"), cache_dir=cache_dir)) == 13
    assert len(resolve_source([str(shard_dir / "000.tar")], cache_dir=cache_dir)) == 10


def test_empty_sources_raise_a_clear_error(tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(EmptySourceError, match="no images found"):
        resolve_source(tmp_path / "empty", cache_dir=cache_dir)
    (tmp_path / "empty.list").write_text("# nothing\n")
    with pytest.raises(EmptySourceError, match="names no images"):
        resolve_source(tmp_path / "empty.list")
    with pytest.raises(EmptySourceError, match="no tar shards"):
        resolve_source(str(tmp_path / "none_*.tar"), cache_dir=cache_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(tmp_path / "missing_folder", cache_dir=cache_dir)


def test_sample_list_travels_to_other_processes_without_its_open_files(image_folder, cache_dir):
    import pickle

    samples = resolve_source(image_folder, cache_dir=cache_dir)
    samples._fds["x"] = 12345
    clone = pickle.loads(pickle.dumps(samples))
    assert clone._fds == {} and clone.paths == samples.paths
    assert os.path.isabs(clone.full_path(0))


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/x-{0..1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]
    assert len(expand_braces("shards-{00000..01023}.tar")) == 1024
    assert expand_braces("shards-{00000..01023}.tar")[-1] == "shards-01023.tar"
    for literal in ("plain.tar", "odd{}.tar", "one{x}.tar"):
        assert expand_braces(literal) == [literal]
    with pytest.raises(ValueError, match="runs backwards"):
        expand_braces("s-{3..1}.tar")


def test_brace_patterns_resolve_to_their_shards_and_missing_ones_are_named(image_folder, tmp_path, cache_dir):
    samples = resolve_source(image_folder, cache_dir=cache_dir)
    blobs = [samples.read(i) for i in range(len(samples))]
    for shard in range(3):
        _write_shard(tmp_path / f"shards-{shard:03d}.tar",
                     [(f"{i:04d}.jpg", blobs[i]) for i in range(shard * 5, shard * 5 + 5)])
    every = resolve_source(str(tmp_path / "shards-{000..002}.tar"), cache_dir=cache_dir)
    assert len(every) == 15 and all(every.read(i) == blobs[i] for i in range(15))
    two = resolve_source(str(tmp_path / "shards-{000,002}.tar"), cache_dir=cache_dir)
    assert len(two) == 10 and two.read(5) == blobs[10]
    assert check_source(str(tmp_path / "shards-{000..002}.tar")) == [str(tmp_path / f"shards-{s:03d}.tar")
                                                                      for s in range(3)]
    with pytest.raises(FileNotFoundError, match=r"2 of the 5 tar shards .* do not exist .*shards-003\.tar"):
        resolve_source(str(tmp_path / "shards-{000..004}.tar"), cache_dir=cache_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_source(str(tmp_path / "missing_folder"))
