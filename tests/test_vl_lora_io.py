"""Diffusers LoRA files <-> LoraAdapter, applying adapters to the tiny SD, the CLIP tokenizer, bad adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.errors import AdapterError
from bench.lora.diffusers_lora import WEIGHTS_NAME, load_diffusers_lora, save_diffusers_lora
from bench.lora.load import load_adapter
from bench.lora.pool import ExpertPool
from test_vl_common import images_array, random_sd_adapter, tiny_sd


def _sample(model, noise, prompt="a photo of a dog", steps=4):
    embeds = model.encode_prompts([prompt] * len(noise), [""] * len(noise), True)
    return model.decode(model.sample(noise, embeds, steps, 7.5))


def test_clip_tokenizer_matches_open_clip_and_sd_special_ids():
    from open_clip.tokenizer import SimpleTokenizer

    from bench.models.diffusion import clip_bpe_tokenizer
    from tasks.dreambooth import DEFAULT_TOKENS

    tok, ref = clip_bpe_tokenizer(), SimpleTokenizer()
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (49408, 49406, 49407, 77)
    for text in ["a sks dog and a wrs stuffed animal in the jungle", "Eiffel Tower, café 123!"]:
        assert tok(text).input_ids == [49406, *ref.encode(text), 49407]
    # every subject's unique token is one rare BPE token, and they are distinct
    assert all(len(ref.encode(t)) == 1 for t in DEFAULT_TOKENS.values())
    assert len(set(DEFAULT_TOKENS.values())) == len(DEFAULT_TOKENS) == 30


def test_diffusers_file_roundtrip_is_exact(tmp_path):
    model = tiny_sd()
    adapter = random_sd_adapter(model, "x", 0, text_encoder=True, ranks={"to_q": 2, "q_proj": 3})
    adapter.metadata = {"token": "sks"}
    folder = save_diffusers_lora(adapter, tmp_path / "x")
    assert sorted(p.name for p in folder.iterdir()) == ["bench_adapter.json", WEIGHTS_NAME]
    keys = set(load_file(str(folder / WEIGHTS_NAME)))
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in keys)
    assert any(k.startswith("text_encoder.") and k.endswith(".lora_B.weight") for k in keys)
    back = load_adapter(folder)  # the additive branch of load_adapter
    assert (back.name, back.base_model, back.metadata["token"]) == ("x", model.model_id, "sks")
    assert back.modules.keys() == adapter.modules.keys()
    for name, m in adapter.modules.items():
        assert torch.equal(back.modules[name].A, m.A) and torch.equal(back.modules[name].B, m.B)
        assert back.modules[name].scale == pytest.approx(m.scale, rel=1e-12)


def test_diffusers_load_lora_weights_equals_our_injection_and_base_is_restored(tmp_path):
    model = tiny_sd("float64")
    adapter = random_sd_adapter(model, "x", 1, text_encoder=True, ranks={"to_v": 2})
    save_diffusers_lora(adapter, tmp_path / "x")
    noise = model.initial_noise(2, seed=3)
    before = {k: v.clone() for k, v in model.components.state_dict().items()}
    modules_before = dict(model.components.named_modules())
    base = _sample(model, noise)
    with model.adapter_applied(load_adapter(tmp_path / "x")):
        ours = _sample(model, noise)
    assert dict(model.components.named_modules()).keys() == modules_before.keys()
    assert all(model.components.get_submodule(n) is m for n, m in modules_before.items())
    assert all(torch.equal(before[k], v) for k, v in model.components.state_dict().items())
    pipe = model.pipe
    pipe.load_lora_weights(str(tmp_path / "x"), adapter_name="x")
    try:
        ref = pipe(["a photo of a dog"] * 2, num_inference_steps=4, guidance_scale=7.5, latents=noise.double(),
                   output_type="pt").images
    finally:
        pipe.unload_lora_weights()
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
    assert (ours - base).abs().max() > 1e-3  # the LoRA matters
    assert torch.allclose(_sample(model, noise), base, atol=0, rtol=0)  # the base is back, bit for bit


def test_deltas_folded_equals_applied_adapter():
    model = tiny_sd("float64")
    adapter = random_sd_adapter(model, "x", 2, text_encoder=True)
    noise = model.initial_noise(1, seed=0)
    with model.adapter_applied(adapter):
        applied = _sample(model, noise)
    with model.deltas_folded({k: m.delta() for k, m in adapter.modules.items()}):
        folded = _sample(model, noise)
    assert torch.allclose(applied, folded, atol=1e-10, rtol=0)


def test_our_generate_equals_the_stock_pipeline():
    model = tiny_sd("float64")
    noise = model.initial_noise(2, seed=5)
    ours = model.generate(["a red clock"], n_images=2, seed=5, num_inference_steps=5, guidance_scale=6.0)
    ref = model.pipe(["a red clock"] * 2, num_inference_steps=5, guidance_scale=6.0, latents=noise.double()).images
    assert torch.equal(images_array(ours), images_array(ref))


def test_kohya_file_with_network_alphas_loads(tmp_path):
    model = tiny_sd()
    layer = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    down, up = torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2)
    te = model.text_encoder.encoder.layers[1].self_attn.q_proj
    te_down, te_up = torch.randn(4, te.in_features), torch.randn(te.out_features, 4)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te_key = "lora_te_text_model_encoder_layers_1_self_attn_{}_proj"  # kohya names the text_model level
    state = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)}
    for proj in ("q", "out"):
        state.update({f"{te_key.format(proj)}.lora_down.weight": te_down.clone(),
                      f"{te_key.format(proj)}.lora_up.weight": te_up.clone()})
    save_file(state, str(tmp_path / "style.safetensors"))
    adapter = load_diffusers_lora(tmp_path / "style.safetensors")
    m, t = (adapter.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"],
            adapter.modules["text_encoder.encoder.layers.1.self_attn.q_proj"])
    assert len(adapter.modules) == 3 and adapter.base_model == ""
    assert torch.equal(m.A, down) and torch.equal(m.B, up) and m.scale == 0.5  # alpha 1 / rank 2
    assert torch.equal(t.A, te_down) and torch.equal(t.B, te_up) and t.scale == 1.0  # no alpha: diffusers' alpha = r
    model.check_adapter(adapter)


def test_lora_for_another_base_model_is_refused(tmp_path):
    model = tiny_sd()
    other = random_sd_adapter(model, "other", 0, base="runwayml/some-other-model")
    with pytest.raises(AdapterError, match="trained on base model 'runwayml/some-other-model'"):
        with model.adapter_applied(other):
            pass
    with pytest.raises(AdapterError, match="other"):
        with model.experts_applied(ExpertPool(model.model_id, [random_sd_adapter(model, "a", 1), other])):
            pass
    # same id but another architecture: shapes do not fit
    bad = random_sd_adapter(model, "bad", 0)
    path = next(iter(bad.modules))
    m = bad.modules[path]
    bad.modules[path] = type(m)(torch.zeros(m.rank, m.d_in + 1), m.B, m.scale)
    with pytest.raises(AdapterError, match="in the base model"):
        model.check_adapter(bad)
    with pytest.raises(AdapterError, match="does not have"):
        model.check_adapter(type(bad)("ghost", model.model_id, {"unet.no.such.to_q": m}))


def test_unsupported_diffusers_loras_are_refused(tmp_path):
    model = tiny_sd()
    folder = save_diffusers_lora(random_sd_adapter(model, "d", 0), tmp_path / "d")
    state = load_file(str(folder / WEIGHTS_NAME))
    key = next(k for k in state if k.endswith("lora_A.weight"))
    for extra, message in [({key.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(3)}, "DoRA"),
                           ({key.replace("lora_A", "lora_B").replace(".weight", ".bias"): torch.ones(3)}, "bias")]:
        save_file({**state, **extra}, str(folder / WEIGHTS_NAME))
        with pytest.raises(AdapterError, match=message):
            load_adapter(folder)
    conv = {k: v[..., None, None] if k == key else v for k, v in state.items()}
    save_file(conv, str(folder / WEIGHTS_NAME))
    with pytest.raises(AdapterError, match="convolution"):
        load_adapter(folder)
    save_file({"text_encoder_2.x.lora_A.weight": torch.ones(1, 2), "text_encoder_2.x.lora_B.weight": torch.ones(2, 1)},
              str(folder / WEIGHTS_NAME))
    with pytest.raises(AdapterError, match="SDXL"):
        load_adapter(folder)
    (folder / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter(folder)
    json.loads((folder / "bench_adapter.json").read_text())  # the sidecar itself was fine
