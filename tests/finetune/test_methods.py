"""Each method on the toy task (glm130b.finetune.toy_task): exact match on 100 held-out words goes
from ~0 to >= 90 %, only the adapter trains (the base stays bit-identical), a LoRA adapter merges
into weights that give the adapter's logits, and PEFT itself reads our LoRA folders."""

import pytest
import torch

from glm130b.adapters.folder import load_model_with_adapter, merge_adapter
from glm130b.adapters.prefix import PREFIX_KEY
from glm130b.checkpoint.model_dir import load_model
from glm130b.finetune.config import FinetuneConfig
from glm130b.finetune.records import read_records
from glm130b.finetune.runner import run_finetune
from glm130b.finetune.scores import exact_match
from glm130b.finetune.toy_task import METHOD_RUNS
from glm130b.generate.inputs import build_generation_batch
from glm130b.quant.linear import quantize_model
from tests.finetune.helpers import RUN

CASES = METHOD_RUNS


def base_model(task, scheme):
    model = load_model(task.base)
    return quantize_model(model, scheme) if scheme is not None else model


def logits(model, task, words):
    """Next-token logits at every position of `word [gMASK] <sop>` for each word."""
    specials = task.tokenizer.specials
    sequences = [task.tokenizer.encode(w) + [specials.gmask, specials.sop] for w in words]
    batch = build_generation_batch(sequences, specials)
    with torch.no_grad():
        return model(batch.input_ids, batch.position_ids, batch.attention_mask)


@pytest.mark.parametrize("case", CASES)
def test_method_learns_the_task_and_trains_only_its_part(task, tmp_path, case):
    fields, train = CASES[case]
    held = read_records(task.held)
    config = FinetuneConfig.from_dict(
        {
            "model": str(task.base),
            "data": str(task.train),
            "valid_data": str(task.held),
            "out_dir": str(tmp_path / case),
            **fields,
            "train": {**RUN, **train},
        }
    )
    before = exact_match(base_model(task, config.scheme), task.tokenizer, held)
    result = run_finetune(config, show_progress=False)
    assert before <= 10 and result.exact_match >= 90, (before, result.exact_match)
    assert result.valid_losses["valid"] < 0.1

    model, cfg = result.model, load_model(task.base).config
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if case == "full":
        assert trainable == {n for n, _ in load_model(task.base).named_parameters()}
        assert (result.output_dir / "model.safetensors").is_file()
        return
    adapter_key = "lora_" if fields["method"] == "lora" else PREFIX_KEY
    assert trainable and all(adapter_key in n for n in trainable)
    if fields["method"] == "lora":  # rank 8 on query_key_value: A [8, h] and B [3h, 8] per layer
        assert result.trainable_parameters == cfg.num_layers * 8 * (cfg.hidden_size + 3 * cfg.hidden_size)
    else:  # a key and a value [heads, P, head_dim] per layer
        assert result.trainable_parameters == cfg.num_layers * 2 * 8 * cfg.hidden_size
    # Everything else is the base, bit for bit (PEFT renames a wrapped layer's tensors base_layer.*).
    frozen = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if adapter_key not in k}
    reference = base_model(task, config.scheme).state_dict()
    assert frozen.keys() == reference.keys()
    assert all(torch.equal(frozen[k], reference[k]) for k in reference)

    # The adapter folder reloads onto the base (quantized again as it was trained) with its score.
    reloaded = load_model_with_adapter(task.base, result.output_dir)
    assert exact_match(reloaded, task.tokenizer, held) == result.exact_match
    if fields["method"] == "lora":
        words = [r.prompt for r in held[:8]]
        merged = load_model(merge_adapter(task.base, result.output_dir, tmp_path / "merged"))
        torch.testing.assert_close(logits(merged, task, words), logits(reloaded, task, words), rtol=1e-5, atol=1e-5)


def test_peft_reads_our_lora_folder(task, tmp_path):
    """PEFT's own loader, on a plain GLM, gives the logits of ours: the folder is PEFT's format."""
    peft = pytest.importorskip("peft")
    fields, train = CASES["lora"]
    config = FinetuneConfig.from_dict(
        {
            "model": str(task.base),
            "data": str(task.train),
            "out_dir": str(tmp_path),
            **fields,
            "train": {**RUN, **train, "train_samples": 5 * 8},
        }
    )
    adapter = run_finetune(config, show_progress=False).output_dir
    ours = load_model_with_adapter(task.base, adapter)
    theirs = peft.PeftModel.from_pretrained(load_model(task.base), str(adapter)).eval()
    words = ["abcd", "hgfe"]
    assert not torch.equal(logits(ours, task, words), logits(load_model(task.base), task, words))  # B moved from 0
    torch.testing.assert_close(logits(theirs.get_base_model(), task, words), logits(ours, task, words), rtol=0, atol=0)
