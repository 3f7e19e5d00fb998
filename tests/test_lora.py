"""mlx_grpo.core.lora: exact no-op at init, the reference-policy switch, parameter counts,
quantized base layers, and adapters that mlx-lm's own loader reads back.

Expected counts come from an independent formula over the config's shapes
(REFERENCE section 3), never from the modules the library built.
"""

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3
from mlx_lm.tuner.lora import LoRALinear as MlxLmLoRALinear

from mlx_grpo.core.adapters import MLX_CONFIG, MLX_WEIGHTS, Adapter
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.lora import (
    adapters_disabled,
    apply_lora,
    lora_modules,
    parse_layers,
    total_count,
    trainable_count,
)
from mlx_grpo.core.models import load_model
from mlx_grpo.tasks.toy import QWEN3_0_6B, TINY, build_tiny_qwen3

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 3  # differs from every in/out dimension of the tiny model
SCALE = 2.0
TOKENS = mx.array([[1, 17, 42, 99, 200, 7, 3, 58], [5, 6, 7, 8, 9, 10, 11, 12]])


def module_dims(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of every Qwen3 linear, from the config alone."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def expected_lora_count(cfg: dict, rank: int, targets, n_layers: int) -> int:
    dims = module_dims(cfg)
    return rank * n_layers * sum(sum(dims[t]) for t in targets)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-lora"))


def fresh(path):
    return load_model(str(path)).model


def randomise_lora_b(model, seed: int = 1) -> None:
    mx.random.seed(seed)
    for m in lora_modules(model):
        m.lora_b = 0.5 * mx.random.normal(m.lora_b.shape)
    mx.eval(model.parameters())


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a - b).max().item()


# --------------------------------------------------------------------------- no-op at init


def test_zero_initialised_lora_b_leaves_logits_exactly_unchanged(tiny_path):
    base = fresh(tiny_path)
    model = fresh(tiny_path)
    apply_lora(model, RANK, SCALE, targets=ALL_TARGETS)
    assert all(mx.all(m.lora_b == 0).item() for m in lora_modules(model))
    assert max_diff(model(TOKENS), base(TOKENS)) == 0.0


def test_adapters_disabled_gives_base_logits_and_reenables_after(tiny_path):
    base_logits = fresh(tiny_path)(TOKENS)
    model = fresh(tiny_path)
    apply_lora(model, RANK, SCALE, targets=ALL_TARGETS)
    randomise_lora_b(model)

    adapted = model(TOKENS)
    assert max_diff(adapted, base_logits) > 1e-3
    with adapters_disabled(model):
        assert max_diff(model(TOKENS), base_logits) == 0.0
    assert max_diff(model(TOKENS), adapted) == 0.0


def test_adapters_disabled_reenables_even_when_the_block_raises(tiny_path):
    model = fresh(tiny_path)
    apply_lora(model, RANK, SCALE)
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("boom")
    assert all(m.enabled for m in lora_modules(model))


# --------------------------------------------------------------------------- parameter counts


def test_trainable_count_all_targets_all_layers_matches_shape_formula(tiny_path):
    model = fresh(tiny_path)
    paths = apply_lora(model, RANK, SCALE, targets=ALL_TARGETS)
    n = TINY["num_hidden_layers"]
    assert len(paths) == 7 * n
    assert trainable_count(model) == expected_lora_count(TINY, RANK, ALL_TARGETS, n)


def test_trainable_count_q_v_on_layer_1_only_matches_shape_formula(tiny_path):
    model = fresh(tiny_path)
    n = TINY["num_hidden_layers"]
    layers = parse_layers("1", n)
    paths = apply_lora(model, RANK, SCALE, targets=("q_proj", "v_proj"), layers=layers)
    assert sorted(paths) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert trainable_count(model) == expected_lora_count(TINY, RANK, ("q_proj", "v_proj"), 1)


def test_qwen3_0_6b_rank_32_count_is_20_185_088():
    per_layer = sum(sum(d) for d in module_dims(QWEN3_0_6B).values())
    assert per_layer == 22528
    assert 32 * 28 * per_layer == 20_185_088
    assert expected_lora_count(QWEN3_0_6B, 32, ALL_TARGETS, 28) == 20_185_088

    # The real shapes, built lazily: MLX never materialises these weights, so this is cheap.
    cfg = dict(
        model_type="qwen3",
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=40960,
        **QWEN3_0_6B,
    )
    model = qwen3.Model(qwen3.ModelArgs.from_dict(cfg))
    apply_lora(model, 32, SCALE, targets=ALL_TARGETS)
    assert trainable_count(model) == 20_185_088


def test_apply_lora_freezes_everything_but_lora_a_and_lora_b(tiny_path):
    model = fresh(tiny_path)
    paths = apply_lora(model, RANK, SCALE, targets=ALL_TARGETS)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    expected = {f"{p}.{leaf}" for p in paths for leaf in ("lora_a", "lora_b")}
    assert sorted(names) == sorted(expected)


