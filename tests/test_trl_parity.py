"""The objective against TRL 1.16's own code, not a re-implementation of it.

TRL's `GRPOTrainer._compute_loss` runs unchanged on a trainer object whose
model call is replaced: `_get_per_token_logps_and_entropies` hands back
log-probs we chose (a leaf tensor, so its gradient is the loss's gradient
with respect to the log-probs). Its config is a real `GRPOConfig`, so TRL's
defaults (sapo temperatures, vespo's k and lambda) are checked too. The
same log-probs, masks and advantages then go through `grpo_loss`; loss,
gradient and metrics must agree to 1e-5 in float32.
"""

import itertools
from collections import defaultdict
from types import SimpleNamespace

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from mlx_grpo.core.advantages import group_advantages  # noqa: E402
from mlx_grpo.core.config import TrainConfig  # noqa: E402
from mlx_grpo.core.objective import METRICS, Normalizer, grpo_loss, k3_kl  # noqa: E402
from mlx_grpo.core.update import tokens_per_update  # noqa: E402

N, T = 6, 7
GA = 2  # gradient accumulation steps: TRL's normaliser for grpo, bnpo, dr_grpo, sapo, luspo
TOKENS_IN_BATCH = 60.0  # dapo, cispo, vespo: completion tokens of the whole generation
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


