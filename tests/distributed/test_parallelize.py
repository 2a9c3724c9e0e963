"""Distributed layouts reproduce the single-process run (CPU, gloo, 2 processes).

One spawn of 2 processes runs every layout in turn (data parallel with FSDP2, tensor parallel,
a 2-stage pipeline, and a DCP save); the tests compare what they wrote against a plain GLM trained
in this process on the same batches. Tolerance: fp32 throughout, so the layouts differ from the
reference only by the order of floating-point sums (sharded matmuls, all-reduces): ~1e-6
relative per step. Losses over 4 AdamW steps must agree within rtol 1e-4 / atol 1e-5, tight
enough that a wrong shard (e.g. all value rows of the GeGLU on one rank, or a missing gradient
reduction) fails: keeping the GeGLU weight whole under TP misses by 10x the tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm130b.cli.commands import main
from glm130b.core.errors import ConfigError
from glm130b.distributed.memory_plan import Recipe, estimate, stage_parameter_counts
from glm130b.distributed.parallelize import (
    GeGLUInput,
    ParallelConfig,
    build_mesh,
    clip_grad_norm_,
    full_state_dict,
    load_checkpoint,
    parallelize,
    save_checkpoint,
    to_official_keys,
    to_split_keys,
)
from glm130b.distributed.pipeline import pipeline_stage, stage_layer_ranges
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.objective.batch import TrainingBatch
from glm130b.objective.loss import masked_lm_loss
from tests.distributed.helpers import data_parallel_loss, pipeline_step
from tests.helpers import free_port

STEPS = 4
SAVE_AFTER = 2
LR = 3e-3
RTOL, ATOL = 1e-4, 1e-5


def tiny_config() -> GLMConfig:
    return GLMConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=128,
        inner_hidden_size=96,
        max_sequence_length=32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_dtype="fp32",
    )


def make_batches(n: int = STEPS, batch: int = 4, length: int = 16) -> list[TrainingBatch]:
    """Fixed random prefix-LM batches: each row one segment with a random prefix, padded at the
    end; rows score different numbers of tokens (so data-parallel shards are unequal). Two
    distinct batches alternate, so the loss on a batch seen again shows that training moved."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(min(n, 2)):
        ids = torch.randint(1, 128, (batch, length), generator=g)
        seg = torch.zeros(batch, length, dtype=torch.long)
        prefix = torch.zeros(batch, length, dtype=torch.bool)
        loss_mask = torch.zeros(batch, length)
        for b in range(batch):
            used = int(torch.randint(length // 2, length + 1, (1,), generator=g))
            p = int(torch.randint(1, used - 1, (1,), generator=g))
            seg[b, :used] = 1
            prefix[b, :p] = True
            loss_mask[b, p:used] = 1.0
        pos = torch.arange(length).expand(batch, length).clone()
        out.append(TrainingBatch(ids, pos, torch.randint(0, 128, (batch, length), generator=g), loss_mask, seg, prefix))
    return [out[i % len(out)] for i in range(n)]


def make_model() -> GLM:
    torch.manual_seed(0)
    return GLM(tiny_config())


def make_optimizer(model):
    # foreach: the multi-tensor kernels refuse a mix of plain tensors and DTensors, so this also
    # checks that parallelize leaves no such mix
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)


def reference_run(model=None, optimizer=None, batches=None, start: int = 0) -> list[float]:
    model = model or make_model()
    optimizer = optimizer or make_optimizer(model)
    losses = []
    for batch in (batches or make_batches())[start:]:
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask(), check_inputs=False)
        loss = masked_lm_loss(logits, batch.targets, batch.loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------- workers
def _train_distributed(model, mesh, batches, rank_rows, loss_fn, ckpt_dir=None) -> list[float]:
    optimizer = make_optimizer(model)
    losses = []
    for step, batch in enumerate(batches):
        rows = rank_rows(batch)
        logits = model(rows.input_ids, rows.position_ids, rows.attention_mask(), check_inputs=False)
        loss, logged = loss_fn(logits, rows)
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(logged))
        if ckpt_dir is not None and step + 1 == SAVE_AFTER:
            save_checkpoint(ckpt_dir, model, optimizer, extra={"step": step + 1})
    return losses


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    batches = make_batches()

    # Data parallel (FSDP2): each rank takes half of the rows; the loss is normalised globally.
    pcfg = ParallelConfig(dp=2)
    mesh = build_mesh(pcfg, "cpu")
    model = parallelize(make_model(), mesh, pcfg)
    half = batches[0].input_ids.shape[0] // 2

    def dp_rows(batch):
        return TrainingBatch(
            **{f.name: getattr(batch, f.name)[rank * half : (rank + 1) * half] for f in dataclasses.fields(batch)}
        )

    def dp_loss(logits, rows):
        return data_parallel_loss(logits, rows, mesh["dp"].get_group())

    results["dp"] = _train_distributed(
        model, mesh, batches, dp_rows, dp_loss, ckpt_dir=os.path.join(out_dir, "ckpt_dp")
    )
    full = full_state_dict(model)
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "dp_full_state.pt"))

    # Tensor parallel: both ranks see the whole batch; the weights are sharded.
    pcfg = ParallelConfig(tp=2)
    mesh = build_mesh(pcfg, "cpu")
    model = parallelize(make_model(), mesh, pcfg)

    def full_loss(logits, rows):
        loss = masked_lm_loss(logits, rows.targets, rows.loss_mask)
        return loss, loss.detach()

    results["tp"] = _train_distributed(
        model, mesh, batches, lambda b: b, full_loss, ckpt_dir=os.path.join(out_dir, "ckpt_tp")
    )
    attention = model.transformer.layers[0].attention
    results["tp_config_heads"] = attention.config.num_attention_heads
    results["tp_qkv_local_rows"] = attention.query_key_value.weight.to_local().shape[0]
    heads_seen = []  # the head count the attention computes with: read from the local qkv output
    hook = attention.query_key_value.register_forward_hook(
        lambda module, args, out: heads_seen.append(out.shape[-1] // (3 * attention.config.head_dim))
    )
    batch = batches[0]
    with torch.no_grad():
        model(batch.input_ids, batch.position_ids, batch.attention_mask(), check_inputs=False)
    hook.remove()
    results["tp_local_heads"] = heads_seen[0]

    # Pipeline parallel, 2 stages, 2 microbatches: one step's loss and full gradients.
    pcfg = ParallelConfig(pp=2, pp_microbatches=2)
    mesh = build_mesh(pcfg, "cpu")
    loss, norm, grads = pipeline_step(make_model(), mesh, pcfg, batches[0], return_grads=True)
    results["pp_grad_norm"] = float(norm)
    results["pp_loss"] = float(loss)  # broadcast from the last stage: the same on every rank
    torch.save(grads, os.path.join(out_dir, f"pp_grads_{rank}.pt"))

    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
    else:
        with open(os.path.join(out_dir, f"results_{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    results = json.loads((out / "results.json").read_text())
    other = json.loads((out / "results_1.json").read_text())
    assert other["pp_loss"] == results["pp_loss"]  # both stages report the last stage's loss
    results.update({k: v for k, v in other.items() if k.startswith("pp")})
    return out, results


@pytest.fixture(scope="module")
def reference_losses():
    return reference_run()


# ---------------------------------------------------------------------------------- tests
def test_data_parallel_reproduces_single_process_losses(distributed, reference_losses):
    _, results = distributed
    torch.testing.assert_close(torch.tensor(results["dp"]), torch.tensor(reference_losses), rtol=RTOL, atol=ATOL)
    assert reference_losses[2] < reference_losses[0] - 1.0  # same batch again: training moved


def test_tensor_parallel_reproduces_single_process_losses(distributed, reference_losses):
    _, results = distributed
    torch.testing.assert_close(torch.tensor(results["tp"]), torch.tensor(reference_losses), rtol=RTOL, atol=ATOL)
    cfg = tiny_config()
    assert results["tp_config_heads"] == cfg.num_attention_heads  # tensor parallel leaves the config alone
    assert results["tp_qkv_local_rows"] == 3 * cfg.hidden_size // 2
    assert results["tp_local_heads"] == cfg.num_attention_heads // 2  # the forward reads them from the shard


def test_full_state_dict_is_official_layout(distributed):
    """The gathered state of the FSDP run, in official keys, loads into a plain GLM and reproduces
    the plain model trained for the same steps (the GeGLU halves merged value-first)."""
    out, _ = distributed
    full = torch.load(out / "dp_full_state.pt")
    reference = make_model()
    reference_run(reference)
    assert set(full) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-3, atol=1e-5, msg=key)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("saved_by", ["dp", "tp"])
def test_checkpoint_saved_with_two_processes_resumes_with_one(distributed, reference_losses, saved_by):
    out, _ = distributed
    model = parallelize(make_model(), None, ParallelConfig())
    with torch.no_grad():  # scramble, so that only the checkpoint can give the right losses
        for p in model.parameters():
            p.normal_()
    optimizer = make_optimizer(model)
    extra = load_checkpoint(out / f"ckpt_{saved_by}", model, optimizer, extra={"step": 0})
    assert extra["step"] == SAVE_AFTER
    resumed = reference_run(model, optimizer, start=SAVE_AFTER)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference_losses[SAVE_AFTER:]), rtol=RTOL, atol=ATOL)


