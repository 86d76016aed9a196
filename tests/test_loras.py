"""LoRA adapters (farm.loras): both file layouts, weight 0 as the plain model bit for bit, switching
back, one load per file, LRU eviction, the pickle refusal, one-line errors, SDXL's three components,
and A1111's Lora hashes."""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from farm.loras import (
    ADAPTER_CACHES,
    LoraAdapters,
    LoraError,
    a1111_lora_hashes,
    a1111_short_hash,
    adapter_name,
    apply_loras,
)
from farm.models import file_sha256, load_components, resolve_model
from farm.render import render_batch
from farm.spec import Lora, RenderTask

TINY_STYLE = Path(__file__).resolve().parents[1] / "jobs" / "loras" / "tiny-style.safetensors"
RANK = 4  # the rank of tiny-style (scripts/make_tiny_lora.py) and of the LoRAs built here
# Attention projections, the layers LoRAs adapt (UNet; CLIP text encoders).
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture
def components(tiny_path: Path):
    """A fresh tiny model per test: adapters loaded here never reach the shared session fixture."""
    return load_components(resolve_model("tiny"), "cpu", "float32")


def lora(path: Path, weight: float = 1.0) -> Lora:
    return Lora(str(path), file_sha256(path), weight)


def task(*loras: Lora, prompt: str = "a cute shiba inu", seed: int = 1) -> RenderTask:
    return RenderTask("tiny", "euler", prompt, "", seed, 4, 7.5, 64, 64, loras=tuple(loras))


def render(components, *loras: Lora, allow_pickle: bool = False, **fields) -> np.ndarray:
    """One image, rendered after switching to the task's LoRAs, as an actor does."""
    job = task(*loras, **fields)
    apply_loras(components, job.loras, allow_pickle)
    return render_batch(components, [job]).images[0]


def count_loads(monkeypatch: pytest.MonkeyPatch, components) -> list[str]:
    """Record every load_lora_weights call on the model's pipeline (the adapter names)."""
    pipeline = components.pipeline
    calls: list[str] = []
    original = pipeline.load_lora_weights

    def counted(source, adapter_name=None, **kwargs):
        calls.append(adapter_name)
        return original(source, adapter_name=adapter_name, **kwargs)

    monkeypatch.setattr(pipeline, "load_lora_weights", counted)
    return calls


def scaled(path: Path, factor: float, target: Path) -> Path:
    """tiny-style with its lora_B factors times ``factor``: another file (another sha256), another effect."""
    tensors = {k: (v * factor if ".lora_B." in k else v) for k, v in load_file(TINY_STYLE).items()}
    save_file(tensors, target)
    return target


def kohya_layout(source: Path, target: Path) -> Path:
    """A diffusers-layout file renamed to the kohya/A1111 layout: lora_unet_<module>.lora_down.weight, lora_up,
    alpha (= rank, the scale 1 the diffusers file has), lora_te_text_model_<module> for the text encoder."""
    tensors = {}
    for key, value in load_file(source).items():
        part, rest = key.split(".", 1)
        module, factor = rest.rsplit(".lora_", 1)
        prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
        name = prefix + module.replace(".", "_")
        tensors[f"{name}.{'lora_down' if factor == 'A.weight' else 'lora_up'}.weight"] = value
        tensors[f"{name}.alpha"] = torch.tensor(float(RANK))
    save_file(tensors, target)
    return target


