"""README.md and docs/: every relative link reaches a file and, where it names one, a heading; CI runs the README's
test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "d2" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def without_code_blocks(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    return {anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", without_code_blocks(page.read_text()), re.M)}


def broken_links(page: Path) -> list:
    broken = []
    for target in LINK.findall(without_code_blocks(page.read_text())):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, name = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif name and dest.suffix == ".md" and name not in anchors(dest):
            broken.append(f"{target}: no such heading")
    return broken


def test_anchor_follows_github():
    assert anchor("The Zen 4 in detail") == "the-zen-4-in-detail"
    assert anchor("Install, the demo, and where the outputs go") == "install-the-demo-and-where-the-outputs-go"
    assert anchor("`--fast` and speed") == "--fast-and-speed"


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [here](page.md#top) [gone](missing.md) [nowhere](#bottom)\n")
    assert broken_links(page) == ["missing.md: no such file", "#bottom: no such heading"]


def test_every_link_of_the_readme_and_docs_resolves():
    found = {str(page.relative_to(ROOT)): broken_links(page) for page in PAGES}
    assert {page: links for page, links in found.items() if links} == {}
    assert sum(len(LINK.findall(page.read_text())) for page in PAGES) > 40  # the pages do link


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    pytest_call = test_command.split("&& ")[-1]
    assert pytest_call == ".venv/bin/python -m pytest -q -n 2 --dist loadfile"
    assert pytest_call in (ROOT / ".ci" / "run").read_text().splitlines()
