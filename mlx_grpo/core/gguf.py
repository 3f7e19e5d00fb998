"""Convert a llama.cpp GGUF file (Llama, Qwen2, Qwen3) into an mlx-lm model directory.

MLX reads GGUF itself (`mx.load(path, return_metadata=True)`): Q4_0, Q4_1 and
Q8_0 tensors arrive as MLX affine-quantized triples (uint32 `weight`, float16
`scales` and `biases`, group size 32), F16/F32 as arrays, and the metadata as
a dict. This module renames, un-permutes and writes them out:

    token_embd          -> model.embed_tokens        output_norm -> model.norm
    output              -> lm_head (absent: tie_word_embeddings = true)
    blk.N.attn_q/k/v    -> model.layers.N.self_attn.q_proj/k_proj/v_proj (.weight, .bias)
    blk.N.attn_output   -> model.layers.N.self_attn.o_proj
    blk.N.attn_q_norm   -> model.layers.N.self_attn.q_norm (k likewise; Qwen3)
    blk.N.ffn_gate/up/down -> model.layers.N.mlp.gate_proj/up_proj/down_proj
    blk.N.attn_norm     -> model.layers.N.input_layernorm
    blk.N.ffn_norm      -> model.layers.N.post_attention_layernorm

Permutation: for the `llama` architecture only, llama.cpp's converter reorders
the rows of Q and K within each head from HF's [first half | second half]
RoPE layout to interleaved pairs (row (h, j, i) -> (h, i, j), j in {0, 1}).
We apply the inverse to the rows of the weight, the bias and, for quantized
tensors, the scales and biases (a row of a quantized matrix is its own groups,
so no dequantization is needed). Qwen2 and Qwen3 use llama.cpp's NeoX RoPE and
are stored unpermuted.

Dtypes: without `keep_quantized` every tensor is written as float32 (MLX's CPU
backend is fast only in float32 and its quantized matmuls do not batch). With
it, Q4_x/Q8_0 stay packed (mlx-lm infers 4 or 8 bits per layer from the shapes)
and the other tensors become float16, the dtype of the scales.

The tokenizer (`tokenizer.json`) is rebuilt from the GGUF vocabulary: a GPT-2
byte-level BPE from `tokenizer.ggml.tokens` + `merges`, control tokens (type 3)
as special added tokens, user-defined ones (type 4) as plain added tokens, and
the pre-tokenizer that `tokenizer.ggml.pre` names, as in llama.cpp's table.

The Hub id the GGUF names as its source (`source_hub_id`) goes into the
config's `_name_or_path`, so an adapter trained on the converted model can
name its base as the Hub knows it.

Refused with a ValueError: other architectures, tensor types other than F32,
F16, Q4_0, Q4_1, Q8_0 (K-quants, IQ-quants, BF16, ...), SentencePiece
vocabularies, unknown pre-tokenizers, RoPE scaling other than linear, and
tensors with no mlx-lm counterpart (such as Llama 3.1's `rope_freqs`).
"""

from __future__ import annotations

import importlib
import json
import mmap
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from mlx_grpo.core.outputs import build, check_target
from mlx_grpo.core.values import is_hub_id

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# GGML tensor type ids: the ones read here, then names for clearer refusals.
SUPPORTED_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
_OTHER_TYPES = {6: "Q5_0", 7: "Q5_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
                20: "IQ4_NL", 23: "IQ4_XS", 30: "BF16"}  # fmt: skip

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# Pre-tokenizer regexes of the original tokenizer.json files (llama.cpp's llama-vocab table).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = _QWEN2.replace(r"\p{N}|", r"\p{N}{1,3}|")
# tokenizer.ggml.pre -> (regexes applied in turn, NFC normalizer, ignore_merges, default add_bos)
PRE_TOKENIZERS = {
    "gpt-2": ([_GPT2], False, False, False),
    "smollm": ([r"\p{N}", _GPT2], False, False, False),  # digits one by one, then GPT-2
    "starcoder": ([r"\p{N}", _GPT2], False, False, False),
    "refact": ([r"\p{N}", _GPT2], False, False, False),
    "qwen2": ([_QWEN2], True, False, False),
    "llama-bpe": ([_LLAMA3], False, True, True),
    "llama3": ([_LLAMA3], False, True, True),
    "llama-v3": ([_LLAMA3], False, True, True),
}