class _Accelerator:
    """One process: gathering and reducing hand back what they are given."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_trainer(args: GRPOConfig, logp: torch.Tensor, entropy: torch.Tensor) -> GRPOTrainer:
    """A GRPOTrainer with the attributes `_compute_loss` reads, set as its __init__ sets them,
    and a model call that returns `logp` and `entropy`."""
    trainer = object.__new__(GRPOTrainer)
    trainer.args = args
    trainer.loss_type = args.loss_type
    trainer.beta = args.beta
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.top_entropy_quantile = args.top_entropy_quantile
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.max_completion_length = args.max_completion_length
    trainer.use_vllm = False
    trainer.aux_loss_enabled = False
    trainer.entropy_coef = args.entropy_coef
    trainer.use_adaptive_entropy = args.use_adaptive_entropy
    trainer._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    trainer._last_world_entropy = float("inf")
    trainer._entropy_window_stats = None
    trainer.current_gradient_accumulation_steps = GA
    trainer.accelerator = _Accelerator()
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
    return trainer


def batch(seed: int = 15) -> dict[str, np.ndarray]:
    """Random float32 inputs: varied lengths (one empty row), ratios wide enough to clip."""
    rng = np.random.default_rng(seed)
    lengths = np.array([7, 3, 0, 5, 6, 1])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    logp = -rng.uniform(0.05, 3.0, (N, T)).astype(np.float32)
    return {
        "logp": logp,
        "old": (logp + rng.normal(0, 0.35, (N, T))).astype(np.float32),
        "ref": (logp + rng.normal(0, 0.5, (N, T))).astype(np.float32),
        "adv": np.array([1.2, -0.7, 0.4, -1.5, 0.0, 0.9], np.float32),
        "mask": mask,
        "entropy": rng.uniform(0.1, 5.0, (N, T)).astype(np.float32),
    }


def trl_side(args: GRPOConfig, x: dict, off_policy: bool, trainer=None):
    """TRL's loss, its gradient with respect to the log-probs and the entropies, and its
    logged metrics (`trainer`: one kept from an earlier call, for adaptive entropy)."""
    logp = torch.tensor(x["logp"], requires_grad=True)
    entropy = torch.tensor(x["entropy"], requires_grad=True)
    inputs = {
        "prompt_ids": torch.zeros((N, 2), dtype=torch.long),
        "prompt_mask": torch.ones((N, 2), dtype=torch.long),
        "completion_ids": torch.zeros((N, T), dtype=torch.long),
        "completion_mask": torch.tensor(x["mask"]).long(),
        "advantages": torch.tensor(x["adv"]),
        "num_items_in_batch": torch.tensor(TOKENS_IN_BATCH),
    }
    if off_policy:
        inputs["old_per_token_logps"] = torch.tensor(x["old"])
    if args.beta != 0.0:
        inputs["ref_per_token_logps"] = torch.tensor(x["ref"])
    if trainer is None:
        trainer = trl_trainer(args, logp, entropy)
    else:
        trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
        trainer._metrics["train"].clear()
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items()}
    grads = (
        logp.grad.numpy(),
        np.zeros_like(x["entropy"]) if entropy.grad is None else entropy.grad.numpy(),
    )
    return float(loss.detach()), grads, metrics


def our_side(cfg: TrainConfig, x: dict, off_policy: bool, entropy_coef=None):
    """Our loss, gradients and metrics (sums divided as `update._metrics` divides them)."""
    settings = cfg.loss_settings()
    adv, mask, ref = mx.array(x["adv"]), mx.array(x["mask"]), mx.array(x["ref"])
    old = mx.array(x["old"]) if off_policy else None
    coef = cfg.entropy_coef if entropy_coef is None else entropy_coef
    tokens = tokens_per_update(TOKENS_IN_BATCH, cfg)
    normalizer = Normalizer(cfg.gradient_accumulation_steps, tokens, entropy_coef=coef)
    out = {}

    def loss_fn(lp, entropy):
        kl = k3_kl(lp, ref) if cfg.beta != 0.0 else None
        loss, out["stats"] = grpo_loss(lp, old, adv, mask, settings, normalizer, kl, entropy)
        return loss

    both = mx.value_and_grad(loss_fn, argnums=(0, 1))
    loss, grads = both(mx.array(x["logp"]), mx.array(x["entropy"]))
    stats = {k: float(v) for k, v in out["stats"].items()}
    ratios = stats["tokens"] if cfg.importance_sampling_level == "token" else N
    per = {"rows": N, "ratios": ratios}
    metrics = {k: stats[k] / per[unit] for k, unit in METRICS.items() if k in stats}
    metrics["entropy"] = stats["entropy"] / stats["tokens"]
    if "kl" in stats:
        metrics["kl"] = stats["kl"] / stats["tokens"]
    return float(loss), tuple(np.array(g) for g in grads), metrics, out["stats"]


def configs(tmp_path, **settings) -> tuple[GRPOConfig, TrainConfig]:
    """The same settings as TRL's GRPOConfig (TRL's defaults for the rest) and ours."""
    trl_args = GRPOConfig(
        output_dir=str(tmp_path),
        max_completion_length=T,
        gradient_accumulation_steps=GA,
        report_to="none",
        use_cpu=True,
        bf16=False,
        **settings,
    )
    ours = TrainConfig(max_completion_length=T, gradient_accumulation_steps=GA, **settings)
    return trl_args, ours


def assert_same(theirs, ours):
    (t_loss, t_grads, t_metrics), (o_loss, o_grads, o_metrics, _) = theirs, ours
    assert o_loss == pytest.approx(t_loss, rel=1e-5, abs=1e-6)
    for o_grad, t_grad in zip(o_grads, t_grads):  # log-probs, entropies
        np.testing.assert_allclose(o_grad, t_grad, rtol=1e-5, atol=1e-6)
    logged = {k: v for k, v in t_metrics.items() if k in (*METRICS, "kl", "entropy")}
    assert set(o_metrics) == set(logged)
    for key, value in logged.items():
        assert o_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


OPTIONS = [
    {"epsilon_high": 0.28},
    {"delta": 1.3},
    {"off_policy_mask_threshold": 0.05},
    {"top_entropy_quantile": 0.3},
    {"entropy_coef": 0.05},
    {"top_entropy_quantile": 0.6, "entropy_coef": -0.02, "delta": 1.3, "beta": 0.0},
    {"steps_per_generation": 2 * GA},  # one generation feeds two optimizer steps
]
# Every loss type and ratio level, on and off policy, with and without the KL term; each
# option on top, off policy (where ratios differ from 1) with the KL term (unless it says).
CASES = [
    (dict(loss_type=loss, importance_sampling_level=level, beta=beta), off_policy)
    for loss, level, beta, off_policy in itertools.product(
        LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [True, False]
    )
] + [
    ({"loss_type": loss, "importance_sampling_level": level, "beta": 0.04, **option}, True)
    for loss, level, option in itertools.product(LOSS_TYPES, ["token", "sequence"], OPTIONS)
]


@pytest.mark.parametrize(
    "settings,off_policy",
    CASES,
    ids=lambda case: "-".join(map(str, case.values())) if isinstance(case, dict) else str(case),
)
def test_loss_gradient_and_metrics_equal_trl(settings, off_policy, tmp_path):
    if settings["loss_type"] == "cispo":  # CISPO's epsilon_high is a cap on the ratio itself
        settings = {**settings, "epsilon_high": 1.25}
    trl_args, cfg = configs(tmp_path, **settings)
    x = batch()
    theirs = trl_side(trl_args, x, off_policy)
    assert_same(theirs, our_side(cfg, x, off_policy))


def test_the_inputs_exercise_every_branch(tmp_path):
    """Guards the cases above: clipping on both sides, the delta cap, a dropped row,
    CISPO's cap and a VESPO weight away from 1 all happen on this batch."""
    x = batch()
    metrics = {}
    for loss, extra in [
        ("dapo", {}),
        ("cispo", {"epsilon_high": 1.25}),
        ("vespo", {}),
    ]:
        args, _ = configs(tmp_path, loss_type=loss, **extra)
        metrics |= trl_side(args, x, off_policy=True)[2]
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    assert metrics["cispo_clip_ratio"] > 0
    assert abs(metrics["vespo/phi_seq_mean"] - 1) > 0.05
    ratio = np.exp(x["logp"] - x["old"])
    assert (ratio[x["mask"] > 0] > 1.3).any()  # delta = 1.3 caps something
    drift = ((x["old"] - x["logp"]) * x["mask"]).sum(1) / np.maximum(x["mask"].sum(1), 1)
    assert ((drift > 0.05) & (x["adv"] < 0)).any()  # the off-policy mask drops a row
    for loss in ("dapo", "grpo"):
        args, _ = configs(tmp_path, loss_type=loss, off_policy_mask_threshold=0.05)
        plain, _ = configs(tmp_path, loss_type=loss)
        assert trl_side(args, x, True)[0] != pytest.approx(trl_side(plain, x, True)[0])


