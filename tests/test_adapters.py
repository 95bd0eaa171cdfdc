"""Adapter I/O: peft round trips, and clear errors for bad adapters."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from bench.errors import AdapterError
from bench.lora.load import load_adapter
from bench.lora.pool import ExpertPool
from conftest import random_adapter


def _peft_trained(tiny_lm, tmp_path, **config):
    """A peft adapter on the tiny model with random non-zero B (as after training), saved by peft."""
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_lm.model, LoraConfig(target_modules=["q_proj", "v_proj"], **config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    folder = tmp_path / "peft_adapter"
    peft_model.save_pretrained(str(folder))
    tiny_lm.model = peft_model.unload()
    return folder


def _outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("config", [dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=8, use_rslora=True),
                                    dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})])
def test_peft_round_trip_identical_outputs(tiny_lm, tmp_path, config):
    src = _peft_trained(tiny_lm, tmp_path, **config)
    adapter = load_adapter(src)
    ours = adapter.save(tmp_path / "ours")
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    reference = PeftModel.from_pretrained(tiny_lm.model, str(src))
    expected = _outputs(reference, ids)
    tiny_lm.model = reference.unload()
    reloaded = PeftModel.from_pretrained(tiny_lm.model, str(ours))
    torch.testing.assert_close(_outputs(reloaded, ids), expected, rtol=0, atol=0)
    tiny_lm.model = reloaded.unload()
    # and our own application path gives the same outputs
    with tiny_lm.adapter_applied(load_adapter(ours)):
        torch.testing.assert_close(_outputs(tiny_lm.model, ids), expected, rtol=1e-6, atol=1e-6)
    # exact tensors survive save/load
    again = load_adapter(ours)
    for name, m in adapter.modules.items():
        assert torch.equal(again.modules[name].A, m.A) and torch.equal(again.modules[name].B, m.B)
        assert again.modules[name].scale == pytest.approx(m.scale, rel=1e-12)


def test_adapter_applied_restores_base(tiny_lm):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    adapter = random_adapter(tiny_lm.model, "x", tiny_lm.model_id)
    with tiny_lm.adapter_applied(adapter):
        pass
    with tiny_lm.deltas_folded({n: m.delta() for n, m in adapter.modules.items()}):
        pass
    after = tiny_lm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _save(adapter, folder):
    adapter.save(folder)
    return folder


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(AdapterError, match="no such folder"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_adapter(tmp_path / "empty")


def test_missing_weights_and_corrupt_safetensors(tiny_lm, tmp_path):
    folder = _save(random_adapter(tiny_lm.model, "a", tiny_lm.model_id), tmp_path / "a")
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="cannot read .*adapter_model.safetensors.*corrupt"):
        load_adapter(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no weights"):
        load_adapter(folder)


@pytest.mark.parametrize("field,value", [("use_dora", True), ("lora_bias", True), ("fan_in_fan_out", True),
                                         ("modules_to_save", ["lm_head"]), ("peft_type", "IA3")])
def test_unsupported_peft_features(tiny_lm, tmp_path, field, value):
    folder = _save(random_adapter(tiny_lm.model, "a", tiny_lm.model_id), tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=field):
        load_adapter(folder)


def test_nan_weights_refused(tiny_lm, tmp_path):
    adapter = random_adapter(tiny_lm.model, "a", tiny_lm.model_id)
    next(iter(adapter.modules.values())).B[0, 0] = float("nan")
    folder = _save(adapter, tmp_path / "a")
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter(folder)


def test_pool_validation(tiny_lm, tiny_t5):
    a = random_adapter(tiny_lm.model, "a", tiny_lm.model_id)
    other_base = random_adapter(tiny_lm.model, "b", "org/another-model")
    with pytest.raises(AdapterError, match="trained on base model 'org/another-model'"):
        ExpertPool(tiny_lm.model_id, [a, other_base])
    fewer = random_adapter(tiny_lm.model, "c", tiny_lm.model_id, targets=("q_proj",))
    with pytest.raises(AdapterError, match="target different modules"):
        ExpertPool(tiny_lm.model_id, [a, fewer])
    with pytest.raises(AdapterError, match="duplicate"):
        ExpertPool(tiny_lm.model_id, [a, a])
    # adapters of another architecture do not fit the model
    t5_pool = ExpertPool(tiny_lm.model_id, [random_adapter(tiny_t5.model, "t5", tiny_lm.model_id, targets=("q", "v"))])
    with pytest.raises(AdapterError, match="base model does not have"):
        t5_pool.check_model(tiny_lm.model)


def test_pool_sampling_is_seeded(make_pool):
    pool = make_pool(6)
    assert pool.sample(3, seed=1).names == pool.sample(3, seed=1).names
    assert len(pool.sample(3, seed=1)) == 3 and pool.sample(None, seed=0) is pool
    assert {tuple(pool.sample(3, seed=s).names) for s in range(10)} != {tuple(pool.sample(3, seed=0).names)}
