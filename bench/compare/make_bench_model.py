#!/usr/bin/env python3
"""Writes the random-init Qwen2 model directory that both sides of the benchmarks load.

    python bench/compare/make_bench_model.py OUT_DIR [--seed 0] [--dtype float32] [--untied]

Model: Qwen2ForCausalLM, hidden 256, 4 layers, 4 attention heads / 2 KV heads (head_dim 64),
intermediate 1024, vocab 4096, tied embeddings (as Qwen2.5-0.5B), rope_theta 1e6, rms eps 1e-6,
transformers' default initialisation (std 0.02) from torch.manual_seed(seed), stored as one
model.safetensors. Tokenizer: byte-level BPE of exactly 4096 entries (256 bytes + 3837 merges +
<|endoftext|>, <|im_start|>, <|im_end|>) trained with the `tokenizers` library on a synthetic
corpus generated from a fixed seed, with Qwen2's normaliser / pre-tokeniser pipeline, a ChatML
chat template, and generation_config.json. Deterministic: same arguments, same files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ONSETS = [""] + [
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "st",
    "tr",
    "pl",
    "ch",
    "sh",
    "th",
    "br",
    "gr",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
CODAS = ["", ""] + ["n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck"]
FUNCTION_WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "is",
    "in",
    "that",
    "it",
    "for",
    "so",
    "we",
    "then",
    "answer",
    "number",
    "sum",
    "product",
    "equals",
    "step",
]


def synthetic_corpus(seed: int, n_sentences: int = 20000) -> list[str]:
    """Sentences of pseudo-words (Zipf-like frequencies over a 12k-word lexicon), function
    words, punctuation and small arithmetic facts; deterministic in `seed`."""
    rng = random.Random(seed)
    lexicon = sorted(
        {
            "".join(
                rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                for _ in range(rng.randint(1, 4))
            )
            for _ in range(16000)
        }
    )
    rng.shuffle(lexicon)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(lexicon))))
    sentences = []
    for _ in range(n_sentences):
        kind = rng.random()
        if kind < 0.15:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            sentences.append(
                f"The sum of {a} and {b} is {a + b}, so the answer is \\boxed{{{a + b}}}."
            )
            continue
        n = rng.randint(4, 16)
        words = [
            rng.choice(FUNCTION_WORDS)
            if rng.random() < 0.3
            else rng.choices(lexicon, cum_weights=cum_weights)[0]
            for _ in range(n)
        ]
        words[0] = words[0].capitalize()
        sentences.append(" ".join(words) + rng.choice([".", ".", "?", "!", ":", ";"]))
    return sentences


def build_tokenizer(seed: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    bpe_size = VOCAB_SIZE - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    if tok.get_vocab_size() != bpe_size:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} entries, wanted {bpe_size}")
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="model directory to (re)create")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--untied", action="store_true", help="separate lm_head weights")
    args = ap.parse_args()

    tok = build_tokenizer(args.seed)
    eot = tok.token_to_id("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1.0e6},
        tie_word_embeddings=not args.untied,
        use_sliding_window=False,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, args.dtype))

    if args.out.exists():
        shutil.rmtree(args.out)
    model.save_pretrained(args.out)
    GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot).save_pretrained(args.out)
    tok.save(str(args.out / "tokenizer.json"))
    (args.out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tok), indent=2) + "\n", encoding="utf-8"
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "model_dir": str(args.out),
                "parameters": n_params,
                "vocab": VOCAB_SIZE,
                "dtype": args.dtype,
                "tied": not args.untied,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