def test_pipeline_two_stages_gives_single_process_loss_and_gradients(distributed):
    out, results = distributed
    batch = make_batches()[0]
    model = split_model = parallelize(make_model(), None, ParallelConfig())
    logits = split_model(batch.input_ids, batch.position_ids, batch.attention_mask(), check_inputs=False)
    loss = masked_lm_loss(logits, batch.targets, batch.loss_mask)
    loss.backward()
    assert results["pp_loss"] == pytest.approx(loss.item(), rel=RTOL, abs=ATOL)
    # the global gradient norm over both stages (tied embedding counted once)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    assert results["pp_grad_norm"] == pytest.approx(norm, rel=RTOL)
    grads = {**torch.load(out / "pp_grads_0.pt"), **torch.load(out / "pp_grads_1.pt")}
    # The tied embedding lives on both stages; pipeline_step reports its summed gradient on each.
    expected = {name: p.grad for name, p in model.named_parameters()}
    assert set(grads) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------- single-process units
def test_split_keys_round_trip_and_value_first():
    model = make_model()
    official = model.state_dict()
    split = to_split_keys(official)
    w = official["transformer.layers.0.mlp.dense_h_to_4h.weight"]
    assert torch.equal(split["transformer.layers.0.mlp.dense_h_to_4h.value.weight"], w[:96])
    assert torch.equal(split["transformer.layers.0.mlp.dense_h_to_4h.gate.weight"], w[96:])
    back = to_official_keys(split)
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)


