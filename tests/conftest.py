"""Tiny pipelines built from configs with random weights: no network, seconds to build."""

import os

import pytest
import torch

from ether_diffusion.testing import tiny_sd_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_pipe():
    return tiny_sd_pipeline()


@pytest.fixture
def tiny_pipe_dir(tmp_path):
    pipe = tiny_sd_pipeline()
    path = tmp_path / "tiny-sd"
    pipe.save_pretrained(path)
    return path
