"""The text side of a model: a byte-level BPE tokenizer (HF ``tokenizers``), its special ids and
its chat template.

Built from a GGUF file's metadata (``Tokenizer.from_gguf``) or a Hugging Face folder's
``tokenizer.json`` + ``tokenizer_config.json`` (``Tokenizer.from_hf_dir``), and saved next to a
converted checkpoint as ``tokenizer.json`` + ``tokenizer_meta.json`` (``save`` / ``load``), so
loading a checkpoint needs no network and no transformers.

    tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt)                    # BOS only if the model asks for it (add_bos)
    text = tok.decode(ids, skip_special_tokens=True)
    stop = tok.eos_ids                          # EOS and end-of-turn ids

A GGUF stores no tokenizer.json: the vocabulary, merges and control-token list are rebuilt into a
``tokenizers`` BPE the way llama.cpp reads them (byte-level; pre-tokenizer picked by
``tokenizer.ggml.pre``; control tokens kept whole as special tokens).
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

META_FILE = "tokenizer_meta.json"
TOKENIZER_FILE = "tokenizer.json"

# GGUF token types (llama.cpp `llama_token_type`).
_CONTROL, _USER_DEFINED = 3, 4

# Tokens that end a turn in the chat formats of the model families we support; whichever of them
# the vocabulary holds as a special token joins `eos_ids`.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
                "<end_of_turn>", "<|eom_id|>")

# Pre-tokenizer split regexes by `tokenizer.ggml.pre` (facts from llama.cpp's llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pre_tokenizer(pre: str | None):
    """The pre-tokenizer for a GGUF ``tokenizer.ggml.pre`` value."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        byte_level])
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM's tokenizer.json: every digit is its own pre-token, then GPT-2's byte-level split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return gpt2  # "default", "gpt2" and unknown values: GPT-2's regex


