"""The package as users get it: a built wheel installed into a fresh venv, run outside the source tree.

The venv reuses the already-installed dependencies through a path entry (so no download), but not this
checkout: `ether_diffusion` comes from the wheel alone, so a file left out of the wheel fails here.
"""

import os
import site
import stat
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((root / "dist").glob("ether_diffusion-*.whl"))
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # install the wheel with this interpreter's pip into the fresh venv's site-packages; deps via a path entry
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", purelib,
                    str(wheel)], check=True, capture_output=True)
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python, Path(purelib), root


def run_in(wheel_venv, code: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    python, _, root = wheel_venv
    return subprocess.run([python, "-c", f"import os; os.umask({umask:#o}); " + code], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})


def test_the_wheel_is_what_runs(wheel_venv):
    _, purelib, _ = wheel_venv
    result = run_in(wheel_venv, "import ether_diffusion; print(ether_diffusion.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(purelib)


def test_eval_prompts_ship_inside_the_package(wheel_venv):
    result = run_in(wheel_venv, "from ether_diffusion.evaluation import protocol_prompts; "
                                "print(len(protocol_prompts('sks', 'dog')), len(protocol_prompts('sks', 'dog', True)))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["25", "25"]


def test_exports_and_adapters_respect_the_umask(wheel_venv):
    """An export must be readable by a ComfyUI running as another user: mode 0644 under umask 022."""
    _, _, root = wheel_venv
    code = ("import torch; from ether_diffusion import AdapterConfig, add_adapter; "
            "from ether_diffusion.pipelines import load_pipeline, save_ether_weights; "
            "from ether_diffusion.export import export_lora; "
            "pipe = load_pipeline(); add_adapter(pipe.unet, 'a', AdapterConfig(method='ether')); "
            "save_ether_weights(pipe, 'adapter.safetensors', 'a'); export_lora(pipe, 'lora.safetensors', 'kohya')")
    result = run_in(wheel_venv, code)
    assert result.returncode == 0, result.stderr
    for name in ("adapter.safetensors", "lora.safetensors"):
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o644, name
    result = run_in(wheel_venv, "from ether_diffusion.atomic import atomic_write_text; atomic_write_text('p.txt', 'x')",
                    umask=0o077)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((root / "p.txt").stat().st_mode) == 0o600
