"""The Gradio app on a tiny pipeline: API calls through gradio_client, and a real headless-Chromium session."""

import shutil
import socket
import threading

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

import torch  # noqa: E402

from ether_diffusion.adapter_file import save_adapter  # noqa: E402
from ether_diffusion.app import NONE, build_app  # noqa: E402
from ether_diffusion.control import build_encoder, encoder_config  # noqa: E402
from ether_diffusion.ether import SWEEP_STRENGTHS  # noqa: E402
from ether_diffusion.studio import Request, Studio  # noqa: E402
from ether_diffusion.testing import tiny_sd_pipeline  # noqa: E402
from ether_diffusion.toyworld import world  # noqa: E402
from ether_diffusion.train import DreamBoothConfig, train_dreambooth  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    instance = root / "instance"
    instance.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), colour).save(instance / f"{i}.png")
    adapters = root / "adapters"
    for name, seed in (("first", 0), ("second", 1)):
        train_dreambooth(DreamBoothConfig(instance_dir=str(instance), instance_prompt=f"a {name} sks circle",
                                          output_dir=str(adapters / name), max_steps=3, seed=seed,
                                          method="ether", learning_rate=0.5), pipe=tiny_sd_pipeline())
        for extra in (adapters / name).glob("checkpoint-*"):
            shutil.rmtree(extra)
    control_pipe = tiny_sd_pipeline()
    config = encoder_config(control_pipe.unet, control_pipe.vae_scale_factor)
    encoder = build_encoder(config)
    with torch.no_grad():
        encoder.conv_out.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_adapter(adapters / "z-control" / "seg.safetensors", {"unet": control_pipe.unet}, "seg",
                 control=("segmentation", config, encoder))
    world.render_segmentation(world.Scene("square", ("red",), "white", "large", 20.0, 40.0, 14.0)).save(root / "map.png")
    studio = Studio(tiny_sd_pipeline(), adapters)
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False)
    yield f"http://127.0.0.1:{port}/", studio, root
    app.close()


def call(client, prompt="a red circle", adapters=(), mode="single", n=1, seed=3, control=None):
    slots = [NONE, NONE, NONE]
    strengths = [1.0, 1.0, 1.0]
    for i, (name, s) in enumerate(adapters):
        slots[i], strengths[i] = name, s
    gallery, status = client.predict(prompt, "", seed, False, 4, 7.5, "DDIM", n, 32, mode, *slots, *strengths,
                                     handle_file(str(control)) if control else None, api_name="/generate")
    return [np.asarray(Image.open(item["image"])) for item in gallery], status


def test_generate_with_and_without_adapters(served):
    url, studio, _ = served
    client = Client(url, verbose=False)
    names = studio.list_adapters()
    assert names == ["first/ether_adapter.safetensors", "second/ether_adapter.safetensors", "z-control/seg.safetensors"]
    base, status = call(client)
    assert "seed 3" in status
    adapted, _ = call(client, adapters=[(names[0], 1.0)])
    assert np.abs(base[0].astype(int) - adapted[0]).max() > 0
    zero, _ = call(client, adapters=[(names[0], 0.0)])
    assert np.abs(base[0].astype(int) - zero[0]).max() <= 1
    compare, _ = call(client, adapters=[(names[0], 1.0)], mode="compare", n=2)
    assert len(compare) == 4 and np.array_equal(compare[0], base[0]) and np.array_equal(compare[1], adapted[0])
    sweep, _ = call(client, adapters=[(names[0], 1.0)], mode="sweep")
    method = studio.describe(names[0])["method"]
    strengths = SWEEP_STRENGTHS[method]
    assert len(sweep) == len(strengths) and np.abs(sweep[0].astype(int) - base[0]).max() <= 1
    assert studio.sweep_strengths(studio.ensure_loaded(names[0])) == strengths


def test_control_adapter_needs_and_follows_a_control_image(served):
    url, studio, root = served
    client = Client(url, verbose=False)
    assert studio.describe("z-control/seg.safetensors")["control"] == "segmentation"
    base, _ = call(client)
    controlled, _ = call(client, adapters=[("z-control/seg.safetensors", 1.0)], control=root / "map.png")
    assert not np.array_equal(base[0], controlled[0])
    compare, _ = call(client, adapters=[("z-control/seg.safetensors", 1.0)], control=root / "map.png", mode="compare")
    assert np.array_equal(compare[0], base[0]) and np.array_equal(compare[1], controlled[0])
    with pytest.raises(Exception, match=r"need a control image: z-control/seg.safetensors \(segmentation\)"):
        call(client, adapters=[("z-control/seg.safetensors", 1.0)])  # the user's name, not an internal one


def test_corrupt_upload_is_refused_and_the_app_keeps_working(served):
    url, studio, root = served
    client = Client(url, verbose=False)
    before = studio.list_adapters()
    bad = root / "broken.safetensors"
    bad.write_bytes(b"this is not an adapter")
    result = client.predict(handle_file(str(bad)), api_name="/upload")
    assert "Upload refused" in result[-1] and "not a readable safetensors file" in result[-1]
    assert studio.list_adapters() == before
    good = root / "adapters" / "first" / "ether_adapter.safetensors"
    shutil.copy(good, root / "copy.safetensors")
    result = client.predict(handle_file(str(root / "copy.safetensors")), api_name="/upload")
    added = result[-1].split("`")[1]
    assert added.startswith("uploads/") and added.endswith("-copy.safetensors")
    images, _ = call(client, adapters=[(added, 1.0)])
    assert images[0].shape == (32, 32, 3)


