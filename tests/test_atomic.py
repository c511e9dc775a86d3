import pytest

from qshift.atomic import atomic_path, save_figure_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "report.md"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            assert not tmp.name.endswith(".md")  # a `*.md` glob never sees the temporary
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and len(list(target.parent.iterdir())) == 1


def test_figures_are_saved_in_the_format_of_their_suffix(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    png = save_figure_atomic(fig, tmp_path / "a.png", dpi=20)
    svg = save_figure_atomic(fig, tmp_path / "a.svg")
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:500]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.svg"]
