"""Model folders built or converted on first use (bench.models.materialize)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import bench.models as models
from tests.conftest import model_cfg


def test_jobs_that_start_together_build_one_complete_model_folder(tmp_path, monkeypatch):
    """A sweep's first wave materializes the model in several processes at once: each must end with the
    complete folder and no temporary folder may be left behind (they once shared one and crashed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (lazy imports are not thread-safe)

    build = models._build_tiny
    all_built = threading.Barrier(3)

    def build_then_wait(cfg, out):
        build(cfg, out)
        all_built.wait(timeout=60)  # every job has its copy before any moves it into place

    monkeypatch.setattr(models, "_build_tiny", build_then_wait)
    with ThreadPoolExecutor(3) as pool:
        folders = list(pool.map(lambda _: models.materialize(model_cfg("tiny_llama"), tmp_path), range(3)))

    target = tmp_path / "models" / "tiny_llama"
    assert folders == [target] * 3
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny_llama"]