def test_total_count_is_the_sum_of_parameter_sizes(tiny_path):
    model = fresh(tiny_path)
    assert total_count(model) == sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("bits", [4, 8])
def test_total_count_counts_quantized_weights_at_full_size(tiny_path, bits):
    full = total_count(fresh(tiny_path))
    model = fresh(tiny_path)
    nn.quantize(model, group_size=32, bits=bits)
    stored = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert stored != full  # packed weights + scales/biases: a naive count would be wrong
    assert total_count(model) == full


# --------------------------------------------------------------------------- parse_layers


def test_parse_layers_accepts_all_last_n_and_index_lists():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("last:2", 4) == [2, 3]
    assert parse_layers("0,1", 4) == [0, 1]
    assert parse_layers("3, 1,1", 4) == [1, 3]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("4", r"indices must be in 0\.\.3"),
        ("-1", r"indices must be in 0\.\.3"),
        ("0,9", r"indices must be in 0\.\.3"),
        ("last:5", r"the model has 4 layers"),
        ("last:0", r"the model has 4 layers"),
        ("first:2", r"use all, last:N or comma-separated indices"),
        ("one,two", r"use all, last:N or comma-separated indices"),
    ],
)
def test_parse_layers_rejects_bad_specs_with_a_helpful_message(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layers(spec, 4)


@pytest.mark.parametrize("spec", ["last:abc", "last:"])
def test_parse_layers_last_with_a_non_number_names_the_spec(spec):
    with pytest.raises(ValueError, match=r"lora_layers 'last:"):
        parse_layers(spec, 4)


# --------------------------------------------------------------------------- quantized base


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_over_quantized_layers_is_a_noop_at_init_and_gets_gradients(tiny_path, bits):
    model = fresh(tiny_path)
    nn.quantize(model, group_size=32, bits=bits)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    base_logits = model(TOKENS)

    paths = apply_lora(model, RANK, SCALE, targets=ALL_TARGETS)
    lora = lora_modules(model)
    assert len(lora) == len(paths)
    assert all(isinstance(m.linear, nn.QuantizedLinear) for m in lora)
    # The adapter sees the unpacked input width, not the packed one.
    q = model.layers[0].self_attn.q_proj
    assert q.lora_a.shape == (TINY["hidden_size"], RANK)
    assert max_diff(model(TOKENS), base_logits) == 0.0

    loss_and_grad = nn.value_and_grad(model, lambda m, x: m(x).sum())
    _, grads = loss_and_grad(model, TOKENS)
    flat = dict(tree_flatten(grads))
    assert set(flat) == {f"{p}.{leaf}" for p in paths for leaf in ("lora_a", "lora_b")}
    for p in paths:
        g = flat[f"{p}.lora_b"]
        assert mx.all(mx.isfinite(g)).item()
        assert mx.abs(g).max().item() > 0, p


# --------------------------------------------------------------------------- mlx-lm round trip


@pytest.mark.parametrize(
    "targets, layer_spec",
    [(ALL_TARGETS, "all"), (("q_proj", "v_proj"), "1")],
    ids=["all-targets-all-layers", "q-v-layer-1"],
)
def test_saved_adapter_loads_in_mlx_lm_with_identical_logits(
    tiny_path, tmp_path, targets, layer_spec
):
    model = fresh(tiny_path)
    layers = parse_layers(layer_spec, TINY["num_hidden_layers"])
    paths = apply_lora(model, RANK, SCALE, targets=targets, layers=layers)
    randomise_lora_b(model)
    ours = model(TOKENS)
    with adapters_disabled(model):
        base_logits = model(TOKENS)
    assert max_diff(ours, base_logits) > 1e-3  # the adapter matters

    out = Adapter.from_model(model, alpha=SCALE * RANK).save(tmp_path / "adapter")
    assert (out / MLX_WEIGHTS).is_file() and (out / MLX_CONFIG).is_file()

    theirs, _ = mlx_lm.load(str(tiny_path), adapter_path=str(out))
    adapted = {n for n, m in theirs.named_modules() if isinstance(m, MlxLmLoRALinear)}
    assert adapted == set(paths)
    assert max_diff(theirs(TOKENS), ours) <= 1e-5


def test_apply_lora_defaults_to_the_targets_and_scale_a_run_uses(tiny_path):
    cfg = TrainConfig(lora_rank=4, lora_alpha=6.0, use_rslora=True)
    paths = apply_lora(fresh(tiny_path), 4, cfg.lora_scale)
    assert {p.rsplit(".", 1)[-1] for p in paths} == set(cfg.lora_targets)
    assert cfg.lora_scale == Adapter(rank=4, alpha=6.0, rslora=True).scale == 6.0 / 2.0
