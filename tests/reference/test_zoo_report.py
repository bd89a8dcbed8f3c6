"""The zoo's published page names the commit it ran and nothing about the working tree: a run that would publish
from a changed tree is refused before it trains, unless ``--allow-dirty``; the JSON says what was changed."""

from __future__ import annotations

import json
import subprocess

import pytest

from gradwatch.reference.zoo import ZooEntry
from gradwatch.reference.zoo_report import main_with, source


def _git(root, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture
def checkout(tmp_path):
    """A real git checkout holding a gradwatch/ folder, one commit, clean."""
    root = tmp_path / "checkout"
    (root / "gradwatch").mkdir(parents=True)
    (root / "gradwatch" / "rules.py").write_text("THRESHOLD = 0.02\n")
    _git(root, "init", "-q")
    _git(root, "add", "gradwatch")
    _git(root, "commit", "-q", "-m", "rules")
    return root


def _absent_entry(libraries=None):
    """One entry whose library is not installed: it is reported as skipped at once, and the JSON is written."""
    return [ZooEntry("absent_net", "absent_library", "a library nobody has", build=lambda: None, task=None,
                     recipe=None, merges=None)]


def test_a_clean_checkout_publishes_its_commit_and_nothing_about_the_tree(checkout, tmp_path):
    commit = _git(checkout, "rev-parse", "--short", "HEAD").strip()
    assert source(str(checkout)).commit == commit and source(str(checkout)).changed == ()
    page, record = tmp_path / "validation.md", tmp_path / "zoo.json"
    main_with(_absent_entry, ["--out-md", str(page), "--json", str(record)], root=str(checkout))
    text = page.read_text()
    assert f"at commit {commit}." in text.split("Source: gradwatch ")[1].split("\n")[0]
    assert "uncommitted" not in text and "absent_net" in text
    assert json.loads(record.read_text())["source"] == {"version": source(str(checkout)).version,
                                                        "commit": commit, "dirty": False, "changed": []}


def test_publishing_from_a_changed_tree_is_refused_before_training(checkout, tmp_path, capsys):
    (checkout / "gradwatch" / "rules.py").write_text("THRESHOLD = 0.01\n")
    page = tmp_path / "validation.md"
    trained = []

    def entries(libraries=None):
        trained.append(True)
        return []

    with pytest.raises(SystemExit) as exit_:
        main_with(entries, ["--out-md", str(page)], root=str(checkout))
    assert exit_.value.code == 2 and not trained and not page.exists()
    err = capsys.readouterr().err
    assert "gradwatch/rules.py" in err and "--allow-dirty" in err


def test_allow_dirty_publishes_the_commit_and_the_json_lists_the_changes(checkout, tmp_path):
    (checkout / "gradwatch" / "rules.py").write_text("THRESHOLD = 0.01\n")
    page, record = tmp_path / "validation.md", tmp_path / "zoo.json"
    main_with(_absent_entry, ["--out-md", str(page), "--json", str(record), "--allow-dirty"], root=str(checkout))
    text = page.read_text()
    assert "uncommitted" not in text and "rules.py" not in text
    assert "--allow-dirty" in text  # the page's command line shows that it was allowed
    recorded = json.loads(record.read_text())["source"]
    assert recorded["dirty"] is True and recorded["changed"] == ["gradwatch/rules.py"]


def test_without_a_page_a_changed_tree_runs(checkout, tmp_path, capsys):
    (checkout / "gradwatch" / "rules.py").write_text("THRESHOLD = 0.01\n")
    assert main_with(_absent_entry, [], root=str(checkout)) == 0  # printed, not published
    assert "absent_net" in capsys.readouterr().out


def test_outside_a_git_checkout_the_source_is_the_version(tmp_path):
    src = source(str(tmp_path))
    assert src.commit is None and src.changed == () and src.text() == f"gradwatch {src.version}"
