"""Small random-weight Qwen3 models and a byte-level tokenizer, built offline.

They let the tests, the demo and the benchmark run on a machine that reaches
no model hub. The tokenizer is a byte-level BPE with no merges (one token per
byte) plus the Qwen3 special tokens, and a ChatML chat template that honours
`enable_thinking` as Qwen3's does (with `tools=True`, one that also shows
tools, tool calls and tool results in Qwen3's form).

Example:
    >>> from mlx_grpo.tasks.toy import build_tiny_qwen3
    >>> path = build_tiny_qwen3("/tmp/tiny-qwen3")
    >>> import mlx_lm; model, tokenizer = mlx_lm.load(str(path))
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# As in Qwen3, the think tags are added tokens that decoding keeps.
THINK_TOKENS = ["<think>", "</think>"]

# The assistant header after the conversation; Qwen3's empty thinking block when it is off.
GENERATION_PROMPT = (
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
) + GENERATION_PROMPT

# Every turn, tool calls and tool results as Qwen3's template renders them (the system
# turn, which shows the tools, is the template's own).
TOOL_MESSAGES = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant\\n' + message['content'] }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n' + ({'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson) + '\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
)

# The plain template, also showing tools (briefly), tool calls and tool results.
TOOLS_CHAT_TEMPLATE = (
    (
        "{%- if tools %}"
        "{{- '<|im_start|>system\\n' }}"
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
        "{{- 'Tools you may call:\\n<tools>\\n' }}"
        # each tool as name(arguments): the byte tokenizer makes every character a token
        "{%- for tool in tools %}{{- tool['function']['name'] + '(' }}"
        "{{- tool['function']['parameters']['properties'] | list | join(', ') }}{{- ')\\n' }}"
        "{%- endfor %}"
        '{{- \'</tools>\\nCall one with <tool_call>{\\"name\\": ..., \\"arguments\\": {...}}'
        "</tool_call>.<|im_end|>\\n' }}"
        "{%- endif %}"
    )
    + TOOL_MESSAGES
    + GENERATION_PROMPT
)

# Qwen3-0.6B's shapes (REFERENCE section 3).
QWEN3_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
)

# A tiny model whose head_dim * heads != hidden, like the real one.
TINY = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    vocab_size=264,
    tie_word_embeddings=True,
)


def _byte_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    return {ch: i for i, ch in enumerate(alphabet)}


def save_byte_tokenizer(
    path: str | Path, eos_token: str = "<|im_end|>", chat_template: str = CHAT_TEMPLATE
) -> dict[str, int]:
    """Write a byte-level tokenizer (tokenizer.json + config) into `path`.

    Returns the ids of the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(THINK_TOKENS)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 4096,
        "chat_template": chat_template,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": eos_token, "pad_token": "<|endoftext|>"}, indent=2)
    )
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + THINK_TOKENS}


def build_tiny_qwen3(
    path: str | Path,
    seed: int = 0,
    dtype: mx.Dtype = mx.float32,
    init_std: float = 0.02,
    model_type: str = "qwen3",
    tools: bool = False,
    **overrides,
) -> Path:
    """Build a random-weight Qwen3 (or Llama) with the byte tokenizer, save it to `path`.

    `overrides` change the shapes in TINY (for example `**QWEN3_0_6B`). The
    model's vocabulary is at least the tokenizer's. Matrices are drawn from
    N(0, init_std^2); a larger std gives peakier, less uniform next-token
    distributions. `tools` gives it the chat template that shows tools.
    """
    import importlib

    arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    path = Path(path)
    specials = save_byte_tokenizer(
        path, chat_template=TOOLS_CHAT_TEMPLATE if tools else CHAT_TEMPLATE
    )
    shapes = {**TINY, **overrides}
    shapes["vocab_size"] = max(shapes["vocab_size"], max(specials.values()) + 1)
    config = dict(
        model_type=model_type,
        architectures=[arch],
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0 if model_type == "qwen3" else 100_000.0,
        max_position_embeddings=4096,
        eos_token_id=[specials["<|im_end|>"], specials["<|endoftext|>"]],
        bos_token_id=None,
        pad_token_id=specials["<|endoftext|>"],
        torch_dtype="float32" if dtype == mx.float32 else "bfloat16",
        **shapes,
    )
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    params = [
        (k, (init_std * mx.random.normal(v.shape)).astype(dtype) if v.ndim > 1 else v.astype(dtype))
        for k, v in tree_flatten(model.parameters())
    ]
    model.load_weights(params)
    mx.eval(model.parameters())
    model.save_weights(str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


def allowed_share(
    prompts, completions, completion_ids, allowed=None, **kwargs
) -> list[float | None]:
    """Toy reward: the share of the completion's characters found in the row's `allowed`."""
    out: list[float | None] = []
    for text, chars in zip(completions, allowed or [None] * len(completions)):
        if chars is None:
            out.append(None)
        else:
            out.append(sum(c in chars for c in text) / max(1, len(text)))
    return out


TOY_TASKS = (
    ("Reply with lowercase letters only.", "abcdefghijklmnopqrstuvwxyz"),
    ("Reply with digits only.", "0123456789"),
)


def write_toy_task(path: str | Path, rows: int = 64, seed: int = 0) -> Path:
    """A JSONL prompt set for `allowed_share`: each row asks for one class of characters."""
    import random

    rng = random.Random(seed)
    path = Path(path)
    with path.open("w") as f:
        for _ in range(rows):
            prompt, allowed = rng.choice(TOY_TASKS)
            f.write(json.dumps({"prompt": prompt, "allowed": allowed}) + "\n")
    return path


def run_demo(output_dir: Path, max_steps: int = 60) -> str:
    """Build a tiny model and a toy task, train GRPO-LoRA on it, report the reward gain.

    `output_dir` must be new, empty or an earlier demo's folder (marked by
    outputs.MARKER), whose model and run are replaced.
    """
    from mlx_grpo.core.outputs import own_folder
    from mlx_grpo.core.trainer import train

    output_dir = own_folder(output_dir, "demo")
    # A wide init gives the random model peaky outputs that a reward can shape.
    model_dir = build_tiny_qwen3(output_dir / "tiny-qwen3", init_std=0.3)
    data = write_toy_task(output_dir / "toy_task.jsonl")
    result = train(
        model=str(model_dir),
        data=str(data),
        rewards=["mlx_grpo.tasks.toy:allowed_share"],
        output_dir=str(output_dir / "run"),
        overwrite=True,  # the demo directory is the demo's own
        num_generations=8,
        prompts_per_step=2,
        max_completion_length=16,
        learning_rate=2e-2,
        lora_rank=8,
        lora_alpha=16,
        max_steps=max_steps,
        logging_steps=10,
        save_steps=0,
    )
    rewards = [m["reward"] for m in result.metrics]
    k = max(1, len(rewards) // 4)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    return (
        f"mean reward, first {k} steps: {first:.3f}; last {k} steps: {last:.3f}\n"
        f"adapter, metrics and config in {result.output_dir}"
    )
