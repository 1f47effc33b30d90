#!/usr/bin/env python3
"""A tiny Qwen2-VL for the easy-vqa demo, randomly initialised (trained from scratch by the
demo's SFT recipe), with a word-level tokenizer over the task's words.

    python examples/easy_vqa/make_model.py --data data/easy_vqa --out data/easy_vqa/model

Writes a Hugging Face Qwen2-VL directory that transformers loads
(`Qwen2VLForConditionalGeneration.from_pretrained`) and gpg-rl trains: config.json and
model.safetensors as transformers 5 saves them (nested `text_config` / `vision_config`,
weights `model.visual.*` + `model.language_model.*` + `lm_head.weight`), tokenizer.json (a
WordLevel model over every word of train.jsonl and of the chat template, split on whitespace,
with Qwen2-VL's special tokens), tokenizer_config.json with Qwen2-VL-2B-Instruct's chat
template, and preprocessor_config.json (min_pixels = max_pixels = 84·84: each 64×64 image
becomes 6×6 patches of 14 px, 9 image tokens after the 2×2 merge).

Sizes: decoder 2 layers, hidden 128 (4 heads, 2 KV heads, MLP 256); vision tower 2 blocks,
width 64 (4 heads), merged to 128: 0.55 M parameters. transformers' own initialisation
(normal, std 0.02), seed --seed. Tested with python 3.11, torch 2.15.0, transformers 5.23.0,
tokenizers 0.23.
"""

import argparse
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-2B-Instruct's chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATE_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", "assistant."]
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 84 * 84,
    "max_pixels": 84 * 84,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 0.00392156862745098,
    "resample": 3,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the folder make_data.py wrote")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    words = set(TEMPLATE_WORDS)
    for line in open(args.data / "train.jsonl"):
        r = json.loads(line)
        words.update(r["question"].split())
        words.add(r["answer"])
    vocab = {w: i for i, w in enumerate(["<unk>"] + sorted(words))}
    ids = {t: len(vocab) + i for i, t in enumerate(SPECIALS)}
    vocab.update(ids)
    size = (len(vocab) + 15) // 16 * 16

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 256, "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")

    text = dict(vocab_size=size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    vision = dict(depth=2, embed_dim=64, hidden_size=128, hidden_act="quick_gelu", mlp_ratio=2, num_heads=4,
                  in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(args.seed)
    model = Qwen2VLForConditionalGeneration(config).float()
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<|im_end|>"]}, indent=2) + "\n")
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: Qwen2-VL with {n / 1e6:.2f} M parameters, vocabulary {len(vocab)} (padded to {size})")


if __name__ == "__main__":
    main()
