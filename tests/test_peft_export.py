"""Adapters that the real PEFT loads: export, import, fuse, switch, push.

Tiny Qwen3 and Llama models are built in transformers (head_dim x heads !=
hidden, as in Qwen3-0.6B), loaded with mlx-lm, trained a few GRPO steps,
exported, and loaded with `PeftModel.from_pretrained`. The rank (3) differs
from every in/out dimension, so an un-transposed factor cannot load.
"""

import json
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from mlx_grpo.cli import main
from mlx_grpo.core.adapters import PEFT_CONFIG, PEFT_WEIGHTS, Adapter, AdapterSet
from mlx_grpo.core.models import load_model
from mlx_grpo.core.trainer import train
from mlx_grpo.tasks.toy import save_byte_tokenizer
from mlx_grpo.tools.export import export_peft, fuse, push_to_hub

TOKENS = [[5, 17, 42, 99, 200, 7, 3, 58, 64, 12]]
RANK = 3
TOLERANCE = 1e-4


def build_hf_model(path, arch):
    """A random transformers model saved in float32 with the byte tokenizer."""
    torch.manual_seed(0)
    shapes = dict(
        vocab_size=272,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
    )
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(rope_theta=1e6, **shapes))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=1e5, **shapes))
    model.float().save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def id_sum(prompts, completions, completion_ids, **kwargs):
    return [float(sum(ids) % 101) for ids in completion_ids]


def grpo_run(model_dir, data, out, **settings):
    """A few real GRPO steps; a high rate so the adapter is far from zero."""
    defaults = dict(
        num_generations=4,
        max_completion_length=6,
        lora_rank=RANK,
        lora_alpha=5.0,
        learning_rate=3e-2,
        max_steps=3,
    )
    return train(
        model=str(model_dir),
        data=str(data),
        reward_funcs=[id_sum],
        output_dir=str(out),
        show_progress=False,
        **{**defaults, **settings},
    ).output_dir


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def peft_logits(model_dir, peft_dir) -> np.ndarray:
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return hf_logits(PeftModel.from_pretrained(base, peft_dir).eval())


def mlx_logits(model_dir, adapter_dir=None) -> np.ndarray:
    lm = load_model(str(model_dir))
    if adapter_dir is not None:
        Adapter.load(adapter_dir).attach(lm.model)
    lm.model.eval()
    return np.array(lm.model(mx.array(TOKENS)))


def max_diff(a, b) -> float:
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, toy_data):
    """(HF model dir, GRPO run dir) for a tiny Qwen3 with all seven targets."""
    root = tmp_path_factory.mktemp("qwen3")
    model_dir = build_hf_model(root / "model", "qwen3")
    return model_dir, grpo_run(model_dir, toy_data, root / "run")


@pytest.fixture(scope="module")
def llama(tmp_path_factory, toy_data):
    """Tied embeddings, q and v only, on layers 0 and 2 of 3."""
    root = tmp_path_factory.mktemp("llama")
    model_dir = build_hf_model(root / "model", "llama")
    run = grpo_run(
        model_dir, toy_data, root / "run", lora_targets=["q_proj", "v_proj"], lora_layers="0,2"
    )
    return model_dir, run


@pytest.mark.parametrize("case", ["qwen3", "llama"])
def test_peft_loads_the_export_and_gives_the_mlx_logits(case, request, tmp_path):
    model_dir, run = request.getfixturevalue(case)
    export_peft(run, tmp_path / "peft")
    ours = mlx_logits(model_dir, run)
    theirs = peft_logits(model_dir, tmp_path / "peft")
    # The adapter matters: far from the base model, so a no-op export fails.
    assert max_diff(ours, mlx_logits(model_dir)) > 100 * TOLERANCE
    assert max_diff(ours, theirs) <= TOLERANCE


