"""Fuzzing what users hand in: malformed adapter files (by category, byte flips, truncations), metadata.jsonl rows,
config files and app uploads. Each must end in the one user-facing error (exit 2, one line on the command line),
never another exception or a hang, and must leave every model exactly as it was."""

import json
import random
import signal
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open

from ether_diffusion import AdapterConfig, AdapterFileError, EtherError, add_adapter
from ether_diffusion.adapter_file import METADATA_KEY, load_adapter, read_adapter_file
from ether_diffusion.cli import main
from ether_diffusion.inject import ether_layers
from ether_diffusion.pipelines import pipeline_components, save_ether_weights
from ether_diffusion.testing import randomise_vectors, tiny_sd_pipeline, write_adapter_tensors


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging."""
    def fire(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A valid two-component adapter file, its tensors and metadata."""
    pipe = tiny_sd_pipeline()
    add_adapter(pipe.unet, "a", AdapterConfig(method="etherplus", n_blocks=2))
    add_adapter(pipe.text_encoder, "a", AdapterConfig(method="ether", targets="text"))
    randomise_vectors(pipe.unet)
    randomise_vectors(pipe.text_encoder, seed=1)
    path = save_ether_weights(pipe, tmp_path_factory.mktemp("valid") / "a.safetensors", "a",
                              info={"instance_prompt": "a sks circle"})
    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(fh.metadata()[METADATA_KEY])
    return path, tensors, meta


def categories(tensors, meta):
    """(label, tensors, metadata) for every kind of malformed file, with a correct checksum."""
    unet_layer = next(iter(meta["components"]["unet"]["layers"]))
    text_layer = next(iter(meta["components"]["text_encoder"]["layers"]))

    def with_meta(**changes):
        m = json.loads(json.dumps(meta))
        for dotted, value in changes.items():
            target = m
            *head, last = dotted.split("/")
            for key in head:
                target = target[key]
            if value is DELETE:
                del target[last]
            else:
                target[last] = value
        return m

    cases = [
        ("metadata is a list", tensors, "[1, 2, 3]"),
        ("metadata is a string", tensors, '"adapter"'),
        ("metadata is null", tensors, "null"),
        ("metadata is a number", tensors, "42"),
        ("metadata nested 100k deep", tensors, "[" * 100_000 + "]" * 100_000),
        ("metadata nested object", tensors, '{"a":' * 50_000 + "1" + "}" * 50_000),
        ("metadata not JSON", tensors, "{format: ether"),
        ("metadata empty", tensors, ""),
    ]
    for key, value in [("format", "other"), ("format", None), ("format_version", 2), ("format_version", "1"),
                       ("components", []), ("components", None), ("components", "unet"), ("name", 5),
                       ("format", DELETE), ("format_version", DELETE), ("components", DELETE)]:
        cases.append((f"{key}={value!r}", tensors, with_meta(**{key: value})))
    comp = "components/unet"
    for key, value in [("config", None), ("config", []), ("layers", None), ("layers", []), ("layers", {}),
                       ("config/method", "lora"), ("config/method", 1), ("config/n_blocks", 0),
                       ("config/n_blocks", -4), ("config/n_blocks", 3), ("config/n_blocks", "2"),
                       ("config/n_blocks", 2.0), ("config/n_blocks", True), ("config/n_blocks", 2**70),
                       ("config/sides", "left"), ("config/sides", None), ("config/targets", 7),
                       ("config/extra", 1), ("config/method", DELETE), ("fingerprint", 12),
                       (f"layers/{unet_layer}", [4]), (f"layers/{unet_layer}", [4, "x"]),
                       (f"layers/{unet_layer}", [-32, 32]), (f"layers/{unet_layer}", [0, 0]),
                       (f"layers/{unet_layer}", [2**40, 32]), (f"layers/{unet_layer}", "32x32"),
                       (f"layers/{unet_layer}", None), (f"layers/{unet_layer}", [32, 32, 32]),
                       (f"layers/{unet_layer}", [32.0, 32.0])]:
        cases.append((f"unet {key}={value!r}", tensors, with_meta(**{f"{comp}/{key}": value})))
    cases.append(("unknown component", tensors, with_meta(**{"components/vae": meta["components"]["unet"]})))
    cases.append(("text n_blocks does not divide", tensors, with_meta(**{"components/text_encoder/config/n_blocks": 5})))
    for value in [[], "seg", {"kind": "seg"}, {"kind": 1, "encoder": {}},
                  {"kind": "seg", "encoder": {"conditioning_embedding_channels": 32, "block_out_channels": []}},
                  {"kind": "seg", "encoder": {"conditioning_embedding_channels": 32, "block_out_channels": [10**9]}},
                  {"kind": "seg", "encoder": {"conditioning_embedding_channels": -1, "block_out_channels": [8]}},
                  {"kind": "seg", "encoder": {"conditioning_embedding_channels": 32, "block_out_channels": [8] * 100}},
                  {"kind": "seg", "encoder": {"conditioning_embedding_channels": 32, "block_out_channels": [8, 16]}}]:
        cases.append((f"control={json.dumps(value)[:40]}", tensors, with_meta(control=value)))
    vec = f"unet.{unet_layer}.u_input"
    tvec = f"text_encoder.{text_layer}.u_input"
    for label, change in [("int64 vectors", lambda t: {k: v.long() for k, v in t.items()}),
                          ("int32 vector", lambda t: {**t, vec: t[vec].int()}),
                          ("float16 vector", lambda t: {**t, vec: t[vec].half()}),
                          ("float64 vector", lambda t: {**t, vec: t[vec].double()}),
                          ("bool vector", lambda t: {**t, vec: t[vec] > 0}),
                          ("vector too short", lambda t: {**t, vec: t[vec][:-1]}),
                          ("vector 2-D", lambda t: {**t, vec: t[vec][None]}),
                          ("vector scalar", lambda t: {**t, vec: t[vec][0].clone()}),
                          ("text vector wrong size", lambda t: {**t, tvec: torch.zeros(3)}),
                          ("missing vector", lambda t: {k: v for k, v in t.items() if k != vec}),
                          ("missing text part", lambda t: {k: v for k, v in t.items() if not k.startswith("text")}),
                          ("unexpected tensor", lambda t: {**t, "unet.foo.u_input": torch.zeros(4)}),
                          ("unexpected extra tensor", lambda t: {**t, "extra.control_encoder.w": torch.zeros(4)}),
                          ("NaN", lambda t: {**t, vec: torch.full_like(t[vec], float("nan"))}),
                          ("inf", lambda t: {**t, tvec: torch.full_like(t[tvec], float("inf"))})]:
        cases.append((label, change(dict(tensors)), meta))
    return cases