def test_split_geglu_keeps_the_forward():
    batch = make_batches(1)[0]
    model = make_model()
    expected = model(batch.input_ids, batch.position_ids, batch.attention_mask())
    parallelize(model, None, ParallelConfig(activation_checkpointing=True))
    assert isinstance(model.transformer.layers[0].mlp.dense_h_to_4h, GeGLUInput) or isinstance(
        model.transformer.layers[0]._checkpoint_wrapped_module.mlp.dense_h_to_4h, GeGLUInput
    )
    got = model(batch.input_ids, batch.position_ids, batch.attention_mask())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_pipeline_stages_are_the_model_with_the_other_stages_modules_removed(tie):
    """Stages (the same seeded model, cut in place) chained by hand give the full model's logits,
    keep its parameter names, and together hold all of them (plus the last stage's tied copy)."""
    config = dataclasses.replace(tiny_config(), num_layers=3, tie_word_embeddings=tie)
    batch = make_batches(1)[0]
    torch.manual_seed(0)
    full = GLM(config)
    expected = full(batch.input_ids, batch.position_ids, batch.attention_mask())
    ranges = stage_layer_ranges(config.num_layers, 3)
    x, names = batch.input_ids, []
    for s, (start, end) in enumerate(ranges):
        torch.manual_seed(0)
        stage = pipeline_stage(GLM(config), start, end, s == 0, s == 2)
        names += [name for name, _ in stage.named_parameters()]
        x = stage(x, batch.position_ids, batch.attention_mask(), check_inputs=False)
        assert x.shape[-1] == (config.vocab_size if s == 2 else config.hidden_size)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    tied_copy = ["transformer.word_embeddings.weight"] if tie else []
    assert sorted(names) == sorted([name for name, _ in full.named_parameters()] + tied_copy)


