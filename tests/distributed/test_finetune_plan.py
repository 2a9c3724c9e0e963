"""`glm130b plan` for an adapter fine-tune (a recipe's `finetune` section): GLM-130B with LoRA over
its INT4 weights fits one H200 and over INT8 or bf16 does not; the adapter sizes it counts are
what PEFT and the prefix module actually add."""

from pathlib import Path

import pytest
import torch
import yaml

from glm130b import GLM, GLMConfig
from glm130b.adapters.folder import freeze
from glm130b.adapters.lora import LORA_TARGETS, add_lora, lora_config
from glm130b.adapters.prefix import add_prefix
from glm130b.cli.commands import main
from glm130b.core.errors import ConfigError
from glm130b.distributed.memory_plan import FinetunePlan, Recipe, estimate

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "glm-130b-lora-int4.yaml"


def with_bits(tmp_path, bits):
    data = yaml.safe_load(RECIPE.read_text())
    data["finetune"]["bits"] = bits
    path = tmp_path / f"recipe-{bits}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("bits, verdict", [(4, "fits in 141 GiB"), (8, "does NOT fit"), (None, "does NOT fit")])
def test_glm130b_lora_fits_one_h200_over_int4_only(tmp_path, capsys, bits, verdict):
    assert (
        main(["plan", "--config", str(with_bits(tmp_path, bits)), "--world-size", "1", "--gpu-memory-gib", "141"]) == 0
    )
    out = capsys.readouterr().out
    assert verdict in out
    assert "LoRA rank 8 on query_key_value" in out and "27.5 M trained parameters" in out


def test_int4_plan_is_the_packed_weights_and_a_few_gib_more():
    [memory] = estimate(Recipe.load(RECIPE).resolve(1))
    linears = 70 * (4 * 12288**2 + 3 * 12288 * 32768)  # qkv, dense, GeGLU input (2 x 32768), output
    assert memory.weights / 2**30 == pytest.approx(linears / 2 / 2**30 + 150528 * 12288 * 2 / 2**30, rel=0.01)
    assert 60 < memory.total / 2**30 < 80  # ~63 GiB of weights + activations with recomputation


@pytest.mark.parametrize(
    "plan",
    [FinetunePlan("lora", lora_rank=4, lora_targets=list(LORA_TARGETS)), FinetunePlan("ptuning", prefix_length=5)],
    ids=lambda p: p.method,
)
def test_counted_adapter_parameters_are_what_the_adapters_add(plan):
    with torch.device("meta"):
        model = freeze(GLM(GLMConfig.from_preset("glm-tiny")))
    if plan.method == "lora":
        add_lora(model, lora_config(rank=4, targets=list(LORA_TARGETS)))
    else:
        add_prefix(model, 5)
    added = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.trainable_parameters(model.config) == added


def test_adapter_plans_refuse_tensor_parallel():
    recipe = Recipe.load(RECIPE)
    recipe.parallel.tp = 2
    with pytest.raises(ConfigError, match="data parallel only"):
        estimate(recipe.resolve(2))
    with pytest.raises(ConfigError, match="finetune.method must be one of lora, ptuning"):
        FinetunePlan("full")
