"""Byte-level BPE tokenizer built with the `tokenizers` library, plus chat templates.

From a GGUF: the vocabulary, merges, token types (control tokens become special tokens)
and the chat template stored in the file. From a Hugging Face directory: tokenizer.json
and tokenizer_config.json.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from alaya_jax.errors import ModelFileError, UnsupportedModelError

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`; digits split one by one where noted.
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4


class Tokenizer:
    """encode/decode, special tokens, and `apply_chat_template` with the model's template."""

    def __init__(self, tok, *, bos_id: int | None, eos_id: int | None,
                 chat_template: str | None, add_bos: bool = False):
        self._tok = tok
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.chat_template = chat_template
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(int(i) for i in ids), skip_special_tokens=skip_special_tokens)

    def stop_ids(self) -> set[int]:
        ids = {self.eos_id} if self.eos_id is not None else set()
        special = self.special_tokens
        for t in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
            i = self._tok.token_to_id(t)
            if i is not None and t in special:
                ids.add(i)
        return ids

    @property
    def special_tokens(self) -> set[str]:
        return {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True, tokenize: bool = False):
        """Renders messages with the model's Jinja chat template (as transformers does)."""
        if not self.chat_template:
            raise UnsupportedModelError("this model's tokenizer has no chat template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.id_to_token(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.id_to_token(self.eos_id) if self.eos_id is not None else "")
        return self.encode(text, add_bos=False) if tokenize else text


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported (expected byte-level BPE 'gpt2')")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges") or []  # writers omit an empty merge list
    if not tokens:
        raise ModelFileError("GGUF metadata lacks tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False)
    tok = HFTokenizer(bpe)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in ("smollm", "starcoder", "refact", "codeshell", "default", "gpt2", "gpt-2"):
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre in ("smollm", "starcoder", "refact", "codeshell"):
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    elif pre in ("llama3", "llama-bpe", "smaug-bpe"):
        steps = [pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported")
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)]
    tok.add_special_tokens(special)
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    return Tokenizer(tok, bos_id=None if bos is None else int(bos),
                     eos_id=None if eos is None else int(eos),
                     chat_template=meta.get("tokenizer.chat_template"),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)))


def tokenizer_from_hf(directory: str) -> Tokenizer:
    """Builds the tokenizer from a Hugging Face directory's tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        raise ModelFileError(f"{directory!r} has no tokenizer.json")
    tok = HFTokenizer.from_file(path)
    conf = {}
    conf_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(conf_path):
        with open(conf_path) as f:
            conf = json.load(f)

    def tid(name):
        t = conf.get(name)
        t = t.get("content") if isinstance(t, dict) else t
        return None if t is None else tok.token_to_id(t)

    return Tokenizer(tok, bos_id=tid("bos_token"), eos_id=tid("eos_token"),
                     chat_template=conf.get("chat_template"),
                     add_bos=bool(conf.get("add_bos_token", False)))