def test_concurrent_requests_get_their_own_adapters(served):
    url, studio, _ = served
    names = studio.list_adapters()[:2]
    expected = {n: call(Client(url, verbose=False), adapters=[(n, 1.0)])[0][0] for n in names}
    results = {}

    def worker(name):
        results[name] = call(Client(url, verbose=False), adapters=[(name, 1.0)])[0][0]

    threads = [threading.Thread(target=worker, args=(n,)) for n in names for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in names:
        assert np.array_equal(results[n], expected[n])


def test_the_ui_cannot_reach_files_outside_the_adapters_folder(served):
    _, studio, root = served
    from ether_diffusion.errors import EtherError

    for name in ("../instance/0.png", str(root / "adapters" / "first" / "ether_adapter.safetensors"), "/etc/passwd"):
        with pytest.raises(EtherError, match="no adapter named"):
            studio.resolve(name)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_real_browser_picks_an_adapter_and_generates(served, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    url, studio, _ = served
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page()
        page.goto(url)
        # the first screen: prompt, Generate and the adapter picker together at the top, uploads folded away
        for element in ("#prompt", "#generate", "#adapter0"):
            box = page.locator(element).bounding_box()
            assert box is not None and box["y"] + box["height"] < 360, (element, box)
        assert not page.locator("#upload").is_visible() and not page.locator("#control-image").is_visible()
        page.locator("#adapter0 input").click()
        page.get_by_role("option", name=studio.list_adapters()[0]).click()
        page.locator("#adapter-info").get_by_text("trigger").wait_for(timeout=30_000)
        page.locator("#prompt textarea").fill("a sks circle on a white background")
        page.locator("#generate").click()
        page.locator("#gallery img").first.wait_for(timeout=120_000)
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        assert page.locator("#gallery img").count() >= 1 and shot.stat().st_size > 0
        browser.close()


def test_uploads_with_the_same_file_name_keep_both_and_serve_their_own_vectors(served):
    """Two different `ether_adapter.safetensors` uploads: both kept, each generating with its own adapter."""
    _, studio, root = served
    picks = []
    for sub in ("first", "second"):
        folder = root / "incoming" / sub
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "adapters" / sub / "ether_adapter.safetensors", folder / "ether_adapter.safetensors")
        picks.append(studio.add_upload(folder / "ether_adapter.safetensors"))
    assert picks[0] != picks[1] and all(p in studio.list_adapters() for p in picks)
    assert studio.add_upload(root / "incoming" / "first" / "ether_adapter.safetensors") == picks[0]  # kept once
    req = Request(prompt="a sks circle", seed=3, steps=2, num_images=1)
    from_uploads = [studio.run(req, [(p, 1.0)])[0][0] for p in picks]
    originals = [studio.run(req, [(f"{sub}/ether_adapter.safetensors", 1.0)])[0][0] for sub in ("first", "second")]
    for a, b in zip(from_uploads, originals):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_rewritten_file_is_reloaded_not_served_from_the_cache(served, tmp_path):
    _, studio, root = served
    target = root / "adapters" / "swap" / "ether_adapter.safetensors"
    target.parent.mkdir(exist_ok=True)
    shutil.copy(root / "adapters" / "first" / "ether_adapter.safetensors", target)
    req = Request(prompt="a sks circle", seed=3, steps=2, num_images=1)
    before = np.asarray(studio.run(req, [("swap/ether_adapter.safetensors", 1.0)])[0][0])
    shutil.copy(root / "adapters" / "second" / "ether_adapter.safetensors", target)
    after = np.asarray(studio.run(req, [("swap/ether_adapter.safetensors", 1.0)])[0][0])
    second = np.asarray(studio.run(req, [("second/ether_adapter.safetensors", 1.0)])[0][0])
    assert np.array_equal(after, second) and not np.array_equal(before, after)
    shutil.rmtree(target.parent)


def test_bad_links_and_unfinished_checkpoints_are_not_offered(tmp_path):
    adapters = tmp_path / "adapters"
    (adapters / "run" / ".checkpoint-5.tmp").mkdir(parents=True)
    pipe = tiny_sd_pipeline()
    from ether_diffusion import AdapterConfig, add_adapter

    add_adapter(pipe.unet, "x", AdapterConfig(method="ether"))
    good = save_adapter(adapters / "run" / "ether_adapter.safetensors", {"unet": pipe.unet}, "x")
    shutil.copy(good, adapters / "run" / ".checkpoint-5.tmp" / "adapter.safetensors")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(good, outside)
    (adapters / "escape.safetensors").symlink_to(outside)
    (adapters / "dangling.safetensors").symlink_to(tmp_path / "missing.safetensors")
    (adapters / "loop.safetensors").symlink_to(adapters / "loop.safetensors")
    studio = Studio(pipe, adapters)  # starts despite the links
    assert studio.list_adapters() == ["run/ether_adapter.safetensors"]


def test_api_inputs_have_meaningful_names_and_the_optional_ones_can_be_left_out(served):
    url, studio, _ = served
    client = Client(url, verbose=False)
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    names = [p["parameter_name"] for p in params]
    assert names == ["prompt", "negative_prompt", "seed", "random_seed", "steps", "guidance", "scheduler", "num_images",
                     "size", "mode", "adapter_1", "adapter_2", "adapter_3", "strength_1", "strength_2", "strength_3",
                     "control_image"]
    assert all(p["parameter_has_default"] for p in params)
    gallery, status = client.predict(prompt="a red circle", adapter_1=studio.list_adapters()[0], strength_1=0.5,
                                     steps=2, size=32, num_images=1, api_name="/generate")
    assert len(gallery) == 1 and "1 image" in status
