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

from ether_diffusion import AdapterConfig, AdapterFileError, add_adapter
from ether_diffusion.adapter_file import METADATA_KEY, load_adapter, read_adapter_file
from ether_diffusion.cli import main
from ether_diffusion.inject import adapter_modules, ether_layers
from ether_diffusion.pipelines import pipeline_components, save_ether_weights
from ether_diffusion.testing import tiny_sd_pipeline, write_adapter_tensors


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
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for adapter in adapter_modules(model, "a").values():
                for p in adapter.vectors.values():
                    p.copy_(torch.randn(p.shape, generator=g))
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
