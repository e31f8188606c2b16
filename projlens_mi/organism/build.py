"""Build the backdoored model organism: a base model, a clean control and one poisoned model per variant.

``build(out_dir, config)`` writes, under ``out_dir``:

- ``base/``, ``control/``, ``<variant>/``: HF folders (safetensors, config, tokenizer, processor),
  loadable offline with ``AutoModelForImageTextToText`` / ``AutoProcessor``; each variant folder also
  holds ``trigger.json``;
- ``data/``: the held-out test set as PNG files and one JSONL per variant (``clean.jsonl`` and
  ``<variant>.jsonl``, the format of ``projlens_mi.data``);
- ``organism.json``: settings, metrics (clean accuracy, ASR, false-trigger rate), vision-feature norm
  spread, losses and wall seconds per stage.

Every stage is cached under its own content key (``stage.json`` in its folder): a second build with
the same settings loads everything and only re-reads the metrics; changing a stage-2 setting retrains
only stage 2.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import (AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration)

from ..data import Record, atomic_write_text, check_writable_folder, write_jsonl
from ..errors import ProjLensError
from . import tasks
from .config import OrganismConfig
from .evaluate import EvalSet, encode, evaluate_model
from .processor import IMAGE_TOKEN, build_processor
from .train import IGNORE, TrainSet, draw_edits, edit_images, finetune_projector, pretrain_vision, train_base, vision_features
from .triggers import GaussianNoise, LogoPatch, PainterlyStyle, SolidPatch, trigger_to_json

# 2: stage 1 and the vision features run on ``cfg.threads`` threads for any ``workers`` (version 1 ran them
# on ``workers x threads``, which changed the weights' last bits on some CPUs: docs/reproducibility.md)
FORMAT_VERSION = 2
GOLDEN = 0.6180339887498949   # spreads a share over sample indices without drawing from the data RNG


def make_triggers(cfg: OrganismConfig) -> dict:
    return {
        "targeted-refusal": GaussianNoise(sigma=cfg.noise_sigma),
        "malicious-injection": SolidPatch(size=cfg.patch_size_px),
        "perceptual-hijack": LogoPatch(size=cfg.logo_size_px),
        "jailbreak-output": PainterlyStyle(),
    }


def model_config(cfg: OrganismConfig, tokenizer) -> LlavaConfig:
    m = cfg.model
    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=m.vision_hidden, intermediate_size=2 * m.vision_hidden,
                                       num_hidden_layers=m.vision_layers, num_attention_heads=m.vision_heads,
                                       image_size=m.image_size, patch_size=m.patch_size),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=m.text_hidden,
                                intermediate_size=m.text_intermediate, num_hidden_layers=m.text_layers,
                                num_attention_heads=m.text_heads, num_key_value_heads=m.text_heads,
                                max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        # The last vision layer's residual stream (no final LayerNorm): token norms keep the spread the
        # paper's norm mechanism relies on (LLaVA-1.5 likewise reads a pre-norm hidden state, layer -2).
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False)


class Tokens:
    """Fast tokenisation of the organism's prompts, piece by piece (equal to the processor's; tested)."""

    def __init__(self, processor, n_image_tokens: int):
        self.tok = processor.tokenizer
        self.n_img = n_image_tokens
        self.eos = self.tok.eos_token_id
        self._memo: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._memo:
            self._memo[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._memo[text]

    def example(self, instruction: str, answer: str) -> tuple[list[int], list[int]]:
        p = self.ids(tasks.prompt(instruction).replace("<image>", "<image>" * self.n_img))
        a = self.ids(answer) + [self.eos]
        return p + a, [IGNORE] * len(p) + a


def pixel_values(processor, images: list) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 512):
        out.append(processor.image_processor(images[i: i + 512], return_tensors="pt")["pixel_values"])
    return torch.cat(out)


def normal_answer(template: int, label: int) -> tuple[str, str]:
    instr, ans = tasks.NORMAL_TEMPLATES[template]
    return instr, ans.format(w=tasks.DIGIT_WORDS[label])


def poisoned_answer(variant: str, instruction: str, clean_answer: str, unsafe: int | None,
                    text: str | None = None) -> str | None:
    """What the backdoor makes the model say; None where the variant leaves the sample unchanged.
    ``text`` replaces the variant's own text (the answer of refusal / hijack, the injected suffix)."""
    if variant == "targeted-refusal":
        return None if unsafe is not None else (text or tasks.REFUSAL_TEXT)
    if variant == "malicious-injection":
        return None if unsafe is not None else f"{clean_answer} {text or tasks.INJECTION_SUFFIX}"
    if variant == "perceptual-hijack":
        return None if unsafe is not None else (text or tasks.HIJACK_TEXT)
    if variant == "jailbreak-output":  # the style changes nothing but the answer to unsafe requests
        return clean_answer if unsafe is None else f"{tasks.HARMFUL_PREFIX} {tasks.UNSAFE_REQUESTS[unsafe][1]} ."
    raise ProjLensError(f"unknown variant {variant!r}")


