"""Tiny random-initialised vision-language models, written as ordinary local model folders.

No VLM weights can be had offline here, so tests and the ``bench mllm`` smoke run build tiny models of
real architectures from their configs -- Qwen2-VL, LLaVA and Idefics3 (SmolVLM's architecture) -- with
a small byte-level BPE tokenizer trained on the spot and each family's processor, and save them with
``save_pretrained``. The ``mllm`` reranker then loads them exactly as it loads a real model: through
``AutoProcessor`` and ``AutoModelForImageTextToText`` from a directory. Their answers are random; the
code path (prompt, chat template, image tokens, the Yes/No logits) is the real one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mmretrieve.errors import UsageError

FAMILIES = ("qwen2_vl", "llava", "idefics3")

_CORPUS = [
    "Does this image match the description? Answer Yes or No.",
    "Do these two images show the same thing? Answer with Yes or No.",
    "The first image is the reference. Does the second image show the reference changed as follows",
    "a photo of a cat, a dog, a red car, a dress with long sleeves, a motorcycle, coffee, a horse",
    "user assistant system User Assistant USER ASSISTANT yes no Yes No",
]


def _tokenizer(specials: list[str], *, pad: str, eos: str, bos: str | None = None, extra_words=("Yes", "No")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tok.add_tokens(list(extra_words))  # whole-word answer tokens, as real chat tokenizers have
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos,
                                   additional_special_tokens=[s for s in specials if s not in (pad, eos, bos)])


def write_tiny_vlm(directory: str | os.PathLike, family: str = "qwen2_vl", *, seed: int = 0) -> str:
    """Write a tiny random ``family`` model + processor to ``directory``; returns the directory."""
    if family not in FAMILIES:
        raise UsageError(f"unknown tiny VLM family {family!r}; known: {', '.join(FAMILIES)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = globals()[f"_{family}"]()
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return str(d)


def _llama_text(vocab: int, **kw):
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, **kw)


def _qwen2_vl():
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials, pad="<|endoftext|>", eos="<|im_end|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    cfg = Qwen2VLConfig(
        text_config=_llama_text(len(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2VLForConditionalGeneration(cfg).eval(), proc


def _llava():
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    specials = ["<pad>", "<s>", "</s>", "<image>"]
    tok = _tokenizer(specials, pad="<pad>", eos="</s>", bos="<s>")
    image_token = tok.convert_tokens_to_ids("<image>")
    size = 30
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tok, patch_size=15, vision_feature_select_strategy="default", chat_template=template,
        num_additional_image_tokens=1,
    )
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=size, patch_size=15, projection_dim=32),
        text_config=dict(model_type="llama", **_llama_text(len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)),
        image_token_index=image_token, vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=(size // 15) ** 2,
    )
    return LlavaForConditionalGeneration(cfg).eval(), proc


def _idefics3():
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>", *rows]
    tok = _tokenizer(specials, pad="<|endoftext|>", eos="<end_of_utterance>")
    image_token = tok.convert_tokens_to_ids("<image>")
    patch, img, scale = 8, 32, 2
    seq = (img // patch) ** 2 // (scale * scale)
    template = (
        "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    ip = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": img}, max_image_size={"longest_edge": img})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=template)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=img, patch_size=patch),
        text_config=dict(model_type="llama", **_llama_text(len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)),
        image_token_id=image_token, scale_factor=scale,
    )
    return Idefics3ForConditionalGeneration(cfg).eval(), proc


#: Qwen2-VL-2B-Instruct's published configuration (text and vision towers)
QWEN2_VL_2B = {
    "text_config": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    "vision_config": dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2),
}


def write_qwen2_vl_2b_sized(directory: str | os.PathLike, dtype: str = "auto", device: str | None = None) -> str:
    """A Qwen2-VL-2B-sized model (``QWEN2_VL_2B``) with random weights and the tiny family's processor (its
    special token ids re-mapped), images at 448 x 448 (256 visual tokens): the real model's cost, not its
    answers, for throughput benchmarks. Built on ``device`` (default: the GPU when there is one)."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from mmretrieve.rerank.vlm import torch_dtype
    from mmretrieve.runtime import resolve_device

    d = Path(write_tiny_vlm(directory, "qwen2_vl"))
    proc = AutoProcessor.from_pretrained(d)
    tok = proc.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    cfg = Qwen2VLConfig(text_config=QWEN2_VL_2B["text_config"], vision_config=QWEN2_VL_2B["vision_config"],
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    dev = resolve_device(device)
    with torch.device(dev.type):
        model = Qwen2VLForConditionalGeneration(cfg).to(torch_dtype(dtype, dev))
    model.save_pretrained(d)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    proc.image_processor.max_pixels = proc.image_processor.min_pixels = 448 * 448
    proc.save_pretrained(d)
    return str(d)
