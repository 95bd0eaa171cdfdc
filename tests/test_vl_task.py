"""The DreamBooth task: data parsing, prompts of composition sets, CLIP-T/CLIP-I by hand, evaluate's files, bad data."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.errors import ConfigError, DataError
from methods.base import Composed, FitReport
from tasks.dreambooth import FIT_TEMPLATES, DreamBoothTask, load_dreambooth
from test_vl_common import DATA_ROOT, task_cfg, tiny_clip_cfg

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "dreambooth").is_dir(), reason="needs ../shared/data/dreambooth")
MOLE_SET = "dog6+wolf_plushie+backpack"


@pytest.fixture(scope="module")
def scorer():
    from tasks.clip_score import ClipScorer

    return ClipScorer.from_config(tiny_clip_cfg(), "cpu")


def task_with(tmp_path=None, **overrides):
    task = DreamBoothTask(task_cfg(**overrides), str(DATA_ROOT))
    if tmp_path is not None:
        task.output_dir = tmp_path
    return task


def random_image(seed: int, size=(40, 50)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


class FakeGenerator:
    """Stands in for a composed diffusion model: a deterministic image per (prompt, seed, image index)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, n_images, seed, **kwargs):
        self.calls.append((list(prompts), n_images, seed, kwargs))
        return [random_image(hash((p, seed, j)) % 2**31, (32, 32)) for p in prompts for j in range(n_images)]


def test_data_parses():
    data = load_dreambooth(str(DATA_ROOT / "dreambooth"))
    assert len(data.subjects) == 30 and sum(len(s.images) for s in data.subjects.values()) == 158
    assert (len(data.object_prompts), len(data.live_prompts)) == (25, 25)
    assert data.object_prompts[0] == "a {0} {1} in the jungle" and data.live_prompts[-1] == "a cube shaped {0} {1}"
    assert data.subjects["wolf_plushie"].cls == "stuffed animal" and data.subjects["dog6"].live
    assert not data.subjects["backpack"].live


def test_prompts_of_sets():
    task = task_with(sets=[MOLE_SET, "can+teapot", "dog2+cat2"], limit=None)
    fit, evals = task.split(MOLE_SET)
    assert len(evals) == 15  # live and object subjects: the templates both lists share
    assert evals[0].input == "a izz dog and a wrs stuffed animal and a sks backpack in the jungle"
    assert json.loads(evals[0].target) == {"clip_text": "a dog and a stuffed animal and a backpack in the jungle"}
    assert evals[-1].input == "a cube shaped izz dog and a wrs stuffed animal and a sks backpack"
    objects = task.split("can+teapot")[1]
    assert len(objects) == 25 and "floating on top of water" in objects[13].input
    assert "wearing a red hat" in task.split("dog2+cat2")[1][10].input
    # fit examples: neutral prompts with one reference photo each, never an eval prompt
    assert len(fit) == len(FIT_TEMPLATES) * 16 and not {e.input for e in fit} & {e.input for e in evals}
    target = json.loads(fit[0].target)
    assert target["subject"] == "dog6" and target["image"].endswith("dog6/00.jpg")
    assert target["clip_text"] == "a photo of a dog and a stuffed animal and a backpack"
    class Names:  # stands in for the pool: its subset is the names asked for
        def subset(self, names):
            return names

    assert task.unit_pool([MOLE_SET], Names(), seed=0) == ["dog6", "wolf_plushie", "backpack"]
    assert len(task.eval_examples(MOLE_SET)) == 15
    tokens = task_with(sets=["dog6+backpack"], tokens={"dog6": "olis"}, clip_t_text="full")
    assert tokens.split("dog6+backpack")[1][0].input == "a olis dog and a sks backpack in the jungle"
    first = tokens.split("dog6+backpack")[1][0]
    assert json.loads(first.target)["clip_text"] == first.input  # clip_t_text=full keeps the tokens


def test_clip_scores_by_hand_equal_the_scorer(scorer):
    from open_clip.tokenizer import SimpleTokenizer

    images = [random_image(i) for i in range(3)]
    texts = ["a dog in the jungle", "a red backpack", "a stuffed animal on the beach"]
    references = [random_image(10 + i, (60, 45)) for i in range(2)]
    model = copy.deepcopy(scorer.model).double()
    mean, std = torch.tensor(scorer.mean).view(3, 1, 1), torch.tensor(scorer.std).view(3, 1, 1)

    def by_hand_image(image):  # shorter side to 32 (bicubic), centre crop, [0, 1], normalize
        w, h = image.size
        size = (32, int(32 * h / w)) if w <= h else (int(32 * w / h), 32)
        image = image.resize(size, Image.BICUBIC)
        left, top = int(round((size[0] - 32) / 2)), int(round((size[1] - 32) / 2))
        x = torch.from_numpy(np.asarray(image.crop((left, top, left + 32, top + 32)), dtype=np.float64) / 255)
        x = (x.permute(2, 0, 1) - mean) / std
        f = model.encode_image(x[None].double())[0]
        return f / f.norm()

    def by_hand_text(text):
        tokens = [49406, *SimpleTokenizer().encode(text), 49407]
        f = model.encode_text(torch.tensor([tokens + [0] * (77 - len(tokens))]))[0]
        return f / f.norm()

    with torch.no_grad():
        img = torch.stack([by_hand_image(i) for i in images])
        txt = torch.stack([by_hand_text(t) for t in texts])
        ref = torch.stack([by_hand_image(i) for i in references])
    clip_t = (img * txt).sum(-1)
    clip_i = (img @ ref.T).mean(-1)
    assert torch.allclose(scorer.clip_t(images, texts).double(), clip_t, atol=1e-5, rtol=0)
    assert torch.allclose(scorer.clip_i(images, scorer.encode_images(references)).double(), clip_i, atol=1e-5, rtol=0)
    assert scorer.label == "tiny-random (meaningless)"
    # the differentiable path (used to train MoLE's gates) agrees on a square image of the CLIP size
    square = random_image(5, (32, 32))
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    assert torch.allclose(scorer.encode_pixels(pixels), scorer.encode_images([square]), atol=1e-5)


