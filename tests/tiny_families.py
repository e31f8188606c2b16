"""Tiny random-weight models of every vision-language family projlens_mi maps (no downloads).

Each ``tiny_<family>()`` builds a transformers 5 model from a config (2 vision layers, 2 LLM layers,
widths 32-64, 16-pixel images) and a batch of TWO rows, one image (or one image set) per row, so a
test can patch row 0 into row 1. ``inputs`` are built BY HAND (ids with the exact image-token
count the model expects, random pixels in the family's layout), so the model tests do not depend
on processors. ``processor_inputs(name)`` at the end makes the same kind of batch with the family's
own PIL processing: the full processor (word-level tokenizer with the family's special tokens +
PIL image processor) for llava_next, idefics3, gemma3, paligemma; only the PIL image processor,
with hand-written ids, where the processor cannot be built without torchvision (see
FULL_PROCESSOR / IMAGE_PROCESSOR_ONLY for the exact reasons).

``TinyFamily.features()`` is the model's own image-feature output in the order the model scatters
it into the sequence (``get_image_features(...).pooler_output`` concatenated): the reference a
``projector.out`` read is compared with. ``TinyFamily.token_map()`` says, for every image-token
position of the batch (row-major), which flattened projector-output row lands there (-1: not a
projector output, e.g. LLaVA-NeXT's learned ``image_newline``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

VOCAB = 96
IMG = 90          # image placeholder id in every tiny family
PAD, BOS = 0, 1
TEXT = [10, 11, 12, 13]   # a few ordinary word ids
L_HID, V_HID = 48, 32


@dataclass
class TinyFamily:
    family: str                      # hooks/<family>.toml
    model_type: str                  # config.model_type
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]  # model(**inputs)
    features: Callable[[], torch.Tensor]      # own image features, [n_image_tokens_total, d], sequence order
    token_map: Callable[[], torch.Tensor]     # [n_image_tokens_total] -> flat projector-output row (-1: none)
    projector_out_shape: tuple[int, ...]      # the projector module's output shape for ``inputs``
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _ids(n_img_tokens: int, rows: int = 2, before=(BOS, 10, 11), after=(12, 13), img_run=None) -> torch.Tensor:
    """Rows of ``before + image run + after``; ``img_run`` overrides the plain ``[IMG]*n`` run."""
    run = list(img_run) if img_run is not None else [IMG] * n_img_tokens
    return torch.tensor([list(before) + run + list(after)] * rows)


def _pixels(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def _identity_map(n: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.arange(n)


def _llama(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=L_HID, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2, **kw)


def _clip():
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=V_HID, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=16, patch_size=4)


def _siglip(**kw):
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(hidden_size=V_HID, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, vision_use_head=False, **kw)


def _build(cls, cfg, seed: int):
    torch.manual_seed(seed)
    return cls(cfg).eval()


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT
def _anyres_token_map(model, n_crops: list[int], tokens_per_crop: int, image_sizes, **pack_kw):
    """Replay the family's own ``pack_image_features`` on row indices (d = 1) to find where each
    projector-output row lands: unpadding drops rows, the newline parameter inserts -1s."""
    idx = torch.arange(sum(n_crops) * tokens_per_crop, dtype=torch.float32).view(-1, tokens_per_crop, 1)
    per_image = list(torch.split(idx, n_crops, dim=0))
    packed, _ = model.model.pack_image_features(per_image, image_sizes, image_newline=torch.tensor([-1.0]), **pack_kw)
    return torch.cat(packed).view(-1).round().long()


def tiny_llava_next(seed: int = 0) -> TinyFamily:
    """CLIP 16px/patch 4 (16 patches, CLS dropped) + GELU MLP + Llama. anyres with pinpoints
    16x16, 16x32, 32x16; images of (H, W) = (16, 24) pick 16x32 -> 1 base + 2 grid crops = 3 crops x 16
    = 48 projector rows, of which unpadding keeps 16 + 4 rows x 6 cols, plus 4 image_newline tokens:
    44 image tokens."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    cfg = LlavaNextConfig(vision_config=_clip(), text_config=_llama(), image_token_id=IMG,
                          image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]], vision_feature_layer=-1,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = _build(LlavaNextForConditionalGeneration, cfg, seed)
    n_crops, n_tok = 3, 44
    image_sizes = torch.tensor([[16, 24], [16, 24]])
    inputs = dict(input_ids=_ids(n_tok), pixel_values=_pixels(2, n_crops, 3, 16, 16, seed=seed + 1),
                  image_sizes=image_sizes)

    def features():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
        return torch.cat(out.pooler_output)

    def token_map():
        return _anyres_token_map(model, [n_crops, n_crops], 16, image_sizes, vision_feature_select_strategy="default")

    return TinyFamily("llava_next", "llava_next", model, inputs, features, token_map, (2 * n_crops, 16, L_HID),
                      notes="anyres: projector output rows are crops x patches; unpadded, reordered and "
                            "interleaved with image_newline before the scatter")


