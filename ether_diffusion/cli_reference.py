"""The command-line reference (docs/cli.md), written from the argparse parsers themselves so that it cannot drift:

    python -m ether_diffusion.cli_reference > docs/cli.md

tests/test_docs.py checks that docs/cli.md is what this prints and that every flag of every command is in it.
"""

from __future__ import annotations

import argparse
import os

WIDTH = "110"  # argparse wraps help to the terminal's width: a fixed one keeps the file the same everywhere


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command that runs (the leaves of the subcommand tree), with its full name, in declaration order."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return [(" ".join(path), parser)]
    return [leaf for name, sub in subparsers[0].choices.items() for leaf in commands(sub, (*path, name))]


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """`ether-diffusion …` commands, then apps/train_dreambooth_ether.py."""
    from .cli import build_parser
    from .train.diffusers_flags import build_parser as diffusers_parser

    return [*(("ether-diffusion " + name, p) for name, p in commands(build_parser())),
            ("apps/train_dreambooth_ether.py", diffusers_parser())]


def reference() -> str:
    os.environ["COLUMNS"] = WIDTH
    lines = ["# Command-line reference", "",
             "Every command's `--help`, generated from the parsers (`python -m ether_diffusion.cli_reference > "
             "docs/cli.md`; a test keeps it current). Guides: [README](../README.md), [docs](README.md).", ""]
    lines += [f"- [`{name}`](#{name.replace(' ', '-').replace('/', '').replace('.', '')})"
              for name, _ in parsers()]
    for name, parser in parsers():
        parser.prog = name
        lines += ["", f"## {name}", "", "```text", parser.format_help().rstrip(), "```"]
    from .train.diffusers_flags import REFUSED

    lines += ["", "Flags of diffusers' script that do not apply to ETHER are refused by name, with the reason:", ""]
    lines += [f"- `--{flag}`: {reason}" for flag, reason in REFUSED.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
