"""Model folders built or converted on first use (bench.models.loading.materialize)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import bench.models.loading as models
from tests.conftest import model_cfg


def test_jobs_that_start_together_build_one_complete_model_folder(tmp_path, monkeypatch):
    """A sweep's first wave materializes the model in several workers at once: one builds (under the folder's
    lock), the others wait and reuse its folder; no temporary folder is left behind (they once shared one and
    crashed, then each built its own copy)."""
    build = models._build_tiny
    build(model_cfg("tiny_llama"), tmp_path / "warm-up")  # transformers' lazy imports are not thread-safe
    builds = []

    def slow_build(cfg, out):
        builds.append(out)
        time.sleep(1.0)  # the others arrive while this one builds
        build(cfg, out)

    monkeypatch.setattr(models, "_build_tiny", slow_build)
    with ThreadPoolExecutor(3) as pool:
        folders = list(pool.map(lambda _: models.materialize(model_cfg("tiny_llama"), tmp_path), range(3)))

    target = tmp_path / "models" / "tiny_llama"
    assert folders == [target] * 3 and len(builds) == 1
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".tiny_llama.lock", "tiny_llama"]


def test_tokenizer_eos_follows_the_model_config(tmp_path):
    """A converted model whose tokenizer names another EOS than its config (transformers 5.17 reads SmolLM2's
    GGUF tokenizer with EOS <|im_start|>, config <|im_end|>) is loaded with the model's EOS, so targets end
    with the same token whatever version converted the model."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    built = models.materialize(model_cfg("tiny_llama"), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(built))
    right = tokenizer.eos_token
    tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None
    tokenizer.save_pretrained(str(built))
    assert AutoTokenizer.from_pretrained(str(built)).eos_token == "<|im_start|>"

    cfg = OmegaConf.merge(model_cfg("tiny_llama"), {"source": "local", "path": str(built)})
    lm = models.load_language_model(cfg, tmp_path, device="cpu")
    assert lm.tokenizer.eos_token == right != "<|im_start|>"
    assert lm.tokenizer.eos_token_id == lm.model.config.eos_token_id
    assert lm.tokenizer.pad_token_id is not None
    labels = lm.encode_pairs(["Q: 1 + 1\nA:"], ["2"])["labels"][0]
    assert labels[labels != -100][-1].item() == lm.model.config.eos_token_id
