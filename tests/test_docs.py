"""The benchmark page's tables are the results files' text, and the results files the docs cite exist.

docs/benchmarks.md includes its tables from benches/results/ (benches/render_docs.py, `make docs`):
these tests fail when a bench run changed a results file and the page was not re-rendered. Standard
library and pytest only, so they run without the compiled extension.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "benches" / "render_docs.py"


def render(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RENDER), *map(str, args)], capture_output=True, text=True, check=False
    )


def site(tmp_path: Path, page: str, results: dict[str, str]) -> Path:
    """A copy of the layout in tmp_path: docs/benchmarks.md holding page, benches/results/ the files."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "benches" / "results").mkdir(parents=True)
    for name, text in results.items():
        (tmp_path / "benches" / "results" / name).write_text(text, encoding="utf-8")
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.write_text(page, encoding="utf-8")
    return doc


def test_benchmarks_page_is_current():
    r = render("--check")
    assert r.returncode == 0, f"run `make docs`:\n{r.stdout}{r.stderr}"
    # The pages still include their results (a page whose markers were lost would pass the check).
    counts = dict(re.findall(r"docs/(\w+)\.md: (\d+) included results are current", r.stdout))
    assert int(counts.get("benchmarks", 0)) >= 13 and "tahoe" in counts and "cluster" in counts, r.stdout


def test_missing_results_file_is_an_error_naming_it(tmp_path):
    page = "# Benchmarks\n\n<!-- results: benches/results/nowhere.md -->\n<!-- end results -->\n"
    doc = site(tmp_path, page, {})
    for check in ([], ["--check"]):
        r = render("--doc", doc, "--root", tmp_path, *check)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "benches/results/nowhere.md" in r.stderr
    assert doc.read_text(encoding="utf-8") == page


def test_unclosed_region_is_an_error(tmp_path):
    doc = site(tmp_path, "<!-- results: benches/results/a.md -->\n\ntext\n", {"a.md": "| x |\n|---|\n"})
    r = render("--doc", doc, "--root", tmp_path, "--check")
    assert r.returncode == 2
    assert "benches/results/a.md" in r.stderr


def test_stale_region_is_found_then_rewritten(tmp_path):
    page = (
        "# Benchmarks\n\n## Section\n\nCommentary before.\n\n"
        "<!-- results: benches/results/a.md -->\n\n| x |\n|---|\n| 1 |\n\n<!-- end results -->\n\n"
        "Commentary after.\n\n"
        "<!-- results: benches/results/b.md -->\n\nb's text\n\n<!-- end results -->\n"
    )
    results = {
        "a.md": "# benches/bench_a.py\n\n| x |\n|---|\n| 2 |\n\n## Part two\nSee [the JSON](a.json), [b](b.md#top), "
        "[the site](https://example.org/x.md) and [above](#section).\n",
        "b.md": "b's text\n",
    }
    doc = site(tmp_path, page, results)

    r = render("--doc", doc, "--root", tmp_path, "--check")
    assert r.returncode == 1
    assert "benches/results/a.md" in r.stdout
    assert "benches/results/b.md" not in r.stdout  # current: not reported
    assert doc.read_text(encoding="utf-8") == page  # --check writes nothing

    r = render("--doc", doc, "--root", tmp_path)
    assert r.returncode == 0, r.stderr
    text = doc.read_text(encoding="utf-8")
    assert "| 2 |" in text and "| 1 |" not in text
    assert "bench_a.py" not in text  # the file's title: the page's section has its own heading
    assert "**Part two**\n\nSee" in text and "## Part two" not in text  # the page's outline stays its own
    assert "[the JSON](../benches/results/a.json)" in text
    assert "[b](../benches/results/b.md#top)" in text
    assert "(https://example.org/x.md)" in text and "(#section)" in text
    assert text.startswith("# Benchmarks\n\n## Section\n\nCommentary before.\n\n")
    assert "<!-- end results -->\n\nCommentary after.\n\n" in text
    assert list(tmp_path.joinpath("docs").iterdir()) == [doc]  # no temporary file left

    assert render("--doc", doc, "--root", tmp_path, "--check").returncode == 0
    assert render("--doc", doc, "--root", tmp_path).returncode == 0
    assert doc.read_text(encoding="utf-8") == text


# A path under benches/results/, up to its last word character (not a sentence's full stop).
CITED = re.compile(r"benches/results/[\w.-]*\w")


def test_cited_results_files_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = [
        f"{page.relative_to(ROOT)}: {path}"
        for page in pages
        for path in sorted(set(CITED.findall(page.read_text(encoding="utf-8"))))
        if not (ROOT / path).is_file()
    ]
    assert not missing, missing
