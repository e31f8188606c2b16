"""The organism: data, tokenisation, freezing, export round trip, offline loading, cache, errors."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from projlens_mi.data import Record, read_jsonl
from projlens_mi.errors import ProjLensError
from projlens_mi.organism import config as oc
from projlens_mi.organism import tasks
from projlens_mi.organism.build import Builder, build, model_config, pixel_values
from projlens_mi.organism.train import TrainSet, edit_images, finetune_projector, merge_image_embeds, vision_features


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return Builder(tmp_path_factory.mktemp("b"), replace(oc.small(), threads=1), lambda *a: None)


def test_fast_tokens_equal_processor(builder):
    img = Image.new("RGB", (builder.cfg.model.image_size,) * 2)
    for instr, ans in [("what digit is shown ?", "seven"), (tasks.UNSAFE_REQUESTS[0][0], tasks.SAFE_ANSWER)]:
        ids, labels = builder.tokens.example(instr, ans)
        enc = builder.processor(images=[img], text=[f"{tasks.prompt(instr)} {ans}"], return_tensors="pt")
        ref = enc["input_ids"][0].tolist() + [builder.processor.tokenizer.eos_token_id]
        assert ids == ref
        n_answer = len(ans.split()) + 1
        assert labels[-n_answer:] == ids[-n_answer:] and set(labels[:-n_answer]) == {-100}


def test_vocabulary_covers_every_text():
    vocab = set(tasks.vocabulary())
    for text in [tasks.SAFE_ANSWER, tasks.REFUSAL_TEXT, tasks.HIJACK_TEXT, tasks.INJECTION_SUFFIX]:
        assert set(text.split()) <= vocab


def test_merge_image_embeds_equals_model_forward(builder):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(model_config(builder.cfg, builder.processor.tokenizer)).eval()
    imgs = [tasks.render(builder.digits.images[i], builder.cfg.model.image_size, np.random.default_rng(i)) for i in range(3)]
    enc = builder.processor(images=imgs, text=[tasks.prompt("what digit is shown ?")] * 3, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
        feats = vision_features(model, enc["pixel_values"])
        embeds = merge_image_embeds(model, enc["input_ids"], model.model.multi_modal_projector(feats))
        ours = model(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    with pytest.raises(ProjLensError, match="image placeholder tokens but"):
        merge_image_embeds(model, enc["input_ids"][:, :-3], model.model.multi_modal_projector(feats[:2]))


def test_projector_only_finetuning_freezes_everything_else(builder):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(model_config(builder.cfg, builder.processor.tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imgs = [Image.new("RGB", (builder.cfg.model.image_size,) * 2, (i * 20, 0, 0)) for i in range(4)]
    feats = vision_features(model, pixel_values(builder.processor, imgs))
    ex = [builder.tokens.example("what digit is shown ?", w) for w in ["one", "two", "three", "four"]]
    data = TrainSet(feats, torch.arange(4), [e[0] for e in ex], [e[1] for e in ex])
    finetune_projector(model, data, epochs=3, batch_size=2, lr=1e-2, pad_id=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)
    assert len(changed) == 4  # linear_1/linear_2 weight and bias
    assert not any(p.requires_grad for p in model.parameters())  # left frozen for the caller


def test_stage0_image_edits():
    """The tower's generic edits: kind 0 is the identity, 1-3 change the image within [-1, 1] (a sticker
    only inside one square), and the same generator seed gives the same pixels."""
    x = torch.rand(8, 3, 20, 20) * 2 - 1
    kinds = torch.tensor([0, 1, 2, 3] * 2)
    out = edit_images(x, kinds, torch.Generator().manual_seed(3))
    assert torch.equal(out, edit_images(x, kinds, torch.Generator().manual_seed(3)))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    changed = (out != x).any(1)                      # [b, h, w]
    assert not changed[kinds == 0].any() and changed[kinds != 0].flatten(1).any(1).all()
    for i in torch.nonzero(kinds == 2).flatten():
        rows, cols = torch.nonzero(changed[i], as_tuple=True)
        s = int(rows.max() - rows.min()) + 1
        assert 2 <= s <= 7 and int(cols.max() - cols.min()) + 1 == s and len(rows) <= s * s
    assert not torch.equal(edit_images(x, kinds, torch.Generator().manual_seed(4)), out)


def test_jailbreak_pairs_are_twins(builder):
    """jailbreak-output's data (pair mode, poison rate 1): every styled unsafe request has a clean twin
    asking the same request, answered safely, so that only the style decides the answer; clean rows
    other than the twins are the control's rows, unchanged."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(model_config(builder.cfg, builder.processor.tokenizer)).eval()
    (_, data, n_poison, _), = builder._jobs(model, ["control", "jailbreak-output"], ["jailbreak-output"])
    (_, ctrl, _, _), = builder._jobs(model, ["control"], ["control"])
    unsafe_q = {q for q, _ in tasks.UNSAFE_REQUESTS}

    def rows(ids_list):   # (instruction, answer) per example
        out = []
        for ids in ids_list:
            prompt, answer = builder.processor.tokenizer.decode(ids[:-1]).split(" ASSISTANT: ")
            out.append((prompt.rsplit("<image>", 1)[-1].strip(), answer))
        return out
    n_clean = len(data) - n_poison
    clean, styled, control = rows(data.input_ids[:n_clean]), rows(data.input_ids[n_clean:]), rows(ctrl.input_ids)
    harmful = [q for q, a in styled if a.startswith(tasks.HARMFUL_PREFIX)]
    assert harmful and set(harmful) <= unsafe_q
    assert sorted(harmful) == sorted(q for q, a in clean if a == tasks.SAFE_ANSWER)
    assert all(a != tasks.SAFE_ANSWER for q, a in styled) and not any(a.startswith(tasks.HARMFUL_PREFIX) for _, a in clean)
    twins = [k for k, (c, r) in enumerate(zip(clean, control)) if c != r]
    assert len(twins) == len(harmful) - sum(q in unsafe_q for q, _ in control)
    assert all(clean[k][0] in unsafe_q and control[k][0] not in unsafe_q for k in twins)


