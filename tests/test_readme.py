"""The README is a front door: short, its links lead somewhere, and its numbers are the scripts'.

Every number in the README's benchmark table must appear in the results file its row cites, so a
rerun of a benchmark that changes a figure fails here until the README says what the script says.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# A number as the tables write them: 0.828, 3,045, 125, 1.9; not the "1M" of a row's label.
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?![\w.])")


def _benchmark_rows() -> list[str]:
    text = README.read_text()
    section = text.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "benches/results/" in line]


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; long reference goes to docs/"
    for heading in ("## Install", "## Two commands", "## Quickstart: Polars", "## Quickstart: scanpy",
                    "## Data layout", "## Limitations", "## License"):
        assert heading in lines, f"README.md lost its {heading!r} section"


def test_readme_benchmark_numbers_come_from_the_results_files():
    rows = _benchmark_rows()
    assert len(rows) >= 5, "the README's benchmark table is gone or lost its citations"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        source = re.search(r"benches/results/[\w.-]+\.md", cells[-1])
        assert source, f"row cites no results file: {row}"
        results = (ROOT / source.group(0)).read_text()
        figures = [n for cell in cells[1:-1] for n in NUMBER.findall(cell)]
        assert figures, f"row has no figures: {row}"
        missing = [n for n in figures if not re.search(rf"(?<![\d.,]){re.escape(n)}(?![\d])", results)]
        assert not missing, f"{source.group(0)} does not contain {missing} (README row: {cells[0]})"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name} links to missing files: {broken}"
