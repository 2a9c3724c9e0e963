"""Tensor-parallel inference on CPU with gloo and 2 ranks: logits and greedy tokens equal the
single-process ones, from a model directory split on the fly and from official shards read one file
per rank."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm130b.checkpoint.model_dir import load_model, save_model
from glm130b.distributed.sharded_inference import load_sharded_model
from glm130b.generate.decode import generate_ids
from glm130b.generate.strategies import Greedy
from tests.helpers import FIXTURES, ORACLE_TOKENS, free_port, load_fixture, oracle_model

CONTEXTS = [[5, 17, 230, 44, ORACLE_TOKENS.gmask], [8, 9, ORACLE_TOKENS.mask, 77, 31, 2]]


def run_model(model, fixture) -> dict:
    with torch.no_grad():
        logits = model(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
        tokens = generate_ids(model, [c + [ORACLE_TOKENS.sop] for c in CONTEXTS], ORACLE_TOKENS, Greedy(), 8)
    return {"logits": logits, "tokens": tokens}


def _worker(rank: int, world: int, port: int, checkpoints: list[str], fixture_name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fixture = load_fixture(fixture_name)
    results = [run_model(load_sharded_model(path, world, rank), fixture) for path in checkpoints]
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    save_model(oracle_model("sat_padded_fp32"), tmp_path / "dir")
    official = FIXTURES / "official_tp2_fp32"  # the same weights, as SAT's own 2-way shards
    mp.spawn(
        _worker,
        args=(2, free_port(), [str(tmp_path / "dir"), str(official)], "sat_padded_fp32", str(tmp_path / "out.pt")),
        nprocs=2,
        join=True,
    )
    fixture = load_fixture("sat_padded_fp32")
    expected = run_model(load_model(tmp_path / "dir"), fixture)
    for result in torch.load(tmp_path / "out.pt"):
        for b, n in enumerate(fixture["lengths"].tolist()):  # only the order of the sums differs (|logits| ~65)
            torch.testing.assert_close(result["logits"][b, :n], expected["logits"][b, :n], atol=1e-4, rtol=0)
        assert result["tokens"] == expected["tokens"]


def test_each_rank_holds_its_share_of_the_linears(tmp_path):
    save_model(oracle_model("sat_padded_fp32"), tmp_path / "dir")
    whole = load_model(tmp_path / "dir")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        part = load_sharded_model(tmp_path / "dir", tp=2, rank=1)  # rank 1's slice (no collective is run)
    finally:
        dist.destroy_process_group()
    qkv = whole.transformer.layers[0].attention.query_key_value.weight
    assert torch.equal(part.transformer.layers[0].attention.query_key_value.weight, qkv[qkv.shape[0] // 2 :])
    h_to_4h = whole.transformer.layers[0].mlp.dense_h_to_4h.weight
    value, gate = h_to_4h.chunk(2)
    expected = torch.cat((value.chunk(2)[1], gate.chunk(2)[1]))  # [value rows; gate rows] of rank 1
    assert torch.equal(part.transformer.layers[0].mlp.dense_h_to_4h.weight, expected)
    dense = whole.transformer.layers[0].attention.dense.weight
    assert torch.equal(part.transformer.layers[0].attention.dense.weight, dense[:, dense.shape[1] // 2 :])


def test_generate_command_under_torchrun_prints_the_single_process_answer(tmp_path):
    import subprocess
    import sys

    from glm130b.tokenizer.tokenizers import train_tokenizer

    save_model(oracle_model("sat_padded_fp32"), tmp_path / "dir")
    text = "the quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。" * 20
    train_tokenizer([text], tmp_path / "dir" / "tokenizer", vocab_size=308)  # ids < the model's 1000
    command = [
        "-m",
        "glm130b.cli",
        "generate",
        "--checkpoint",
        str(tmp_path / "dir"),
        "--max-new-tokens",
        "6",
        "--no-stream",
        "the quick [MASK] fox",
        "lazy dog [gMASK]",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    sharded = subprocess.run([*torchrun, *command, "--tp", "2"], capture_output=True, text=True, env=env)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert sharded.stdout == single.stdout and single.stdout.count("\n") == 2