DELETE = object()


def assert_refused(path, pipe, capsys):
    """read, load and the CLI all give the adapter-file error; the pipeline is unchanged."""
    with time_limit(30):
        with pytest.raises(AdapterFileError):
            read_adapter_file(path)
        before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in pipeline_components(pipe).items()}
        grads = {c: [p.requires_grad for p in m.parameters()] for c, m in pipeline_components(pipe).items()}
        with pytest.raises(AdapterFileError):
            load_adapter(path, pipeline_components(pipe))
        for comp, model in pipeline_components(pipe).items():
            assert not list(ether_layers(model)), comp
            state = model.state_dict()
            assert state.keys() == before[comp].keys() and all(torch.equal(state[k], before[comp][k]) for k in state)
            assert [p.requires_grad for p in model.parameters()] == grads[comp]
        capsys.readouterr()
        assert main(["info", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_every_malformed_category_is_refused_cleanly(valid, tmp_path, capsys):
    _, tensors, meta = valid
    pipe = tiny_sd_pipeline()
    cases = categories(tensors, meta)
    assert len(cases) >= 70  # with the byte flips and truncations below: over 150 malformed files
    for i, (label, t, m) in enumerate(cases):
        path = write_adapter_tensors(tmp_path / f"{i}.safetensors", t, m)
        try:
            assert_refused(path, pipe, capsys)
        except (AssertionError, pytest.fail.Exception) as exc:
            raise AssertionError(f"case {label!r}: {exc}") from None


def test_random_byte_flips_and_truncations_are_refused(valid, tmp_path, capsys):
    path, tensors, meta = valid
    data = path.read_bytes()
    rng = random.Random(0)
    pipe = tiny_sd_pipeline()
    cases = []
    for i in range(60):
        flipped = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 3))):
            flipped[rng.randrange(len(flipped))] ^= rng.randrange(1, 256)
        cases.append((f"flip {i}", bytes(flipped)))
    for i in range(20):
        cases.append((f"truncate {i}", data[: rng.randrange(len(data))]))
    cases += [("empty", b""), ("eight zero bytes", bytes(8)), ("huge header length", (2**62).to_bytes(8, "little"))]
    refused = 0
    for label, blob in cases:
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(blob)
        try:
            read_adapter_file(bad)
        except AdapterFileError:
            assert_refused(bad, pipe, capsys)
            refused += 1
            continue
        # the only acceptable alternative: the flip changed nothing the file means (e.g. one header space
        # turned into another whitespace character)
        parsed = read_adapter_file(bad)
        assert parsed.metadata == meta and parsed.tensors.keys() == tensors.keys(), label
        assert all(torch.equal(parsed.tensors[k], tensors[k]) for k in tensors), label
    assert refused >= len(cases) - 3