def random_lora(pipeline, parts: dict[str, tuple[str, ...]], seed: int, target: Path, scale: float = 4.0) -> Path:
    """A diffusers-layout LoRA file for ``pipeline``'s own layer shapes: random rank-RANK factors on every
    Linear of each component whose name ends in one of its layer names; the model is left untouched."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for part, layers in parts.items():
        for name, module in getattr(pipeline, part).named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(layers):
                down = torch.randn(RANK, module.in_features, generator=generator) / module.in_features**0.5
                up = torch.randn(module.out_features, RANK, generator=generator) * scale / RANK**0.5
                tensors[f"{part}.{name}.lora_A.weight"] = down
                tensors[f"{part}.{name}.lora_B.weight"] = up
    save_file(tensors, target)
    return target


def assert_one_line(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, message


def assert_no_adapters(pipeline) -> None:
    """No component holds an adapter (a failed load left nothing behind)."""
    assert not any(pipeline.get_list_adapters().values()), pipeline.get_list_adapters()


# ---------------------------------------------------------------------------------------
# Rendering with a LoRA


def test_the_shipped_lora_changes_the_image_and_weight_zero_is_the_plain_model(components):
    plain = render(components)
    styled = render(components, lora(TINY_STYLE, 1.0))
    assert np.abs(styled.astype(int) - plain).mean() > 10  # plain to see (scripts/make_tiny_lora.py)
    assert components.lora_key == ((file_sha256(TINY_STYLE), 1.0),)

    zero = task(lora(TINY_STYLE, 0.0))
    assert zero.loras == (lora(TINY_STYLE, 0.0),)  # the entry stays in the task (and its row)
    assert np.array_equal(render(components, lora(TINY_STYLE, 0.0)), plain)
    assert components.lora_key == ()
    # A batch without LoRAs after one with them renders the original image exactly.
    render(components, lora(TINY_STYLE, 1.0))
    assert np.array_equal(render(components), plain)


def test_a_weight_sweep_gives_distinct_images(components):
    images = [render(components, lora(TINY_STYLE, w)) for w in (0, 0.25, 0.5, 1)]
    assert np.array_equal(images[0], render(components))
    for i in range(len(images)):
        for j in range(i):
            assert not np.array_equal(images[i], images[j]), (i, j)
    # Farther from the plain image the larger the weight.
    distances = [np.abs(im.astype(int) - images[0]).mean() for im in images]
    assert distances == sorted(distances)


def test_the_kohya_layout_loads_and_applies_like_the_diffusers_one(components, tmp_path):
    kohya = kohya_layout(TINY_STYLE, tmp_path / "tiny-style-kohya.safetensors")
    assert any(k.startswith("lora_te_text_model_") for k in load_file(kohya))
    diffusers_image = render(components, lora(TINY_STYLE))
    kohya_image = render(components, lora(kohya))
    assert not np.array_equal(kohya_image, render(components))
    assert np.array_equal(kohya_image, diffusers_image)
    # The text encoder part took too: the same layers, the same vectors.
    ids = components.tokenizer(["a cute shiba inu"], return_tensors="pt").input_ids
    encoded = {}
    for file in (TINY_STYLE, kohya):
        apply_loras(components, [lora(file)])
        with torch.no_grad():
            encoded[file] = components.text_encoder(ids)[0]
    torch.testing.assert_close(encoded[TINY_STYLE], encoded[kohya])


def test_text_encoder_layers_switch_on_and_off_exactly(components):
    ids = components.tokenizer(["a cute shiba inu"], return_tensors="pt").input_ids

    def encode() -> torch.Tensor:
        with torch.no_grad():
            return components.text_encoder(ids)[0]

    apply_loras(components, [])
    plain = encode()
    apply_loras(components, [lora(TINY_STYLE)])
    assert not torch.allclose(encode(), plain, atol=1e-3)
    apply_loras(components, [lora(TINY_STYLE, 0.0)])
    assert torch.equal(encode(), plain)
    apply_loras(components, [lora(TINY_STYLE, 0.5)])
    apply_loras(components, [])
    assert torch.equal(encode(), plain)


def test_a_text_encoder_only_lora_changes_the_image(components, tmp_path):
    """The render core keys its prompt encoders by components.lora_key, so a LoRA that only changes the
    text encoder reaches the image, and going back to no LoRA gives the original again."""
    path = random_lora(components.pipeline, {"text_encoder": TEXT_LAYERS}, 7, tmp_path / "te-only.safetensors")
    plain = render(components)
    styled = render(components, lora(path))
    assert not np.array_equal(styled, plain)
    assert np.array_equal(render(components), plain)


def test_two_loras_at_once(components, tmp_path):
    other = scaled(TINY_STYLE, -1.0, tmp_path / "inverse.safetensors")
    both = render(components, lora(TINY_STYLE, 1.0), lora(other, 0.5))
    assert components.lora_key == ((file_sha256(TINY_STYLE), 1.0), (file_sha256(other), 0.5))
    alone = render(components, lora(TINY_STYLE, 1.0))
    assert not np.array_equal(both, alone)
    # A zero-weight entry beside another drops out of the active set: the other's image exactly.
    assert np.array_equal(render(components, lora(TINY_STYLE, 1.0), lora(other, 0.0)), alone)


# ---------------------------------------------------------------------------------------
# The adapter cache


def test_a_file_loads_once_for_many_batches(components, monkeypatch):
    calls = count_loads(monkeypatch, components)
    for seed, weight in [(1, 1.0), (2, 0.5), (3, 0.0)]:
        render(components, lora(TINY_STYLE, weight), seed=seed)
    render(components, seed=4)
    apply_loras(components, [lora(TINY_STYLE, 2.0)])
    assert calls == [adapter_name(file_sha256(TINY_STYLE))]


def test_least_recently_used_adapters_are_evicted(components, monkeypatch, tmp_path):
    adapters = LoraAdapters(kept=2)
    calls = count_loads(monkeypatch, components)
    a, b, c = (lora(scaled(TINY_STYLE, f, tmp_path / f"x{f}.safetensors")) for f in (1.0, 0.5, 2.0))

    def show(entry: Lora) -> np.ndarray:
        adapters.apply(components, [entry])
        return render_batch(components, [task(entry)]).images[0]

    first_a = show(a)
    adapters.apply(components, [b])
    adapters.apply(components, [a])  # a is now the most recently used: c evicts b
    adapters.apply(components, [c])
    loaded = components.pipeline.get_list_adapters()
    assert sorted(loaded["unet"]) == sorted(loaded["text_encoder"]) == sorted(adapter_name(x.sha256) for x in (a, c))
    assert len(calls) == 3
    adapters.apply(components, [b])  # evicted: read again, and a goes
    assert len(calls) == 4 and adapter_name(a.sha256) not in components.pipeline.get_list_adapters()["unet"]
    assert np.array_equal(show(a), first_a)  # loaded again, the same image
    # A batch needing more than `kept` keeps them all while it renders.
    adapters.apply(components, [a, b, c])
    assert len(components.pipeline.get_list_adapters()["unet"]) == 3


def test_a_dropped_model_takes_its_adapter_cache_along(tiny_path):
    model = load_components(resolve_model("tiny"), "cpu", "float32")
    apply_loras(model, [lora(TINY_STYLE)])
    assert model.pipeline in ADAPTER_CACHES
    pipeline = weakref.ref(model.pipeline)
    del model
    gc.collect()
    assert pipeline() is None


# ---------------------------------------------------------------------------------------
# Refusals, in one line naming the file


def test_pickle_loras_are_refused_unless_allowed(components, monkeypatch, tmp_path):
    path = tmp_path / "tiny-style.bin"
    torch.save(load_file(TINY_STYLE), path)
    calls = count_loads(monkeypatch, components)
    with pytest.raises(LoraError) as exc:
        apply_loras(components, [lora(path)])
    assert_one_line(exc, path, "pickle", "--allow-pickle")
    assert calls == []
    allowed = render(components, lora(path), allow_pickle=True)
    assert np.array_equal(allowed, render(components, lora(TINY_STYLE)))


def test_pickles_load_weights_only(components, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"unet.x.lora_A.weight": RunsCode(str(marker))}, path)
    with pytest.raises(LoraError) as exc:
        apply_loras(components, [lora(path)], allow_pickle=True)
    assert_one_line(exc, path, "cannot read")
    assert not marker.exists()


class RunsCode:
    """Unpickling this runs code: the payload a weights-only load must refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_a_lora_for_another_architecture_is_refused(components, tmp_path, tiny_xl_components):
    sdxl = random_lora(
        tiny_xl_components.pipeline,  # only read: its layer shapes
        {"unet": UNET_LAYERS, "text_encoder": TEXT_LAYERS, "text_encoder_2": TEXT_LAYERS},
        3,
        tmp_path / "sdxl-style.safetensors",
    )
    plain = render(components)
    with pytest.raises(LoraError) as exc:
        apply_loras(components, [lora(sdxl)])
    assert_one_line(exc, sdxl, "another architecture", "SD 1.x")
    # Nothing of it stays behind: the plain image, and a good LoRA still loads.
    assert_no_adapters(components.pipeline)
    assert np.array_equal(render(components), plain)
    assert not np.array_equal(render(components, lora(TINY_STYLE)), plain)


