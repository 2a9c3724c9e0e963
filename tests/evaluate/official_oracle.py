"""Makes tests/fixtures/official_eval.pt: the official GLM-130B evaluation code (THUDM/GLM-130B
`evaluation/`, `generation/` and `tasks/lambada/`, unmodified) run on CPU over SwissArmyTransformer
0.2.12's GLM130B with a tiny random model, for one `mul` (with [MASK] and [gMASK]), three `gen`
(plain greedy; LAMBADA's beam search with a bidirectional and a causal context) and one `lm` task. tests/evaluate/test_official_oracle.py checks glm130b against it.

    bash shared/oracle/setup_sat_venv.sh /tmp/sat-venv && /tmp/sat-venv/bin/pip install "dataclass-wizard<0.30" scipy
    git -C <GLM-130B clone> archive HEAD evaluation generation tasks | tar -x -C /tmp/glm130b-official
    /tmp/sat-venv/bin/python tests/evaluate/official_oracle.py /tmp/glm130b-official tests/fixtures/official_eval.pt

What is adjusted around the official code, and why:
- the tokenizer is tests/evaluate/char_tokenizer.py behind SAT's `get_tokenizer` (icetk's model
  is not available), so both sides tokenize alike;
- fp32: the softmax output's `.half()` cast becomes a cast to the value dtype (as sat_oracle.py does);
- LAMBADA's hard-coded icetk ids (146010, ...) lie outside the 40-id vocabulary and are dropped
  (glm130b adds them only for an icetk tokenizer);
- evaluation/tasks.py imports SAT's icetk tokenizer class for a type annotation only: that module
  is stubbed (it would import icetk and transformers);
- numpy 2 is needed (it has `np.bool` again, which generation/strategies.py uses; 1.24-1.26 lack it).
The items, task configs, weights and outputs all go into the fixture.
"""

import argparse
import inspect
import json
import random
import socket
import sys
import tempfile
import textwrap
import types
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from char_tokenizer import ALPHABET, SPECIAL_IDS, VOCAB_SIZE, CharTokenizerBase  # noqa: E402

CONFIG = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    vocab_size=VOCAB_SIZE,
    inner_hidden_size=64,
    max_sequence_length=256,
)
TASKS = {
    "mul": {
        "name": "oracle-mul",
        "type": "mul",
        "path": "mul",
        "max_seq_length": 48,
        "micro-batch-size": 3,
        "file-pattern": {"single": "**/single.jsonl", "multi": "**/multi.jsonl"},
    },
    "mul-gmask": {
        "name": "oracle-mul-gmask",
        "type": "mul",
        "path": "mul",
        "use_task_mask": True,
        "file-pattern": "**/multi.jsonl",
        "micro_batch_size": 2,
    },
    "gen": {"name": "oracle-gen", "type": "gen", "path": "gen", "max_gen_length": 6, "max_seq_length": 40},
    "lambada": {
        "name": "oracle-lambada",
        "type": "gen",
        "module": "tasks.lambada.task.LAMBADA",
        "path": "lambada",
        "sampling_strategy": "BeamSearchStrategy",
        "num_beams": 16,
        "max_gen_length": 5,
        "use_task_mask": True,
        "max_seq_length": 40,
    },
    "lambada-unidirectional": {
        "name": "oracle-lambada-unidirectional",
        "type": "gen",
        "module": "tasks.lambada.task.LAMBADA",
        "path": "lambada",
        "sampling_strategy": "BeamSearchStrategy",
        "num_beams": 16,
        "max_gen_length": 5,
        "use_task_mask": True,
        "unidirectional": True,
        "max_seq_length": 40,
    },
    "lm": {
        "name": "oracle-lm",
        "type": "lm",
        "path": "lm",
        "file-pattern": "*.txt",
        "max_seq_length": 64,
        "generation-length": 16,
        "use_task_mask": True,
    },
}