def convert_gguf(
    gguf_path: str | Path, output: str | Path, keep_quantized: bool | None = None
) -> Path:
    """Write an mlx-lm model directory (config, weights, tokenizer) converted from a GGUF.

    `keep_quantized`: None keeps Q4_x/Q8_0 packed on an Apple GPU and
    dequantizes them to float32 elsewhere (the CPU); True/False force it.
    `output` must be new, empty or an earlier conversion (replaced whole); the
    folder is written beside it and renamed into place (outputs.build).

    Example:
        >>> from mlx_grpo.tasks.smollm2 import fetch_smollm2_gguf
        >>> path = convert_gguf(fetch_smollm2_gguf(), "/tmp/smollm2-135m")
        >>> import mlx_lm; model, tokenizer = mlx_lm.load(str(path))
    """
    gguf_path, output = Path(gguf_path), Path(output)
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file {gguf_path} does not exist; pass the path of a .gguf file")
    protected = {"the GGUF file": gguf_path}
    check_target(output, "converted", protected)  # before the slow part
    if keep_quantized is None:
        keep_quantized = mx.metal.is_available()
    for name, kind in tensor_types(gguf_path).items():  # before mx.load, which may choke
        if kind not in SUPPORTED_TYPES:
            type_name = _OTHER_TYPES.get(kind, f"type id {kind}")
            raise ValueError(
                f"{gguf_path}: tensor '{name}' has GGML type {type_name}, which is not supported "
                f"(only {', '.join(SUPPORTED_TYPES.values())}); use a Q4_0/Q4_1/Q8_0/F16 GGUF "
                "of the model, or convert the original checkpoint with mlx_lm.convert"
            )
    try:
        tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    except RuntimeError as e:  # a truncated download, mostly
        raise ValueError(f"{gguf_path}: MLX cannot read it ({e}); download it again") from e
    arch = _meta(meta, "general.architecture", gguf_path)
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{gguf_path}: architecture '{arch}' is not supported (only {sorted(ARCHITECTURES)}); "
            "convert the original Hugging Face checkpoint with mlx_lm.convert instead"
        )
    config = _config(meta, tensors, arch, gguf_path)
    weights = _weights(tensors, config, keep_quantized, gguf_path)
    _check_names(weights, config, gguf_path)
    if keep_quantized and any(k.endswith(".scales") for k in weights):
        # mlx-lm reads 4 or 8 bits per layer from the shapes; these are only defaults.
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
        config["quantization_config"] = config["quantization"]
    if repo := source_hub_id(meta):
        config["_name_or_path"] = repo
    files = _tokenizer_files(meta, config, gguf_path)
    files["config.json"] = json.dumps(config, indent=2)
    with build(output, "converted", protected) as folder:
        mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
        for name, text in files.items():
            (folder / name).write_text(text)
    return output


# Where a GGUF may name the Hub repository it was converted from, most specific first.
_SOURCE_KEYS = (
    "general.source.huggingface.repository",
    "general.source.repo_url",
    "general.source.url",
    "general.name",
)


def source_hub_id(meta: Mapping[str, object]) -> str | None:
    """The Hub id (org/name) a GGUF's metadata names as its source; None when none does.

    llama.cpp's converter writes `general.source.huggingface.repository` (older)
    or `general.source.repo_url` (https://huggingface.co/org/name); a
    `general.name` counts only when it has the org/name shape. The base model of
    a fine-tune (`general.base_model.*`) is another model and is not used.
    """
    for key in _SOURCE_KEYS:
        value = meta.get(key)
        if isinstance(value, str):
            value = re.sub(r"^https?://huggingface\.co/", "", value.strip()).rstrip("/")
            if is_hub_id(value):
                return value
    return None


def string_metadata(path: str | Path) -> dict[str, str]:
    """The string-valued metadata of a GGUF, read from its header alone (no tensors)."""
    return _read_header(path)[0]


def tensor_types(path: str | Path) -> dict[str, int]:
    """GGML type id of every tensor, read from the GGUF header (mx.load does not tell)."""
    return _read_header(path)[1]


