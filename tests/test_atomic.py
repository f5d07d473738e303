"""nanoseek.atomic: a write that fails or is killed half-way leaves the previous file, never a torn one."""

import json
import os

import pytest

from nanoseek.atomic import atomic_copy, atomic_open, atomic_savefig, atomic_write_json, atomic_write_text, fsync_tree


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_writes_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old\n")
    atomic_write_json(path, {"x": [1, 2], "é": 1}, ensure_ascii=False)
    assert path.read_text(encoding="utf-8") == json.dumps({"x": [1, 2], "é": 1}, indent=2, ensure_ascii=False) + "\n"
    atomic_copy(path, tmp_path / "b.json")
    assert (tmp_path / "b.json").read_bytes() == path.read_bytes()
    assert names(tmp_path) == ["a.json", "b.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):  # fails after the file is opened: open(path, "w") would truncate it
        atomic_write_text(path, "new \udcff")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(path, "wb") as f:
            f.write(b"half of the new content")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert names(tmp_path) == ["state.json"]  # no temporary file left behind


def test_a_killed_writer_leaves_the_old_file(tmp_path):
    path = tmp_path / "stamp.json"
    path.write_text("old")
    pid = os.fork()
    if pid == 0:  # the child dies half-way through its write, running no cleanup (as under SIGKILL)
        with atomic_open(path, "w") as f:
            f.write("half")
            f.flush()
            os._exit(0)
    os.waitpid(pid, 0)
    assert path.read_text() == "old"
    assert all(n == "stamp.json" or n.startswith(".stamp.json.") for n in names(tmp_path))  # at most a hidden temp


def test_savefig_writes_complete_files_only(tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.artist import Artist

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = tmp_path / "loss.png"
    atomic_savefig(fig, png, dpi=50)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")  # the whole file
    assert plt.imread(png).shape[:2] == (240, 320)

    pdf = tmp_path / "loss.pdf"  # the PDF backend opens its file before it draws: a failed draw tears it
    atomic_savefig(fig, pdf)
    before = pdf.read_bytes()
    assert before.startswith(b"%PDF")

    class Broken(Artist):
        def draw(self, renderer):
            raise RuntimeError("drawing failed")

    ax.add_artist(Broken())
    with pytest.raises(RuntimeError, match="drawing failed"):
        atomic_savefig(fig, pdf)
    plt.close(fig)
    assert pdf.read_bytes() == before
    assert names(tmp_path) == ["loss.pdf", "loss.png"]


def test_fsync_tree_leaves_links_alone(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    fsync_tree(tmp_path)
