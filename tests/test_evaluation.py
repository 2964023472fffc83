"""`ether-diffusion eval` plumbing with tiny random backbones built from configs: the DreamBooth prompt list, the
DINO / CLIP-I / CLIP-T arithmetic against a direct computation, generation with recorded seeds, errors."""

import json

import pytest
import torch
from PIL import Image

from ether_diffusion.cli import main as cli_main
from ether_diffusion.evaluation import Backbones, Sample, protocol_prompts, score
from ether_diffusion.lpips import Lpips, diversity, locate
from ether_diffusion.testing import random_lpips_weights, tiny_backbones, tiny_sd_pipeline
from ether_diffusion.toyworld import world


@pytest.fixture(scope="module")
def backbones_dirs(tmp_path_factory):
    return tiny_backbones(tmp_path_factory.mktemp("backbones"))


def _pictures(n, seed, subject=None):
    import random

    rng = random.Random(seed)
    scenes = [world.subject_scene(rng, subject) if subject else world.random_scene(rng) for _ in range(n)]
    return [world.render(s) for s in scenes]


def test_protocol_has_the_25_dreambooth_prompts():
    objects, live = protocol_prompts("sks", "dog"), protocol_prompts("sks", "dog", live=True)
    assert len(objects) == len(live) == 25
    assert objects[0] == "a sks dog in the jungle" and live[10] == "a sks dog wearing a red hat"
    assert objects[-1] == live[-1] == "a cube shaped sks dog"


def test_scores_match_a_direct_computation(backbones_dirs):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    dino_dir, clip_dir = backbones_dirs
    generated = [Sample(im, "a sks circle on a white background") for im in _pictures(3, 1)]
    references = _pictures(2, 2, "striped-circle")
    report = score(generated, references, Backbones(dino_dir, clip_dir), token="sks")

    dino, dino_proc = AutoModel.from_pretrained(dino_dir), AutoImageProcessor.from_pretrained(dino_dir)
    clip, clip_proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)

    def cls(images):
        with torch.no_grad():
            return dino(pixel_values=dino_proc(images=images, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]

    def clip_image(images):
        with torch.no_grad():
            out = clip.get_image_features(pixel_values=clip_proc(images=images, return_tensors="pt")["pixel_values"])
        return getattr(out, "pooler_output", out)

    gen = [s.image for s in generated]
    cos = torch.nn.functional.cosine_similarity
    expected_dino = torch.stack([cos(a[None], cls(references)) for a in cls(gen)]).mean()
    expected_clip_i = torch.stack([cos(a[None], clip_image(references)) for a in clip_image(gen)]).mean()
    tokens = clip_proc(text=["a circle on a white background"], return_tensors="pt", padding=True)
    with torch.no_grad():
        text = clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    expected_clip_t = cos(clip_image(gen), getattr(text, "pooler_output", text)).mean()
    assert report["dino"] == pytest.approx(float(expected_dino), abs=1e-5)
    assert report["clip_i"] == pytest.approx(float(expected_clip_i), abs=1e-5)
    assert report["clip_t"] == pytest.approx(float(expected_clip_t), abs=1e-5)
    same = score([Sample(im, "x") for im in references], references[:1] * 2, Backbones(dino_dir, clip_dir))
    assert same["dino"] < 1.0 - 1e-4  # two different references: not a trivial 1
    identical = score([Sample(references[0], "x")], references[:1], Backbones(dino_dir, clip_dir))
    assert identical["dino"] == pytest.approx(1.0, abs=1e-5) and identical["clip_i"] == pytest.approx(1.0, abs=1e-5)


def test_cli_generates_with_recorded_seeds_and_scores(backbones_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # `--lpips auto` finds nothing there
    dino_dir, clip_dir = backbones_dirs
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, im in enumerate(_pictures(2, 3, "striped-circle")):
        im.save(refs / f"{i}.png")
    base = tmp_path / "base"
    tiny_sd_pipeline().save_pretrained(base)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"object": ["a {token} {cls} on a white background", "a red {token} {cls}"]}))
    out = tmp_path / "eval"
    assert cli_main(["eval", "--references", str(refs), "--base", str(base), "--token", "sks", "--class-word",
                     "circle", "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "2", "--seed", "5",
                     "--dino", dino_dir, "--clip", clip_dir, "--out", str(out)]) == 0
    manifest = json.loads((out / "images" / "manifest.json").read_text())
    assert [m["seed"] for m in manifest] == [5, 6, 7, 8]
    assert manifest[2]["prompt"] == "a red sks circle" and (out / "images" / manifest[2]["file"]).is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["generated"] == 4 and -1 <= report["dino"] <= 1 and "| DINO |" in (out / "report.md").read_text()
    assert report["lpips_diversity"] is None and "LPIPS diversity skipped" in capsys.readouterr().err
    again, lpips_dir = tmp_path / "again", tmp_path / "lpips"
    random_lpips_weights(lpips_dir)
    assert cli_main(["eval", "--references", str(refs), "--images", str(out / "images"), "--token", "sks",
                     "--dino", dino_dir, "--clip", clip_dir, "--lpips", str(lpips_dir), "--out", str(again)]) == 0
    rescored = json.loads((again / "report.json").read_text())
    for key in ("dino", "clip_i", "clip_t"):
        assert rescored[key] == pytest.approx(report[key], abs=1e-5)
    model = Lpips.from_files(*locate(lpips_dir))
    pictures = [Image.open(out / "images" / m["file"]) for m in manifest]
    expected = diversity(model, pictures, [m["prompt"] for m in manifest])
    assert expected > 0 and rescored["lpips_diversity"] == pytest.approx(expected, rel=1e-5)
    assert cli_main(["eval", "--references", str(refs), "--images", str(out / "images"), "--dino", dino_dir,
                     "--clip", clip_dir, "--lpips", str(tmp_path / "nowhere"), "--out", str(again)]) == 2
    assert "LPIPS weights not found" in capsys.readouterr().err


def test_unavailable_backbone_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.new("RGB", (32, 32)).save(refs / "0.png")
    code = cli_main(["eval", "--references", str(refs), "--images", str(refs), "--dino", "nobody/no-such-model",
                     "--out", str(tmp_path / "o")])
    assert code == 2 and "could not load the DINO backbone 'nobody/no-such-model'" in capsys.readouterr().err
