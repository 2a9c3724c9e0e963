"""Parameter groups, schedules, batch ramp-up and the fp16 loss scaler against the recipe's rules."""

import pytest

from glm130b import GLM, GLMConfig
from glm130b.train.config import TrainConfig
from glm130b.train.optim import (
    DynamicLossScaler,
    build_optimizer,
    embedding_grad_scale,
    global_batch_size_at,
    learning_rate,
    parameter_groups,
)


def recipe(**overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "train_samples": 100_000,
            "global_batch_size": 64,
            "micro_batch_size": 4,
            "rampup_start_batch_size": 8,
            **overrides,
        }
    )


def test_no_weight_decay_on_biases_and_layernorms_only():
    model = GLM(GLMConfig.from_preset("glm-tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    expected = {n for n in names.values() if n.endswith(".bias") or "layernorm" in n}
    assert exempt == expected and len(expected) == 4 * 2 + 4 * 2 + 2  # 4 biases + 2 LNs a layer, final LN
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    optimizer = build_optimizer(model, recipe())
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    cfg = recipe()  # lr 8e-5, floor 8e-6, warmup 500 samples, decay ends at 90 000
    assert learning_rate(0, cfg) == pytest.approx(8e-5 / 500)
    assert learning_rate(249, cfg) == pytest.approx(8e-5 * 250 / 500)
    assert learning_rate(500, cfg) == pytest.approx(8e-5)
    middle = (500 + 90_000) // 2
    assert learning_rate(middle, cfg) == pytest.approx((8e-5 + 8e-6) / 2, rel=1e-4)  # cos(pi/2) = 0
    assert learning_rate(90_000, cfg) == learning_rate(99_999, cfg) == 8e-6
    decay = [learning_rate(s, cfg) for s in range(500, 90_000, 1000)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_batch_ramp_up_grows_in_whole_micro_batches_to_the_global_batch():
    cfg = recipe()  # 8 -> 64 over 2.5 % of 100 000 samples
    sizes = [global_batch_size_at(s, cfg) for s in range(0, 3000, 10)]
    assert sizes[0] == 8 and global_batch_size_at(2500, cfg) == 64 and max(sizes) == 64
    assert all(s % 4 == 0 for s in sizes) and all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert global_batch_size_at(1250, cfg) == 36  # halfway: 8 + 56 / 2
    assert global_batch_size_at(0, recipe(rampup_start_batch_size=None)) == 64


@pytest.mark.parametrize("train_samples", [96, 98, 100_000])
def test_a_run_trains_its_train_samples_not_up_to_a_batch_more(train_samples):
    cfg = recipe(train_samples=train_samples, rampup_start_batch_size=None)  # global 64, micro 4
    samples = 0
    while samples < train_samples:
        samples += global_batch_size_at(samples, cfg)
    assert samples == -(-train_samples // 4) * 4  # 96, 100 (98 in whole micro-batches), 100 000


def test_embedding_grad_scale_schedule():
    assert embedding_grad_scale(10_000, recipe()) == 0.1
    cfg = recipe(embedding_grad_scale_ramp_start=100, embedding_grad_scale_ramp_steps=400)
    assert embedding_grad_scale(50, cfg) == 0.1
    assert embedding_grad_scale(300, cfg) == pytest.approx(0.55)  # 0.1 + 0.9 * 200 / 400
    assert embedding_grad_scale(500, cfg) == embedding_grad_scale(9_000, cfg) == 1.0


def test_loss_scale_overflow_halves_and_a_clean_window_doubles():
    scaler = DynamicLossScaler(initial=2.0**16, window=3, hysteresis=1, minimum=1.0)
    scaler.update(overflow=True)
    assert scaler.scale == 2.0**15
    for _ in range(2):
        scaler.update(overflow=False)
    assert scaler.scale == 2.0**15  # two clean steps are not a window
    scaler.update(overflow=False)
    assert scaler.scale == 2.0**16
    scaler.update(overflow=False)
    scaler.update(overflow=True)  # an overflow restarts the clean count
    for _ in range(2):
        scaler.update(overflow=False)
    assert scaler.scale == 2.0**15


def test_loss_scale_hysteresis_and_floor():
    scaler = DynamicLossScaler.from_config(recipe())  # recipe: 2^16, window 2000, hysteresis 2, min 1
    assert (scaler.scale, scaler.window, scaler.hysteresis, scaler.minimum) == (2.0**16, 2000, 2, 1.0)
    scaler.update(overflow=True)
    assert scaler.scale == 2.0**16  # the first overflow is tolerated
    scaler.update(overflow=True)
    assert scaler.scale == 2.0**15
    scaler.update(overflow=True)  # hysteresis spent: every further overflow halves
    assert scaler.scale == 2.0**14
    for _ in range(40):
        scaler.update(overflow=True)
    assert scaler.scale == 1.0
    restored = DynamicLossScaler(1, 1, 1, 1)
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