@pytest.mark.parametrize("quantile", [1.0, 0.5])
def test_adaptive_entropy_control_follows_trl_update_by_update(quantile, tmp_path):
    """Four optimizer steps of one micro-batch each: TRL's controller (inside its
    `_compute_loss`) and ours (`applied_entropy_coef` before, `adapt_entropy_coef` after)
    apply and move the coefficient alike, through both of its branches and its bounds."""
    from mlx_grpo.core.state import EntropyControl
    from mlx_grpo.core.update import adapt_entropy_coef, applied_entropy_coef

    settings = dict(
        loss_type="grpo",
        use_adaptive_entropy=True,
        entropy_coef=0.01,
        entropy_coef_delta=0.02,
        entropy_coef_max=0.04,
        entropy_target=2.6,
        top_entropy_quantile=quantile,
    )
    trl_args, cfg = configs(tmp_path, **settings)
    control, trainer, coefs = EntropyControl(cfg.entropy_coef), None, []
    for scale in (0.4, 0.5, 0.6, 2.0):  # mean entropy below, below, below, above the target
        x = batch()
        x["entropy"] = x["entropy"] * scale
        if trainer is None:
            trainer = trl_trainer(trl_args, torch.zeros(1), torch.zeros(1))
        theirs = trl_side(trl_args, x, True, trainer)
        ours = our_side(cfg, x, True, entropy_coef=applied_entropy_coef(control, cfg))
        assert_same(theirs, ours)
        adapt_entropy_coef(control, ours[3], cfg)
        assert control.coef == pytest.approx(trainer.entropy_coef, abs=1e-9)
        assert control.last_entropy == pytest.approx(trainer._last_world_entropy, rel=1e-5)
        coefs.append(control.coef)
    assert coefs == pytest.approx([0.03, 0.04, 0.04, 0.02])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_perturbed_input_is_seen(loss_type, tmp_path):
    """The comparison can fail: one log-prob changed on our side only breaks it."""
    settings = {"loss_type": loss_type, "beta": 0.04}
    if loss_type == "cispo":
        settings["epsilon_high"] = 1.25
    trl_args, cfg = configs(tmp_path, **settings)
    x = batch()
    theirs = trl_side(trl_args, x, True)
    y = {**x, "logp": x["logp"].copy()}
    y["logp"][0, 2] += 0.05
    with pytest.raises(AssertionError):
        assert_same(theirs, our_side(cfg, y, True))


