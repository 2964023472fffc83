"""apps/: the diffusers-style training script under accelerate (one and two processes), the README's multi-process
command, the model card, and the Gradio app as a program of its own."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("apps")
    from ether_diffusion.testing import tiny_sd_pipeline
    from ether_diffusion.toyworld import world
    import random

    tiny_sd_pipeline().save_pretrained(root / "tiny-sd")
    (root / "dog").mkdir()
    rng = random.Random(0)
    for i in range(3):
        world.render(world.subject_scene(rng, "striped-circle", "white")).resize((32, 32)).save(root / "dog" / f"{i}.png")
    return root


def the_issue_command(data, out):
    """diffusers' DreamBooth-LoRA command from the issue, sizes made small, both `--flag=value` and `--flag value`."""
    return [f"--pretrained_model_name_or_path={data / 'tiny-sd'}", "--instance_data_dir", str(data / "dog"),
            f"--output_dir={out}", "--instance_prompt=a photo of sks dog", "--resolution=32", "--train_batch_size=1",
            "--gradient_accumulation_steps", "1", "--learning_rate=1e-4", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", "--max_train_steps=4", "--checkpointing_steps=2",
            "--validation_prompt=a photo of sks dog in a bucket", "--validation_epochs=2", "--seed=0",
            "--mixed_precision=fp16", "--with_prior_preservation", f"--class_data_dir={out}-class",
            "--class_prompt=a photo of dog", "--num_class_images=2", "--prior_loss_weight=1.0",
            "--train_text_encoder", "--gradient_checkpointing", "--use_8bit_adam", "--resume_from_checkpoint=latest",
            "--report_to=tensorboard"]


def test_the_diffusers_command_trains_an_ether_adapter_under_accelerate(data, tmp_path):
    pytest.importorskip("bitsandbytes", reason="--use_8bit_adam needs bitsandbytes")
    out = tmp_path / "dog-ether"
    cmd = [*ACCELERATE, "--num_processes", "1", str(REPO / "apps" / "train_dreambooth_ether.py"),
           *the_issue_command(data, out), "--method", "etherplus", "--n_blocks=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("adapter written to") == 1
    for name in ("ether_adapter.safetensors", "README.md", "training_config.json", "checkpoint-2", "checkpoint-4"):
        assert (out / name).exists(), name
    assert list((out / "validation").glob("*.png"))  # every 2 epochs of 3 pictures: step 4 (and the last)
    settings = (out / "training_config.json").read_text()
    for expected in ('"max_steps": 4', '"n_blocks": 2', '"mixed_precision": "fp16"', '"use_8bit_adam": true',
                     '"train_text_encoder": true', '"validation_steps": 6'):
        assert expected in settings, expected
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    for key in ("base_model:", "library_name: ether-diffusion", "license:", "instance_prompt: \"a photo of sks dog\"",
                "tags:"):
        assert key in front, key
    assert "None" not in card and "sides=both" in card
    export = re.search(r"`(ether-diffusion export [^`]+)`", card).group(1)
    assert f"--base {data / 'tiny-sd'}" in export
    args = export.replace("ether_adapter.safetensors", str(out / "ether_adapter.safetensors")).replace(
        "lora.safetensors", str(tmp_path / "lora.safetensors")).split()[1:]
    from ether_diffusion.cli import main

    assert main(args) == 0 and (tmp_path / "lora.safetensors").is_file()  # the printed command works as printed


def test_flags_that_do_not_apply_are_refused_by_name(data, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "apps" / "train_dreambooth_ether.py"),
                             *the_issue_command(data, tmp_path / "x"), "--rank=4"], capture_output=True, text=True,
                            env=ENV)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --rank does not apply") and "--n_blocks" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("entry", ["script", "cli"])
def test_two_processes_on_cpu_as_the_readme_says_and_only_the_writer_says_so(data, tmp_path, entry):
    """`--multi_gpu` with `--num_processes 2` starts two CPU processes (gloo); `--cpu` would silently start one."""
    out = tmp_path / "ddp"
    if entry == "script":
        target = [str(REPO / "apps" / "train_dreambooth_ether.py"), f"--pretrained_model_name_or_path={data / 'tiny-sd'}",
                  f"--instance_data_dir={data / 'dog'}", f"--output_dir={out}", "--instance_prompt=a sks dog",
                  "--max_train_steps=2", "--checkpointing_steps=2"]
    else:
        target = ["-m", "ether_diffusion.cli", "train", "dreambooth", "--base", str(data / "tiny-sd"),
                  "--instance-dir", str(data / "dog"), "--output-dir", str(out), "--instance-prompt", "a sks dog",
                  "--max-steps", "2", "--checkpointing-steps", "2"]
    cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", *target]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("adapter written to") == 1
    import json

    assert json.loads((out / "training_summary.json").read_text())["processes"] == 2


def test_the_gradio_demo_is_the_app_and_serves_the_embedded_model(tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client

    front = (REPO / "apps" / "gradio_demo" / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "ETHER_ADAPTERS_DIR": str(tmp_path / "adapters"), "GRADIO_SERVER_PORT": str(port)}
    server = subprocess.Popen([sys.executable, str(REPO / "apps" / "gradio_demo" / "app.py")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = None
        for _ in range(120):
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert server.poll() is None, server.stdout.read()
                time.sleep(1)
        assert client is not None
        gallery, status = client.predict(prompt="a large red circle on a white background", steps=4, num_images=1,
                                         api_name="/generate")
        assert len(gallery) == 1 and Image.open(gallery[0]["image"]).size == (64, 64)
    finally:
        server.terminate()
        server.wait(timeout=30)
