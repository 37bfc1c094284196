"""Files replaced whole (mlgcn_dist/files.py): what every checkpoint, summary, metrics log and pack meta goes through."""

import os
import subprocess
import sys

import pytest

from mlgcn_dist.files import replaced_atomically, write_text_atomic


def test_a_text_write_replaces_the_file_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "deep" / "summary.json"
    write_text_atomic(path, "old\n")
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_a_write_that_fails_midway_keeps_the_old_file_and_removes_its_half(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    write_text_atomic(path, "old\n")

    def full_disk(fd):  # a full disk shows when the data is flushed to it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_named_temporary_file_is_used_and_removed(tmp_path):
    path, tmp = tmp_path / "meta.json", tmp_path / "meta.json.partial"
    write_text_atomic(path, "{}", tmp=tmp)
    assert path.read_text() == "{}" and not tmp.exists()


def test_a_binary_write_replaces_the_file_with_exactly_its_bytes(tmp_path):
    path, data = tmp_path / "last.pt", bytes(range(256)) * 4
    with replaced_atomically(path, "wb") as fh:
        fh.write(data)
    assert path.read_bytes() == data


def test_two_processes_writing_the_same_file_at_once_each_replace_it_whole(tmp_path, monkeypatch):
    path = tmp_path / "REQUEUE"
    pid = os.getpid()
    with replaced_atomically(path) as first:
        first.write("from the first process\n")
        monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # a second process, writing while the first is
        write_text_atomic(path, "from the second process\n")
        assert path.read_text() == "from the second process\n"
    assert path.read_text() == "from the first process\n" and [p.name for p in tmp_path.iterdir()] == ["REQUEUE"]


def test_the_tools_that_write_atomically_without_training_do_not_import_torch():
    code = "import sys, mlgcn_dist.files, mlgcn_dist.tracking, mlgcn_dist.compare; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
