"""`hf:<folder>` reward models: MLX scores against transformers' own classifier output."""

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlx_grpo.core.rewards import RewardSpecError, load_rewards  # noqa: E402
from mlx_grpo.tasks.toy import save_byte_tokenizer  # noqa: E402

FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForSequenceClassification"),
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification"),
    "llama": ("LlamaConfig", "LlamaForSequenceClassification"),
}


def build_classifier(folder, family="qwen3", num_labels=2, seed=0):
    """A tiny random `...ForSequenceClassification` saved as transformers saves it."""
    specials = save_byte_tokenizer(folder)
    config_class, model_class = (getattr(transformers, n) for n in FAMILIES[family])
    extra = {"head_dim": 16} if family == "qwen3" else {}
    config = config_class(
        vocab_size=max(specials.values()) + 1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=specials["<|endoftext|>"],
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # larger than the init's std, so rewards differ clearly
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def transformers_rewards(model, folder, texts):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    inputs = tokenizer(
        text=texts,
        return_tensors="pt",
        padding=True,
        padding_side="right",
        add_special_tokens=False,
    )
    with torch.no_grad():
        return model(**inputs).logits[:, 0].numpy()


PROMPTS = ["What is 2 + 3?", "Name a colour.", "Say hi.", "Count to three."]
COMPLETIONS = ["5", "A long answer that goes on and on: blue.", "hi", "1, 2, 3"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reward_model_scores_equal_transformers(family, tmp_path):
    folder = tmp_path / f"rm-{family}"
    model = build_classifier(folder, family)
    (reward,) = load_rewards([f"hf:{folder}"])
    assert reward.name == folder.name
    ours = np.array(reward.fn(prompts=PROMPTS, completions=COMPLETIONS))
    theirs = transformers_rewards(model, folder, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert np.ptp(theirs) > 0.05  # rows of different lengths score differently


def test_chat_prompts_are_scored_through_the_chat_template(tmp_path):
    folder = tmp_path / "rm"
    model = build_classifier(folder)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    (reward,) = load_rewards([f"hf:{folder}"])
    ours = np.array(reward.fn(prompts=prompts, completions=completions))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = [
        tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)
    ]
    np.testing.assert_allclose(
        ours, transformers_rewards(model, folder, texts), rtol=1e-4, atol=1e-4
    )
    plain = np.array(reward.fn(prompts=PROMPTS, completions=COMPLETIONS))
    assert not np.allclose(ours, plain, atol=1e-3)  # the template changes what is read


def test_a_folder_that_is_not_a_reward_model_is_refused_clearly(tmp_path, tiny_model_dir):
    with pytest.raises(RewardSpecError, match="no config.json"):
        load_rewards([f"hf:{tmp_path / 'missing'}"])
    with pytest.raises(RewardSpecError, match="ForSequenceClassification"):
        load_rewards([f"hf:{tiny_model_dir}"])  # a causal LM
    folder = tmp_path / "rm"
    build_classifier(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(RewardSpecError, match="model_type 'gpt2' is not supported"):
        load_rewards([f"hf:{folder}"])
