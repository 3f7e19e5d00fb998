"""One rollout feeding several optimizer updates, against TRL 1.16's own batching.

TRL's `GRPOTrainer._prepare_inputs` runs unchanged on a trainer object whose
generation is replaced (it hands back row numbers): it shuffles each
generation batch, splits it into steps_per_generation slices and serves them
num_iterations times; the Trainer makes an optimizer step every
gradient_accumulation_steps slices. The same shuffle then goes through our
`micro_batches` and `optimise` (with a recording loss in place of the
model's): every update must take the same rows in the same micro-batches, at
the learning rate transformers' own scheduler gives that optimizer step.
"""

import dataclasses
from types import SimpleNamespace

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_map

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from transformers import get_scheduler  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from mlx_grpo.core.batches import micro_batches, row_order  # noqa: E402
from mlx_grpo.core.config import TrainConfig  # noqa: E402
from mlx_grpo.core.models import load_model  # noqa: E402
from mlx_grpo.core.rollout import Noise, rollout  # noqa: E402
from mlx_grpo.core.update import optimise  # noqa: E402
from mlx_grpo.tasks.toy import build_tiny_qwen3  # noqa: E402

G = 4
PROMPTS = [[10, 20, 30], [5, 6, 7, 8, 9, 11], [40, 41, 42, 43], [7, 7, 8]]  # B = 4: 16 rows
# (gradient_accumulation_steps, steps_per_generation, num_iterations)
LAYOUTS = [(2, 4, 1), (1, 4, 2), (2, 8, 2), (2, 2, 3), (4, 4, 1)]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(build_tiny_qwen3(tmp_path_factory.mktemp("tiny-seq"), init_std=0.3)))


@pytest.fixture(scope="module")
def batch(lm):
    eos = lm.eos_ids + list(range(0, 256, 11))  # lengths vary
    sampling = dataclasses.replace(TrainConfig().sampling(), max_completion_length=6)
    return rollout(lm.model, PROMPTS, G, sampling, eos, lm.pad_id, Noise(5))


def trl_sequence(tmp_path, ga, spg, mu, generations):
    """TRL's updates (each a list of micro-batches' row numbers) over `generations`
    generation batches, and the order each generation batch was shuffled into."""
    rows = len(PROMPTS) * G
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=rows // spg,
        gradient_accumulation_steps=ga,
        steps_per_generation=spg,
        num_iterations=mu,
        num_generations=G,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    trainer = object.__new__(GRPOTrainer)
    trainer.args, trainer.num_iterations = args, mu
    trainer._step, trainer._buffered_inputs = 0, None
    trainer.model = SimpleNamespace(training=True)
    made = []

    def generate(_inputs):
        made.append(len(made))
        return {"row": torch.arange(rows), "generation": torch.full((rows,), made[-1])}

    trainer._generate_and_score_completions = generate
    served, orders = [], []
    for _ in range(generations * spg * mu):
        inputs = trainer._prepare_inputs(None)
        trainer._step += 1  # as GRPOTrainer.training_step counts
        served.append((int(inputs["generation"][0]), sorted(inputs["row"].tolist())))
        if len(orders) < len(made):
            orders.append(np.concatenate([b["row"].numpy() for b in trainer._buffered_inputs]))
    assert len(made) == generations
    return [served[i : i + ga] for i in range(0, len(served), ga)], orders