def test_export_config_says_what_peft_needs(llama, qwen3, tmp_path):
    model_dir, run = llama
    config = json.loads((export_peft(run, tmp_path / "l") / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK and config["lora_alpha"] == 5.0
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["layers_to_transform"] == [0, 2]
    assert config["base_model_name_or_path"] == str(model_dir)
    card = (tmp_path / "l" / "README.md").read_text()
    assert str(model_dir) in card and "id_sum" not in card  # callables have no spec
    assert "steps | 3" in card

    qwen_config = json.loads((export_peft(qwen3[1], tmp_path / "q") / PEFT_CONFIG).read_text())
    assert "layers_to_transform" not in qwen_config  # every layer is adapted
    assert len(qwen_config["target_modules"]) == 7


@pytest.mark.parametrize("case", ["qwen3", "llama"])
def test_merged_peft_equals_mlx_grpo_fuse(case, request, tmp_path):
    model_dir, run = request.getfixturevalue(case)
    export_peft(run, tmp_path / "peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, tmp_path / "peft").merge_and_unload().eval()

    fused_dir = fuse(str(model_dir), run, tmp_path / "fused")
    fused, _ = mlx_lm.load(str(fused_dir))
    ours = np.array(fused(mx.array(TOKENS)))
    assert max_diff(ours, hf_logits(merged)) <= TOLERANCE
    assert max_diff(ours, mlx_logits(model_dir, run)) <= TOLERANCE


@pytest.mark.parametrize("mistake", ["no_transpose", "alpha_is_scale", "no_prefix"])
def test_a_wrong_export_is_caught(mistake, qwen3, tmp_path):
    """The check above fails for the classic converter mistakes (REFERENCE section 2)."""
    model_dir, run = qwen3
    peft_dir = export_peft(run, tmp_path / "peft")
    weights = load_file(peft_dir / PEFT_WEIGHTS)
    config = json.loads((peft_dir / PEFT_CONFIG).read_text())
    if mistake == "no_transpose":
        weights = {k: v.T.contiguous() for k, v in weights.items()}
    elif mistake == "alpha_is_scale":
        config["lora_alpha"] = config["lora_alpha"] / config["r"]
    else:
        weights = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    save_file(weights, peft_dir / PEFT_WEIGHTS)
    (peft_dir / PEFT_CONFIG).write_text(json.dumps(config))

    ours = mlx_logits(model_dir, run)
    try:
        if mistake == "no_prefix":  # PEFT finds none of its keys, says so and loads nothing
            with pytest.warns(UserWarning, match="missing adapter keys"):
                theirs = peft_logits(model_dir, peft_dir)
        else:
            theirs = peft_logits(model_dir, peft_dir)
    except RuntimeError:  # PEFT refuses mis-shaped factors outright
        return
    assert max_diff(ours, theirs) > 100 * TOLERANCE


@pytest.fixture(scope="module")
def peft_adapter(qwen3, tmp_path_factory):
    """A PEFT-made rsLoRA adapter with random B (so it is not a no-op)."""
    model_dir, _ = qwen3
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=RANK,
        lora_alpha=7,
        use_rslora=True,
        target_modules=["q_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("peft-made")
    model.save_pretrained(out)
    return out, hf_logits(model.eval())


def test_peft_to_mlx_to_peft_gives_identical_tensors(peft_adapter, tmp_path):
    peft_dir, _ = peft_adapter
    result = runner_ok("import", str(peft_dir), "--output", str(tmp_path / "mlx"))
    assert "mlx adapter written" in result.output
    Adapter.load(tmp_path / "mlx").save_peft(tmp_path / "back")

    original, back = load_file(peft_dir / PEFT_WEIGHTS), load_file(tmp_path / "back" / PEFT_WEIGHTS)
    assert original.keys() == back.keys()
    for key in original:
        assert torch.equal(original[key], back[key]), key
    config = json.loads((tmp_path / "back" / PEFT_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (RANK, 7, True)
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj"]


def test_an_imported_peft_adapter_gives_peft_logits_in_mlx(peft_adapter, qwen3, tmp_path):
    peft_dir, expected = peft_adapter
    model_dir, _ = qwen3
    Adapter.load_peft(peft_dir).save(tmp_path / "mlx")
    assert max_diff(mlx_logits(model_dir, tmp_path / "mlx"), expected) <= TOLERANCE
    # mlx-lm's own loader reads the imported adapter too (rsLoRA folded into its scale).
    model, _ = mlx_lm.load(str(model_dir), adapter_path=str(tmp_path / "mlx"))
    assert max_diff(np.array(model(mx.array(TOKENS))), expected) <= TOLERANCE


def test_training_continues_from_a_peft_adapter(peft_adapter, qwen3, toy_data, tmp_path):
    peft_dir, _ = peft_adapter
    model_dir, _ = qwen3
    start = Adapter.load_peft(peft_dir)
    run = grpo_run(model_dir, toy_data, tmp_path / "run", adapter=str(peft_dir), learning_rate=1e-3)
    saved = Adapter.load(run)
    assert (saved.rank, saved.alpha, saved.rslora) == (RANK, 7.0, True)
    assert saved.modules == start.modules
    moved = [np.abs(np.array(saved.lora_b[p] - start.lora_b[p])).max() for p in start.modules]
    assert 0 < max(moved) < 0.1  # it started from the PEFT factors and trained on


@pytest.mark.parametrize(
    "change,message",
    [
        ({"rank_pattern": {"q_proj": 5}}, "per-module rank_pattern"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_peft_adapters_mlx_cannot_express_are_refused(peft_adapter, tmp_path, change, message):
    peft_dir, _ = peft_adapter
    copy = shutil.copytree(peft_dir, tmp_path / "odd")
    config = json.loads((copy / PEFT_CONFIG).read_text())
    (copy / PEFT_CONFIG).write_text(json.dumps({**config, **change}))
    result = CliRunner().invoke(main, ["import", str(copy), "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output


def test_adapters_switch_on_one_base_without_reloading(qwen3, llama, peft_adapter, tmp_path):
    model_dir, run = qwen3
    peft_dir, peft_expected = peft_adapter
    lm = load_model(str(model_dir))
    base = np.array(lm.model(mx.array(TOKENS)))
    adapters = AdapterSet(lm.model)
    adapters.add("grpo", run)
    adapters.add("peft", peft_dir)

    def logits():
        return np.array(lm.model(mx.array(TOKENS)))

    adapters.use("grpo")
    assert max_diff(logits(), mlx_logits(model_dir, run)) <= TOLERANCE
    adapters.use("peft")
    assert max_diff(logits(), peft_expected) <= TOLERANCE
    adapters.use(None)
    assert max_diff(logits(), base) == 0.0
    with pytest.raises(KeyError, match="no adapter named 'other'"):
        adapters.use("other")


def test_fuse_of_a_quantized_base_dequantized_equals_base_plus_adapter(qwen3, tmp_path):
    model_dir, run = qwen3
    quantized = tmp_path / "q4"
    mlx_lm.convert(
        str(model_dir), mlx_path=str(quantized), quantize=True, q_group_size=32, q_bits=4
    )
    result = runner_ok(
        "fuse",
        "--model",
        str(quantized),
        "--adapter",
        str(run),
        "--output",
        str(tmp_path / "fused"),
        "--dequantize",
    )
    assert "fused model written" in result.output
    fused, _ = mlx_lm.load(str(tmp_path / "fused"))
    assert "quantization" not in json.loads((tmp_path / "fused" / "config.json").read_text())
    expected = mlx_logits(quantized, run)
    assert max_diff(np.array(fused(mx.array(TOKENS))), expected) <= TOLERANCE

    kept = fuse(str(quantized), run, tmp_path / "fused-q4")  # re-quantized after merging
    assert "quantization" in json.loads((kept / "config.json").read_text())
    requantized, _ = mlx_lm.load(str(kept))
    assert np.array(requantized(mx.array(TOKENS))).shape == expected.shape


def test_an_adapter_trained_on_a_quantized_base_exports_for_the_float_base(
    qwen3, toy_data, tmp_path
):
    model_dir, _ = qwen3
    quantized = tmp_path / "q8"
    mlx_lm.convert(
        str(model_dir), mlx_path=str(quantized), quantize=True, q_group_size=32, q_bits=8
    )
    run = grpo_run(quantized, toy_data, tmp_path / "run")
    export_peft(run, tmp_path / "peft", base_model=str(model_dir))
    theirs = peft_logits(model_dir, tmp_path / "peft")
    assert max_diff(mlx_logits(model_dir, run), theirs) <= TOLERANCE


def test_push_to_hub_uploads_the_folder_and_never_prints_the_token(
    qwen3, tmp_path, monkeypatch, hub_calls
):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    _, run = qwen3
    result = runner_ok(
        "export",
        str(run),
        "--output",
        str(tmp_path / "peft"),
        "--push-to-hub",
        "me/grpo-adapter",
        "--private",
        "--base-model",  # the run trained on a local folder: the Hub id must be named
        "Qwen/Qwen3-0.6B",
    )
    assert "hf_secret_value" not in result.output
    assert "https://huggingface.co/me/grpo-adapter" in result.output
    (_, create), (_, upload) = hub_calls
    assert create["repo_id"] == "me/grpo-adapter" and create["private"] is True
    assert upload["folder_path"] == str(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "Qwen/Qwen3-0.6B"
    assert push_to_hub(tmp_path / "peft", "me/x").endswith("me/x")


def test_generate_uses_the_adapter(qwen3):
    model_dir, run = qwen3
    with_adapter = runner_ok(
        "generate",
        "--model",
        str(model_dir),
        "--adapter",
        str(run),
        "--max-tokens",
        "8",
        "Reply with digits only.",
    )
    without = runner_ok(
        "generate", "--model", str(model_dir), "--max-tokens", "8", "Reply with digits only."
    )
    assert with_adapter.output != without.output


def runner_ok(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result