def canonical_value(name, shape):
    """Random values keyed by parameter name (shared/oracle/sat_oracle.py's rule), the linear weights
    scaled up (attention and FFN outputs 8x, the others 2x): with the reference's scale the residual
    keeps the input token on top, and a random tied-embedding model mostly repeats its last token."""
    g = torch.Generator().manual_seed(1234 + zlib.crc32(name.encode()))
    if "layernorm" in name:
        return (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=g)
    if "word_embeddings" in name:
        return torch.randn(shape, generator=g)
    scale = 8 if name.endswith(("dense.weight", "dense_4h_to_h.weight")) else 2
    return scale * torch.randn(shape, generator=g) / shape[-1] ** 0.5


def words(rng, n):
    return " ".join("".join(rng.choice(ALPHABET[1:27]) for _ in range(rng.randint(1, 6))) for _ in range(n))


def task_data(seed=0):
    rng = random.Random(seed)
    single = [
        {
            "inputs_pretokenized": words(rng, rng.randint(2, 14)) + ".",
            "label": rng.randrange(4),
            "choices_pretokenized": list("abcd"),
        }
        for _ in range(7)
    ]
    multi = [
        {
            "inputs_pretokenized": words(rng, rng.randint(2, 14)),
            "label": rng.randrange(3),
            "choices_pretokenized": [words(rng, rng.randint(1, 2)) for _ in range(3)],
        }
        for _ in range(7)
    ]
    gen = [
        {"inputs_pretokenized": words(rng, rng.randint(2, 12)), "targets_pretokenized": [words(rng, 1), words(rng, 2)]}
        for _ in range(5)
    ]
    lambada = [
        {"inputs_pretokenized": words(rng, rng.randint(3, 12)), "targets_pretokenized": [words(rng, 1)]}
        for _ in range(16)
    ]
    lines = lambda records: "".join(json.dumps(r) + "\n" for r in records)
    return {
        "mul/a/single.jsonl": lines(single),
        "mul/a/multi.jsonl": lines(multi),
        "gen/test.jsonl": lines(gen),
        "lambada/test.jsonl": lines(lambada),
        "lm/doc.txt": words(rng, 40) + ". " + words(rng, 30) + ".",
    }


class OfficialTokenizer(CharTokenizerBase):
    """The interface the official evaluation code asks of SAT's tokenizer."""

    commands = {
        "[MASK]": SPECIAL_IDS["mask"],
        "[gMASK]": SPECIAL_IDS["gmask"],
        "sop": SPECIAL_IDS["sop"],
        "eop": SPECIAL_IDS["eop"],
        "eos": SPECIAL_IDS["eos"],
    }

    def __init__(self):
        self.tokenizer = self  # qa_evaluate calls tokenizer.tokenizer.decode

    def tokenize(self, text):
        return self.encode(text)

    def detokenize(self, ids):
        return self.decode(ids)

    def get_command(self, name):
        return self.commands[name]


def setup_sat():
    torch.cuda.current_device = lambda: "cpu"
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from SwissArmyTransformer import get_tokenizer, mpu

    mpu.initialize_model_parallel(1)
    get_tokenizer(outer_tokenizer=OfficialTokenizer())
    stub = types.ModuleType("ice_tokenizer")  # imported by evaluation/tasks.py for a type annotation only
    stub._IceTokenizer = OfficialTokenizer
    sys.modules["SwissArmyTransformer.tokenization.icetk_glm_130B"] = types.ModuleType("icetk_glm_130B")
    sys.modules["SwissArmyTransformer.tokenization.icetk_glm_130B.ice_tokenizer"] = stub
    from SwissArmyTransformer.model.official import glm130B_model as G

    cls = G.SelfAttentionWithFP32SoftmaxMixin  # fp32 throughout: no .half() on the softmax output
    src = textwrap.dedent(inspect.getsource(cls.attention_fn))
    old = "attention_probs = attention_probs.half()"
    assert src.count(old) == 1
    ns = {}
    exec(
        compile(src.replace(old, "attention_probs = attention_probs.type_as(value_layer)"), "<patched>", "exec"),
        sys.modules[cls.__module__].__dict__,
        ns,
    )
    cls.attention_fn = ns["attention_fn"]


