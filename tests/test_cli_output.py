"""What a user sees on the terminal: our warnings as plain `warning: …` lines, no third-party chatter (unless
--debug), and user errors as one `error: …` line with exit status 2."""

import os
import subprocess
import sys

from PIL import Image


QUIETING = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS")


def run(*args):
    """The command as a user starts it: a fresh process whose environment has none of the quieting switches."""
    env = {k: v for k, v in os.environ.items() if k not in QUIETING}
    return subprocess.run([sys.executable, "-m", "ether_diffusion.cli", *args], capture_output=True, text=True, env=env)


def test_training_output_is_clean_and_warnings_are_plain_lines(tmp_path):
    data = tmp_path / "instance"
    data.mkdir()
    Image.new("RGB", (64, 64), "red").save(data / "a.png")
    (data / "b.png").write_text("not a picture")
    result = run("train", "dreambooth", "--instance-dir", str(data), "--instance-prompt", "a sks circle",
                 "--output-dir", str(tmp_path / "out"), "--max-steps", "2")
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.lstrip().startswith(("train:", "\r"))]
    lines = [ln for ln in lines if "step/s" not in ln and "it/s" not in ln]  # our progress bars stay
    assert lines == [f"warning: skipping {data / 'b.png'}: not a readable image (cannot identify image file "
                     f"'{data / 'b.png'}')"], lines
    assert "adapter written to" in result.stdout


def test_debug_keeps_library_messages(tmp_path):
    result = run("generate", "--prompt", "a red circle", "--out", str(tmp_path), "--steps", "1", "--debug")
    assert result.returncode == 0
    assert "Loading pipeline components" in result.stderr  # diffusers' own bar, hidden without --debug
    quiet = run("generate", "--prompt", "a red circle", "--out", str(tmp_path), "--steps", "1")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