# ---------------------------------------------------------------------------
# Advantages: TRL's block of `_generate_and_score_completions`, run from its own source
# ---------------------------------------------------------------------------


def trl_advantage_block():
    """The statements of `_generate_and_score_completions` from the unscorable mask to the
    advantages with NaN set to 0, compiled from TRL's source as they stand."""
    import inspect
    import textwrap

    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = source.index("        unscorable_mask = ")
    end_marker = "        advantages = torch.nan_to_num(advantages, nan=0.0)\n"
    end = source.index(end_marker) + len(end_marker)
    return compile(textwrap.dedent(source[start:end]), "trl-advantages", "exec")


def trl_advantages(per_func, weights, g, scale, aggregation):
    from trl.trainer.utils import nanstd

    trainer = SimpleNamespace(
        multi_objective_aggregation=aggregation,
        scale_rewards=scale,
        reward_weights=torch.tensor(weights, dtype=torch.float32),
        reward_funcs=[None] * len(weights),
    )
    names = {
        "self": trainer,
        "torch": torch,
        "nanstd": nanstd,
        "rewards_per_func": torch.tensor(per_func, dtype=torch.float32),
        "num_generations": g,
        "device": "cpu",
    }
    exec(trl_advantage_block(), names)
    return names["advantages"].numpy(), names["is_std_zero"].numpy()


def rewards_with_gaps(seed: int = 0) -> np.ndarray:
    """(16, 2) rewards of 4 groups of 4: a None here and there, a row no function scored,
    the second function silent on a whole group, and a group of ties in the first."""
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(16, 2)).astype(np.float32)
    r[4:8, 0] = 0.5  # ties
    r[1, 1] = np.nan
    r[6, :] = np.nan  # unscorable
    r[8:12, 1] = np.nan  # one function silent on a group
    return r


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, -0.4]])
def test_advantages_equal_trl(aggregation, scale, weights):
    per_func = rewards_with_gaps()
    theirs, zero_std = trl_advantages(per_func, weights, 4, scale, aggregation)
    ours = group_advantages(per_func, np.array(weights), 4, scale, aggregation)
    np.testing.assert_allclose(ours.advantages, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.isclose(ours.std, 0.0), zero_std)
    assert np.abs(theirs).max() > 0.5  # not all zero


def test_a_perturbed_reward_changes_the_advantages():
    per_func = rewards_with_gaps()
    theirs, _ = trl_advantages(per_func, [1.0, 1.0], 4, "group", "normalize_then_sum")
    per_func[0, 0] += 0.1
    ours = group_advantages(per_func, np.ones(2), 4, "group", "normalize_then_sum")
    assert not np.allclose(ours.advantages, theirs, rtol=1e-5, atol=1e-5)
