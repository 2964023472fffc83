"""Datasets: the toy world rendered as an imagefolder or caption folder (`data render`), training from a dataset
(`--dataset-name` with diffusers' column flags) giving what the same pictures as a folder give, the column and row
errors, and the dataset cards in datasets/."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ether_diffusion import EtherError
from ether_diffusion.cli import main
from ether_diffusion.testing import tiny_sd_pipeline
from ether_diffusion.toyworld.subjects import get_subject
from ether_diffusion.train import ControlConfig, DreamBoothConfig, train_control, train_dreambooth

datasets = pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parents[1]
CARDS = ["dreambooth", "toyworld-subjects", "toyworld-control", "toyworld-base"]


def render(*args: str) -> None:
    assert main(["data", "render", *args]) == 0


def test_render_writes_imagefolders_that_datasets_loads(tmp_path):
    render("--kind", "subject", "--subject", "random", "--seed", "4", "--out", str(tmp_path / "s"))
    render("--kind", "control", "--control-kind", "edges", "--n", "3", "--out", str(tmp_path / "c"))
    render("--kind", "base", "--n", "4", "--out", str(tmp_path / "b"))
    subject = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "s"), split="train")
    assert subject.num_rows == 5 and all(t.startswith("a ") and " sks " in t for t in subject["text"])
    spec = get_subject("random-4")
    assert all(spec.class_word in t for t in subject["text"])
    control = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "c"), split="train")
    assert set(control.column_names) == {"image", "conditioning_image", "text"} and control.num_rows == 3
    assert control[0]["image"].size == control[0]["conditioning_image"].size == (64, 64)
    base = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "b"), split="train")
    assert base.num_rows == 4 and all(t.endswith("background") for t in base["text"])


def _dreambooth(out, **kw):
    settings = dict(instance_prompt="a sks ringed triangle", output_dir=str(out), max_steps=3, seed=1,
                    checkpointing_steps=100, resolution=32, train_text_encoder=True)
    return DreamBoothConfig(**{**settings, **kw})


def test_training_from_a_dataset_gives_the_adapter_the_same_pictures_as_a_folder_give(tmp_path):
    render("--kind", "subject", "--out", str(tmp_path / "dataset"))
    render("--kind", "subject", "--layout", "folder", "--out", str(tmp_path / "folder"))
    a = train_dreambooth(_dreambooth(tmp_path / "a", dataset_name=str(tmp_path / "dataset"), caption_column="text"),
                         pipe=tiny_sd_pipeline())
    b = train_dreambooth(_dreambooth(tmp_path / "b", instance_dir=str(tmp_path / "folder")), pipe=tiny_sd_pipeline())
    c = train_dreambooth(_dreambooth(tmp_path / "c", dataset_name=str(tmp_path / "dataset")), pipe=tiny_sd_pipeline())
    ta, tb, tc = load_file(a), load_file(b), load_file(c)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=0, rtol=0)
    # without --caption-column every picture is captioned with the instance prompt, so training differs
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


def test_control_training_from_a_dataset_matches_the_folder(tmp_path):
    render("--kind", "control", "--n", "8", "--seed", "2", "--out", str(tmp_path / "dataset"))
    render("--kind", "control", "--n", "8", "--seed", "2", "--layout", "folder", "--out", str(tmp_path / "folder"))
    common = dict(max_steps=2, train_batch_size=2, checkpointing_steps=100, resolution=32)
    a = train_control(ControlConfig(dataset_name=str(tmp_path / "dataset"), output_dir=str(tmp_path / "a"), **common),
                      pipe=tiny_sd_pipeline())
    b = train_control(ControlConfig(data_dir=str(tmp_path / "folder"), output_dir=str(tmp_path / "b"), **common),
                      pipe=tiny_sd_pipeline())
    ta, tb = load_file(a), load_file(b)
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=0, rtol=0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ether_diffusion.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("flags, problem", [
    (["--image-column", "picture"], "has no column 'picture' (its columns: image, text)"),
    (["--caption-column", "caption"], "has no column 'caption'"),
    (["--image-column", "text"], "row 1: column 'text' is not an image"),
])
def test_column_errors_exit_2_with_one_line(tmp_path, flags, problem):
    render("--kind", "subject", "--n", "2", "--out", str(tmp_path / "d"))
    done = _cli("train", "dreambooth", "--dataset-name", str(tmp_path / "d"), "--instance-prompt", "a sks x",
                "--output-dir", str(tmp_path / "o"), *flags)
    assert done.returncode == 2 and problem in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "o").exists()


def test_a_missing_picture_and_a_bad_control_column_are_named_by_row(tmp_path):
    render("--kind", "control", "--n", "3", "--out", str(tmp_path / "d"))
    (tmp_path / "d" / "conditioning" / "00001.png").unlink()
    done = _cli("train", "control", "--dataset-name", str(tmp_path / "d"), "--output-dir", str(tmp_path / "o"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "row 2: conditioning_image_file_name file not found: conditioning/00001.png" in done.stderr
    render("--kind", "control", "--n", "2", "--out", str(tmp_path / "e"))
    with pytest.raises(EtherError, match="has no column 'hint'"):
        train_control(ControlConfig(dataset_name=str(tmp_path / "e"), conditioning_image_column="hint",
                                    output_dir=str(tmp_path / "p")))


def test_folder_and_dataset_together_or_neither_is_refused(tmp_path):
    for kw in (dict(), dict(instance_dir="x", dataset_name="y")):
        with pytest.raises(EtherError, match="one of them"):
            _dreambooth(tmp_path, **kw).validate()


def test_without_the_datasets_library_one_line_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    from ether_diffusion.data import load_dataset_examples

    with pytest.raises(EtherError, match=r"pip install 'ether-diffusion\[datasets\]'"):
        load_dataset_examples(str(tmp_path), "image", None, "a sks x")


@pytest.mark.parametrize("name", CARDS)
def test_dataset_cards_have_front_matter_that_parses(name):
    text = (ROOT / "datasets" / name / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] and meta["task_categories"] and meta["size_categories"] and meta["pretty_name"]


def test_the_dreambooth_lists_exist_once_and_are_the_ones_eval_uses():
    from ether_diffusion.evaluation import protocol_prompts

    folder = ROOT / "datasets" / "dreambooth"
    prompts = json.loads((folder / "prompts.json").read_text())
    assert (folder / "prompts.json").resolve() == (ROOT / "ether_diffusion/resources/dreambooth_prompts.json")
    assert len(prompts["object"]) == len(prompts["live"]) == 25 and len(prompts["subjects"]) == 30
    assert protocol_prompts("sks", "dog") == [t.format(token="sks", cls="dog") for t in prompts["object"]]
    assert prompts["subjects"]["dog"] == "dog" and prompts["subjects"]["wolf_plushie"] == "stuffed animal"


def test_the_diffusers_style_script_takes_the_dataset_and_timestep_bias_flags(tmp_path):
    from ether_diffusion.train.diffusers_flags import config_from_args

    cfg = config_from_args(["--dataset_name", str(tmp_path), "--image_column", "img", "--caption_column", "prompt",
                            "--instance_prompt", "a sks dog", "--output_dir", str(tmp_path / "o"),
                            "--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "2"])
    assert (cfg.dataset_name, cfg.image_column, cfg.caption_column) == (str(tmp_path), "img", "prompt")
    assert (cfg.timestep_bias_strategy, cfg.timestep_bias_multiplier) == ("later", 2.0)