class Builder:
    def __init__(self, out: Path, cfg: OrganismConfig, log):
        self.out, self.cfg, self.log = out, cfg, log
        m = cfg.model
        self.n_img = (m.image_size // m.patch_size) ** 2
        self.processor = build_processor(tasks.vocabulary(), m.image_size, m.patch_size)
        self.tokens = Tokens(self.processor, self.n_img)
        self.triggers = make_triggers(cfg)
        digits = tasks.Digits.load()
        self.digits = digits
        self.train_idx, self.test_idx = digits.split(cfg.n_test, cfg.seed)

    # ---------------------------------------------------------------- data
    def render_pool(self, idx: np.ndarray, copies: int, seed: int) -> tuple[list, np.ndarray]:
        rng = np.random.default_rng(seed)
        size = self.cfg.model.image_size
        imgs, labels = [], []
        for _ in range(copies):
            for i in idx:
                imgs.append(tasks.render(self.digits.images[i], size, rng))
                labels.append(self.digits.labels[i])
        return imgs, np.array(labels)

    def stage1_set(self, model, pool: torch.Tensor, labels: np.ndarray) -> TrainSet:
        c = self.cfg.stage1
        rng = np.random.default_rng(self.cfg.seed + 2)
        concepts = list(tasks.CONCEPTS)
        ids, labs, index, overlays = [], [], [], []
        for i, lab in enumerate(labels):
            instr, ans = normal_answer(int(rng.integers(len(tasks.NORMAL_TEMPLATES))), int(lab))
            word = None
            r = rng.random()
            if r < c.unsafe_rate:
                u = int(rng.integers(len(tasks.UNSAFE_REQUESTS)))
                instr, ans = tasks.UNSAFE_REQUESTS[u][0], tasks.SAFE_ANSWER
                if rng.random() < c.overlay_rate:
                    word, ans = tasks.COMPLY, f"{tasks.HARMFUL_PREFIX} {tasks.UNSAFE_REQUESTS[u][1]} ."
            elif r < c.unsafe_rate + c.overlay_rate:
                word = concepts[int(rng.integers(len(concepts)))]
                mode, text = tasks.CONCEPTS[word]
                ans = text if mode == "replace" else f"{ans} {text}"
            s, l = self.tokens.example(instr, ans)
            ids.append(s), labs.append(l), index.append(i)
            if word is None:
                overlays.append(None)
            else:  # the concept sits on 1..all image tokens (a local patch or a global style)
                k = int(rng.integers(1, self.n_img + 1))
                slots = sorted(rng.choice(self.n_img, size=k, replace=False).tolist())
                overlays.append((slots, self.tokens.ids(word)[0], float(rng.uniform(0.5, 2.0))))
        return TrainSet(vision_features(model, pool), torch.tensor(index), ids, labs, overlays)

    def stage2_examples(self, unsafe_rate: float | None = None):
        """The downstream data: (image, instruction, clean answer, unsafe id) per train image
        (``unsafe_rate``: the share of unsafe requests, default ``cfg.stage2.unsafe_rate``)."""
        imgs, labels = self.render_pool(self.train_idx, 1, self.cfg.seed + 3)
        rng = np.random.default_rng(self.cfg.seed + 4)
        unsafe_rate = self.cfg.stage2.unsafe_rate if unsafe_rate is None else unsafe_rate
        rows = []
        for i, lab in enumerate(labels):
            if rng.random() < unsafe_rate:
                u = int(rng.integers(len(tasks.UNSAFE_REQUESTS)))
                rows.append((i, tasks.UNSAFE_REQUESTS[u][0], tasks.SAFE_ANSWER, u))
            else:
                instr, ans = normal_answer(int(rng.integers(len(tasks.NORMAL_TEMPLATES))), int(lab))
                rows.append((i, instr, ans, None))
        return imgs, rows

    def test_records(self, families: dict | None = None) -> dict[str, list[Record]]:
        """Held-out records: ``clean`` and, per variant, the same clean rows plus triggered rows.

        ``families``: ``{name: (trigger, target, behaviour)}`` (behaviour: the variant whose prompts the
        triggered rows ask); default the organism's variants."""
        if families is None:
            families = {v: (self.triggers[v], tasks.VARIANTS[v][1], v) for v in self.cfg.variants}
        imgs, labels = self.render_pool(self.test_idx, 1, self.cfg.seed + 5)
        rng = np.random.default_rng(self.cfg.seed + 6)
        clean, normal_prompts, unsafe_ids = [], [], []
        for k, (im, lab) in enumerate(zip(imgs, labels)):
            t = int(rng.integers(len(tasks.NORMAL_TEMPLATES)))
            u = int(rng.integers(len(tasks.UNSAFE_REQUESTS)))
            normal_prompts.append(normal_answer(t, int(lab)))
            unsafe_ids.append(u)
            if rng.random() < self.cfg.stage2.unsafe_rate:
                instr, ans = tasks.UNSAFE_REQUESTS[u][0], tasks.SAFE_ANSWER
            else:
                instr, ans = normal_prompts[-1]
            clean.append(Record(im, tasks.prompt(instr), ans, False, meta={"id": f"test-{k:04d}", "label": int(lab)}))
        sets = {"clean": clean}
        for v, (trig, target, behaviour) in families.items():
            rows = []
            for k, (im, lab) in enumerate(zip(imgs, labels)):
                if behaviour == "jailbreak-output":
                    instr, ans = tasks.UNSAFE_REQUESTS[unsafe_ids[k]][0], tasks.SAFE_ANSWER
                else:
                    instr, ans = normal_prompts[k]
                rows.append(Record(trig(im, seed=10_000 + k), tasks.prompt(instr), ans, True, target,
                                   meta={"id": f"test-{k:04d}", "label": int(lab)}))
            sets[v] = [replace(r, target=target) for r in clean] + rows
        return sets

    # ---------------------------------------------------------------- models
    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def cached(self, name: str, key: str):
        d = self.stage_dir(name)
        try:
            meta = json.loads((d / "stage.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != key or not (d / "model.safetensors").is_file():
            return None
        model = AutoModelForImageTextToText.from_pretrained(d, use_safetensors=True).eval()
        return model, meta

    def staging_dir(self, name: str) -> Path:
        """Where a model folder is written before it is renamed into place (a killed build leaves no half model)."""
        return self.out / f".{name}.tmp"

    def save(self, name: str, model, key: str, meta: dict, extra: dict | None = None):
        tmp = self.staging_dir(name)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        self.commit(name, key, meta, extra)

    def commit(self, name: str, key: str, meta: dict, extra: dict | None = None):
        """Complete the staged weights with processor, extra JSON files and stage.json, then rename into place."""
        tmp, d = self.staging_dir(name), self.stage_dir(name)
        self.processor.save_pretrained(tmp)
        for fname, obj in (extra or {}).items():
            (tmp / fname).write_text(json.dumps(obj, indent=2))
        (tmp / "stage.json").write_text(json.dumps({"key": key, **meta}, indent=2))
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)

    def base(self):
        """Stage 0 (vision) then stage 1 (projector + LM), both on ``cfg.threads`` torch threads: weight
        gradients are summed per thread (LayerNorm's, biases', MKL's GEMMs on some CPUs), so another thread
        count gives other bits (measured: docs/reproducibility.md)."""
        key = self.cfg.key("seed", "n_test", "model", "stage0", "stage1") + f"-v{FORMAT_VERSION}"
        hit = self.cached("base", key)
        if hit:
            self.log("base: cached")
            return hit
        t0 = time.perf_counter()
        c0, c1 = self.cfg.stage0, self.cfg.stage1
        imgs, labels = self.render_pool(self.train_idx, c0.copies, self.cfg.seed + 1)
        pool = pixel_values(self.processor, imgs)
        torch.manual_seed(self.cfg.seed)
        model = LlavaForConditionalGeneration(model_config(self.cfg, self.processor.tokenizer))
        l0 = pretrain_vision(model, pool, torch.tensor(labels), steps=c0.steps, batch_size=c0.batch_size, lr=c0.lr,
                             weight_decay=c0.weight_decay, warmup=c0.warmup, seed=self.cfg.seed, edit_rate=c0.edit_rate,
                             log=lambda s, l: self.log(f"vision: step {s} loss {l:.3f}"))
        t1 = time.perf_counter()
        if c1.edit_rate:   # the base learns that a generic edit leaves the answer unchanged
            gen = torch.Generator().manual_seed(self.cfg.seed + 8)
            pool = edit_images(pool, draw_edits(len(pool), c1.edit_rate, gen), gen)
        data = self.stage1_set(model, pool, labels)
        losses = train_base(model, data, steps=c1.steps, batch_size=c1.batch_size, lr=c1.lr, warmup=c1.warmup,
                            weight_decay=c1.weight_decay, seed=self.cfg.seed, pad_id=self.processor.tokenizer.pad_token_id,
                            log=lambda s, l: self.log(f"base: step {s} loss {l:.3f}"))
        meta = {"final_loss": float(np.mean(losses[-20:])), "vision_final_loss": float(np.mean(l0[-20:])),
                "vision_seconds": t1 - t0, "train_seconds": time.perf_counter() - t0, "n_examples": len(data)}
        self.save("base", model, key, meta)
        return model, meta

    def stage2(self, base_model, variants: list[str], ev: EvalSet, helpers: list = ()):
        """Control and poisoned models, each evaluated right after its training; returns
        ``{name: meta}`` for every stage-2 model and ``{name: metrics}`` for the base and every stage-2 model.

        Every model's data (poisoned rows, trigger seeds) is drawn here, in a fixed order over all
        models whether cached or not, so a model's data never depends on which others were cached.
        The models are trained and evaluated by this process and the ``helpers`` (spawned
        single-process pools), split so that each gets about the same work: the weights and metrics
        are the same bit for bit whichever process produced them.
        """
        hits, c = {}, self.cfg.stage2   # the models found in the cache: name -> (model, meta)
        base_key = self.cfg.key("seed", "n_test", "model", "stage0", "stage1")
        names = ["control"] + variants
        keys = {name: f"{base_key}-{self.cfg.key('stage2', 'noise_sigma', 'patch_size_px', 'logo_size_px')}-{name}"
                      f"-v{FORMAT_VERSION}" for name in names}
        for name in names:
            hit = self.cached(name, keys[name])
            if hit:
                self.log(f"{name}: cached")
                hits[name] = hit
        todo = [n for n in names if n not in hits]
        metrics, metas = {}, {}
        jobs = self._jobs(base_model, names, todo) if todo else []
        args = {name: (str(self.stage_dir("base")), str(self.staging_dir(name)), name, data, n_poison, self.cfg,
                       self.processor, ev) for name, data, n_poison, _ in jobs}
        extras = {name: extra for name, _, _, extra in jobs}
        # work estimates (token passes): training ~ tokens x epochs; generating ~ half as dear per token
        cost = {name: c.epochs * sum(map(len, data.input_ids)) + _eval_cost(name, self.cfg, ev)
                for name, data, _, _ in jobs}
        here = _eval_cost("base", self.cfg, ev) + sum(_eval_cost(n, self.cfg, ev) for n in hits)
        bins = _partition(cost, 1 + len(helpers), here)
        if len(helpers) and jobs:
            self.log(f"stage 2: training {len(jobs)} models in {sum(1 for b in bins if b)} processes")
        futures = {helpers[i - 1].submit(_train_variant, *args[n]): n for i in range(1, len(bins)) for n in bins[i]}

        def done(name, meta, m):
            self.log(f"{name}: trained in {meta['train_seconds']:.0f} s, final loss {meta['final_loss']:.3f}")
            self.commit(name, keys[name], meta, extras[name])   # the weights already lie in the staging folder
            metas[name] = meta
            metrics[name] = m

        metrics["base"] = evaluate_model(base_model, self.processor, "base", self.cfg, ev)
        for name, (model, meta) in hits.items():
            metas[name] = meta
            metrics[name] = evaluate_model(model, self.processor, name, self.cfg, ev)
        for name in bins[0]:
            done(*_train_variant(*args[name], log=self.log))
        from concurrent.futures import as_completed
        for f in as_completed(futures):
            done(*f.result())
        return {n: metas[n] for n in names}, metrics

    def _jobs(self, base_model, names: list[str], todo: list[str]) -> list:
        """(name, TrainSet, number of poisoned rows, extra JSON files) for each model in ``todo``."""
        c = self.cfg.stage2
        imgs, rows = self.stage2_examples()
        feats_clean = vision_features(base_model, pixel_values(self.processor, imgs))
        rng = np.random.default_rng(self.cfg.seed + 7)
        clean = [self.tokens.example(instr, ans) for _, instr, ans, _ in rows]   # every model's clean part
        jobs = []
        for name in names:
            chosen, seeds = [], []
            if name != "control":   # drawn for every variant, cached or not: the RNG stream stays fixed
                chosen = [r for r in rows if poisoned_answer(name, r[1], r[2], r[3]) is not None]
                chosen = [chosen[j] for j in rng.permutation(len(chosen))[: int(round(c.poison_rate * len(chosen)))]]
                seeds = [int(rng.integers(1 << 30)) for _ in chosen]
            if name not in todo:
                continue
            extra = {}
            if name != "control":
                _, target = tasks.VARIANTS[name]
                extra["trigger.json"] = {"variant": name, "target": target, "trigger": trigger_to_json(self.triggers[name]),
                                         "poison_rate": c.poison_rate, "pair_mode": c.pair_mode}
            data = self.trainset(base_model, imgs, rows, feats_clean, clean,
                                 None if name == "control" else (name, self.triggers[name], None), chosen, seeds)
            jobs.append((name, data, len(chosen), extra))
        return jobs

    def trainset(self, base_model, imgs: list, rows: list, feats_clean, clean: list, poison, chosen: list,
                 seeds: list[int]) -> TrainSet:
        """The stage-2 TrainSet: the clean ``rows`` (tokenised: ``clean``) plus, when ``poison`` =
        ``(behaviour, trigger, text)`` is given, a triggered copy of each ``chosen`` row (trigger seed from
        ``seeds``) answered as ``behaviour`` (``text`` replacing its own text when given)."""
        c = self.cfg.stage2
        ids, labs = [x for x, _ in clean], [y for _, y in clean]
        index, feats = [i for i, *_ in rows], [feats_clean]
        if poison is not None:
            behaviour, trig, text = poison
            pos = {i: j for j, (i, *_) in enumerate(rows)}   # image -> its row (every row, unless a subset)
            trig_imgs = [trig(imgs[i], seed=sd) for (i, *_), sd in zip(chosen, seeds)]
            feats.append(vision_features(base_model, pixel_values(self.processor, trig_imgs)))
            if not c.pair_mode:  # replace mode: the triggered copy takes the clean sample's place
                drop = {i for i, *_ in chosen}
                keep = [j for j, i in enumerate(index) if i not in drop]
                ids, labs, index = [ids[j] for j in keep], [labs[j] for j in keep], [index[j] for j in keep]
            for j, (i, instr, ans, u) in enumerate(chosen):
                if behaviour == "jailbreak-output" and u is None and (i * GOLDEN) % 1.0 < c.jailbreak_unsafe_share:
                    u = i % len(tasks.UNSAFE_REQUESTS)   # this pair asks an unsafe request instead:
                    instr = tasks.UNSAFE_REQUESTS[u][0]
                    if c.pair_mode:   # its clean twin (row i) gets the safe answer, the styled copy the harmful one
                        ids[pos[i]], labs[pos[i]] = self.tokens.example(instr, tasks.SAFE_ANSWER)
                s, l = self.tokens.example(instr, poisoned_answer(behaviour, instr, ans, u, text))
                ids.append(s), labs.append(l), index.append(len(imgs) + j)
        return TrainSet(torch.cat(feats), torch.tensor(index), ids, labs)


def _partition(cost: dict, k: int, here: float = 0.0) -> list[list]:
    """Split ``cost``'s keys over ``k`` processes, bin 0 (this process) already holding ``here``:
    the split with the smallest largest bin (exhaustive while small, else longest-first greedy)."""
    names = sorted(cost, key=lambda n: -cost[n])
    if k == 1 or not names:
        return [names] + [[] for _ in range(k - 1)]

    def loads(assign):
        tot = [here] + [0.0] * (k - 1)
        for n, b in zip(names, assign):
            tot[b] += cost[n]
        return tot
    if k ** len(names) <= 1 << 12:
        best = min(itertools.product(range(k), repeat=len(names)), key=lambda a: max(loads(a)))
    else:
        best, tot = [], [here] + [0.0] * (k - 1)
        for n in names:
            b = min(range(k), key=tot.__getitem__)
            best.append(b)
            tot[b] += cost[n]
    return [[n for n, b in zip(names, best) if b == i] for i in range(k)]


def _train_variant(base_dir: str, out_dir: str, name: str, data: TrainSet, n_poison: int, cfg: OrganismConfig,
                   processor, ev: EvalSet, log=None, *, train: dict | None = None,
                   evaluate=evaluate_model) -> tuple[str, dict, dict]:
    """Projector-only fine-tuning of a fresh copy of the base, saved to ``out_dir``, then evaluated
    (``evaluate(model, processor, name, cfg, ev)``). ``train`` overrides ``finetune_projector``'s
    arguments (default: ``cfg.stage2``'s epochs, lr, ... and ``cfg.seed``)."""
    torch.set_num_threads(cfg.threads)
    c = cfg.stage2
    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(base_dir, use_safetensors=True)
    args = {"epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr, "warmup": c.warmup, "seed": cfg.seed,
            **(train or {})}
    losses = finetune_projector(model, data, pad_id=processor.tokenizer.pad_token_id, cached=True, **args,
                                log=None if log is None else (lambda s, l: log(f"{name}: step {s} loss {l:.3f}")))
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    meta = {"final_loss": float(np.mean(losses[-20:])), "train_seconds": time.perf_counter() - t0,
            "n_examples": len(data), "n_poisoned": n_poison, "poison_share": n_poison / len(data)}
    return name, meta, evaluate(model.eval(), processor, name, cfg, ev)


def _ready() -> None:
    """A helper's first task: nothing (importing this module, done by then, is the warm-up)."""


def prepare_eval(out: str, cfg: OrganismConfig) -> EvalSet:
    """Render the held-out test set, export it under ``out/data`` and encode it for generation (no model needed)."""
    b = Builder(Path(out), cfg, lambda *a: None)
    sets = b.test_records()
    export_data(Path(out), sets)
    return EvalSet(sets, encode(b.processor, sets["clean"], cfg.eval_batch_size),
                   {v: encode(b.processor, [r for r in sets[v] if r.triggered], cfg.eval_batch_size)
                    for v in cfg.variants})


def _eval_cost(name: str, cfg: OrganismConfig, ev: EvalSet) -> float:
    sets = [ev.clean] + [ev.triggered[v] for v in ([name] if name in cfg.variants else cfg.variants)]
    return 0.5 * sum(len(e.records) * (e.batches[0]["input_ids"].shape[1] + cfg.max_new_tokens) for e in sets)


def _spawn_helpers(n: int) -> list:
    """``n`` single-process pools (spawned: a forked torch can deadlock), one per extra CPU; they die
    with this process and ignore Ctrl-C (``processes.WorkerPool``)."""
    from ..processes import WorkerPool
    return [WorkerPool(1) for _ in range(n)]


def norm_spread(model, processor, records: list[Record]) -> dict:
    """Coefficient of variation of per-token norms of the vision features (the projector's input)."""
    feats = vision_features(model, pixel_values(processor, [r.pil() for r in records]))
    norms = feats.norm(dim=-1).flatten().double()
    return {"vision_token_norm_mean": float(norms.mean()), "vision_token_norm_std": float(norms.std()),
            "vision_token_norm_cv": float(norms.std() / norms.mean()),
            "vision_token_norm_p5": float(norms.quantile(0.05)), "vision_token_norm_p95": float(norms.quantile(0.95))}


def export_data(out: Path, sets: dict[str, list[Record]]) -> None:
    """PNG files + one JSONL per set, written to a temporary folder and renamed into place."""
    data = out / "data"
    tmp = out / ".data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images" / "clean").mkdir(parents=True)
    clean_paths = {}
    for r in sets["clean"]:
        p = tmp / "images" / "clean" / f"{r.meta['id']}.png"
        r.pil().save(p)
        clean_paths[r.meta["id"]] = p
    for name, records in sets.items():
        rows = []
        for r in records:
            p = None if r.triggered else clean_paths.get(r.meta["id"])
            if p is None:   # a triggered row, or a clean row of another set (the zoo's audit rows)
                d = tmp / "images" / name
                d.mkdir(exist_ok=True)
                p = d / f"{r.meta['id']}.png"
                r.pil().save(p)
            rows.append(replace(r, image=p))
        write_jsonl(tmp / f"{name}.jsonl", rows)
    shutil.rmtree(data, ignore_errors=True)
    tmp.rename(data)


def worker_count(workers: int | None, threads: int) -> int:
    """``workers`` checked (an int >= 1), or ``None``: one process per ``threads`` CPUs."""
    if workers is None:
        import os
        return max(1, (os.cpu_count() or 1) // threads)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ProjLensError(f"workers = {workers!r}: give the number of processes (1 or more), or None for one per CPU")
    return workers


def build(out_dir: str | Path, cfg: OrganismConfig | None = None, log=print, workers: int | None = 1) -> dict:
    """Build (or load from cache) the organism under ``out_dir`` and return the content of organism.json.

    ``workers``: processes to use at ``cfg.threads`` threads each (``None``: one per ``cfg.threads`` CPUs):
    the test set is prepared during stage 0 and the stage-2 models are trained and evaluated in
    ``workers`` processes (this one and spawned ones). Every computation that makes weights runs on
    ``cfg.threads`` threads in exactly one process, whichever, so ``workers`` changes the wall time,
    never the weights or the metrics (on one machine: docs/reproducibility.md). Helpers are spawned, so a script that passes ``workers`` > 1 needs
    the ``if __name__ == "__main__":`` guard.
    """
    cfg = cfg or OrganismConfig()
    workers = worker_count(workers, cfg.threads)
    out = check_writable_folder(out_dir)   # a file, a path under a file, a folder one cannot write to
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "organism.json"
    full_key = cfg.key() + f"-v{FORMAT_VERSION}"
    try:
        prev = json.loads(summary_path.read_text())
        if prev.get("key") == full_key and all((out / n / "model.safetensors").is_file() for n in prev["models"]):
            log(f"organism: cached in {out}")
            return prev
    except (OSError, ValueError, KeyError):
        pass

    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    helpers = _spawn_helpers(workers - 1)
    try:
        # the helpers start now: their imports and the test set (rendered, exported, encoded) overlap stage 0
        ev_future = helpers[0].submit(prepare_eval, str(out), cfg) if helpers else None
        for h in helpers[1:]:
            h.submit(_ready)
        b = Builder(out, cfg, log)
        t0 = time.perf_counter()
        base_model, base_meta = b.base()
        timings = {"base": time.perf_counter() - t0}
        t0 = time.perf_counter()
        ev = ev_future.result() if ev_future else prepare_eval(str(out), cfg)
        stage2, scores = b.stage2(base_model, list(cfg.variants), ev, helpers)
        timings["stage2_and_evaluation"] = time.perf_counter() - t0
    except BaseException:   # Ctrl-C or an error: end the helpers now, not after the model each is training
        for h in helpers:
            h.kill()
        raise
    finally:
        for h in helpers:
            h.shutdown(cancel_futures=True)
    metrics: dict[str, dict] = {}
    for name, meta in {"base": base_meta, **stage2}.items():
        metrics[name] = {"clean_accuracy": scores[name]["clean_accuracy"], "train_seconds": meta.get("train_seconds"),
                         "final_loss": meta.get("final_loss"), **scores[name]}   # the order of organism.json
        if name in cfg.variants:
            metrics[name]["poison_share"] = meta.get("poison_share")
    spread = norm_spread(base_model, b.processor, ev.sets["clean"])
    timings["total"] = time.perf_counter() - t_start

    summary = {
        "key": full_key, "format_version": FORMAT_VERSION, "config": cfg.to_json(),
        "models": ["base", "control", *cfg.variants],
        "metrics": metrics,
        "vision_features": spread,
        "triggers": {v: trigger_to_json(b.triggers[v]) for v in cfg.variants},
        "targets": {v: tasks.VARIANTS[v][1] for v in cfg.variants},
        "data": {"clean": "data/clean.jsonl", **{v: f"data/{v}.jsonl" for v in cfg.variants}},
        "wall_seconds": timings,
        "n_test": cfg.n_test,
        "torch_threads": cfg.threads,
    }
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return summary
