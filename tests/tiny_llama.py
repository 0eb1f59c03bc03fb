"""A tiny random Llama checkpoint written to disk, and an independent numpy forward.

The numpy forward is written from the Llama definition (Hugging Face conventions: linear
weights [out, in], rotate_half RoPE), sharing no code with alaya_jax.model.
"""

from __future__ import annotations

import json
import os

import numpy as np

TINY = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=64)


def make_weights(cfg=TINY, seed=0, tie=False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    E, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = E // H
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, E)),
         "model.norm.weight": rng.uniform(0.5, 1.5, E)}
    if not tie:
        w["lm_head.weight"] = rng.normal(0, 0.2, (V, E))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rng.uniform(0.5, 1.5, E)
        w[p + "post_attention_layernorm.weight"] = rng.uniform(0.5, 1.5, E)
        w[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.3, (H * D, E))
        w[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.3, (K * D, E))
        w[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.3, (K * D, E))
        w[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.2, (E, H * D))
        w[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.2, (F, E))
        w[p + "mlp.up_proj.weight"] = rng.normal(0, 0.2, (F, E))
        w[p + "mlp.down_proj.weight"] = rng.normal(0, 0.2, (E, F))
    return {k: v.astype(np.float32) for k, v in w.items()}


def reference_logits(w, ids, cfg=TINY, tie=False) -> np.ndarray:
    """Plain numpy causal forward in f64: ids [T] -> logits [T, V]."""
    E = cfg["hidden_size"]
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D, eps = E // H, cfg["rms_norm_eps"]
    T = len(ids)
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [T, N, D]
        half = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
        return x * cos[:, None] + half * sin[:, None]

    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, H, D))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, K, D))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, K, D)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
        s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
        p_ = np.exp(s - s.max(-1, keepdims=True))
        p_ /= p_.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", p_, v).reshape(T, H * D)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if tie else w["lm_head.weight"]
    return x @ head.T


def _byte_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True),
                            AddedToken("<|im_end|>", special=True)])
    return tok


def write_hf(directory, w, cfg=TINY, tie=False):
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    conf = dict(cfg, model_type="llama", architectures=["LlamaForCausalLM"],
                tie_word_embeddings=tie, eos_token_id=257)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(conf, f)
    items = sorted(w.items())
    half = len(items) // 2  # two shards, as large checkpoints come
    save_file(dict(items[:half]), os.path.join(directory, "model-00001-of-00002.safetensors"))
    save_file(dict(items[half:]), os.path.join(directory, "model-00002-of-00002.safetensors"))
    _byte_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "chat_template":
                   "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}, f)


def permute_rope_rows(w, n_heads):
    """llama.cpp's converter permutation (HF halves -> interleaved pairs)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def write_gguf(path, w, cfg=TINY, *, qtype="F32", arch="llama", tie=False):
    """Writes the weights as a llama.cpp GGUF (Q/K rows permuted, optional quantization).

    Returns the weights as the file holds them after quantization (for the reference)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qt = getattr(Q, qtype)
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(H)
    writer.add_head_count_kv(K)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    tok = _byte_tokenizer()
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"<pad{i}>" for i in range(cfg["vocab_size"] - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") and len(t) > 1 else 1 for t in tokens])
    writer.add_token_merges([])
    writer.add_eos_token_id(vocab["<|im_end|>"])

    held = {}

    def put(name, hf_name, arr, permute=None):
        stored = permute_rope_rows(arr, permute) if permute else arr
        if arr.ndim == 2 and qt not in (Q.F32,):
            data = gguf.quants.quantize(stored, qt)
            writer.add_tensor(name, data, raw_dtype=qt)
            back = gguf.quants.dequantize(data, qt).reshape(stored.shape).astype(np.float32)
        else:
            writer.add_tensor(name, stored.astype(np.float32))
            back = stored.astype(np.float32)
        if permute:  # undo for the HF-layout reference
            out, inp = back.shape
            back = back.reshape(permute, out // permute // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)
        held[hf_name] = back

    put("token_embd.weight", "model.embed_tokens.weight", w["model.embed_tokens.weight"])
    put("output_norm.weight", "model.norm.weight", w["model.norm.weight"])
    if not tie:
        put("output.weight", "lm_head.weight", w["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", p + "input_layernorm.weight", w[p + "input_layernorm.weight"])
        put(b + "ffn_norm.weight", p + "post_attention_layernorm.weight",
            w[p + "post_attention_layernorm.weight"])
        put(b + "attn_q.weight", p + "self_attn.q_proj.weight", w[p + "self_attn.q_proj.weight"], H)
        put(b + "attn_k.weight", p + "self_attn.k_proj.weight", w[p + "self_attn.k_proj.weight"], K)
        put(b + "attn_v.weight", p + "self_attn.v_proj.weight", w[p + "self_attn.v_proj.weight"])
        put(b + "attn_output.weight", p + "self_attn.o_proj.weight", w[p + "self_attn.o_proj.weight"])
        put(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", w[p + "mlp.gate_proj.weight"])
        put(b + "ffn_up.weight", p + "mlp.up_proj.weight", w[p + "mlp.up_proj.weight"])
        put(b + "ffn_down.weight", p + "mlp.down_proj.weight", w[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held