def test_size_cap_refuses_before_reading(valid, monkeypatch, capsys):
    path, _, _ = valid
    monkeypatch.setenv("ETHER_DIFFUSION_MAX_ADAPTER_MB", str(path.stat().st_size / 2**20 / 2))
    with pytest.raises(AdapterFileError, match="limit"):
        read_adapter_file(path)
    assert main(["info", str(path)]) == 2
    monkeypatch.setenv("ETHER_DIFFUSION_MAX_ADAPTER_MB", "lots")
    with pytest.raises(AdapterFileError, match="megabytes"):
        read_adapter_file(path)


def test_files_without_a_checksum_still_load(valid, tmp_path):
    _, tensors, meta = valid
    path = write_adapter_tensors(tmp_path / "old.safetensors", tensors, meta, checksum=False)
    assert read_adapter_file(path).metadata == meta


def test_a_failure_after_attaching_rolls_everything_back(valid, monkeypatch):
    """Defence in depth: whatever fails after the first component is attached, the models end as they began."""
    import ether_diffusion.adapter_file as adapter_file

    path, _, _ = valid
    pipe = tiny_sd_pipeline()
    grads = [p.requires_grad for p in pipe.unet.parameters()]

    def broken(*_):
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(adapter_file, "copy_vectors", broken)
    with pytest.raises(RuntimeError, match="disk vanished"):
        load_adapter(path, pipeline_components(pipe))
    assert not list(ether_layers(pipe.unet)) and not list(ether_layers(pipe.text_encoder))
    assert [p.requires_grad for p in pipe.unet.parameters()] == grads


# -- metadata.jsonl rows, config files, app uploads -------------------------------------------------------------


def bad_rows(folder):
    """(label, line bytes) for malformed metadata.jsonl rows; the folder holds good.png / other.png / small.png."""
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(folder / "good.png")
    Image.new("RGB", (32, 32), "blue").save(folder / "other.png")
    Image.new("RGB", (16, 16), "blue").save(folder / "small.png")
    (folder / "text.png").write_text("not a picture")
    ok = {"image": "good.png", "conditioning_image": "other.png", "text": "a red square"}
    rows = [("not JSON", b"{image: good.png"), ("array", b"[1, 2]"), ("string", b'"row"'), ("null", b"null"),
            ("number", b"7"), ("nested", b"[" * 50_000 + b"]" * 50_000), ("not UTF-8", b"\xff\xfe\x00{}"),
            ("empty object", b"{}"), ("truncated", json.dumps(ok).encode()[:-3])]
    for key in ("image", "conditioning_image", "text"):
        for value in (None, 3, ["good.png"], {"a": 1}):
            rows.append((f"{key}={value!r}", json.dumps({**ok, key: value}).encode()))
        rows.append((f"no {key}", json.dumps({k: v for k, v in ok.items() if k != key}).encode()))
    for key in ("image", "conditioning_image"):
        for value in ("missing.png", "text.png", ".", "", "../../nothing.png"):
            rows.append((f"{key}={value!r}", json.dumps({**ok, key: value}).encode()))
    rows.append(("sizes differ", json.dumps({**ok, "conditioning_image": "small.png"}).encode()))
    return ok, rows