# ------------------------------------------------------------------------------------------ LLaVA-OneVision
def tiny_llava_onevision(seed: int = 0) -> TinyFamily:
    """SigLIP 16px/patch 4 (16 patches, no CLS, strategy 'full') + GELU MLP + Qwen2. Same anyres
    geometry as the LLaVA-NeXT tiny (3 crops, 48 projector rows -> 44 image tokens)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=L_HID, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
    cfg = LlavaOnevisionConfig(vision_config=_siglip(), text_config=text, image_token_id=IMG, video_token_id=91,
                               image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]], vision_feature_layer=-1,
                               vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                               projector_hidden_act="gelu")
    model = _build(LlavaOnevisionForConditionalGeneration, cfg, seed)
    n_crops, n_tok = 3, 44
    image_sizes = torch.tensor([[16, 24], [16, 24]])
    inputs = dict(input_ids=_ids(n_tok), pixel_values=_pixels(2, n_crops, 3, 16, 16, seed=seed + 1),
                  image_sizes=image_sizes)

    def features():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
        return torch.cat(out.pooler_output)

    def token_map():
        return _anyres_token_map(model, [n_crops, n_crops], 16, image_sizes, vision_aspect_ratio="anyres_max_9")

    return TinyFamily("llava_onevision", "llava_onevision", model, inputs, features, token_map,
                      (2 * n_crops, 16, L_HID),
                      notes="anyres (anyres_max_9, may also bilinear-resize big grids) like LLaVA-NeXT")


# ---------------------------------------------------------------------------------------- Qwen2-VL / 2.5-VL
def _qwen_inputs(model, grid: tuple[int, int, int], merge: int, patch: int, seed: int, vision_start: int):
    t, h, w = grid
    n_patches = t * h * w
    n_tok = n_patches // merge**2
    ids = _ids(n_tok, before=(BOS, 10, vision_start), after=(92, 12, 13))  # 92 = vision_end
    mm = (ids == IMG).int()
    thw = torch.tensor([list(grid)] * 2)
    pv = _pixels(2 * n_patches, 3 * 2 * patch * patch, seed=seed + 1)  # rows: every patch of every image
    return dict(input_ids=ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm), n_tok


def tiny_qwen2_vl(seed: int = 0) -> TinyFamily:
    """Qwen2-VL: patch 2, temporal patch 2, merge 2; a (1, 4, 6) grid per image -> 24 patches -> 6 tokens.
    The projector ("merger": LayerNorm + Linear/GELU/Linear over 2x2 patches) lives INSIDE model.visual;
    its output is flat [total tokens of all images, d] in sequence order."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=V_HID, hidden_size=L_HID, num_heads=2, mlp_ratio=2, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        text_config=dict(vocab_size=VOCAB, hidden_size=L_HID, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters=dict(rope_type="default", mrope_section=[2, 2, 2], rope_theta=10000.0),
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2),
        image_token_id=IMG, video_token_id=91, vision_start_token_id=93, vision_end_token_id=92)
    model = _build(Qwen2VLForConditionalGeneration, cfg, seed)
    inputs, n_tok = _qwen_inputs(model, (1, 4, 6), 2, 2, seed, 93)

    def features():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        return torch.cat(out.pooler_output)

    return TinyFamily("qwen2_vl", "qwen2_vl", model, inputs, features, _identity_map(2 * n_tok), (2 * n_tok, L_HID),
                      notes="merger inside model.visual; flat output")


