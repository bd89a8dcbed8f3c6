"""docs/validation.md has several writers: each replaces only its own part."""

from __future__ import annotations

from gradwatch.reference._sections import marker, write_head, write_section


def test_each_writer_replaces_only_its_part(tmp_path):
    page = str(tmp_path / "validation.md")
    write_head(page, "# Zoo\n\nold table\n")
    a, b = marker("python -m a"), marker("gradwatch b")
    write_section(page, a, "## A\n\nfirst")
    write_section(page, b, "## B\n\nsecond")
    write_section(page, a, "## A\n\nfirst, again")
    write_head(page, "# Zoo\n\nnew table\n")
    text = open(page).read()
    assert text.count(a) == 1 and text.count(b) == 1 and "old table" not in text and "first, again" in text
    assert text.index("new table") < text.index("first, again") < text.index("second")
