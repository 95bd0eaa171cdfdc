"""`task=dreambooth`: compose 2–3 DreamBooth subject LoRAs in one image; CLIP-T and CLIP-I (DESIGN §5).

Data (``<data_root>/dreambooth``, from google/dreambooth): one folder of reference photos per subject and
``prompts_and_classes.txt`` (subject -> class noun; 25 object and 25 live-subject prompt templates).

Subtasks are composition sets named ``subject+subject[+subject]`` (e.g. MoLE's ``dog6+wolf_plushie+backpack``); the
experts of a set are the subjects' LoRAs (`unit_pool`). Each subject is written ``<unique token> <class>``: the
token is a rare single CLIP token per subject (`DEFAULT_TOKENS`, overridable by ``task.tokens``; the expert pool must
be trained with the same table). Prompts of a set: the official templates that fit every subject of the set
(object list if none is live, live list if all are, otherwise the 15 templates the two lists share), with
``{0} {1}`` replaced by the subjects joined in the multi-subject form of Custom Diffusion / MoLE:
``a sks dog and a ygk stuffed animal and a pff backpack in the jungle``. CLIP-T reads the same prompt without the
unique tokens (``a dog and a stuffed animal and a backpack in the jungle``); ``clip_t_text: full`` keeps them.

Each prompt gets ``n_images`` images per seed (image j of every prompt starts from the same noise, for every
method). Scores per set: ``clip_t`` (mean over images), ``clip_i/<subject>`` (mean cosine to that subject's
references) and ``clip_i`` (mean over the set's subjects). Images and a contact sheet (rows: prompts; columns:
seeds × images) go to ``output_dir`` (set by the runner; default a temporary folder).

Fit examples (MoLE's gates): neutral prompts (``a photo of a …``, never an eval template) paired with one reference
photo of one subject; ``Example.target`` is JSON ``{"clip_text", "subject", "image"}`` (eval examples:
``{"clip_text"}``).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bench.errors import ConfigError, DataError
from bench.lora.pool import ExpertPool
from bench.registry import register_task
from tasks.base import Example, Score, Task

PROMPTS_FILE = "prompts_and_classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LIVE_CLASSES = ("cat", "dog")  # DreamBooth's live subjects: the cats and dogs
JOIN = " and a "
FIT_TEMPLATES = ("a photo of a {0} {1}", "a picture of a {0} {1}", "a close-up photo of a {0} {1}",
                 "a good photo of a {0} {1}", "a rendering of a {0} {1}")
# A rare word that CLIP's BPE keeps as one token, per subject (DreamBooth's `sks` for the first).
DEFAULT_TOKENS = {
    "backpack": "sks", "backpack_dog": "ygk", "bear_plushie": "pff", "berry_bowl": "kke", "can": "iwm",
    "candle": "xpo", "cat": "bhk", "cat2": "lhp", "clock": "wib", "colorful_sneaker": "rcb", "dog": "khz",
    "dog2": "lbj", "dog3": "tmw", "dog5": "yql", "dog6": "izz", "dog7": "evp", "dog8": "fnc", "duck_toy": "dwp",
    "fancy_boot": "aew", "grey_sloth_plushie": "cbp", "monster_toy": "hcs", "pink_sunglasses": "smx",
    "poop_emoji": "nuh", "rc_car": "fgo", "red_cartoon": "tbr", "robot_toy": "kgs", "shiny_sneaker": "fik",
    "teapot": "awg", "vase": "csn", "wolf_plushie": "wrs",
}


@dataclass(frozen=True)
class Subject:
    name: str
    cls: str
    images: tuple[Path, ...]

    @property
    def live(self) -> bool:
        return self.cls in LIVE_CLASSES


@dataclass(frozen=True)
class DreamBoothData:
    subjects: dict[str, Subject]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    def subject(self, name: str) -> Subject:
        if name not in self.subjects:
            raise DataError(f"unknown DreamBooth subject {name!r}; known: {sorted(self.subjects)}")
        subject = self.subjects[name]
        if not subject.images:
            raise DataError(f"DreamBooth subject {name!r}: no images in its folder (expected {IMAGE_SUFFIXES})")
        return subject

    def templates(self, subjects: list[Subject]) -> list[str]:
        """The templates (with ``{0} {1}``) that fit every subject of a set, in the official order."""
        if all(s.live for s in subjects):
            return list(self.live_prompts)
        if not any(s.live for s in subjects):
            return list(self.object_prompts)
        return [p for p in self.object_prompts if p in self.live_prompts]


@lru_cache(maxsize=8)
def load_dreambooth(data_dir: str) -> DreamBoothData:
    """Parse ``prompts_and_classes.txt`` and list each subject's photos (a folder may be missing or empty here;
    `DreamBoothData.subject` refuses such a subject when it is used)."""
    folder = Path(data_dir)
    path = folder / PROMPTS_FILE
    if not path.is_file():
        raise DataError(f"DreamBooth data: {path} is missing (set paths.data_root to the folder holding dreambooth/)")
    text = path.read_text()
    try:
        classes_part, prompts_part = text.split("\nPrompts", 1)
        object_part, live_part = prompts_part.split("Live Subject Prompts", 1)
    except ValueError:
        raise DataError(f"{path}: expected a Classes section, then Object Prompts and Live Subject Prompts") from None
    rows = re.findall(r"^([A-Za-z0-9_]+),(.+)$", classes_part, flags=re.M)
    subjects = {}
    for name, cls in rows:
        if name == "subject_name":
            continue
        sub = folder / name
        images = tuple(sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)) if sub.is_dir() else ()
        subjects[name] = Subject(name, cls.strip(), images)
    template = re.compile(r"^'(.*)'\.format\(unique_token, class_token\),?\s*$", flags=re.M)
    object_prompts, live_prompts = template.findall(object_part), template.findall(live_part)
    if not subjects or len(object_prompts) != 25 or len(live_prompts) != 25:
        raise DataError(f"{path}: found {len(subjects)} subjects, {len(object_prompts)} object and "
                        f"{len(live_prompts)} live prompts (expected 30, 25, 25)")
    return DreamBoothData(subjects, tuple(object_prompts), tuple(live_prompts))


def set_subjects(name: str) -> list[str]:
    """``dog6+wolf_plushie+backpack`` -> its subject names."""
    parts = [p.strip() for p in str(name).split("+")]
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"composition set {name!r}: expected distinct subject names joined by '+'")
    return parts


def unique_token(subject: str, overrides=None) -> str:
    overrides = overrides or {}
    if subject in overrides:
        return str(overrides[subject])
    if subject not in DEFAULT_TOKENS:
        raise ConfigError(f"no unique token for subject {subject!r}: add it to task.tokens / experts train.tokens")
    return DEFAULT_TOKENS[subject]


def fill(template: str, phrases: list[str]) -> str:
    """An official template with its ``{0} {1}`` replaced by the subjects' phrases joined with ' and a '."""
    return template.replace("{0} {1}", JOIN.join(phrases))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text) or "default"


