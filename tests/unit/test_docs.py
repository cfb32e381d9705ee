"""Nothing in the docs goes stale silently: what is generated is checked, and every relative link resolves."""

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim import cli, config, querylog, reference, summary
from sim.errors import SimError

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_the_configuration_reference_is_current():
    """docs/reference.md is what `python -m sim.reference` writes from the code today."""
    assert (ROOT / "docs" / "reference.md").read_text() == reference.markdown() + "\n", (
        "docs/reference.md is stale: run python -m sim.reference")


def anchors(page: Path) -> Iterator[str]:
    """The anchors a Markdown page's headings get, as GitHub makes them: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered (fenced code is not headings)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    """Every relative link names a file that exists and, in a Markdown page, a heading's anchor that exists."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = page.parent / path if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in set(anchors(file))):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files or anchors: {broken}"


def test_the_errors_the_docs_show_are_what_the_cli_prints():
    """Each `$ python -m sim …` line a page follows with `error: …` still fails, with that message (… in the page
    stands for any text): the command's settings are loaded as the CLI loads them, and nothing runs."""
    shown = [(page.name, cmd.removeprefix("$ python -m sim "), out) for page in PAGES
             for cmd, out in zip(page.read_text().splitlines(), page.read_text().splitlines()[1:])
             if cmd.startswith("$ python -m sim ") and out.startswith("error: ")]
    assert len(shown) >= 3
    for page, args, out in shown:
        with pytest.raises(SimError) as raised:
            scenario, _, overrides = cli._split_args(shlex.split(args))
            config.load(scenario, overrides)
        pattern = ".*".join(re.escape(part) for part in out.split("…"))
        assert re.fullmatch(pattern, f"error: {raised.value}"), f"{page}: {args} prints error: {raised.value}"


def test_the_readme_links_every_page():
    linked = {(ROOT / t.split("#")[0]).resolve() for t in LINK.findall((ROOT / "README.md").read_text())}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_the_readmes_sample_output_is_what_the_benchmark_recorded():
    """The README's "what a run prints" is what the run benchmarks/runs.py recorded printed (its summary as the CLI
    formats it), not a copy typed by hand."""
    runs = json.loads((ROOT / "benchmarks" / "results" / "runs.json").read_text())
    printed = summary.format_summary(summary.parse(runs["runs"]["scenarios"]["distributed_knockoff"]["summary"]))
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- printed:", 1)[1].split("\n", 1)[1]
    assert block.startswith("```\n" + printed + "\n```\n"), "run python benchmarks/runs.py --report-only"


def test_the_reproducing_page_shows_the_table_the_benchmark_wrote():
    """docs/reproducing.md's table is benchmarks/results/replication.md's, not a copy typed by hand."""
    report = (ROOT / "benchmarks" / "results" / "replication.md").read_text()
    page = (ROOT / "docs" / "reproducing.md").read_text()
    block = page.split("<!-- replication table: written by benchmarks/replicate.py -->\n", 1)[1]
    block = block.split("<!-- end of replication table -->", 1)[0]
    assert block and report.endswith(block), "run python benchmarks/replicate.py --report-only"


def test_the_data_contracts_are_documented_column_by_column():
    """docs/analysis.md describes every column of the query log and every part of the summary."""
    text = (ROOT / "docs" / "analysis.md").read_text()
    missing = [c for c in querylog.COLUMNS if f"`{c}`" not in text]
    missing += [f for f in summary.Summary.model_fields if f"`{f}`" not in text]
    assert not missing, missing