def build_model():
    from SwissArmyTransformer.model import GLM130B

    args = argparse.Namespace(
        **CONFIG,
        hidden_size_per_attention_head=None,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        checkpoint_activations=False,
        checkpoint_num_layers=1,
        layernorm_order="post",
        skip_init=False,
        use_gpu_initialization=False,
        fp16=False,
        model_parallel_size=1,
    )
    torch.manual_seed(0)
    model = GLM130B(args)
    for name, p in model.named_parameters():
        p.data = canonical_value(name, tuple(p.shape))
    return model.eval()


def evaluate_file(task, relative_path, model):
    from evaluation.utils import build_data_loader, gather_result

    dataset = task.build_dataset(relative_path)
    loader = build_data_loader(
        dataset,
        micro_batch_size=task.config.micro_batch_size,
        num_workers=0,
        drop_last=False,
        collate_fn=dataset.collate_fn if dataset.has_collate_fn else None,
    )
    outputs, log_probs = [], []
    with torch.no_grad():
        for batch in loader:
            if task.config.type.value == "mul":
                log_probs += model.cond_log_prob(batch)
            outputs.append(task.predict_single_batch(batch))
    predictions = gather_result(outputs, len(dataset), task.config.micro_batch_size)
    metrics = {key: metric(predictions, dataset.data) for key, metric in task.metrics.items()}
    out = {"metrics": {k: float(v) for k, v in metrics.items()}}
    if task.config.type.value == "mul":
        out["predictions"], out["log_probs"] = [int(p) for p in predictions], log_probs
    elif task.config.type.value == "gen":
        out["predictions"] = [task.tokenizer.decode(p) for p in predictions]
    else:
        out["losses"] = [float(x) for x in predictions]
    return out


def main():
    official, out_path = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    sys.path.insert(0, str(official))
    setup_sat()
    import yaml
    from evaluation import DEFAULT_CLASS, BaseConfig, ModelForEvaluation
    from SwissArmyTransformer import get_tokenizer
    from tasks.lambada.strategy import BeamSearchStrategyForLAMBADA

    original_init = BeamSearchStrategyForLAMBADA.__init__

    def init_in_vocabulary(self, *args, banned_prefix=(), invalid_slices=(), **kwargs):
        original_init(
            self,
            *args,
            banned_prefix=[p for p in banned_prefix if max(p) < VOCAB_SIZE],
            invalid_slices=[i for i in invalid_slices if i < VOCAB_SIZE],
            **kwargs,
        )

    BeamSearchStrategyForLAMBADA.__init__ = init_in_vocabulary
    import importlib

    model = build_model()
    evaluator = ModelForEvaluation(model)
    data = task_data()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for relative, text in data.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(text)
        for key, fields in TASKS.items():
            config_path = root / f"{key}.yaml"
            config_path.write_text(yaml.safe_dump(fields))
            config = BaseConfig.from_yaml_file(str(config_path))
            if config.module:
                module, name = config.module.rsplit(".", 1)
                task_class = getattr(importlib.import_module(module), name)
            else:
                task_class = DEFAULT_CLASS[config.type]
            config = task_class.config_class().from_yaml_file(str(config_path))
            config.path = str(root / config.path)
            task = task_class(evaluator, get_tokenizer(), config)
            results[key] = {
                file: evaluate_file(task, file, evaluator) for files in task.file_groups.values() for file in files
            }
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "rotary" not in k}
    torch.save(
        {
            "oracle": "THUDM/GLM-130B evaluation/ on SwissArmyTransformer==0.2.12 GLM130B, fp32, CPU",
            "config": CONFIG,
            "special_tokens": SPECIAL_IDS,
            "state_dict": state,
            "data": data,
            "tasks": TASKS,
            "results": results,
        },
        out_path,
    )
    print(json.dumps(results, indent=1)[:3000])


if __name__ == "__main__":
    main()