class RecordingLoss:
    """A LossAndGrad that records which rows each call sees, and in which update."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.calls = model, optimizer, []

    def __call__(self, mb, normalizer):
        rows = np.array(mb.advantages).astype(int).tolist()  # the advantages are row numbers
        self.calls.append((len(self.optimizer.rates), mb.index, rows, normalizer))
        zeros = tree_map(mx.zeros_like, self.model.trainable_parameters())
        stats = {"entropy": mx.array(0.0), "tokens": mb.mask.sum()}
        return (mx.array(0.0), stats), zeros


class RecordingOptimizer(optim.SGD):
    """Applies nothing; records the learning rate of every update."""

    def __init__(self):
        super().__init__(learning_rate=0.0)
        self.rates = []

    def update(self, model, gradients):
        self.rates.append(self.learning_rate.item())


def our_sequence(lm, batch, cfg, orders):
    optimizer = RecordingOptimizer()
    loss = RecordingLoss(lm.model, optimizer)
    rows = mx.arange(batch.completion_ids.shape[0]).astype(mx.float32)
    for step, order in enumerate(orders):
        micro = micro_batches(lm.model, batch, rows, cfg, order=order)
        optimise(lm.model, optimizer, micro, cfg, step, loss_and_grad=loss)
    updates: dict[int, dict[int, list[int]]] = {}
    for update, index, seen, _ in loss.calls:  # a micro-batch may come in several chunks
        updates.setdefault(update, {}).setdefault(index, []).extend(seen)
    per_update = [
        [sorted(rows) for _, rows in sorted(u.items())] for _, u in sorted(updates.items())
    ]
    return per_update, optimizer.rates, loss.calls


@pytest.mark.parametrize("ga,spg,mu", LAYOUTS)
def test_every_update_takes_the_rows_trl_takes(lm, batch, tmp_path, ga, spg, mu):
    theirs, orders = trl_sequence(tmp_path, ga, spg, mu, generations=2)
    cfg = TrainConfig(
        prompts_per_step=len(PROMPTS),
        num_generations=G,
        gradient_accumulation_steps=ga,
        steps_per_generation=spg,
        num_iterations=mu,
    )
    ours, _, _ = our_sequence(lm, batch, cfg, orders)
    assert cfg.updates_per_step == spg * mu // ga
    assert len(ours) == len(theirs) == 2 * cfg.updates_per_step
    for update, (our_update, their_update) in enumerate(zip(ours, theirs)):
        assert our_update == [rows for _, rows in their_update], f"update {update}"
        # and each update's micro-batches come from one generation: its step's rollout
        assert {generation for generation, _ in their_update} == {update // cfg.updates_per_step}


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_each_update_gets_the_learning_rate_of_its_optimizer_step(lm, batch, scheduler):
    steps, warmup, ga, spg, mu = 5, 2, 1, 2, 2  # 4 updates per step, 20 in all
    cfg = TrainConfig(
        prompts_per_step=len(PROMPTS),
        num_generations=G,
        gradient_accumulation_steps=ga,
        steps_per_generation=spg,
        num_iterations=mu,
        learning_rate=1.0,
        lr_scheduler=scheduler,
        warmup_steps=warmup,
        max_steps=steps,
    )
    orders = [row_order(len(PROMPTS) * G, cfg, step) for step in range(steps)]
    _, rates, _ = our_sequence(lm, batch, cfg, orders)
    per_step = cfg.updates_per_step
    param = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([param], lr=1.0)
    name = "constant_with_warmup" if scheduler == "constant" else scheduler
    # TRL counts warmup and max_steps in optimizer steps
    schedule = get_scheduler(name, sgd, warmup * per_step, steps * per_step)
    expected = []
    for _ in range(steps * per_step):  # the Trainer: optimizer step, then scheduler step
        expected.append(schedule.get_last_lr()[0])
        sgd.step()
        schedule.step()
    assert len(rates) == len(expected) == 20
    np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=1e-9)
    assert len(set(rates[:per_step])) == per_step  # the rate moves between a rollout's updates


def test_dapo_divides_each_update_by_the_rollouts_tokens_per_update(lm, batch):
    cfg = TrainConfig(
        prompts_per_step=len(PROMPTS), num_generations=G, gradient_accumulation_steps=2,
        steps_per_generation=8,
    )  # fmt: skip
    _, _, calls = our_sequence(lm, batch, cfg, [row_order(len(PROMPTS) * G, cfg, 0)])
    tokens = float(np.array(batch.completion_mask).sum())
    assert [c[3].tokens_in_batch for c in calls] == pytest.approx([tokens * 2 / 8] * len(calls))
    assert {c[3].accumulation_steps for c in calls} == {2}


def test_rows_are_shuffled_only_where_a_rollout_feeds_several_updates():
    one = TrainConfig(prompts_per_step=4, num_generations=4, gradient_accumulation_steps=2)
    mu = dataclasses.replace(one, num_iterations=3)  # passes over the whole rollout
    several = dataclasses.replace(one, steps_per_generation=4)
    for cfg in (one, mu):
        np.testing.assert_array_equal(row_order(16, cfg, 3), np.arange(16))
    order = row_order(16, several, 3)
    assert sorted(order) == list(range(16)) and list(order) != list(range(16))
    np.testing.assert_array_equal(order, row_order(16, several, 3))  # a resumed step: the same
    assert list(row_order(16, several, 4)) != list(order)
    other_seed = dataclasses.replace(several, seed=1)
    assert list(row_order(16, other_seed, 3)) != list(order)
