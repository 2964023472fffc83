"""A pipeline whose denoiser is not a UNet (FLUX.1, SD3: real pipelines built from configs, saved, loadable by
diffusers) is refused in one line that names it and the supported ones, before any weight is loaded."""

import subprocess
import sys

import pytest

from ether_diffusion import EtherError
from ether_diffusion.pipelines import load_pipeline
from ether_diffusion.testing import tiny_flux_pipeline, tiny_sd3_pipeline


@pytest.fixture(scope="module")
def dit_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    tiny_flux_pipeline().save_pretrained(root / "flux")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    return root


def test_the_tiny_dit_pipelines_are_real_ones(dit_bases):
    from diffusers import DiffusionPipeline

    assert type(DiffusionPipeline.from_pretrained(dit_bases / "flux")).__name__ == "FluxPipeline"
    assert type(DiffusionPipeline.from_pretrained(dit_bases / "sd3")).__name__ == "StableDiffusion3Pipeline"


@pytest.mark.parametrize("kind, name, denoiser", [("flux", "FluxPipeline", "FluxTransformer2DModel"),
                                                   ("sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel")])
def test_load_pipeline_refuses_them_by_name(dit_bases, kind, name, denoiser):
    with pytest.raises(EtherError, match=rf"{name} \(denoiser: {denoiser}\) is not supported.*StableDiffusionPipeline"):
        load_pipeline(str(dit_bases / kind))


@pytest.mark.parametrize("command", [
    ["train", "dreambooth", "--base", "{flux}", "--instance-dir", "{inst}", "--instance-prompt", "a sks dog",
     "--output-dir", "{out}"],
    ["generate", "--base", "{sd3}", "--prompt", "a dog", "--out", "{out}"],
    ["export", "{adapter}", "--to", "lora", "--base", "{flux}", "--out", "{out}/x.safetensors"],
])
def test_commands_exit_2_with_one_line_instead_of_a_traceback(dit_bases, tmp_path, command):
    from test_pipeline_verbs import make_file

    inst = tmp_path / "inst"
    inst.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(inst / "a.png")
    values = {"flux": dit_bases / "flux", "sd3": dit_bases / "sd3", "inst": inst, "out": tmp_path / "out",
              "adapter": make_file(tmp_path / "a.safetensors", 1)}
    args = [part.format(**values) for part in command]
    done = subprocess.run([sys.executable, "-m", "ether_diffusion.cli", *args], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not supported" in lines[0] and "Traceback" not in done.stderr, done.stderr