def test_layers_this_model_lacks_are_refused(components, tmp_path):
    """kohya SDXL text-encoder keys (lora_te2_) on an SD model: diffusers would skip them with a warning."""
    tensors = load_file(kohya_layout(TINY_STYLE, tmp_path / "k.safetensors"))
    extra = {k.replace("lora_te_", "lora_te2_"): v.clone() for k, v in tensors.items() if k.startswith("lora_te_")}
    path = tmp_path / "with-te2.safetensors"
    save_file({**tensors, **extra}, path)
    with pytest.raises(LoraError) as exc:
        apply_loras(components, [lora(path)])
    assert_one_line(exc, path, "8 of its 48 LoRA layers have no match", "SD 1.x")


@pytest.mark.parametrize(
    ("part", "layer", "words"),
    [
        (
            "unet.",
            "attn2.to_k",
            "its factor for layer down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k is "
            "(4, 48) in the file but (4, 32) in this SD 1.x model",
        ),
        ("text_encoder.", "q_proj", "its text encoder layers do not fit this SD 1.x model"),
    ],
)
def test_shapes_that_do_not_fit_are_refused(components, tmp_path, part, layer, words):
    tensors = load_file(TINY_STYLE)
    key = next(k for k in tensors if k.startswith(part) and k.endswith(f"{layer}.lora_A.weight"))
    tensors[key] = torch.zeros(RANK, 48)  # the layer takes 32 features
    path = tmp_path / "wrong-shape.safetensors"
    save_file(tensors, path)
    with pytest.raises(LoraError) as exc:
        apply_loras(components, [lora(path)])
    assert_one_line(exc, path, "a LoRA for another architecture", words)
    assert_no_adapters(components.pipeline)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"not a safetensors file at all", ["cannot read as safetensors"]),
        (None, ["holds no LoRA layers", "not a LoRA file"]),  # a textual-inversion file
    ],
)
def test_files_that_are_not_loras_are_refused(components, tmp_path, content, words):
    path = tmp_path / "thing.safetensors"
    if content is None:
        save_file({"<tiny-style>": torch.zeros(1, 32)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(LoraError) as exc:
        apply_loras(components, [lora(path)])
    assert_one_line(exc, path, *words)


def test_a_changed_file_is_refused(components, tmp_path):
    path = scaled(TINY_STYLE, 1.0, tmp_path / "style.safetensors")
    recorded = lora(path)
    scaled(TINY_STYLE, 2.0, path)
    with pytest.raises(LoraError) as exc:
        apply_loras(components, [recorded])
    assert_one_line(exc, path, "changed since the job was read")


def test_a_failed_batch_leaves_the_active_set_as_it_was(components, tmp_path):
    styled = render(components, lora(TINY_STYLE))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    with pytest.raises(LoraError):
        apply_loras(components, [lora(TINY_STYLE, 0.5), lora(bad)])
    assert components.lora_key == ((file_sha256(TINY_STYLE), 1.0),)
    job = task(lora(TINY_STYLE))
    assert np.array_equal(render_batch(components, [job]).images[0], styled)


# ---------------------------------------------------------------------------------------
# SDXL: the UNet and both text encoders


def test_an_sdxl_lora_adapts_the_unet_and_both_text_encoders(tiny_xl_path, tmp_path):
    components = load_components(resolve_model("tiny-xl"), "cpu", "float32")
    pipeline = components.pipeline
    path = random_lora(
        pipeline,
        {"unet": UNET_LAYERS, "text_encoder": TEXT_LAYERS, "text_encoder_2": TEXT_LAYERS},
        5,
        tmp_path / "xl.safetensors",
    )
    ids = components.tokenizer(["a cute shiba inu"], return_tensors="pt").input_ids
    config = components.unet.config
    size = config.sample_size
    sample = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    pooled = torch.zeros(1, components.text_encoder_2.config.projection_dim)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[size * 8.0, size * 8, 0, 0, size * 8, size * 8]])}

    def outputs() -> list[torch.Tensor]:
        with torch.no_grad():
            return [
                components.text_encoder(ids)[0],
                components.text_encoder_2(ids)[0],
                components.unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample,
            ]

    apply_loras(components, [])
    plain = outputs()
    apply_loras(components, [lora(path)])
    for before, after in zip(plain, outputs(), strict=True):
        assert not torch.allclose(before, after, atol=1e-4)
    apply_loras(components, [lora(path, 0.0)])
    assert all(torch.equal(a, b) for a, b in zip(plain, outputs(), strict=True))
    apply_loras(components, [lora(path, 0.5)])
    apply_loras(components, [])
    assert all(torch.equal(a, b) for a, b in zip(plain, outputs(), strict=True))


