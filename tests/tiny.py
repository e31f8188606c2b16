"""Tiny random-weight LLaVA models for tests (no downloads, built from configs in milliseconds)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from projlens_mi.organism.processor import build_processor

WORDS = ["USER:", "ASSISTANT:", "what", "digit", "is", "shown", "?", "describe", "the", "image", ".",
         "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "a", "cat"]
IMAGE_SIZE, PATCH = 16, 4  # 4 x 4 = 16 image tokens


def tiny_llava(seed: int = 0, layers: int = 3):
    """A random-weight LlavaForConditionalGeneration (CLIP tower, GELU MLP projector, Llama LM) and its processor."""
    processor = build_processor(WORDS, IMAGE_SIZE, PATCH)
    tok = processor.tokenizer
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    return model, processor


def tiny_images(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


PROMPT = "USER: <image> what digit is shown ? ASSISTANT:"
