"""The inference memory plan against the official GLM-130B hardware table and against a measured peak."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from glm130b.distributed.inference_plan import Devices, fits, plan_inference
from glm130b.model.config import GLMConfig

# THUDM/GLM-130B README, "Hardware requirements" (batch 1, 2048 tokens): what runs and what does not.
OFFICIAL_TABLE = [
    ("8x40GB", None, True),  # 8 x A100-40G, fp16
    ("8x32GB", None, False),  # 8 x V100-32G, fp16: needs offloading
    ("8x32GB", 8, True),  # 8 x V100-32G, INT8
    ("8x24GB", 8, True),  # 8 x RTX 3090, INT8
    ("4x24GB", 4, True),  # 4 x RTX 3090, INT4
    ("8x11GB", 4, True),
]  # 8 x RTX 2080 Ti, INT4


@pytest.mark.parametrize(("gpus", "bits", "runs"), OFFICIAL_TABLE)
def test_reproduces_the_official_hardware_table(gpus, bits, runs):
    devices = Devices.parse(gpus)
    memory = plan_inference(GLMConfig.from_preset("glm-130b"), devices.count, bits, context=2048, batch=1)
    assert fits(memory, devices) == runs


def test_weights_are_the_parameter_count_at_the_stored_width():
    config = GLMConfig.from_preset("glm-130b")
    fp16 = plan_inference(config, 1).weights
    assert fp16 == pytest.approx(2 * 128_697_794_560, rel=1e-9)  # every parameter in 2 bytes
    int4 = plan_inference(config, 1, bits=4).weights
    linear = config.num_layers * (4 * 12288**2 + 3 * 12288 * 32768)
    assert int4 == pytest.approx(fp16 - 2 * linear + linear / 2, rel=1e-3)  # + scales, ~0.01 %


def test_bad_requests_name_the_fix():
    with pytest.raises(Exception, match="COUNTxMEMORY"):
        Devices.parse("eight A100s")
    with pytest.raises(Exception, match="cannot split 96 heads"):
        plan_inference(GLMConfig.from_preset("glm-130b"), 7)
    with pytest.raises(Exception, match="exceeds max_sequence_length"):
        plan_inference(GLMConfig.from_preset("glm-130b"), 8, context=4096)


MEASURE = textwrap.dedent("""
    import sys, torch
    from glm130b import GLM, GLMConfig
    from glm130b.distributed.inference_plan import plan_inference
    from glm130b.generate.decode import generate_ids
    from glm130b.generate.strategies import Greedy
    from glm130b.tokenizer.specials import SpecialTokens
    def status(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) * 1024
    torch.set_num_threads(1)
    config = GLMConfig(num_layers=8, hidden_size=1024, num_attention_heads=16, vocab_size=32000,
                       inner_hidden_size=2816, max_sequence_length=1024, hidden_dropout=0, attention_dropout=0)
    specials = SpecialTokens(mask=31990, gmask=31991, smask=31992, sop=31993, eop=31994, eos=31995, pad=0)
    batch, context, new = int(sys.argv[1]), int(sys.argv[2]), 12
    contexts = [[(7 * i + b) % 30000 + 1 for i in range(context - new - 2)] + [specials.gmask, specials.sop]
                for b in range(batch)]
    tiny = GLM(GLMConfig.from_preset("glm-tiny", vocab_size=32000, max_sequence_length=1024)).eval()
    with torch.no_grad():  # warm-up: libraries loaded and code paths touched before the measurement
        generate_ids(tiny, [c[-40:] for c in contexts], specials, Greedy(), 4)
    del tiny
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = status("VmRSS:")
    with torch.no_grad():
        generate_ids(GLM(config).eval(), contexts, specials, Greedy(), new)
    plan = plan_inference(config, 1, None, None, context, batch, dtype_bytes=4, runtime_bytes=0)
    print(status("VmHWM:") - before, plan.total)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the peak")
@pytest.mark.parametrize(("batch", "context"), [(1, 300), (4, 120)])
def test_predicts_the_measured_peak_of_a_cpu_generation_within_10_percent(batch, context):
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(batch), str(context)], capture_output=True, text=True, check=True
    )
    measured, planned = map(float, run.stdout.split())
    assert abs(measured - planned) <= 0.10 * measured, (
        f"measured {measured / 2**20:.0f} MiB, planned {planned / 2**20:.0f}"
    )


def test_plan_command_answers_the_question_a_user_asks(capsys):
    from glm130b.cli.commands import main

    assert main(["plan", "--preset", "glm-130b", "--gpus", "4x24GB", "--bits", "4", "--context", "2048"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^fits: [0-9.]+ GiB of 24 GiB per GPU", out, re.M) and "KV cache" in out
    assert main(["plan", "--gpus", "8x32GB"]) == 2
    assert "--preset NAME or --model-config FILE" in capsys.readouterr().err