def _render_chat_template(template: str, messages: Sequence[dict], **context) -> str:
    """Render a HF-style chat template (sandboxed jinja2, the environment transformers uses)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=list(messages), **context)


class Tokenizer:
    """Encode/decode text and render chat prompts for one model.

    Attributes: ``bos_id`` (int or None), ``eos_id`` (the model's EOS), ``eos_ids`` (frozenset of
    every id that ends generation: EOS and the end-of-turn tokens), ``pad_id``, ``add_bos``
    (whether ``encode`` prepends BOS by default), ``chat_template`` (jinja2 source or None),
    ``vocab_size``.
    """

    def __init__(self, backend: _HFTokenizer, *, bos_id: int | None, eos_id: int | None,
                 eos_ids: Iterable[int] = (), pad_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None):
        self._tok = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        ids = set(int(i) for i in eos_ids)
        if eos_id is not None:
            ids.add(int(eos_id))
        self.eos_ids = frozenset(ids)
        self.pad_id = pad_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template

    # --- text <-> ids -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) stay whole.
        ``add_bos`` defaults to the model's own setting (``self.add_bos``)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos):
            if self.bos_id is None:
                raise ValueError("encode(add_bos=True): this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def _token(self, i: int | None) -> str:
        return "" if i is None else (self._tok.id_to_token(i) or "")

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt string for ``messages`` ([{"role": ..., "content": ...}, ...]), rendered with
        the model's jinja2 chat template; extra keyword arguments reach the template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (the checkpoint carried none); "
                             "format the prompt yourself and call encode()")
        return _render_chat_template(self.chat_template, messages,
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token=self._token(self.bos_id),
                                     eos_token=self._token(self.eos_id), **kwargs)

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """Build from a GGUF file's ``tokenizer.*`` metadata (byte-level BPE, ``ggml.model == gpt2``)."""
        import gguf
        reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) \
            else gguf.GGUFReader(os.fspath(path_or_reader))

        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer.ggml.model is {kind!r}; jax_tokenweave reads byte-level "
                             f"BPE vocabularies ('gpt2': Llama 3, Qwen2, SmolLM2) only")
        tokens = field("tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = field("tokenizer.ggml.merges") or []
        if tokens is None:
            raise ValueError("GGUF file lacks tokenizer.ggml.tokens (no vocabulary)")
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # Real byte-level tokens are spelled in the byte alphabet; one that is not (rare) is
        # respelled byte by byte. A control token is kept whole as an added special token
        # (transformers and llama.cpp do the same).
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                         fuse_unk=False, byte_fallback=False)
        backend = _HFTokenizer(bpe)
        backend.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        special = [AddedToken(t, normalized=False, special=True)
                   for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        user = [AddedToken(t, normalized=False, special=False)
                for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        backend.add_special_tokens(special)
        if user:
            backend.add_tokens(user)

        def opt_id(key):
            v = field(key)
            return None if v is None else int(v)

        eos = opt_id("tokenizer.ggml.eos_token_id")
        eot = [opt_id(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
        special_ids = {i for i, ty in enumerate(types) if ty == _CONTROL}
        eos_ids = {i for i in eot if i is not None} | {
            vocab[t] for t in _END_OF_TURN if t in vocab and vocab[t] in special_ids}
        return cls(backend, bos_id=opt_id("tokenizer.ggml.bos_token_id"), eos_id=eos, eos_ids=eos_ids,
                   pad_id=opt_id("tokenizer.ggml.padding_token_id"),
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
                   chat_template=field("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Build from a Hugging Face folder: ``tokenizer.json`` plus, when present,
        ``tokenizer_config.json`` (BOS/EOS, add_bos_token, chat_template, or a separate
        ``chat_template.jinja``) and ``generation_config.json`` (extra EOS ids)."""
        path = os.fspath(path)
        tj = os.path.join(path, TOKENIZER_FILE)
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{tj} not found: a Hugging Face tokenizer folder needs tokenizer.json")
        backend = _HFTokenizer.from_file(tj)

        def load_json(name):
            p = os.path.join(path, name)
            if not os.path.exists(p):
                return {}
            with open(p) as f:
                return json.load(f)

        tc, gc, mc = (load_json(n) for n in ("tokenizer_config.json", "generation_config.json",
                                             "config.json"))

        def tok_id(v):
            if isinstance(v, dict):
                v = v.get("content")
            return None if v is None else backend.token_to_id(v)

        def first(*vals):
            for v in vals:
                if v is not None:
                    return v
            return None

        bos = first(tok_id(tc.get("bos_token")), gc.get("bos_token_id"), mc.get("bos_token_id"))
        eos = first(tok_id(tc.get("eos_token")), mc.get("eos_token_id"))
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        eos_ids: set[int] = set()
        for v in (gc.get("eos_token_id"), mc.get("eos_token_id")):
            if isinstance(v, int):
                eos_ids.add(v)
            elif isinstance(v, list):
                eos_ids.update(int(x) for x in v)
        template = tc.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_file):
            with open(jinja_file) as f:
                template = f.read()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(backend, bos_id=bos, eos_id=eos, eos_ids=eos_ids, pad_id=tok_id(tc.get("pad_token")),
                   add_bos=bool(tc.get("add_bos_token", False)), chat_template=template)

    # --- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_meta.json`` into ``directory``."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, TOKENIZER_FILE))
        meta = dict(bos_id=self.bos_id, eos_id=self.eos_id, eos_ids=sorted(self.eos_ids),
                    pad_id=self.pad_id, add_bos=self.add_bos, chat_template=self.chat_template)
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read what ``save`` wrote."""
        directory = os.fspath(directory)
        meta_path = os.path.join(directory, META_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: not a directory written by Tokenizer.save")
        with open(meta_path) as f:
            meta = json.load(f)
        backend = _HFTokenizer.from_file(os.path.join(directory, TOKENIZER_FILE))
        return cls(backend, **meta)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={sorted(self.eos_ids)}, add_bos={self.add_bos}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")