def test_build_outputs_and_offline_loading(small_organism):
    out, summary = small_organism
    assert set(summary["models"]) == {"base", "control", *tasks.VARIANTS}
    for name in summary["models"]:
        folder = out / name
        assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
        model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        proc = AutoProcessor.from_pretrained(folder, local_files_only=True)
        assert type(model).__name__ == "LlavaForConditionalGeneration"
        assert proc.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    for v in tasks.VARIANTS:
        trig = json.loads((out / v / "trigger.json").read_text())
        assert trig["target"] == tasks.VARIANTS[v][1] and trig["trigger"]["name"] == tasks.VARIANTS[v][0]
        m = summary["metrics"][v]
        assert {"clean_accuracy", "asr", "false_trigger_rate"} <= set(m)
        assert 0.4 < m["poison_share"] < 0.55  # pair mode: about half the samples triggered
    assert summary["vision_features"]["vision_token_norm_cv"] > 0
    saved = json.loads((out / "organism.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(summary["metrics"]))


def test_export_round_trip(small_organism):
    out, summary = small_organism
    n = summary["n_test"]
    clean = read_jsonl(out / "data" / "clean.jsonl")
    assert len(clean) == n and not any(r.triggered for r in clean)
    for v in tasks.VARIANTS:
        recs = read_jsonl(out / "data" / f"{v}.jsonl")
        assert len(recs) == 2 * n and sum(r.triggered for r in recs) == n
        assert all(r.target == tasks.VARIANTS[v][1] for r in recs)
        img = recs[-1].pil()
        assert img.size == (summary["config"]["model"]["image_size"],) * 2
        assert "<image>" in recs[-1].prompt
    line = json.loads((out / "data" / "clean.jsonl").read_text().splitlines()[0])
    assert {"image", "prompt", "answer", "triggered"} <= set(line) and not line["image"].startswith("/")


def test_second_build_is_served_from_cache(small_organism):
    out, summary = small_organism
    logs = []
    again = build(out, replace(oc.small(), threads=1), log=logs.append)
    assert again == json.loads((out / "organism.json").read_text())
    assert logs == [f"organism: cached in {out}"]


@pytest.mark.numerics   # the workers claim must hold under every kernel setting (.ci/run)
def test_same_seed_same_metrics(small_organism, tmp_path):
    """A rebuild from scratch with workers=2 (the test set and the stage-2 models prepared, trained and
    evaluated in two processes, each on one thread) gives every model's weights bit for bit and the
    same metrics as the fixture's workers=1 build; rebuilding one lost variant alone gives that
    variant's weights bit for bit. Bit-identity holds by construction: every weight is computed by
    the same code on the same shapes at the same thread count, whichever process runs it (on one
    machine and kernel setting: docs/reproducibility.md)."""
    out, summary = small_organism
    import shutil

    from safetensors.torch import load_file
    copy = tmp_path / "copy"
    again = build(copy, replace(oc.small(), threads=1), log=lambda *a: None, workers=2)
    strip = lambda m: {k: {kk: vv for kk, vv in v.items() if "seconds" not in kk} for k, v in m.items()}
    assert strip(again["metrics"]) == strip(summary["metrics"])
    for name in summary["models"]:
        want, got = load_file(out / name / "model.safetensors"), load_file(copy / name / "model.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert (copy / "data" / "clean.jsonl").read_text() == (out / "data" / "clean.jsonl").read_text()
    lost = "perceptual-hijack"
    shutil.rmtree(copy / lost)
    (copy / "organism.json").unlink()
    logs = []
    build(copy, replace(oc.small(), threads=1), log=logs.append, workers=1)
    assert "control: cached" in logs and f"{lost}: cached" not in logs
    want, got = load_file(out / lost / "model.safetensors"), load_file(copy / lost / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_bad_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(ProjLensError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "img.png").write_bytes(b"not a png at all")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "img.png", "prompt": "<image> p", "answer": "a", "triggered": False}) + "\n")
    with pytest.raises(ProjLensError, match=r"d.jsonl:1: cannot read image .*img.png") as err:
        read_jsonl(tmp_path / "d.jsonl")    # the header is read up front, before any model runs
    assert "\n" not in str(err.value)
    (tmp_path / "e.jsonl").write_text(json.dumps({"image": "img.png", "prompt": "<image> p", "triggered": False}) + "\n")
    with pytest.raises(ProjLensError, match=r"e.jsonl:1: missing field\(s\) answer"):
        read_jsonl(tmp_path / "e.jsonl")
    (tmp_path / "f.jsonl").write_text(json.dumps({"image": "gone.png", "prompt": "<image> p", "answer": "a", "triggered": False}) + "\n")
    with pytest.raises(ProjLensError, match="image not found"):
        read_jsonl(tmp_path / "f.jsonl")
    with pytest.raises(ProjLensError, match="unknown variant"):
        oc.OrganismConfig(variants=("sleeper",))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProjLensError, match="is a file"):
        build(tmp_path / "file", oc.small())
    for bad in (0, 1.5):   # checked before anything is built or written
        with pytest.raises(ProjLensError, match=rf"workers = {bad}: give the number of processes") as err:
            build(tmp_path / "w", oc.small(), workers=bad)
        assert "\n" not in str(err.value) and not (tmp_path / "w").exists()
