"""A real HF tokenizer and processor for the organism, built offline from a word list.

The tokenizer is a ``tokenizers`` WordLevel model (whitespace split; special tokens, including the
image placeholder, are matched before splitting so the processor's expanded ``<image><image>...``
run tokenizes to one id per patch), wrapped in ``PreTrainedTokenizerFast``. The image processor is
transformers' PIL LLaVA processor (no torchvision needed). Both save and reload offline.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import LlavaImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
IMAGE_TOKEN = "<image>"


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``SPECIALS + words`` (duplicates dropped, order kept), left padding."""
    vocab: dict[str, int] = {}
    for w in SPECIALS + list(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", padding_side="left")
    fast.init_kwargs["name_or_path"] = "projlens-organism"  # TransformerLens needs a name
    return fast


def build_processor(words: list[str], image_size: int, patch_size: int) -> LlavaProcessor:
    """A LLaVA processor: ``image_size`` square RGB images in [-1, 1], ``(image_size/patch_size)**2`` image tokens."""
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(words),
                          patch_size=patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token=IMAGE_TOKEN)