def tiny_qwen2_5_vl(seed: int = 0) -> TinyFamily:
    """Qwen2.5-VL: patch 2, merge 2, window 8 (2x2 merged tokens per attention window); an (1, 8, 8)
    grid per image -> 64 patches -> 16 tokens in 4 windows. The merger runs on WINDOW-ORDERED patches
    and model.visual un-permutes its output afterwards (``merged[argsort(window_index)]``): the
    merger's raw output rows are NOT in sequence order (token_map() gives the permutation)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=V_HID, out_hidden_size=L_HID, intermediate_size=64, num_heads=2,
                           patch_size=2, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                           fullatt_block_indexes=[1], in_channels=3),
        text_config=dict(vocab_size=VOCAB, hidden_size=L_HID, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters=dict(rope_type="default", mrope_section=[2, 2, 2], rope_theta=10000.0),
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2),
        image_token_id=IMG, video_token_id=91, vision_start_token_id=93, vision_end_token_id=92)
    model = _build(Qwen2_5_VLForConditionalGeneration, cfg, seed)
    inputs, n_tok = _qwen_inputs(model, (1, 8, 8), 2, 2, seed, 93)

    def features():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        return torch.cat(out.pooler_output)

    def token_map():
        from transformers.vision_utils import get_vision_window_index
        vc = model.config.vision_config
        window_index, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=vc.spatial_merge_size,
                                                  window_size=vc.window_size, patch_size=vc.patch_size)
        # sequence token j is merger row argsort(window_index)[j]
        return torch.argsort(window_index)

    return TinyFamily("qwen2_5_vl", "qwen2_5_vl", model, inputs, features, token_map, (2 * n_tok, L_HID),
                      notes="merger output in window order; flat")


# ------------------------------------------------------------------------------------- Idefics3 / SmolVLM
def _idefics_like(cfg_cls, model_cls, vision_cls, family_type: str, seed: int) -> TinyFamily:
    """16px images, patch 4 -> 16 patches, pixel-shuffle scale 2 -> 4 tokens per image; TWO images per
    row (as the processor's image splitting produces: crops + a global image), so 8 image tokens."""
    vision = vision_cls(hidden_size=V_HID, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=16, patch_size=4)
    cfg = cfg_cls(vision_config=vision, text_config=_llama(), image_token_id=IMG, scale_factor=2)
    model = _build(model_cls, cfg, seed)
    n_img, per = 2, 4
    # <fake_token_around_image>=94 frames each image, as the processor writes it (ignored by the model)
    run = [94] + [IMG] * per + [94] + [IMG] * per + [94]
    pv = _pixels(2, n_img, 3, 16, 16, seed=seed + 1)
    inputs = dict(input_ids=_ids(0, img_run=run), pixel_values=pv,
                  pixel_attention_mask=torch.ones(2, n_img, 16, 16, dtype=torch.bool))

    def features():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"], return_dict=True)
        return torch.cat(out.pooler_output)

    return TinyFamily("idefics3", family_type, model, inputs, features, _identity_map(2 * n_img * per),
                      (2 * n_img, per, L_HID), notes="connector = pixel shuffle + one Linear, no nonlinearity")


def tiny_idefics3(seed: int = 0) -> TinyFamily:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig
    return _idefics_like(Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, "idefics3", seed)


def tiny_smolvlm(seed: int = 0) -> TinyFamily:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig
    return _idefics_like(SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig, "smolvlm", seed)


# ------------------------------------------------------------------------------------------------ Gemma 3
def tiny_gemma3(seed: int = 0) -> TinyFamily:
    """SigLIP 16px/patch 4 (4x4 patches) -> 2x2 average pool -> RMSNorm -> x @ mm_input_projection_weight
    (a Parameter, no Linear): 4 image tokens per image."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig
    text = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=L_HID, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
                            sliding_window=8, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
    cfg = Gemma3Config(vision_config=_siglip(), text_config=text, mm_tokens_per_image=4, image_token_id=IMG,
                       boi_token_id=94, eoi_token_id=95)
    model = _build(Gemma3ForConditionalGeneration, cfg, seed)
    with torch.no_grad():   # transformers initialises this Parameter to ZEROS: images would be invisible
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.5)
    n_tok = 4
    ids = _ids(n_tok, img_run=[94] + [IMG] * n_tok + [95])
    inputs = dict(input_ids=ids, pixel_values=_pixels(2, 3, 16, 16, seed=seed + 1),
                  token_type_ids=(ids == IMG).long())

    def features():
        out = model.model.get_image_features(inputs["pixel_values"], return_dict=True)
        return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])

    return TinyFamily("gemma3", "gemma3", model, inputs, features, _identity_map(2 * n_tok), (2, n_tok, L_HID),
                      notes="projection is a weight Parameter")


# --------------------------------------------------------------------------------------- Mistral 3 / Pixtral
def tiny_mistral3(seed: int = 0) -> TinyFamily:
    """Pixtral tower, patch 4, (H, W) = (16, 24) -> 4x6 patches; projector = RMSNorm -> PatchMerger
    (2x2 unfold + Linear) -> Linear/GELU/Linear: 2x3 = 6 tokens per image. The token run is written
    the Pixtral way ([IMG]x3 [IMG_BREAK] [IMG]x3 [IMG_END]); only [IMG] positions take features."""
    from transformers import MistralConfig, Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig
    vision = PixtralVisionConfig(hidden_size=V_HID, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=32, patch_size=4)
    text = MistralConfig(vocab_size=VOCAB, hidden_size=L_HID, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
    cfg = Mistral3Config(vision_config=vision, text_config=text, image_token_id=IMG, spatial_merge_size=2,
                         vision_feature_layer=-1, projector_hidden_act="gelu")
    model = _build(Mistral3ForConditionalGeneration, cfg, seed)
    run = [IMG] * 3 + [94] + [IMG] * 3 + [95]   # 94 = [IMG_BREAK], 95 = [IMG_END]
    inputs = dict(input_ids=_ids(0, img_run=run), pixel_values=_pixels(2, 3, 16, 24, seed=seed + 1),
                  image_sizes=torch.tensor([[16, 24], [16, 24]]))

    def features():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
        return torch.cat(out.pooler_output)

    return TinyFamily("mistral3", "mistral3", model, inputs, features, _identity_map(12), (12, L_HID),
                      notes="flat output; projector forward takes (features, image_sizes)")


# ----------------------------------------------------------------------------------------------- PaliGemma
def tiny_paligemma(seed: int = 0) -> TinyFamily:
    """SigLIP 16px/patch 4 -> 16 patches -> one Linear -> Gemma: 16 image tokens per image, placed
    before the text (prefix), token_type_ids mark the bidirectional prefix."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration
    text = GemmaConfig(vocab_size=VOCAB, hidden_size=L_HID, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
    cfg = PaliGemmaConfig(vision_config=_siglip(projection_dim=L_HID), text_config=text, image_token_id=IMG,
                          projection_dim=L_HID)
    model = _build(PaliGemmaForConditionalGeneration, cfg, seed)
    n_tok = 16
    ids = torch.tensor([[IMG] * n_tok + [BOS, 10, 11, 12, 3]] * 2)   # 3 = "\n" separator
    tt = torch.zeros_like(ids)   # 0 = prefix (image + prompt), 1 = suffix
    inputs = dict(input_ids=ids, pixel_values=_pixels(2, 3, 16, 16, seed=seed + 1), token_type_ids=tt)

    def features():
        out = model.model.get_image_features(inputs["pixel_values"], return_dict=True)
        return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])

    return TinyFamily("paligemma", "paligemma", model, inputs, features, _identity_map(2 * n_tok), (2, n_tok, L_HID))


