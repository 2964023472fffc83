"""`--device` / `--dtype` on the commands: an absent accelerator is a one-line error (exit 2), a half-precision
base runs with fp32 adapter vectors, and the app's GPU offload refuses a CPU."""

import pytest
import torch

from ether_diffusion import AdapterConfig, EtherError, add_adapter
from ether_diffusion.cli import main
from ether_diffusion.inject import adapter_modules
from ether_diffusion.pipelines import load_ether_weights, load_pipeline, save_ether_weights
from ether_diffusion.runtime import resolve_device, resolve_dtype

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


@no_cuda
@pytest.mark.parametrize("command", [["generate", "--prompt", "a red circle", "--out", "OUT"], ["demo", "--out", "OUT"]])
def test_asking_for_an_absent_gpu_is_one_line_and_exit_2(command, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "o")) for a in command] + ["--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0]
    assert not (tmp_path / "o" / "ether_adapter.safetensors").exists()


def test_auto_is_cpu_fp32_here_and_fp16_on_cuda():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_dtype("auto", resolve_device("auto")) == torch.float32


def test_generate_in_bf16_keeps_vectors_fp32(tmp_path, capsys):
    pipe = load_pipeline()
    add_adapter(pipe.unet, "a", AdapterConfig(method="etherplus"))
    path = save_ether_weights(pipe, tmp_path / "a.safetensors", "a")
    half = load_pipeline(dtype=torch.bfloat16)
    load_ether_weights(half, path, "a")
    assert half.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for m in adapter_modules(half.unet, "a").values() for p in m.parameters())
    assert main(["generate", "--prompt", "a red circle on a white background", "--out", str(tmp_path / "img"),
                 "--adapter", str(path), "--steps", "2", "--device", "cpu", "--dtype", "bf16"]) == 0
    assert (tmp_path / "img" / "0-0.png").is_file()


def test_app_offload_needs_a_gpu(tmp_path):
    pytest.importorskip("gradio")
    from ether_diffusion.app import launch

    with pytest.raises(EtherError, match="--offload"):
        launch(None, tmp_path / "adapters", device="cpu", offload=True, block=False)