@register_task("dreambooth")
class DreamBoothTask(Task):
    domain = "vl"

    def __init__(self, cfg, data_root: str | None = None) -> None:
        super().__init__(cfg, data_root)
        if cfg.get("fit_scope", "per_subtask") != "per_subtask":
            raise ConfigError("task.fit_scope must be per_subtask for dreambooth: each composition set has its own "
                              "experts")
        if int(cfg.n_images) < 1 or not list(cfg.seeds):
            raise ConfigError("task.n_images must be ≥ 1 and task.seeds a non-empty list")
        if cfg.get("clip_t_text", "class") not in ("class", "full"):
            raise ConfigError(f"task.clip_t_text={cfg.clip_t_text!r}; choose class or full")
        self.data = load_dreambooth(str(self.data_dir()))
        for name in self.all_subtasks():
            for subject in set_subjects(name):
                self.data.subject(subject)
                unique_token(subject, cfg.get("tokens"))
        self.output_dir: Path | None = None  # set by the runner before evaluate
        self._scorer = None
        self._references: dict[str, object] = {}

    def data_dir(self) -> Path:
        if not self.data_root:
            raise DataError("task dreambooth needs paths.data_root (the folder holding dreambooth/)")
        return Path(self.data_root) / str(self.cfg.get("data_subdir", "dreambooth"))

    def data_files(self) -> list[Path]:
        """The prompts file and the reference photos of every subject of the chosen sets."""
        subjects = dict.fromkeys(s for name in self.subtasks() for s in set_subjects(name))
        return [self.data_dir() / PROMPTS_FILE] + [p for s in subjects for p in self.data.subject(s).images]

    # --------------------------------------------------------------- subtasks, experts, examples
    def all_subtasks(self) -> list[str]:
        return [str(s) for s in self.cfg.sets]

    def unit_artifacts(self, unit: list[str], variants: list[str]) -> list[str]:
        """The unit's generated images and its contact sheet per variant (where `evaluate` writes them)."""
        return ([f"images/{_slug(s)}" for s in unit]
                + [self._sheet_name(s, v) for s in unit for v in variants])

    @staticmethod
    def _sheet_name(subtask: str, variant: str) -> str:
        return f"contact-{_slug(subtask)}-{_slug(variant or 'default')}.png"

    def unit_pool(self, unit: list[str], pool: ExpertPool, seed: int) -> ExpertPool:
        """The experts (subjects) a fit unit composes."""
        return pool.subset([s for name in unit for s in set_subjects(name)])

    def phrase(self, subject: str, with_token: bool = True) -> str:
        cls = self.data.subject(subject).cls
        return f"{unique_token(subject, self.cfg.get('tokens'))} {cls}" if with_token else cls

    def _texts(self, template: str, subjects: list[str]) -> tuple[str, str]:
        """(prompt, CLIP-T text) of a template for a set."""
        full = self.cfg.get("clip_t_text", "class") == "full"
        prompt = fill(template, [self.phrase(s) for s in subjects])
        return prompt, fill(template, [self.phrase(s, full) for s in subjects])

    def split(self, subtask: str) -> tuple[list[Example], list[Example]]:
        subjects = set_subjects(subtask)
        evals = []
        for template in self.data.templates([self.data.subject(s) for s in subjects]):
            prompt, clip_text = self._texts(template, subjects)
            evals.append(Example(prompt, json.dumps({"clip_text": clip_text}), subtask))
        fit = []
        for template in FIT_TEMPLATES:
            prompt, clip_text = self._texts(template, subjects)
            for s in subjects:
                for image in self.data.subject(s).images:
                    target = {"clip_text": clip_text, "subject": s, "image": str(image)}
                    fit.append(Example(prompt, json.dumps(target), subtask))
        return fit, evals

    def prompt(self, example: Example) -> str:
        return example.input

    # --------------------------------------------------------------- scoring
    def scorer(self):
        if self._scorer is None:
            import torch

            from tasks.clip_score import ClipScorer

            device = str(self.cfg.clip.get("device", "auto"))
            device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
            self._scorer = ClipScorer.from_config(self.cfg.clip, device, self.cfg.clip.get("cache_dir"))
        return self._scorer

    def record_info(self) -> dict:
        """What the records must carry about this task's scores (a random scorer is labelled meaningless)."""
        return {**self.scorer().info(), "clip_model": str(self.cfg.clip.model),
                "clip_pretrained": self.cfg.clip.get("pretrained")}

    def references(self, subject: str):
        """Unit CLIP embeddings (m, D) of a subject's reference photos."""
        if subject not in self._references:
            from PIL import Image

            images = [Image.open(p).convert("RGB") for p in self.data.subject(subject).images]
            self._references[subject] = self.scorer().encode_images(images)
        return self._references[subject]

    def _generate(self, composed, prompts: list[str], n_images: int, seed: int, desc: str) -> list:
        cfg = self.cfg
        return composed.generate(
            prompts, n_images=n_images, seed=int(seed), num_inference_steps=int(cfg.num_inference_steps),
            guidance_scale=float(cfg.guidance_scale), negative_prompt=str(cfg.get("negative_prompt") or ""),
            batch_size=int(cfg.batch_size), progress=True, desc=desc,
        )

    def evaluate(self, composed, subtasks: list[str]) -> tuple[list[Score], list[dict]]:
        out = Path(self.output_dir) if self.output_dir else Path(tempfile.mkdtemp(prefix="dreambooth-"))
        self.output_dir = out
        scorer, n = self.scorer(), int(self.cfg.n_images)
        scores, predictions = [], []
        for subtask in subtasks:
            subjects = set_subjects(subtask)
            examples = self.eval_examples(subtask)
            folder = out / "images" / _slug(subtask) / _slug(composed.variant or "default")
            folder.mkdir(parents=True, exist_ok=True)
            images, rows, grid = [], [], []  # grid: (prompt, seed, image) order of the contact sheet
            for si, seed in enumerate(self.cfg.seeds):
                batch = self._generate(composed, [e.input for e in examples], n,
                                       seed, f"{subtask} {composed.variant}".strip())
                for k, image in enumerate(batch):
                    example = examples[k // n]
                    path = folder / f"p{k // n:02d}-s{seed}-{k % n}.png"
                    image.save(path)
                    grid.append((k // n, si, k % n, len(images)))
                    images.append(image)
                    rows.append({"subtask": subtask, "variant": composed.variant, "prompt": example.input,
                                 "clip_text": json.loads(example.target)["clip_text"], "seed": int(seed),
                                 "image_index": k % n, "image": str(path.relative_to(out)), "scorer": scorer.label})
            clip_t = scorer.clip_t(images, [r["clip_text"] for r in rows])
            per_subject = {s: scorer.clip_i(images, self.references(s)) for s in subjects}
            for i, row in enumerate(rows):
                row["clip_t"] = float(clip_t[i])
                row.update({f"clip_i/{s}": float(v[i]) for s, v in per_subject.items()})
            subject_means = {s: float(v.mean()) for s, v in per_subject.items()}
            scores.append(Score(subtask, "clip_t", float(clip_t.mean()), len(images)))
            scores.append(Score(subtask, "clip_i", sum(subject_means.values()) / len(subjects), len(images)))
            scores.extend(Score(subtask, f"clip_i/{s}", v, len(images)) for s, v in subject_means.items())
            sheet = out / self._sheet_name(subtask, composed.variant)
            contact_sheet([images[g[-1]] for g in sorted(grid)], columns=n * len(self.cfg.seeds)).save(sheet)
            predictions.extend(rows)
        return scores, predictions

    def score_examples(self, composed, examples: list[Example]) -> tuple[float, list[dict]]:
        """The fit-time score (oracle): mean of CLIP-T and CLIP-I (to each example's reference photo)."""
        from PIL import Image

        scorer = self.scorer()
        prompts = list(dict.fromkeys(e.input for e in examples))
        generated = dict(zip(prompts, self._generate(composed, prompts, 1, self.cfg.seeds[0], "fit score")))
        targets = [json.loads(e.target) for e in examples]
        images = [generated[e.input] for e in examples]
        clip_t = scorer.clip_t(images, [t["clip_text"] for t in targets])
        refs = scorer.encode_images([Image.open(t["image"]).convert("RGB") for t in targets])
        clip_i = (scorer.encode_images(images) * refs).sum(-1)
        rows = [{"prompt": e.input, "reference": t["image"], "clip_t": float(a), "clip_i": float(b)}
                for e, t, a, b in zip(examples, targets, clip_t, clip_i)]
        return float((clip_t.mean() + clip_i.mean()) / 2), rows


def contact_sheet(images: list, columns: int):
    """A grid of equally sized images, `columns` per row, filled row by row."""
    from PIL import Image

    if not images:
        raise ValueError("no images for a contact sheet")
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return sheet
