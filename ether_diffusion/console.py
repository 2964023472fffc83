"""How every entry point runs a command (`ether-diffusion`, the app, the apps/ programs): quiet third-party
libraries, user errors as one `error: …` line with exit status 2. Below the command layers, so each imports it."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from .errors import EtherError

PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as plain `warning: …` lines; other libraries' Python warnings are dropped."""
    if str(Path(filename).resolve()).startswith(PACKAGE_DIR):
        print(f"warning: {message}", file=sys.stderr)


def quiet_libraries() -> None:
    """Silence third-party chatter (transformers / diffusers advice, deprecations) for a clean command output;
    `--debug` keeps all of it. Set before those libraries are imported, so their loggers start quiet."""
    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars; our own progress bars stay
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.showwarning = _show_warning


def run_command(work, debug: bool = False) -> int:
    """Run a command's work as every entry point does (`ether-diffusion`, the apps/ programs): quiet libraries
    unless debugging, a user error as one `error: …` line and exit status 2, Ctrl-C as 130."""
    if not debug:
        quiet_libraries()
    try:
        work()
    except EtherError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
