"""Data parallel: two gloo processes (as under torchrun) split the batches of every task and gather
them; every record, metric and interval equals the single-process run's, exactly (each item is
computed in the same batch either way)."""

import json
import os
import random

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm130b.evaluate.config import load_task
from glm130b.evaluate.parallel import Executor
from glm130b.evaluate.runner import evaluate_task
from tests.evaluate.helpers import CharTokenizer, gen_records, mul_records, random_words, tiny_glm, write_jsonl
from tests.helpers import free_port

TASKS = {
    "mul.yaml": "name: mul\ntype: mul\npath: mul\nmicro-batch-size: 2\n",
    "gen.yaml": "name: gen\ntype: gen\npath: gen\nmax_gen_length: 3\nmicro_batch_size: 2\nuse_task_mask: true\n",
    "beam.yaml": "name: beam\ntype: gen\npath: gen\nmax_gen_length: 3\nsampling_strategy: BeamSearchStrategy\n",
    "lm.yaml": "name: lm\ntype: lm\npath: lm\nfile-pattern: '*.txt'\nmax_seq_length: 48\ngeneration_length: 8\n"
    "use_task_mask: true\nmicro_batch_size: 3\n",
}


def evaluate_all(root) -> list[dict]:
    torch.set_num_threads(1)
    model, tokenizer = tiny_glm(), CharTokenizer()
    return [
        evaluate_task(load_task(root / name), root / "data", model, tokenizer, Executor(progress=False))
        for name in TASKS
    ]


def worker(rank: int, world: int, port: int, root, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = evaluate_all(root)
        if rank == 0:
            out.write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    write_jsonl(tmp_path / "data/mul/test.jsonl", mul_records(11, 9))
    write_jsonl(tmp_path / "data/gen/test.jsonl", gen_records(12, 5))
    (tmp_path / "data/lm").mkdir(parents=True)
    (tmp_path / "data/lm/doc.txt").write_text(random_words(random.Random(13), 40))
    for name, text in TASKS.items():
        (tmp_path / name).write_text(text)
    single = json.loads(json.dumps(evaluate_all(tmp_path)))
    mp.spawn(worker, args=(2, free_port(), tmp_path, tmp_path / "two.json"), nprocs=2, join=True)
    assert json.loads((tmp_path / "two.json").read_text()) == single
