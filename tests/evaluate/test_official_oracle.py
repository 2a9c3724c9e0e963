"""Reference (2): the official GLM-130B evaluation code (tests/fixtures/official_eval.pt, made by
tests/evaluate/official_oracle.py over SwissArmyTransformer 0.2.12) and glm130b agree on the same
weights, items and task configs: per-item predictions and every metric, for multiple choice with
[MASK] (single-token and multi-token files) and [gMASK], plain greedy generation (EM / F1),
LAMBADA's beam-search protocol with a bidirectional and with a causal (unidirectional) context, and
language modelling over sliding windows."""

import pytest
import torch
import yaml

from glm130b import GLM, GLMConfig
from glm130b.evaluate.config import load_task
from glm130b.evaluate.parallel import Executor
from glm130b.evaluate.runner import evaluate_task
from tests.evaluate.helpers import CharTokenizer
from tests.helpers import FIXTURES

ORACLE = torch.load(FIXTURES / "official_eval.pt")


@pytest.fixture(scope="module")
def model():
    config = GLMConfig(**ORACLE["config"], hidden_dropout=0.0, attention_dropout=0.0)
    glm = GLM(config).eval()
    glm.load_state_dict(ORACLE["state_dict"])
    return glm


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    for relative, text in ORACLE["data"].items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def ours(key, model, data_root, batch_size=None):
    path = data_root / f"{key}.yaml"
    path.write_text(yaml.safe_dump(ORACLE["tasks"][key]))
    return evaluate_task(load_task(path), data_root, model, CharTokenizer(), Executor(batch_size, progress=False))


@pytest.mark.parametrize("key", ["mul", "mul-gmask"])
def test_multiple_choice_matches_the_official_code(key, model, data_root):
    result = ours(key, model, data_root)
    for name, official in ORACLE["results"][key].items():
        mine = result["files"][name]
        assert [r["prediction"] for r in mine["records"]] == official["predictions"]
        for record, log_probs in zip(mine["records"], official["log_probs"]):
            assert record["log_probs"] == pytest.approx(log_probs, rel=1e-5, abs=1e-4)  # fp32, independent kernels
        assert mine["metrics"]["Accuracy"] == pytest.approx(official["metrics"]["Accuracy"])


@pytest.mark.parametrize("key", ["gen", "lambada", "lambada-unidirectional"])
def test_generation_matches_the_official_code(key, model, data_root):
    result = ours(key, model, data_root)
    for name, official in ORACLE["results"][key].items():
        mine = result["files"][name]
        assert [r["prediction"] for r in mine["records"]] == official["predictions"]
        for metric, value in official["metrics"].items():
            assert mine["metrics"][metric] == pytest.approx(value)


def test_language_model_matches_the_official_code(model, data_root):
    result = ours("lm", model, data_root, batch_size=4)
    [(name, official)] = ORACLE["results"]["lm"].items()
    mine = result["files"][name]
    assert [r["nll"] for r in mine["records"]] == pytest.approx(official["losses"], rel=1e-5)
    assert mine["metrics"]["PPL"] == pytest.approx(official["metrics"]["PPL"], rel=1e-5)
