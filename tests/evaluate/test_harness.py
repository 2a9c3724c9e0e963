"""The lm-evaluation-harness adapter: lm_eval, running a local task YAML over the ARC-Easy file of
shared/data/eval through model `glm130b`, chooses the same answer as glm130b's own toolkit for every
item; rolling log-likelihood equals the lm windows' NLL; generate_until equals greedy generation."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the `eval` extra)")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from glm130b.checkpoint.model_dir import save_model  # noqa: E402
from glm130b.evaluate.config import load_task  # noqa: E402
from glm130b.evaluate.harness import GLMHarnessLM  # noqa: E402
from glm130b.evaluate.language_model import windows  # noqa: E402
from glm130b.evaluate.packing import score_batch  # noqa: E402
from glm130b.evaluate.parallel import Executor  # noqa: E402
from glm130b.evaluate.runner import evaluate_task  # noqa: E402
from glm130b.generate import loading  # noqa: E402
from glm130b.generate.decode import generate_ids  # noqa: E402
from glm130b.generate.strategies import Greedy  # noqa: E402
from glm130b.quant.linear import QuantizedLinear  # noqa: E402
from tests.evaluate.helpers import ByteTokenizer, tiny_glm  # noqa: E402
from tests.helpers import SHARED  # noqa: E402

ARC = SHARED / "data" / "eval" / "english" / "arc_easy.jsonl"
ITEMS = 12
TASK_YAML = """task: glm130b_local_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def loaded():
    return tiny_glm(vocab=264, max_len=512), ByteTokenizer()


@pytest.mark.skipif(not ARC.is_file(), reason=f"benchmark data not found at {ARC}")
def test_lm_eval_and_the_toolkit_choose_the_same_answers(loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    lines = ARC.read_text(encoding="utf-8").splitlines()[:ITEMS]
    (tmp_path / "arc.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/arc.yaml").write_text(TASK_YAML.format(path=tmp_path / "arc.jsonl"))
    lm = GLMHarnessLM(loaded=loaded, batch_size=4)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["glm130b_local_arc_easy"],
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
    )
    samples = sorted(out["samples"]["glm130b_local_arc_easy"], key=lambda s: s["doc_id"])
    harness = [max(range(len(s["resps"])), key=lambda c: s["resps"][c][0][0]) for s in samples]

    records = [json.loads(line) for line in lines]  # the toolkit's own jsonl, as `--convert` writes it
    (tmp_path / "data/arc").mkdir(parents=True)
    (tmp_path / "data/arc/test.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "inputs_pretokenized": r["query"] + "\nAnswer:",
                    "choices_pretokenized": r["choices"],
                    "label": r["gold"],
                }
            )
            + "\n"
            for r in records
        )
    )
    (tmp_path / "arc.yaml").write_text("name: arc\ntype: mul\npath: arc\n")
    result = evaluate_task(load_task(tmp_path / "arc.yaml"), tmp_path / "data", *loaded, Executor(progress=False))
    ours = result["files"]["test.jsonl"]["records"]
    assert harness == [r["prediction"] for r in ours]
    for sample, record in zip(samples, ours):
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(record["log_probs"], abs=1e-4)


def test_rolling_loglikelihood_and_generate_until(loaded):
    model, tokenizer = loaded
    lm = GLMHarnessLM(loaded=loaded, stride=64, batch_size=3)
    text = "The quick brown fox jumps over the lazy dog. " * 30
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    seqs = windows(tokenizer.encode(text), 512, 64, tokenizer.specials)
    assert len(seqs) > 2  # several windows, so the stride matters
    expected = sum(span.log_prob for [span] in score_batch(model, seqs, 0))
    assert total == pytest.approx(expected, rel=1e-5)

    context = "Question: what is two plus two?\nAnswer:"
    [text_out] = lm.generate_until(
        [Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 8}), 0)], disable_tqdm=True
    )
    [span] = generate_ids(model, [tokenizer.encode(context) + [2, 4]], tokenizer.specials, Greedy(), 8)
    assert text_out == tokenizer.decode(span).split("\n")[0]


def test_registered_as_glm130b_and_built_from_model_args(tmp_path, monkeypatch):
    model_dir = save_model(tiny_glm(vocab=264), tmp_path / "model")
    (model_dir / "tokenizer").mkdir()
    monkeypatch.setattr(loading, "load_tokenizer", lambda path: ByteTokenizer())
    lm = get_model("glm130b").create_from_arg_string(
        f"model={model_dir},quantized=int8,mask=gMASK", {"batch_size": 2, "device": "cpu"}
    )
    assert isinstance(lm, GLMHarnessLM) and lm.gmask and lm.batch_size == 2
    assert any(isinstance(m, QuantizedLinear) for m in lm.glm.modules())
