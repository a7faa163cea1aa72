"""``clipdistill index``: the cheap check, the optional decode, the lists and the JSON summary."""
from __future__ import annotations

import json

import pytest

from clipdistill.loaders import formats
from clipdistill.loaders.cli import main
from clipdistill.loaders.sources import SampleList

EXPECTED_CHEAP = {"truncated": "truncated", "random_bytes": "unknown_format", "empty": "empty",
                  "text": "unknown_format"}


@pytest.mark.parametrize("kind, reason", [*EXPECTED_CHEAP.items(), ("corrupt_scan", None),
                                          ("png_named_jpg", None), ("grayscale", None), ("cmyk", None)])
def test_cheap_check_of_each_kind(bad_folder, kind, reason):
    _, kinds = bad_folder
    assert formats.check_file_range(str(kinds[kind]))[0] == reason
    assert formats.check_bytes(kinds[kind].read_bytes())[0] == reason


def test_cheap_check_allows_bytes_after_the_end_marker_and_names_other_failures(tmp_path, bad_folder):
    root, kinds = bad_folder
    good = kinds["grayscale"].read_bytes()
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(good + b"\x00" * 1000)  # within 64 KiB after EOI: legal
    assert formats.check_file_range(str(trailer))[0] is None
    far = tmp_path / "far.jpg"
    far.write_bytes(good + b"\x00" * (70 * 1024))  # EOI further than 64 KiB from the end
    assert formats.check_file_range(str(far))[0] == "truncated"
    gif = tmp_path / "anim.jpg"
    gif.write_bytes(b"GIF89a" + b"\x00" * 100)
    assert formats.check_file_range(str(gif)) == ("unsupported_format", "gif")
    assert formats.check_file_range(str(tmp_path / "gone.jpg"))[0] == "missing"
    (tmp_path / "dir.jpg").mkdir()
    assert formats.check_file_range(str(tmp_path / "dir.jpg"))[0] == "unreadable"


@pytest.mark.parametrize("workers", [1, 2])
def test_index_command_writes_lists_and_ends_with_a_json_summary(bad_folder, tmp_path, capsys, workers,
                                                                 monkeypatch):
    from clipdistill.loaders import index

    monkeypatch.setattr(index, "_INLINE_BELOW", 0)  # use the process pool even for a few files
    root, kinds = bad_folder
    out = tmp_path / "clean.list"
    code = main(["index", str(root), "--out", str(out), "--workers", str(workers),
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert list(summary)[:4] == ["total", "valid", "rejected", "reasons"]
    assert summary["total"] == 12 + len(kinds)
    assert summary["rejected"] == 4 and summary["valid"] == summary["total"] - 4
    assert summary["reasons"] == {"empty": 1, "truncated": 1, "unknown_format": 2}
    clean = SampleList.load(out)
    assert len(clean) == summary["valid"]
    assert not any(p.endswith(("bad_empty.jpg", "bad_text.jpg", "bad_truncated.jpg")) for p in clean.paths)
    rejects = (tmp_path / "clean.list.rejects.tsv").read_text().splitlines()[1:]
    assert sorted(line.split("\t")[1] for line in rejects) == ["empty", "truncated", "unknown_format",
                                                               "unknown_format"]
    assert all(line.split("\t")[0].startswith(str(root)) for line in rejects)


def test_index_decode_also_catches_files_that_only_fail_to_decode(bad_folder, tmp_path, capsys):
    root, _ = bad_folder
    out = tmp_path / "clean.list"
    assert main(["index", str(root), "--out", str(out), "--decode", "--workers", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rejected"] == 5
    assert summary["reasons"]["decode_error"] == 1
    assert not any("corrupt_scan" in p for p in SampleList.load(out).paths)


def test_index_of_an_empty_source_fails_with_a_clear_message(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    code = main(["index", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.list"),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert "no images found" in capsys.readouterr().err


def test_register_adds_the_index_subcommand():
    import argparse

    from clipdistill.loaders.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["index", "some/folder", "--out", "x.list", "--decode", "--workers", "3"])
    assert args.func.__name__ == "run_index" and args.decode and args.workers == 3