def test_pipeline_microbatches_default_to_one_per_micro_batch():
    """The one rule of `glm130b pretrain` and `glm130b plan`: global_batch_size / (dp x micro_batch_size)."""
    pcfg = ParallelConfig(pp=2).resolve(4)  # dp 2
    assert pcfg.with_microbatches(global_batch_size=16, micro_batch_size=2).microbatches == 4
    assert ParallelConfig(pp=2, pp_microbatches=8).resolve(4).with_microbatches(16, 2).microbatches == 8
    with pytest.raises(ConfigError, match="not a multiple of dp 2 x micro_batch_size 3"):
        pcfg.with_microbatches(16, 3)
    with pytest.raises(ConfigError, match="not filled in yet"):
        _ = ParallelConfig(pp=2).microbatches
    four_layers = dataclasses.replace(tiny_config(), num_layers=4)
    with pytest.raises(ConfigError, match="smaller than pp 4"):
        ParallelConfig(pp=4).resolve(4).with_microbatches(4, 2).validate(four_layers, 4)


def test_parallel_config_validation():
    cfg = GLMConfig.from_preset("glm-130b")
    resolved = ParallelConfig(tp=4, pp=8).validate(cfg, 768)
    assert resolved.dp == 24
    with pytest.raises(ConfigError, match="not divisible by tp 4 x pp 8"):
        ParallelConfig(tp=4, pp=8).validate(cfg, 100)
    with pytest.raises(ConfigError, match="must divide num_attention_heads"):
        ParallelConfig(tp=5).validate(cfg, 5)
    with pytest.raises(ConfigError, match="set parallel.dp"):
        ParallelConfig(tp=4, pp=8, dp=2).validate(cfg, 768)
    with pytest.raises(ConfigError, match="exceeds num_layers"):
        ParallelConfig(pp=128).validate(cfg, 128)
    with pytest.raises(ConfigError, match="positive integer"):
        ParallelConfig(tp=0)
    with pytest.raises(ConfigError, match="unknown parallel field"):
        ParallelConfig.from_dict({"tensor_parallel": 2})


# ---------------------------------------------------------------------------------- recipe and plan
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "glm-130b-recipe.yaml"


def test_recipe_validates_and_stages_hold_every_parameter():
    recipe = Recipe.load(RECIPE).resolve(768)
    assert (recipe.parallel.tp, recipe.parallel.pp, recipe.parallel.dp) == (4, 8, 24)
    assert recipe.parallel.microbatches == 4224 // 24
    cfg = recipe.model
    with torch.device("meta"):
        total = GLM(cfg).num_parameters()
    stages = stage_parameter_counts(cfg, 8, 1)
    assert [e - s for (s, e), _ in stages] == [8, 9, 9, 9, 9, 9, 9, 8]
    # tp 1: the stages partition the model, plus the last stage's copy of the tied embedding
    assert sum(n for _, n in stages) == total + cfg.vocab_size * cfg.hidden_size
    # tp 4: one middle layer per GPU, by hand: sharded matrices and column biases / 4, the rest whole
    C, F = cfg.hidden_size, cfg.inner_hidden_size
    per_layer = (3 * C * C + 3 * C + C * C + 2 * F * C + 2 * F + F * C) // 4 + 2 * C + 4 * C
    (start, end), n = stage_parameter_counts(cfg, 8, 4)[1]
    assert n == (end - start) * per_layer