def test_evaluate_scores_images_and_contact_sheet(tmp_path, scorer):
    task = task_with(tmp_path, sets=[MOLE_SET], limit=2, n_images=2, seeds=[0, 1])
    fake = FakeGenerator()
    scores, rows = task.evaluate(Composed(fake, FitReport(), "form=batched"), [MOLE_SET])
    assert [c[1:3] for c in fake.calls] == [(2, 0), (2, 1)] and fake.calls[0][3]["num_inference_steps"] == 4
    assert len(rows) == 8 and rows[0]["scorer"] == "tiny-random (meaningless)"
    assert {s.metric for s in scores} == {"clip_t", "clip_i", "clip_i/dog6", "clip_i/wolf_plushie", "clip_i/backpack"}
    images = [Image.open(tmp_path / r["image"]) for r in rows]
    assert all(r["image"].startswith(f"images/{MOLE_SET}/form=batched/") for r in rows)
    by_metric = {s.metric: s for s in scores}
    clip_t = scorer.clip_t(images, [r["clip_text"] for r in rows])
    assert by_metric["clip_t"].value == pytest.approx(float(clip_t.mean()), abs=1e-6) and by_metric["clip_t"].n == 8
    per_subject = {}
    for subject in ("dog6", "wolf_plushie", "backpack"):
        refs = [Image.open(p).convert("RGB") for p in sorted((DATA_ROOT / "dreambooth" / subject).glob("*.jpg"))]
        per_subject[subject] = float(scorer.clip_i(images, scorer.encode_images(refs)).mean())
        assert by_metric[f"clip_i/{subject}"].value == pytest.approx(per_subject[subject], abs=1e-6)
        first = float(scorer.clip_i(images[:1], scorer.encode_images(refs))[0])
        assert rows[0][f"clip_i/{subject}"] == pytest.approx(first, abs=1e-6)
    assert by_metric["clip_i"].value == pytest.approx(sum(per_subject.values()) / 3, abs=1e-6)
    sheet = Image.open(tmp_path / f"contact-{MOLE_SET}-form=batched.png")
    assert sheet.size == (4 * 32, 2 * 32)  # rows: prompts; columns: 2 seeds × 2 images
    first_row = [r for r in rows if r["prompt"] == rows[0]["prompt"]]
    assert [(r["seed"], r["image_index"]) for r in first_row] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert np.array_equal(np.asarray(sheet)[:32, 64:96], np.asarray(Image.open(tmp_path / first_row[2]["image"])))
    assert task.record_info()["scorer"] == "tiny-random (meaningless)"
    # what a resumed job copies for this unit is exactly what evaluating it wrote
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*.png")}
    artifacts = [Path(a) for a in task.unit_artifacts([MOLE_SET], ["form=batched"])]
    assert all((tmp_path / a).exists() for a in artifacts)
    assert all(any(w == a or a in w.parents for a in artifacts) for w in written)


def test_fit_score_for_the_oracle(scorer):
    task = task_with(sets=["dog6+backpack"])
    examples = task.fit_examples(3, 0, ["dog6+backpack"])
    value, rows = task.score_examples(Composed(FakeGenerator(), FitReport()), examples)
    assert len(rows) == 3 and value == pytest.approx(np.mean([(r["clip_t"] + r["clip_i"]) / 2 for r in rows]), abs=1e-6)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="unknown DreamBooth subject 'dog42'"):
        task_with(sets=["dog6+dog42"])
    with pytest.raises(ConfigError, match="distinct subject names"):
        task_with(sets=["dog6+dog6"])
    with pytest.raises(ConfigError, match="per_subtask"):
        task_with(fit_scope="joint")
    with pytest.raises(DataError, match="paths.data_root"):
        DreamBoothTask(task_cfg(sets=[MOLE_SET]), None)
    with pytest.raises(ConfigError, match="no unique token for subject 'teddy'"):
        from tasks.dreambooth import unique_token

        unique_token("teddy")
    # an image folder without images
    root = tmp_path / "data"
    (root / "dreambooth").mkdir(parents=True)
    shutil.copy(DATA_ROOT / "dreambooth" / "prompts_and_classes.txt", root / "dreambooth")
    shutil.copytree(DATA_ROOT / "dreambooth" / "dog6", root / "dreambooth" / "dog6")
    (root / "dreambooth" / "backpack").mkdir()
    (root / "dreambooth" / "backpack" / "notes.txt").write_text("no photos here")
    with pytest.raises(DataError, match="'backpack': no images"):
        DreamBoothTask(task_cfg(sets=["dog6+backpack"]), str(root))
    broken = tmp_path / "broken" / "dreambooth"
    broken.mkdir(parents=True)
    (broken / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\ndog6,dog\n")
    with pytest.raises(DataError, match="expected a Classes section"):
        DreamBoothTask(task_cfg(sets=["dog6+backpack"]), str(broken.parent))
    with pytest.raises(DataError, match="is missing"):
        DreamBoothTask(task_cfg(sets=["dog6+backpack"]), str(tmp_path / "nowhere"))
