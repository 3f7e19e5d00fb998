"""GGUF -> mlx-lm conversion, checked against references that do not use mlx_grpo.core.gguf.

SmolLM2 (real, Llama architecture, Q4_1): transformers' own GGUF loader, which
reads the file with the `gguf` package, dequantizes in NumPy and undoes the Q/K
permutation itself. Qwen3 and Qwen2 (synthetic): NumPy weights quantized and dequantized
by the `gguf` package, run through mlx-lm's qwen3 / qwen2 model directly.
"""

from __future__ import annotations

import json
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.core.gguf import convert_gguf, source_hub_id, string_metadata, tensor_types
from mlx_grpo.core.models import load_model

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
GT = gguf.GGUFValueType

CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEXTS = [
    "12345 + 678 = ?",
    "Hello world! 123 and 4.5e-3",
    "  multiple   spaces\n\n\tand tabs  \n",
    "Café déjà vu, naïve façade: 日本語 🙂",
    "def f(x):\n    return x**2  # square\n",
    "I'm sure they'll say it's 3.14159, isn't it?",
    CHATML,
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


@pytest.fixture(scope="module")
def smol_gguf():
    from mlx_grpo.tasks.smollm2 import fetch_smollm2_gguf

    return fetch_smollm2_gguf()


@pytest.fixture(scope="module")
def smol_lm(smol_gguf, tmp_path_factory):
    start = time.perf_counter()
    path = convert_gguf(smol_gguf, tmp_path_factory.mktemp("smollm2"), keep_quantized=False)
    print(f"\nconverted SmolLM2-135M in {time.perf_counter() - start:.1f} s")
    return load_model(str(path))


@pytest.fixture(scope="module")
def reference_tokenizer(smol_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smol_gguf, smol_lm, reference_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        smol_gguf.parent, gguf_file=smol_gguf.name, dtype=torch.float32
    ).eval()
    worst = 0.0
    for text in TEXTS[:4] + [CHATML]:
        ids = reference_tokenizer.encode(text)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].numpy()
        got = np.array(smol_lm.model(mx.array([ids]))[0])
        assert got.shape == expected.shape
        worst = max(worst, float(np.abs(got - expected).max()))
        assert (got.argmax(-1) == expected.argmax(-1)).all()
    print(f"\nmax |logit diff| vs transformers' GGUF loader: {worst:.2e}")
    assert worst <= 1e-3  # logits reach ~30; a wrong permutation or name gives O(1) errors


@pytest.mark.slow
def test_smollm2_tokenizer_matches_reference_and_renders_chatml(smol_lm, reference_tokenizer):
    tokenizer = smol_lm.tokenizer
    # transformers' GGUF tokenizer applies GPT-2's split only; for ASCII digits that equals
    # SmolLM2's digit-by-digit split, since its vocabulary has no multi-digit tokens.
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference_tokenizer.encode(text), text
        assert tokenizer.decode(ids) == text
    # Every digit is its own piece, as llama.cpp's "smollm" pre-tokenizer and the original do.
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x٣٤")
    assert [piece for piece, _ in pieces] == ["x", "Ù£", "Ù¤"]  # byte-level forms of ٣, ٤
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == CHATML
    assert smol_lm.eos_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def _greedy(lm, question: str, max_tokens: int) -> str:
    import mlx_lm

    messages = [{"role": "user", "content": question}]
    prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return mlx_lm.generate(lm.model, lm.tokenizer, prompt, max_tokens=max_tokens)


@pytest.mark.slow
def test_smollm2_greedy_answers_fluently(smol_lm):
    answer = _greedy(smol_lm, "What is the capital of France?", 16)
    print(f"\n{answer!r}")
    assert "Paris" in answer
    text = _greedy(smol_lm, "Write one sentence about the sea.", 40)
    print(repr(text))
    words = text.split()
    assert len(words) >= 8
    assert sum(c.isascii() for c in text) / len(text) > 0.95
    plain = [w for w in words if w.strip(".,;:!?'\"()").isalpha()]
    assert len(plain) / len(words) > 0.8  # words, not byte soup or repeated symbols


@pytest.mark.slow
def test_smollm2_kept_quantized_matches_dequantized(smol_gguf, smol_lm, tmp_path):
    import mlx.nn as nn
    import mlx_lm

    path = convert_gguf(smol_gguf, tmp_path / "q4", keep_quantized=True)
    model, _ = mlx_lm.load(str(path))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    model.set_dtype(mx.float32)  # float32 scales: the Q/K rows un-permuted in packed form
    ids = mx.array([smol_lm.tokenizer.encode("The capital of France is")])
    assert mx.abs(model(ids) - smol_lm.model(ids)).max().item() < 1e-3


