"""The docs cannot drift: every relative link in README.md and docs/ resolves to a file in the repository, and
docs/cli.md is exactly the reference the parsers generate, with every flag of every command in it."""

import argparse
import re
from pathlib import Path

import pytest

from ether_diffusion.cli_reference import parsers, reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "datasets").glob("**/README.md")), ROOT / "apps" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name}: {missing}"


def test_cli_reference_is_current_and_names_every_flag():
    text = (ROOT / "docs" / "cli.md").read_text()
    assert text == reference(), "docs/cli.md is stale: python -m ether_diffusion.cli_reference > docs/cli.md"
    for name, parser in parsers():
        assert f"## {name}\n" in text
        for action in parser._actions:
            for flag in action.option_strings:  # hidden ones too: the refused diffusers flags are listed
                if action.help != argparse.SUPPRESS or name.startswith("apps/"):
                    assert flag in text, (name, flag)