def _read_header(path: str | Path) -> tuple[dict[str, str], dict[str, int]]:
    """(string metadata, tensor types) of a GGUF file."""
    with open(path, "rb") as f:
        magic, version = struct.unpack("<4sI", f.read(8).ljust(8, b"\0"))
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(
                f"{path} is not a GGUF v2/v3 file (magic {magic!r}, version {version}); "
                "pass a .gguf file written by a recent llama.cpp"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse_header(buf)
            except (struct.error, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from e


def _parse_header(buf: mmap.mmap) -> tuple[dict[str, str], dict[str, int]]:
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24
    strings = {}
    for _ in range(n_kv):
        key = _string(buf, pos)
        pos = _skip(buf, pos, 8)
        (kind,) = struct.unpack_from("<I", buf, pos)
        if kind == 8:
            strings[key] = _string(buf, pos + 4)
        pos = _skip(buf, pos + 4, kind)
    types = {}
    for _ in range(n_tensors):
        (length,) = struct.unpack_from("<Q", buf, pos)
        name = bytes(buf[pos + 8 : pos + 8 + length]).decode("utf-8")
        (n_dims,) = struct.unpack_from("<I", buf, pos + 8 + length)
        pos += 8 + length + 4 + 8 * n_dims
        types[name] = struct.unpack_from("<I", buf, pos)[0]
        pos += 4 + 8  # type, data offset
    return strings, types


def _string(buf: mmap.mmap, pos: int) -> str:
    (length,) = struct.unpack_from("<Q", buf, pos)
    return bytes(buf[pos + 8 : pos + 8 + length]).decode("utf-8")


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip(buf: mmap.mmap, pos: int, kind: int) -> int:
    """Position after one GGUF metadata value of type `kind` (8 string, 9 array)."""
    if kind in _SCALARS:
        return pos + _SCALARS[kind]
    if kind == 8:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if kind != 9:
        raise ValueError(f"malformed GGUF header: unknown metadata value type {kind} at {pos}")
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _SCALARS:
        return pos + count * _SCALARS[item]
    for _ in range(count):
        pos = _skip(buf, pos, item)
    return pos


_MISSING = object()


def _meta(meta: dict, key: str, where: Path, default=_MISSING):
    value = meta.get(key, default)
    if value is _MISSING:
        raise ValueError(
            f"{where}: GGUF metadata lacks '{key}'; the file is incomplete or too old, "
            "re-export it with a recent llama.cpp convert_hf_to_gguf.py"
        )
    if isinstance(value, mx.array):
        value = value.tolist()
    return value


def _config(meta: dict, tensors: dict, arch: str, where: Path) -> dict:
    """config.json for mlx-lm (and transformers) from the `{arch}.*` metadata."""

    def get(key, default=_MISSING):
        value = _meta(meta, f"{arch}.{key}", where, default)
        if isinstance(value, list):  # per-layer values; only uniform ones are supported
            if len(set(value)) != 1:
                raise ValueError(f"{where}: '{arch}.{key}' varies by layer, which is unsupported")
            value = value[0]
        return value

    if (embed := tensors.get("token_embd.weight")) is None:
        raise ValueError(f"{where}: no token_embd.weight tensor; the file is incomplete")
    heads = get("attention.head_count")
    head_dim = get("attention.key_length", None)
    rope_dims = get("rope.dimension_count", None)
    if rope_dims not in (None, head_dim or get("embedding_length") // heads):
        raise ValueError(f"{where}: partial rotary embeddings are not supported")
    config = {
        "model_type": arch,
        "architectures": [ARCHITECTURES[arch]],
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon'):.6g}"),  # float32 noise
        "rope_theta": float(get("rope.freq_base", 10000.0)),  # llama.cpp's default base
        "max_position_embeddings": get("context_length"),
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if head_dim is not None or arch == "qwen3":
        config["head_dim"] = head_dim or config["hidden_size"] // heads
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling != "none" or "rope_freqs.weight" in tensors:
        raise ValueError(
            f"{where}: RoPE scaling '{scaling}' (or a rope_freqs tensor, as in Llama 3.1) "
            "is not supported; convert the original checkpoint with mlx_lm.convert"
        )
    for name in ("bos", "eos", "padding"):
        token_id = _meta(meta, f"tokenizer.ggml.{name}_token_id", where, None)
        if token_id is not None:
            config[f"{name.replace('padding', 'pad')}_token_id"] = token_id
    return config


def _weights(tensors: dict, config: dict, keep: bool, where: Path) -> dict[str, mx.array]:
    """mlx-lm-named weights: renamed, Q/K rows un-permuted (Llama), dequantized unless `keep`."""
    parts: dict[str, dict[str, mx.array]] = {}
    for name, value in tensors.items():
        base, _, kind = name.rpartition(".")
        parts.setdefault(base, {})[kind] = value
    dtype = mx.float16 if keep else mx.float32
    # llama.cpp interleaved the Q and K rows of Llama only (Qwen uses NeoX RoPE there).
    permuted = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for base, part in parts.items():
        target = _hf_name(base, where)
        heads = config["model_type"] == "llama" and permuted.get(base.rpartition(".")[2])
        if heads:
            part = {kind: _unpermute(value, heads) for kind, value in part.items()}
        if "scales" in part and not keep:
            scales, biases = part.pop("scales"), part.pop("biases")
            bits = part["weight"].shape[-1] // scales.shape[-1]  # uint32 words per group of 32
            part["weight"] = mx.dequantize(
                part["weight"], scales.astype(mx.float32), biases.astype(mx.float32), 32, bits
            )
        for kind, value in part.items():
            packed = kind in ("scales", "biases") or value.dtype == mx.uint32
            out[f"{target}.{kind}"] = value if packed else value.astype(dtype)
    return out


def _hf_name(base: str, where: Path) -> str:
    if base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(
        f"{where}: tensor '{base}' has no mlx-lm counterpart (this converter maps "
        f"{sorted(_GLOBAL_NAMES)} and blk.N.{{{','.join(_LAYER_NAMES)}}}); the model uses "
        "a variant that is not supported, convert the original checkpoint with mlx_lm.convert"
    )


def _unpermute(x: mx.array, heads: int) -> mx.array:
    """Rows (head, i, j) -> (head, j, i): llama.cpp's interleaved RoPE pairs back to halves."""
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _check_names(weights: dict, config: dict, where: Path) -> None:
    """Every parameter mlx-lm's model expects is there, and nothing else."""
    from mlx.utils import tree_flatten

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))  # lazy: nothing is allocated
    expected = {name for name, _ in tree_flatten(model.parameters())}
    got = {k for k in weights if not k.endswith((".scales", ".biases"))}
    if expected != got:
        missing, extra = sorted(expected - got)[:5], sorted(got - expected)[:5]
        raise ValueError(
            f"{where}: the tensors do not match a {config['model_type']} model "
            f"(missing {missing}, unexpected {extra}); the file is incomplete or a variant "
            "this converter does not know"
        )


def _tokenizer(meta: dict, where: Path) -> tuple[object, bool]:
    """The GGUF vocabulary as a `tokenizers` byte-level BPE; also llama.cpp's default add_bos."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre

    model = _meta(meta, "tokenizer.ggml.model", where)
    name = _meta(meta, "tokenizer.ggml.pre", where, "default")
    if model != "gpt2" or name not in PRE_TOKENIZERS:
        raise ValueError(
            f"{where}: tokenizer '{model}' with pre-tokenizer '{name}' is not supported (only "
            f"'gpt2' byte-level BPE with tokenizer.ggml.pre in {sorted(PRE_TOKENIZERS)}); "
            "use the model's Hugging Face tokenizer files"
        )
    regexes, nfc, ignore_merges, add_bos = PRE_TOKENIZERS[name]
    tokens = _meta(meta, "tokenizer.ggml.tokens", where)
    types = _meta(meta, "tokenizer.ggml.token_type", where, [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _meta(meta, "tokenizer.ggml.merges", where, [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    splits = [pre.Split(Regex(r), behavior="isolated") for r in regexes]
    tok.pre_tokenizer = pre.Sequence(
        [*splits, pre.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # GGUF token types: 3 control (special), 4 user-defined (added, kept in decoding).
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    )
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == 4])
    return tok, add_bos


def _tokenizer_files(meta: dict, config: dict, where: Path) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json."""
    from tokenizers import processors

    tok, add_bos = _tokenizer(meta, where)
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {k: config.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}
    ids["unk"] = _meta(meta, "tokenizer.ggml.unknown_token_id", where, None)
    named = {f"{k}_token": tokens[i] for k, i in ids.items() if i is not None}
    add_bos = (
        bool(_meta(meta, "tokenizer.ggml.add_bos_token", where, add_bos)) and ids["bos"] is not None
    )
    if add_bos:
        bos = named["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, ids["bos"])]
        )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if template := _meta(meta, "tokenizer.chat_template", where, None):
        tokenizer_config["chat_template"] = template
    # Chat models also stop on end-of-turn tokens that are not the EOS.
    stops = {
        _meta(meta, f"tokenizer.ggml.{k}_token_id", where, None) for k in ("eos", "eot", "eom")
    }
    generation = {"bos_token_id": ids["bos"], "eos_token_id": sorted(stops - {None})}
    if ids["pad"] is not None:
        generation["pad_token_id"] = ids["pad"]
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "special_tokens_map.json": json.dumps(named, indent=2),
        "generation_config.json": json.dumps(generation, indent=2),
    }