# Tiny Qwen models written as GGUF, with mixed tensor types. Qwen3's head_dim * heads != hidden.
TINY = dict(hidden=64, ffn=96, layers=2, heads=4, kv_heads=2, eps=1e-6, theta=1e6)
HEAD_DIM = {"qwen3": 32, "qwen2": 16}  # mlx-lm's qwen2 takes hidden // heads
BYTES = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
TOKENS = BYTES + ["he", "ll", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _layer_tensors(arch: str) -> dict[str, tuple[str, tuple, int]]:
    """blk.N.<gguf name> -> (HF name, shape (out, in), GGML type)."""
    q, kv = TINY["heads"] * HEAD_DIM[arch], TINY["kv_heads"] * HEAD_DIM[arch]
    tensors = {
        "attn_q.weight": ("self_attn.q_proj.weight", (q, 64), Q.Q8_0),
        "attn_k.weight": ("self_attn.k_proj.weight", (kv, 64), Q.Q4_0),
        "attn_v.weight": ("self_attn.v_proj.weight", (kv, 64), Q.F16),
        "attn_output.weight": ("self_attn.o_proj.weight", (64, q), Q.Q8_0),
        "ffn_gate.weight": ("mlp.gate_proj.weight", (96, 64), Q.Q4_1),
        "ffn_up.weight": ("mlp.up_proj.weight", (96, 64), Q.F32),
        "ffn_down.weight": ("mlp.down_proj.weight", (64, 96), Q.Q8_0),
        "attn_norm.weight": ("input_layernorm.weight", (64,), Q.F32),
        "ffn_norm.weight": ("post_attention_layernorm.weight", (64,), Q.F32),
    }
    if arch == "qwen3":
        tensors["attn_q_norm.weight"] = ("self_attn.q_norm.weight", (HEAD_DIM[arch],), Q.F32)
        tensors["attn_k_norm.weight"] = ("self_attn.k_norm.weight", (HEAD_DIM[arch],), Q.F32)
    else:
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            tensors[f"attn_{name}.bias"] = (f"self_attn.{name}_proj.bias", (rows,), Q.F32)
    return tensors


def _random_model(arch: str, seed: int = 0) -> dict[str, tuple[str, np.ndarray, int]]:
    """gguf name -> (HF name, float32 values, GGML type); 1-D tensors near 1, all distinct."""
    rng = np.random.default_rng(seed)
    vocab = len(TOKENS)
    tensors = {
        "token_embd.weight": ("model.embed_tokens.weight", (vocab, 64), Q.Q8_0),
        "output.weight": ("lm_head.weight", (vocab, 64), Q.Q4_0),
        "output_norm.weight": ("model.norm.weight", (64,), Q.F32),
    }
    for i in range(TINY["layers"]):
        for name, (hf, shape, kind) in _layer_tensors(arch).items():
            tensors[f"blk.{i}.{name}"] = (f"model.layers.{i}.{hf}", shape, kind)
    out = {}
    for name, (hf, shape, kind) in tensors.items():
        values = (
            1 + 0.2 * rng.standard_normal(shape) if len(shape) == 1 else rng.normal(0, 0.3, shape)
        )
        out[name] = (hf, values.astype(np.float32), kind)
    return out


def _write_gguf(
    path, arch: str, tensors: dict, pre: str = "qwen2", meta: dict | None = None
) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():  # e.g. general.source.huggingface.repository
        writer.add_string(key, value)
    writer.add_context_length(4096)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_block_count(TINY["layers"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    if arch == "qwen3":
        writer.add_key_length(HEAD_DIM[arch])
        writer.add_value_length(HEAD_DIM[arch])
    writer.add_rope_freq_base(TINY["theta"])
    writer.add_layer_norm_rms_eps(TINY["eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * (len(TOKENS) - 3) + [3] * 3)
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(TOKENS.index("<|endoftext|>"))
    writer.add_eos_token_id(TOKENS.index("<|im_end|>"))
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    for name, (_, values, kind) in tensors.items():
        if kind in (Q.F32, Q.F16):
            writer.add_tensor(name, values.astype(np.float16 if kind == Q.F16 else np.float32))
        else:
            packed = gguf.quants.quantize(values, kind)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
    _finish(writer)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _reference_logits(arch: str, tensors: dict, ids: list[int]) -> np.ndarray:
    """mlx-lm's own model on the gguf package's dequantized NumPy weights."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{arch}")
    config = dict(
        model_type=arch,
        hidden_size=TINY["hidden"],
        num_hidden_layers=TINY["layers"],
        intermediate_size=TINY["ffn"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        head_dim=HEAD_DIM[arch],
        rms_norm_eps=TINY["eps"],
        vocab_size=len(TOKENS),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_theta=TINY["theta"],
    )
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = []
    for hf, values, kind in tensors.values():
        if kind == Q.F16:
            values = values.astype(np.float16).astype(np.float32)
        elif kind != Q.F32:
            values = gguf.quants.dequantize(gguf.quants.quantize(values, kind), kind)
        weights.append((hf, mx.array(values)))
    model.load_weights(weights)  # strict: every parameter named, no extra
    return np.array(model(mx.array([ids]))[0])


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def tiny_gguf(request, tmp_path_factory):
    arch = request.param
    tensors = _random_model(arch)
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, tensors)
    return arch, path, tensors


def test_qwen_gguf_converts_to_the_same_logits(tiny_gguf, tmp_path):
    arch, path, tensors = tiny_gguf
    lm = load_model(str(convert_gguf(path, tmp_path / "model", keep_quantized=False)))
    assert lm.config["model_type"] == arch and lm.config["rope_theta"] == 1e6
    assert lm.config["tie_word_embeddings"] is False
    ids = lm.tokenizer.encode("hello <|im_end|>")
    assert ids[:3] == [TOKENS.index("he"), TOKENS.index("ll"), TOKENS.index("o")]
    assert ids[-1] == TOKENS.index("<|im_end|>")
    assert lm.eos_ids == [TOKENS.index("<|im_end|>")]
    prompt = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    expected = _reference_logits(arch, tensors, ids)
    got = np.array(lm.model(mx.array([ids]))[0])
    # Same dequantized numbers, same model code: equal up to float32 rounding. A permutation
    # of Q/K rows or a swapped name would change the logits by O(1).
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_qwen_gguf_kept_quantized_mixes_4_and_8_bits(tiny_gguf, tmp_path):
    import mlx.nn as nn
    import mlx_lm

    arch, path, tensors = tiny_gguf
    model, tokenizer = mlx_lm.load(str(convert_gguf(path, tmp_path / "q", keep_quantized=True)))
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, nn.QuantizedLinear) and attention.q_proj.bits == 8
    assert isinstance(attention.k_proj, nn.QuantizedLinear) and attention.k_proj.bits == 4
    assert not isinstance(attention.v_proj, nn.QuantizedLinear)  # F16 in the file
    ids = tokenizer.encode("hello there")
    expected = _reference_logits(arch, tensors, ids)
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    assert np.abs(got - expected).max() < 2e-2 * np.abs(expected).max()  # float16 compute


def test_llama3_pre_tokenizer_prepends_bos_and_keeps_digit_groups(tmp_path):
    path = tmp_path / "llama-bpe.gguf"
    _write_gguf(path, "qwen3", _random_model("qwen3"), pre="llama-bpe")
    lm = load_model(str(convert_gguf(path, tmp_path / "out")))
    assert lm.tokenizer.encode("hello")[0] == TOKENS.index("<|endoftext|>")
    pieces = lm.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345")
    assert [piece for piece, _ in pieces] == ["123", "45"]  # Llama 3 splits digits by threes


REPO = "TinyOrg/tiny-qwen"


@pytest.mark.parametrize(
    "meta,expected",
    [
        ({"general.source.huggingface.repository": REPO}, REPO),
        ({"general.source.repo_url": f"https://huggingface.co/{REPO}"}, REPO),
        ({"general.name": REPO}, REPO),
        ({"general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2"}, None),  # the real SmolLM2's
        ({"general.source.url": "https://github.com/some/repo"}, None),
    ],
    ids=["hf-repository", "repo-url", "name", "name-not-an-id", "other-url"],
)
def test_conversion_records_the_hub_id_the_gguf_names(tmp_path, meta, expected):
    path = tmp_path / "named.gguf"
    _write_gguf(path, "qwen3", _random_model("qwen3"), meta=meta)
    assert source_hub_id(string_metadata(path)) == expected
    config = json.loads((convert_gguf(path, tmp_path / "out") / "config.json").read_text())
    assert config.get("_name_or_path") == expected


def test_header_reader_agrees_with_gguf_package(tiny_gguf):
    _, path, tensors = tiny_gguf
    reader = gguf.GGUFReader(path)
    types = tensor_types(path)
    assert types == {t.name: int(t.tensor_type) for t in reader.tensors}
    assert types == {name: int(kind) for name, (_, _, kind) in tensors.items()}
    strings = {k: f.contents() for k, f in reader.fields.items() if f.types == [GT.STRING]}
    assert string_metadata(path) == strings and strings["tokenizer.ggml.pre"] == "qwen2"


def test_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "gemma.gguf"
    _write_gguf(path, "gemma2", {"token_embd.weight": ("", np.zeros((4, 32), np.float32), Q.F32)})
    with pytest.raises(ValueError, match="architecture 'gemma2' is not supported"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", [Q.Q5_0, Q.Q6_K])
def test_unsupported_tensor_type_is_refused(tmp_path, kind):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 256), np.float32))
    # Raw zero bytes: the gguf package has no NumPy quantizer for Q6_K.
    raw = np.zeros(gguf.quants.quant_shape_to_byte_shape((4, 256), kind), np.uint8)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_shape=raw.shape, raw_dtype=kind)
    _finish(writer)
    with pytest.raises(ValueError, match=f"'blk.0.attn_q.weight' has GGML type {kind.name}"):
        convert_gguf(path, tmp_path / "out")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="is not a GGUF v2/v3 file"):
        convert_gguf(path, tmp_path / "out")


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    path = tmp_path / "odd-pre.gguf"
    _write_gguf(path, "qwen3", _random_model("qwen3"), pre="made-up")
    with pytest.raises(ValueError, match="pre-tokenizer 'made-up' is not supported"):
        convert_gguf(path, tmp_path / "out")
