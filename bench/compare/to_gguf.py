#!/usr/bin/env python3
"""Writes a Hugging Face Qwen2 checkpoint as a GGUF file for llama.cpp's `qwen2` architecture.

    python bench/compare/to_gguf.py HF_DIR OUT.gguf [--dtype f32|bf16]

Reads config.json, model.safetensors (or the shards named by model.safetensors.index.json),
tokenizer.json and tokenizer_config.json; writes one GGUF file with the `gguf` package:

- metadata: general.architecture = "qwen2", qwen2.{context_length, embedding_length,
  block_count, feed_forward_length, attention.head_count, attention.head_count_kv,
  rope.freq_base, attention.layer_norm_rms_epsilon}, general.file_type (ALL_F32 or
  MOSTLY_BF16);
- tensors (HF name -> GGUF name): model.embed_tokens -> token_embd, model.norm -> output_norm,
  lm_head -> output (absent when the embeddings are tied: llama.cpp then reuses token_embd),
  and per layer i: input_layernorm -> blk.i.attn_norm, self_attn.{q,k,v}_proj (weight + bias)
  -> blk.i.attn_{q,k,v}, self_attn.o_proj -> blk.i.attn_output, post_attention_layernorm ->
  blk.i.ffn_norm, mlp.{gate,up,down}_proj -> blk.i.ffn_{gate,up,down}. Matrices are stored in
  --dtype; 1-D tensors (norm weights, biases) always in f32, as llama.cpp's converter does.
  The weights are written as they are (no permutation: Qwen2 uses the NeoX rope layout, which
  llama.cpp's qwen2 graph expects);
- tokenizer: tokenizer.ggml.model = "gpt2" (byte-level BPE), tokenizer.ggml.pre = "qwen2"
  (llama.cpp's Qwen2 pre-tokenizer regex), tokens = the vocabulary in id order padded with
  "[PAD<id>]" (type UNUSED) up to the embedding rows, token types (NORMAL; added special tokens
  CONTROL; other added tokens USER_DEFINED), merges "left right" from tokenizer.json, the
  bos / eos / pad ids from config and tokenizer_config, add_bos_token false, and the chat
  template.

Only Qwen2ForCausalLM checkpoints with a byte-level BPE tokenizer.json are accepted; anything
else is an error. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

try:
    import gguf
except ImportError:  # pragma: no cover - message for a missing dependency
    raise SystemExit("to_gguf.py needs the `gguf` package (pip install -r requirements.txt)")

LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf: str) -> str:
    if hf in TOP_MAP:
        return TOP_MAP[hf]
    parts = hf.split(".")
    if len(parts) > 4 and parts[0] == "model" and parts[1] == "layers":
        rest = ".".join(parts[3:])
        if rest in LAYER_MAP:
            return f"blk.{int(parts[2])}.{LAYER_MAP[rest]}"
    raise SystemExit(f"unexpected tensor {hf!r} for a Qwen2 checkpoint")


def safetensor_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    raise SystemExit(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def vocab_metadata(model_dir: Path, n_rows: int) -> dict:
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise SystemExit("tokenizer.json: only BPE models are supported")
    if not any(
        p.get("type") == "ByteLevel"
        for p in (tj.get("pre_tokenizer") or {}).get("pretokenizers", [tj.get("pre_tokenizer")])
        if p
    ):
        raise SystemExit("tokenizer.json: expected a byte-level BPE (ByteLevel pre-tokenizer)")
    by_id: dict[int, tuple[str, int]] = {}
    for tok, i in model["vocab"].items():
        by_id[i] = (tok, gguf.TokenType.NORMAL)
    for added in tj.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= n_rows:
        raise SystemExit(f"token id {max(by_id)} exceeds the {n_rows} embedding rows")
    tokens, types = [], []
    for i in range(n_rows):
        tok, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(tok)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="Hugging Face Qwen2 model directory")
    ap.add_argument("out", type=Path, help="GGUF file to write")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="matrix storage type")
    args = ap.parse_args()

    cfg = json.loads((args.model / "config.json").read_text())
    if cfg.get("model_type") != "qwen2":
        raise SystemExit(f"{args.model}: model_type {cfg.get('model_type')!r}, expected 'qwen2'")
    tcfg_path = args.model / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    rope = cfg.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"rope_type {rope.get('rope_type')!r} is not supported here")

    writer = gguf.GGUFWriter(str(args.out), arch="qwen2")
    writer.add_name(args.model.name)
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(int(cfg["num_attention_heads"]))
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])))
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if args.dtype == "f32" else gguf.LlamaFileType.MOSTLY_BF16
    )

    n_rows = int(cfg["vocab_size"])
    vocab = vocab_metadata(args.model, n_rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    tok_to_id = {t: i for i, t in enumerate(vocab["tokens"])}

    def special_id(key: str, cfg_key: str) -> int | None:
        name = tcfg.get(key)
        if isinstance(name, dict):
            name = name.get("content")
        if isinstance(name, str) and name in tok_to_id:
            return tok_to_id[name]
        v = cfg.get(cfg_key)
        return v[0] if isinstance(v, list) else v

    eos = special_id("eos_token", "eos_token_id")
    bos = special_id("bos_token", "bos_token_id")
    pad = special_id("pad_token", "pad_token_id")
    if eos is not None:
        writer.add_eos_token_id(int(eos))
    writer.add_bos_token_id(int(bos if bos is not None else eos))
    if pad is not None:
        writer.add_pad_token_id(int(pad))
    writer.add_add_bos_token(False)
    if isinstance(tcfg.get("chat_template"), str):
        writer.add_chat_template(tcfg["chat_template"])

    tied = bool(cfg.get("tie_word_embeddings", False))
    n_tensors, n_params = 0, 0
    seen = set()
    for path in safetensor_files(args.model):
        with safe_open(str(path), framework="pt") as f:
            for hf in sorted(f.keys()):
                if hf == "lm_head.weight" and tied:
                    continue
                name = gguf_name(hf)
                t = f.get_tensor(hf)
                n_params += t.numel()
                if t.ndim == 1 or args.dtype == "f32":
                    writer.add_tensor(name, t.to(torch.float32).numpy())
                else:
                    bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
                    writer.add_tensor(name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
                seen.add(name)
                n_tensors += 1
    layers = int(cfg["num_hidden_layers"])
    want = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{v}" for i in range(layers) for v in LAYER_MAP.values()
    }
    if not tied:
        want.add("output.weight")
    missing = sorted(want - seen)
    if missing:
        raise SystemExit(f"{args.model}: missing tensors {missing[:5]}…")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(
        json.dumps(
            {
                "gguf": str(args.out),
                "dtype": args.dtype,
                "tensors": n_tensors,
                "parameters": n_params,
                "tied": tied,
                "vocab": n_rows,
                "bytes": args.out.stat().st_size,
                "gguf_package": importlib.metadata.version("gguf"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