def test_every_malformed_control_row_is_reported_by_line_number(tmp_path, capsys):
    from ether_diffusion.data import load_control_folder

    ok, rows = bad_rows(tmp_path)
    assert len(rows) >= 30
    for label, line in rows:
        (tmp_path / "metadata.jsonl").write_bytes(json.dumps(ok).encode() + b"\n" + line + b"\n")
        with time_limit(30):
            with pytest.raises(EtherError, match="row 2: ") as info:
                load_control_folder(tmp_path)
        assert "row 1" not in str(info.value), label
    capsys.readouterr()
    assert main(["train", "control", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 2" in err[0] and not (tmp_path / "out").exists()


def bad_configs():
    """(label, file name, bytes) for malformed or ill-typed training config files."""
    cases = [("not TOML", "c.toml", b"max_steps = = 3"), ("not UTF-8", "c.toml", b"\xff\xfe max_steps = 3"),
             ("JSON list", "c.json", b"[1, 2]"), ("JSON nested", "c.json", b"[" * 50_000 + b"]" * 50_000),
             ("JSON not an object", "c.json", b"3"), ("JSON bad", "c.json", b"{max_steps: 3}"),
             ("unknown key", "c.toml", b"max_stepz = 3"), ("nested table", "c.toml", b"[max_steps]\nx = 1"),
             ("JSON wrong type", "c.json", b"{\"prior_loss_weight\": \"heavy\"}")]
    for key, value in [("max_steps", "1.5"), ("max_steps", '"many"'), ("max_steps", "0"), ("max_steps", "[3]"),
                       ("learning_rate", '"fast"'), ("learning_rate", "-1.0"), ("learning_rate", "{a = 1}"),
                       ("n_blocks", '"4"x'), ("n_blocks", "2.5"), ("method", '"lora"'), ("method", "3"),
                       ("sides", '"left"'), ("mixed_precision", '"fp8"'), ("train_batch_size", "0"),
                       ("checkpoints_total_limit", "0"), ("checkpointing_steps", "-1"), ("resolution", "33"),
                       ("validation_prompts", "3"), ("with_prior_preservation", '"maybe"'), ("seed", '"x"'),
                       ("device", '"tpu"'), ("num_class_images", "1e400")]:
        cases.append((f"{key}={value}", "c.toml", f"{key} = {value}\n".encode()))
    return cases


def test_every_malformed_config_is_one_error_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from ether_diffusion.train import loop

    loads = []

    def load_pipeline(*args, **kwargs):
        loads.append(args)
        raise EtherError("the model was loaded")

    monkeypatch.setattr(loop, "load_pipeline", load_pipeline)
    instance = tmp_path / "instance"
    instance.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(instance / "a.png")
    cases = bad_configs()
    assert len(cases) >= 30
    for label, name, data in cases:
        path = tmp_path / name
        path.write_bytes(data)
        capsys.readouterr()
        with time_limit(30):
            code = main(["train", "dreambooth", "--config", str(path), "--instance-dir", str(instance),
                         "--instance-prompt", "a sks circle", "--output-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (label, err)
        assert not loads, label


def test_every_malformed_upload_is_refused_and_changes_nothing(valid, tmp_path):
    from ether_diffusion.studio import Studio

    path, tensors, meta = valid
    pipe = tiny_sd_pipeline()
    studio = Studio(pipe, tmp_path / "adapters")
    uploads = []
    for i, (label, t, m) in enumerate(categories(tensors, meta)[::3]):
        uploads.append((label, write_adapter_tensors(tmp_path / f"u{i}.safetensors", t, m)))
    data = path.read_bytes()
    for i, cut in enumerate((0, 7, 100, len(data) // 2, len(data) - 1)):
        (tmp_path / f"cut{i}.safetensors").write_bytes(data[:cut])
        uploads.append((f"truncated at {cut}", tmp_path / f"cut{i}.safetensors"))
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    uploads.append(("a PNG", tmp_path / "picture.png"))
    assert len(uploads) >= 30
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for label, upload in uploads:
        with time_limit(30):
            with pytest.raises(AdapterFileError):
                studio.add_upload(upload)
        assert studio.list_adapters() == [], label
        assert not (tmp_path / "adapters" / "uploads").exists() or not any((tmp_path / "adapters" / "uploads").iterdir())
    assert not list(ether_layers(pipe.unet))
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