# ---------------------------------------------------------------------------------------
# A1111's Lora hashes


def test_a1111_hash_is_over_the_tensor_data_not_the_header(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(8.0).reshape(2, 4)}
    plain, tagged = tmp_path / "plain.safetensors", tmp_path / "tagged.safetensors"
    save_file(tensors, plain)
    save_file(tensors, tagged, metadata={"ss_output_name": "something else"})
    assert file_sha256(plain) != file_sha256(tagged)
    assert a1111_short_hash(str(plain), "") == a1111_short_hash(str(tagged), "")
    # By hand: the 8-byte little-endian header length, the JSON header, then the data hashed.
    data = plain.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    assert json.loads(data[8 : 8 + header_size])["lora_unet_x.lora_down.weight"]["shape"] == [2, 4]
    assert a1111_short_hash(str(plain), "") == hashlib.sha256(data[8 + header_size :]).hexdigest()[:12]


def test_a1111_hashes_text(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "my:style,v2.safetensors", metadata={"sshs_model_hash": "ab" * 32})
    pickle = tmp_path / "old.pt"
    torch.save({"a": torch.ones(2)}, pickle)
    loras = [Lora(str(tmp_path / "my:style,v2.safetensors"), "", 1.0), Lora(str(pickle), file_sha256(pickle), 0.5)]
    # kohya's stored hash when the header holds one; a pickle's whole-file sha256.
    assert a1111_lora_hashes(loras) == f"mystylev2: {'ab' * 6}, old: {file_sha256(pickle)[:12]}"
    assert a1111_lora_hashes([]) == ""
    shipped = a1111_lora_hashes([lora(TINY_STYLE)])
    assert shipped.startswith("tiny-style: ") and shipped != f"tiny-style: {file_sha256(TINY_STYLE)[:12]}"
