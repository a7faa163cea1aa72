"""Hostile folders and shards (issue 18): symlink loops, duplicates, unsupported kinds, truncated
shards and changed folders are named and counted; nothing is lost or doubled; scans never abort."""
from __future__ import annotations

import json
import logging
import os
import tarfile

import pytest

from clipdistill.loaders import ImageLoader, OutputSpec
from clipdistill.loaders.cli import main
from clipdistill.loaders.sources import resolve_source, walk_folder
from clipdistill.loaders.synthetic import write_dataset

from .test_sources import _write_shard

OUT = (OutputSpec("image", 16),)


def _age(root, seconds=60):
    """Set every folder's mtime back (a folder written within the last 2 s is rescanned anyway)."""
    for folder, _, _ in os.walk(root):
        st = os.stat(folder)
        os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


def _index(source, tmp_path, capsys, *extra, base=None):
    out = tmp_path / "clean.list"
    assert main(["index", str(source), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--no-progress", *extra]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rejects = [line.split("\t") for line in (tmp_path / "clean.list.rejects.tsv").read_text().splitlines()[1:]]
    return summary, {os.path.relpath(loc, base or source): reason for loc, reason, _ in rejects}


def _loader_ids(source, cache_dir):
    ld = ImageLoader(source, global_batch_size=4, outputs=OUT, backend="torch", cache_dir=cache_dir, workers=1)
    seen = [i for b in ld for i in b.sample_ids[b.mask].tolist()]
    return ld, seen


def test_a_file_symlink_loop_is_a_reject_and_the_scan_goes_on(tmp_path, capsys):
    # Reproduction: a.jpg -> b.jpg -> a.jpg beside 5 good images gave "total": 1 (the scan stopped at ELOOP).
    root = tmp_path / "data"
    write_dataset(root, 5, size=(40, 30))
    os.symlink("b.jpg", root / "a.jpg")
    os.symlink("a.jpg", root / "b.jpg")
    summary, rejects = _index(root, tmp_path, capsys)
    assert (summary["total"], summary["valid"], summary["rejected"]) == (7, 5, 2)
    assert summary["reasons"] == {"symlink_loop": 2} and rejects == {"a.jpg": "symlink_loop", "b.jpg": "symlink_loop"}
    ld, seen = _loader_ids(root, tmp_path / "c2")
    assert len(ld.samples) == 5 and sorted(seen) == list(range(5))


def test_a_directory_loop_lists_each_image_once(tmp_path, capsys):
    # Reproduction: sub/up -> .. listed every image about 41 times (5 -> 205).
    root = tmp_path / "data"
    write_dataset(root, 5, size=(40, 30))
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")
    summary, rejects = _index(root, tmp_path, capsys)
    assert (summary["total"], summary["valid"]) == (6, 5) and rejects == {"sub/up": "symlink_loop"}
    ld, seen = _loader_ids(root, tmp_path / "c2")
    assert len(ld.samples) == 5 and sorted(seen) == list(range(5))


def test_links_to_listed_folders_and_files_are_duplicates_whatever_the_listing_order(tmp_path):
    root = tmp_path / "data"
    write_dataset(root / "real", 3, size=(40, 30))
    os.symlink("real", root / "alias")  # sorts before "real": still listed under its real name
    os.symlink("real/img_000000.jpg", root / "copy.jpg")
    os.symlink("missing.jpg", root / "dangling.jpg")
    (root / "other").mkdir()
    os.symlink("../real/img_000001.jpg", root / "other" / "x.jpg")
    os.symlink("../real/img_000001.jpg", root / "other" / "y.jpg")
    scan = walk_folder(root)
    assert scan.paths == [f"real/img_{i:06d}.jpg" for i in range(3)]
    assert {rel: reason for rel, reason, _ in scan.skipped} == {
        "alias": "duplicate", "copy.jpg": "duplicate", "dangling.jpg": "missing",
        "other/x.jpg": "duplicate", "other/y.jpg": "duplicate"}
    os.symlink(os.path.abspath(root / "real"), tmp_path / "outside")  # a linked folder not otherwise listed
    os.symlink("../outside", root / "via_link")
    os.unlink(root / "alias")
    assert walk_folder(tmp_path / "outside").paths == [f"img_{i:06d}.jpg" for i in range(3)]


def test_skipped_kinds_are_counted_as_unsupported(tmp_path, capsys):
    # Reproduction: each caption and JSON beside an image was an `unsupported` reject (2/3 of an
    # image+caption+json folder rejected, one saved record per caption); tar shards ignore them.
    root = tmp_path / "data"
    write_dataset(root, 3, size=(40, 30))
    for i in range(3):
        (root / f"img_{i:06d}.txt").write_text("a caption")
        (root / f"img_{i:06d}.json").write_text("{}")
    (root / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 40)
    (root / ".hidden.jpg").write_bytes((root / "img_000000.jpg").read_bytes())
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(b"x")
    (root / "labels.csv").write_text("a,b\n")
    os.symlink("labels.csv", root / "labels_link.csv")
    os.mkfifo(root / "pipe.png")
    _age(root)  # so that the second index reads the saved list and its state
    summary, rejects = _index(root, tmp_path, capsys)
    assert (summary["total"], summary["valid"], summary["reasons"]) == (6, 3, {"unsupported": 3})
    assert rejects == {"anim.gif": "unsupported", ".hidden.jpg": "unsupported", "pipe.png": "unsupported"}
    assert summary["other_files"] == 9  # 6 captions and JSONs, labels.csv, its link, .cache
    again, _ = _index(root, tmp_path, capsys)  # from the saved list: the same counts
    assert {k: again[k] for k in ("total", "reasons", "other_files")} == \
        {k: summary[k] for k in ("total", "reasons", "other_files")}
    state_file = next((tmp_path / "cache" / "lists").glob("*.state.json"))
    state = json.loads(state_file.read_text())
    assert len(state["skipped"]) == 3 and state["other_files"] == 9
    # a state saved by an older version: captions were `unsupported` entries, no other_files
    del state["other_files"]
    state["skipped"] += [[str(root / f"img_{i:06d}.txt"), "unsupported", "(.txt)"] for i in range(3)]
    state_file.write_text(json.dumps(state))
    old, rejects = _index(root, tmp_path, capsys)
    assert (old["total"], old["reasons"], old["other_files"], len(rejects)) == (6, {"unsupported": 3}, 3, 3)
    ld, _ = _loader_ids(root, tmp_path / "c2")
    assert len(ld.samples) == 3 and len(ld.samples.skipped) == 3


def test_the_saved_list_is_revalidated_and_a_resumed_run_keeps_its_own(tmp_path, caplog):
    root = tmp_path / "data"
    write_dataset(root, 6, size=(40, 30), subfolders=2)
    _age(root)
    cache = tmp_path / "cache"
    first = resolve_source(root, cache_dir=cache)
    with caplog.at_level(logging.INFO, logger="clipdistill.loaders"):
        assert resolve_source(root, cache_dir=cache).paths == first.paths
    assert "from the saved list" in caplog.text and "changed" not in caplog.text
    (root / "d001" / "late.jpg").write_bytes((root / first.paths[0]).read_bytes())  # added in a subfolder
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipdistill.loaders"):
        kept = resolve_source(root, cache_dir=cache, keep_saved=True)  # a resumed run: same list, told why
        assert kept.paths == first.paths and kept.digest() == first.digest()
        assert "changed since this run's list was saved" in caplog.text and "'d001'" in caplog.text
        caplog.clear()
        again = resolve_source(root, cache_dir=cache)
    assert again.paths == sorted(first.paths + ["d001/late.jpg"])
    assert "scanning it again" in caplog.text and "(1 added, 0 gone)" in caplog.text
    (root / first.paths[0]).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipdistill.loaders"):
        gone = resolve_source(root, cache_dir=cache)
    assert first.paths[0] not in gone.paths and "(0 added, 1 gone)" in caplog.text
    # --rescan still forces a scan of an unchanged folder
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipdistill.loaders"):
        resolve_source(root, cache_dir=cache, rescan=True)
    assert "from the saved list" not in caplog.text


def test_a_list_saved_by_an_older_version_is_rescanned_or_kept_with_a_warning(tmp_path, caplog):
    root = tmp_path / "data"
    write_dataset(root, 3, size=(40, 30))
    cache = tmp_path / "cache"
    first = resolve_source(root, cache_dir=cache)
    for record in (cache / "lists").glob("*.state.json"):
        record.unlink()  # what today's main leaves: the list alone
    with caplog.at_level(logging.WARNING, logger="clipdistill.loaders"):
        assert resolve_source(root, cache_dir=cache, keep_saved=True).paths == first.paths
    assert "no record of its state" in caplog.text


def test_a_resumed_run_keeps_a_list_saved_while_its_folder_was_being_written(tmp_path, caplog):
    root = tmp_path / "data"
    write_dataset(root, 3, size=(40, 30))  # just written: its scan is "racy" (within 2 s of the mtimes)
    cache = tmp_path / "cache"
    first = resolve_source(root, cache_dir=cache)
    with caplog.at_level(logging.INFO, logger="clipdistill.loaders"):
        assert resolve_source(root, cache_dir=cache, keep_saved=True).paths == first.paths
    assert "from the saved list" in caplog.text and "changed" not in caplog.text


@pytest.mark.parametrize("cut", ["in_a_member", "after_a_member"])
def test_a_truncated_shard_is_named_and_the_other_shards_are_used(tmp_path, capsys, cut):
    # Reproduction: one truncated .tar aborted every shard ("not an uncompressed tar file").
    blobs = [p.read_bytes() for p in write_dataset(tmp_path / "img", 9, size=(40, 30))]
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "000.tar", [(f"{i}.jpg", blobs[i]) for i in range(4)] + [("0.txt", b"caption")])
    _write_shard(shards / "001.tar", [(f"{i}.jpg", blobs[i]) for i in range(4, 9)] + [("x.gif", b"GIF89a")])
    data = (shards / "001.tar").read_bytes()
    members = tarfile.open(shards / "001.tar").getmembers()
    end = members[2].offset_data + members[2].size + (200 if cut == "in_a_member" else 0)
    if cut == "after_a_member":  # tarfile stops quietly here: only the missing end blocks show it
        end = members[3].offset
    (shards / "001.tar").write_bytes(data[:end])
    summary, rejects = _index(str(shards / "*.tar"), tmp_path, capsys, base=shards)
    assert summary["reasons"] == {"truncated": 1} and rejects == {"001.tar": "truncated"}
    assert summary["valid"] == 7 and summary["total"] == 8  # 4 + the 3 complete members of 001.tar
    assert not (shards / "001.tar.idx").exists()  # looked at again next time
    ld, seen = _loader_ids(str(shards / "*.tar"), tmp_path / "c2")
    assert sorted(seen) == list(range(7)) and all(ld.samples.read(i) == blobs[i] for i in range(7))