def test_plan_command_prints_memory_per_gpu(capsys):
    assert main(["plan", "--config", str(RECIPE), "--world-size", "768", "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "tp 4 x pp 8 x dp 24" in out and "peak per GPU" in out and "fits in 80 GiB" in out
    for column in ("weights", "grads", "optim", "activ."):
        assert column in out
    assert main(["plan", "--config", str(RECIPE), "--world-size", "100"]) == 2
    assert "not divisible by tp 4 x pp 8" in capsys.readouterr().err


def test_plan_reads_the_pretrain_config_with_the_pretrain_checks(capsys, tmp_path):
    pretrain_config = RECIPE.parent / "glm-130b.yaml"  # the file `glm130b pretrain --config` takes
    assert main(["plan", "--config", str(pretrain_config), "--world-size", "64", "--tp", "8", "--pp", "8"]) == 0
    assert "tp 8 x pp 8 x dp 1" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_preset: glm-tiny\nbogus_key: 3\n")
    assert main(["plan", "--config", str(bad), "--world-size", "1"]) == 2
    assert "unknown TrainConfig field(s) bogus_key" in capsys.readouterr().err
    for option, value in (("--gpu-memory-gib", "-5"), ("--world-size", "0")):
        arguments = {"--world-size": "8", option: value}
        assert main(["plan", "--config", str(pretrain_config), *sum(arguments.items(), ())]) == 2
        assert f"{option} must be a positive" in capsys.readouterr().err


def test_memory_estimate_scales_with_sharding():
    """ZeRO sharding: the optimizer states per GPU fall as 1/dp; recomputation shrinks activations."""
    base = Recipe.load(RECIPE)
    small = estimate(base.resolve(768))
    large = estimate(base.resolve(1536))
    assert large[1].optimizer == pytest.approx(small[1].optimizer / 2)
    no_recompute = dataclasses.replace(base.parallel, activation_checkpointing=False)
    no_ckpt = estimate(dataclasses.replace(base, parallel=no_recompute).resolve(768))
    assert no_ckpt[0].activations > 3 * small[0].activations


# ---------------------------------------------------------------------------------- 4 processes (opt-in)
def _worker4(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    batches, results = make_batches(), {}
    pcfg = ParallelConfig(dp=2, tp=2)
    mesh = build_mesh(pcfg, "cpu")
    model = parallelize(make_model(), mesh, pcfg)
    dp_rank, half = mesh["dp"].get_local_rank(), batches[0].input_ids.shape[0] // 2

    def rows(batch):
        return TrainingBatch(
            **{f.name: getattr(batch, f.name)[dp_rank * half : (dp_rank + 1) * half] for f in dataclasses.fields(batch)}
        )

    results["dp2_tp2"] = _train_distributed(
        model,
        mesh,
        batches,
        rows,
        lambda logits, r: data_parallel_loss(logits, r, mesh["dp"].get_group()),
        ckpt_dir=os.path.join(out_dir, "ckpt_2d"),
    )
    for name, kw in (("pp2_tp2", dict(tp=2)), ("pp2_dp2_ac", dict(dp=2, activation_checkpointing=True))):
        pcfg = ParallelConfig(pp=2, pp_microbatches=2, **kw)
        mesh = build_mesh(pcfg, "cpu")
        dp_rank = mesh["dp"].get_local_rank()
        loss, norm, _ = pipeline_step(make_model(), mesh, pcfg, rows(batches[0]) if "dp2" in name else batches[0])
        results[name + "_norm"] = float(norm)
        results[name + "_loss"] = float(loss)
    if rank == world - 1:
        with open(os.path.join(out_dir, "results4.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(
    os.environ.get("GLM130B_TEST_4PROC") != "1", reason="4 processes (~1 min on 2 cores): set GLM130B_TEST_4PROC=1"
)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_four_processes_two_dimensional_layouts(tmp_path, reference_losses):
    """dp 2 x tp 2 training, pp 2 x tp 2 and pp 2 x dp 2 (with recomputation) steps, and a dp 2 x tp 2
    checkpoint resumed by one process."""
    mp.spawn(_worker4, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True)
    results = json.loads((tmp_path / "results4.json").read_text())
    torch.testing.assert_close(torch.tensor(results["dp2_tp2"]), torch.tensor(reference_losses), rtol=RTOL, atol=ATOL)
    model, batch = make_model(), make_batches()[0]
    loss = masked_lm_loss(
        model(batch.input_ids, batch.position_ids, batch.attention_mask()), batch.targets, batch.loss_mask
    )
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    for name in ("pp2_tp2", "pp2_dp2_ac"):
        assert results[name + "_loss"] == pytest.approx(loss.item(), rel=RTOL)
        assert results[name + "_norm"] == pytest.approx(norm, rel=RTOL)
    resumed_model = parallelize(make_model(), None, ParallelConfig())
    optimizer = make_optimizer(resumed_model)
    load_checkpoint(tmp_path / "ckpt_2d", resumed_model, optimizer)
    resumed = reference_run(resumed_model, optimizer, start=SAVE_AFTER)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference_losses[SAVE_AFTER:]), rtol=RTOL, atol=ATOL)