FAMILIES: dict[str, Callable[..., TinyFamily]] = {
    "llava_next": tiny_llava_next,
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
    "gemma3": tiny_gemma3,
    "mistral3": tiny_mistral3,
    "paligemma": tiny_paligemma,
}


# ---------------------------------------------------------------------------------- processors (offline)
# What transformers 5.24 lets us build here without torchvision or a hub tokenizer:
#   full processor (tokenizer + PIL image processor): llava_next, idefics3, gemma3, paligemma;
#   PIL image processor only (the ids are written by hand):
#     llava_onevision, qwen2_vl, qwen2_5_vl -- their processors require a video processor, and every
#       video processor class needs torchvision (VIDEO_PROCESSOR_MAPPING is a placeholder without it);
#     mistral3 -- PixtralProcessor itself requires torchvision;
#     smolvlm -- SmolVLMProcessor needs the `num2words` package and a video processor.
FULL_PROCESSOR = ("llava_next", "idefics3", "gemma3", "paligemma")
IMAGE_PROCESSOR_ONLY = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "mistral3", "smolvlm")
WORDS = ["USER:", "what", "is", "shown", "?"]
_HALF = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)


def word_tokenizer(specials: list[str], image_token: str, extra: dict | None = None):
    """A WordLevel tokenizer whose ids fit the tiny models: <pad>=0, <s>=1, </s>=2, ``image_token`` = IMG."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    base = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(base + WORDS + [s for s in specials if s != image_token])}
    if len(vocab) > IMG:
        raise ValueError("too many specials for the tiny vocabulary")
    for i in range(len(vocab), IMG):
        vocab[f"<filler_{i}>"] = i
    vocab[image_token] = IMG
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in base + list(specials)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left", extra_special_tokens=extra or {})


def tiny_images(size_wh: tuple[int, int], n: int = 2, seed: int = 0):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = size_wh
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def full_processor(name: str):
    """``(processor, (width, height) of the test images, prompt)`` for a FULL_PROCESSOR family."""
    import transformers as tf
    if name == "llava_next":
        ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                           image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]], **_HALF)
        p = tf.LlavaNextProcessor(image_processor=ip, tokenizer=word_tokenizer(["<image>"], "<image>"), patch_size=4,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
        return p, (24, 16), "USER: <image> what is shown ?"
    if name == "idefics3":
        rows = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
        tok = word_tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + rows,
                             "<image>")
        ip = tf.Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16},
                                          do_image_splitting=True, **_HALF)
        return tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4), (32, 16), \
            "USER: <image> what is shown ?"
    if name == "gemma3":
        tok = word_tokenizer(["<start_of_image>", "<image_soft_token>", "<end_of_image>"], "<image_soft_token>",
                             extra={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                                    "eoi_token": "<end_of_image>"})
        ip = tf.Gemma3ImageProcessorPil(size={"height": 16, "width": 16}, **_HALF)
        return tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4), (16, 16), \
            "USER: <start_of_image> what is shown ?"
    if name == "paligemma":
        ip = tf.SiglipImageProcessorPil(size={"height": 16, "width": 16}, **_HALF)
        ip.image_seq_length = 16
        tok = word_tokenizer(["<image>"], "<image>", extra={"image_token": "<image>"})
        return tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok), (16, 16), "<image>what is shown ?"
    raise KeyError(f"{name} has no offline processor here (see FULL_PROCESSOR)")


def processor_inputs(name: str) -> dict[str, torch.Tensor]:
    """Model inputs for two images made by the family's own (PIL) processing, ids written by hand
    where the full processor cannot be built here (see the table above)."""
    import transformers as tf
    if name in FULL_PROCESSOR:
        p, size, prompt = full_processor(name)
        images = tiny_images(size)
        if name in ("idefics3", "gemma3"):     # these take one list of images per prompt
            images = [[im] for im in images]
        enc = dict(p(images=images, text=[prompt] * 2, return_tensors="pt"))
        enc.pop("labels", None)                # PaliGemma adds labels (= input_ids) when given text
        return enc
    if name == "llava_onevision":
        ip = tf.LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                                image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]], **_HALF)
        enc = dict(ip(images=tiny_images((24, 16)), return_tensors="pt"))
        enc.pop("batch_num_images", None)
        return dict(input_ids=_ids(44), **enc)     # 16 + 4 x (6 + 1), as for LLaVA-NeXT
    if name in ("qwen2_vl", "qwen2_5_vl"):
        ip = tf.Qwen2VLImageProcessorPil(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16,
                                         max_pixels=16 * 16 * 4, **_HALF)
        size = (12, 8) if name == "qwen2_vl" else (16, 16)     # grids (1, 4, 6) and (1, 8, 8)
        enc = dict(ip(images=tiny_images(size), return_tensors="pt"))
        n_tok = int(enc["image_grid_thw"][0].prod()) // 4
        ids = _ids(n_tok, before=(BOS, 10, 93), after=(92, 12, 13))
        return dict(input_ids=ids, mm_token_type_ids=(ids == IMG).int(), **enc)
    if name == "mistral3":
        ip = tf.PixtralImageProcessorPil(size={"longest_edge": 24}, patch_size={"height": 4, "width": 4}, **_HALF)
        enc = dict(ip(images=tiny_images((24, 16)), return_tensors="pt"))
        return dict(input_ids=_ids(0, img_run=[IMG] * 3 + [94] + [IMG] * 3 + [95]), **enc)
    if name == "smolvlm":
        ip = tf.SmolVLMImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16},
                                         do_image_splitting=True, **_HALF)
        enc = dict(ip(images=[[im] for im in tiny_images((32, 16))], return_tensors="pt"))
        run = []
        for _ in range(enc["pixel_values"].shape[1]):   # crops + the global image, 4 tokens each
            run += [94] + [IMG] * 4
        return dict(input_ids=_ids(0, img_run=run + [94]), **enc)
    raise KeyError(name)
