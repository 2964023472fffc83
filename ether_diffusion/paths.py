"""Default locations: where training writes adapters and the app looks for them, unless told otherwise."""

from __future__ import annotations

import os
import re
from pathlib import Path


def default_adapters_dir() -> Path:
    """$XDG_DATA_HOME/ether-diffusion/adapters (~/.local/share/ether-diffusion/adapters)."""
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "ether-diffusion" / "adapters"


def default_output_dir(instance_prompt: str) -> Path:
    """A run folder named after the prompt, e.g. .../adapters/a-photo-of-sks-dog."""
    slug = re.sub(r"[^a-z0-9]+", "-", instance_prompt.lower()).strip("-")[:60] or "adapter"
    return default_adapters_dir() / slug
