"""dsrdmpd.atomicfile: the one way files are written (temporary, fsync, umask's mode, rename)."""
import os
import stat

import pytest

from dsrdmpd.atomicfile import atomic_path, remove_stale_temporaries, write_text_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(plain.stat().st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.png"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp.parent and tmp.suffix == ".png" and tmp != target
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    target = tmp_path / "scene.tif"
    stale = tmp_path / ".scene.abc123.tmp.tif"
    stale.write_text("partial")
    other = tmp_path / ".other.abc123.tmp.tif"
    other.write_text("not ours")
    assert remove_stale_temporaries(target) == 1
    assert not stale.exists() and other.exists()
