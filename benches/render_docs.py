"""Include the bench scripts' results files in docs/*.md (benchmarks.md, tahoe.md, cluster.md), so their tables are the scripts' output.

Why (issue 24, item 5): the page's tables used to be copied from ``benches/results/`` by hand, and a
hand copy drifts from the file it was copied from (a rerun, a reshaped column, a rounded number). The
page now marks each table it takes from a results file with two comment lines, which Markdown does not
show::

    <!-- results: benches/results/NAME.md -->
    (the text of benches/results/NAME.md, written here by this script)
    <!-- end results -->

``python benches/render_docs.py`` (``make docs``, after a bench run) replaces every such region with the
file's current text and writes the page in place: a temporary file beside it, then a rename, so the
page is never left half written. ``--check`` writes nothing; it exits 1 naming each region that differs
from its file (``tests/test_docs.py`` runs it, so a page left behind its results fails the tests). A
marker naming a file that does not exist, an end marker without its start or a start without its end
is an error (exit 2) naming it.

The included text is fitted to its place: its first line is dropped when it is a Markdown ``#`` title
(the page's section has its own heading); its other headings become bold lines, so that the page's
outline stays its own and the commentary after a region stays in its section; relative links are
rewritten to resolve from the page's folder (``[x](foo.md)`` in benches/results becomes
``[x](../benches/results/foo.md)`` in docs/). Everything outside the regions is left byte for byte.
Standard library only: it runs without the compiled extension or the bench dependencies.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"

BEGIN = re.compile(r"<!-- results: (?P<path>\S+) -->")
END = "<!-- end results -->"
HEADING = re.compile(r"^ {0,3}(?P<hashes>#{1,6})(?:[ \t]+(?P<text>.*?))?(?:[ \t]+#+)?[ \t]*$")
FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})(?P<rest>.*)$")
# An inline link's or image's target, and a reference definition's: [text](target), [label]: target.
INLINE_LINK = re.compile(r"(?P<head>!?\[[^\]]*\]\(\s*)(?P<target>[^)\s]+)")
REFERENCE = re.compile(r"^(?P<head> {0,3}\[[^\]]+\]:[ \t]*)(?P<target>\S+)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class RenderError(Exception):
    """A marker the page cannot be rendered with (missing file, unpaired marker)."""


@dataclass
class Region:
    """One marked region: the file it includes, where it starts, and whether its text is current."""

    path: str
    line: int
    stale: bool


def _fences(lines: list[str]):
    """Yield (line, inside_fence) for each line, a fence's own opening and closing lines counted inside."""
    fence = None
    for line in lines:
        m = FENCE.match(line)
        if fence is None:
            if m and not (m["fence"][0] == "`" and "`" in m["rest"]):
                fence = m["fence"]
                yield line, True
            else:
                yield line, False
        else:
            if m and m["fence"][0] == fence[0] and len(m["fence"]) >= len(fence) and not m["rest"].strip():
                fence = None
            yield line, True


def _relink(target: str, src_dir: Path, doc_dir: Path) -> str:
    """A relative link target of a file in src_dir, made relative to doc_dir (absolute ones unchanged)."""
    if SCHEME.match(target) or target.startswith(("#", "/")):
        return target
    path, sep, fragment = target.partition("#")
    if not path:
        return target
    moved = Path(os.path.relpath(src_dir / path, doc_dir)).as_posix()
    return moved + sep + fragment


def included_lines(src: Path, doc_dir: Path) -> list[str]:
    """The text a region holds for results file src, fitted to a page in doc_dir."""
    lines = src.read_text(encoding="utf-8").split("\n")
    if lines and (m := HEADING.match(lines[0])) and len(m["hashes"]) == 1:
        lines = lines[1:]
    out: list[str] = []
    after_heading = False
    for line, fenced in _fences(lines):
        if not fenced and (m := HEADING.match(line)):
            # A heading is a block of its own: as a bold line it needs a blank line on each side.
            if out and out[-1].strip():
                out.append("")
            out.append(f"**{m['text']}**" if m["text"] else "")
            after_heading = True
            continue
        if after_heading and line.strip():
            out.append("")
        after_heading = False
        if not fenced:
            line = INLINE_LINK.sub(lambda k: k["head"] + _relink(k["target"], src.parent, doc_dir), line)
            line = REFERENCE.sub(lambda k: k["head"] + _relink(k["target"], src.parent, doc_dir), line)
        out.append(line)
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    return out


def render(text: str, doc: Path, root: Path) -> tuple[str, list[Region]]:
    """The page's text with every region refilled from its file, and the regions found."""
    lines = text.split("\n")
    name = _shown(doc, root)
    out: list[str] = []
    regions: list[Region] = []
    begin = None  # (line index, path) of the region being skipped
    for i, (line, fenced) in enumerate(_fences(lines)):
        stripped = line.strip()
        if begin is not None:
            if stripped == END:
                start, path = begin
                src = root / path
                new = ["", *included_lines(src, doc.parent), ""]
                regions.append(Region(path, start + 1, lines[start + 1 : i] != new))
                out.extend(new)
                out.append(line)
                begin = None
            elif BEGIN.fullmatch(stripped):
                raise RenderError(f"{name}:{begin[0] + 1}: {begin[1]}'s region has no {END} before the next marker")
            continue
        if fenced:
            out.append(line)
        elif m := BEGIN.fullmatch(stripped):
            if not (root / m["path"]).is_file():
                raise RenderError(f"{name}:{i + 1}: {m['path']} does not exist")
            begin = (i, m["path"])
            out.append(line)
        elif stripped == END:
            raise RenderError(f"{name}:{i + 1}: {END} without a <!-- results: ... --> line before it")
        else:
            out.append(line)
    if begin is not None:
        raise RenderError(f"{name}:{begin[0] + 1}: {begin[1]}'s region has no {END}")
    return "\n".join(out), regions


def _shown(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def write_atomically(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a region is stale")
    parser.add_argument("--doc", type=Path, action="append",
                        help="a page (repeatable; default: every docs/*.md of the repository)")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the folder the markers' paths start from (default: the repository)"
    )
    args = parser.parse_args(argv)
    worst = 0
    for doc in args.doc or sorted(DOC.parent.glob("*.md")):
        worst = max(worst, _one(doc, args.root, args.check))
    return worst


def _one(doc: Path, root: Path, check: bool) -> int:
    """Render or check one page: 0 current (or rewritten), 1 stale (--check), 2 an error."""
    name = _shown(doc, root)
    try:
        text = doc.read_bytes().decode("utf-8")
        new, regions = render(text, doc, root)
    except (OSError, RenderError) as e:
        print(f"render_docs.py: error: {e}", file=sys.stderr)
        return 2
    if not regions:
        return 0
    stale = [r for r in regions if r.stale]
    if check:
        for r in stale:
            print(f"{name}:{r.line}: the region of {r.path} differs from the file (run `make docs`)")
        if stale:
            print(f"{name}: {len(stale)} of {len(regions)} included results are stale")
            return 1
        print(f"{name}: {len(regions)} included results are current")
        return 0
    if new != text:
        write_atomically(doc, new)
        print(f"{name}: rewrote {len(stale)} of {len(regions)} included results")
    else:
        print(f"{name}: {len(regions)} included results are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
