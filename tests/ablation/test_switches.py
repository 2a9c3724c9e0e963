"""The model switches of the ablation against their reference arithmetic, written out here:
SwissArmyTransformer's layernorm_order ('post', 'pre', 'sandwich') plus GLM-130B's DeepNorm, and
the attention softmax in fp32 or in the compute dtype."""

import math

import pytest
import torch
import torch.nn.functional as F

from glm130b import GLM, GLMConfig
from glm130b.generate.inputs import build_generation_batch
from glm130b.model.config import ConfigError
from glm130b.model.glm import RotaryAngles
from glm130b.model.initialization import initialize_glm
from tests.helpers import ORACLE_TOKENS as T


def ln(module, x):
    return F.layer_norm(x, (x.shape[-1],), module.weight, module.bias, module.eps)


def reference_block(block, order, alpha, x, rotary, mask):
    """One layer as SAT's layer_forward writes it (DeepNorm: SPEC.md section 3). The attention and
    the FFN are the block's own (their arithmetic has its own parity tests); only the placement of
    the LayerNorms and the residuals is under test."""
    attend = lambda a: block.attention(a, rotary, mask, None, 0)
    if order in ("deepnorm", "post"):  # residual from the normalised input
        a = ln(block.input_layernorm, x)
        h = alpha * a + attend(a)
        m = ln(block.post_attention_layernorm, h)
        return alpha * m + block.mlp(m)
    branch = attend(ln(block.input_layernorm, x))
    if order == "sandwich":
        branch = ln(block.third_layernorm, branch)
    h = x + branch
    branch = block.mlp(ln(block.post_attention_layernorm, h))
    if order == "sandwich":
        branch = ln(block.fourth_layernorm, branch)
    return h + branch


def perturb_layernorms(model):
    """LayerNorms away from 1 and 0, so that a misplaced one cannot hide."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))


@pytest.mark.parametrize("order", ["deepnorm", "post", "pre", "sandwich"])
def test_layernorm_order_matches_its_reference(tiny_config, order):
    config = GLMConfig.from_dict({**tiny_config.to_dict(), "layernorm_order": order})
    model = initialize_glm(GLM(config).eval(), seed=0)
    perturb_layernorms(model)
    batch = build_generation_batch([[5, 6, 9, T.gmask, T.sop, 7, 8]], T)
    rotary = RotaryAngles.build(batch.position_ids, config)
    alpha = math.sqrt(2 * config.num_layers) if order == "deepnorm" else 1.0
    with torch.no_grad():
        x = model.transformer.word_embeddings(batch.input_ids)
        for block in model.transformer.layers:
            x = reference_block(block, order, alpha, x, rotary, batch.attention_mask)
        expected = ln(model.transformer.final_layernorm, x) @ model.transformer.word_embeddings.weight.T
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_orders_share_the_init_and_only_sandwich_has_extra_layernorms(tiny_config):
    states = {
        order: initialize_glm(
            GLM(GLMConfig.from_dict({**tiny_config.to_dict(), "layernorm_order": order})), seed=3
        ).state_dict()
        for order in ("deepnorm", "pre", "sandwich")
    }
    extra = set(states["sandwich"]) - set(states["deepnorm"])
    assert extra == {
        f"transformer.layers.{i}.{n}.{p}"
        for i in range(tiny_config.num_layers)
        for n in ("third_layernorm", "fourth_layernorm")
        for p in ("weight", "bias")
    }
    assert set(states["pre"]) == set(states["deepnorm"])
    for order in ("pre", "sandwich"):  # the same seed gives every order the same weights
        assert all(torch.equal(states[order][k], v) for k, v in states["deepnorm"].items())
    for key in extra:
        assert torch.equal(states["sandwich"][key], torch.ones(64) if key.endswith("weight") else torch.zeros(64))


def reference_attention_probs(q, k, layer, mask, softmax_in_fp32):
    """The official attention scores (SPEC.md section 3): q / (sqrt(d) l), -10000 fill, times l, softmax;
    before the GLM-130B fix the last two steps ran in the compute dtype."""
    scores = (q / (math.sqrt(q.shape[-1]) * layer)) @ k.transpose(-1, -2)
    scores = scores.masked_fill(mask, -10000.0)
    if softmax_in_fp32:
        return torch.softmax(scores.float() * layer, dim=-1).to(q.dtype)
    return torch.softmax(scores * layer, dim=-1, dtype=q.dtype)


def reference_attention(tiny_config, softmax, q, k, v, mask, layer):
    """The model's reference attention of layer `layer` (1-based) with the given softmax switch."""
    config = GLMConfig.from_dict(
        {**tiny_config.to_dict(), "num_layers": layer, "attention_backend": "reference", "attention_softmax": softmax}
    )
    return GLM(config).transformer.layers[layer - 1].attention._reference_attention(q, k, v, mask)


def blocked_last_two(length):
    mask = torch.zeros(1, 1, length, length, dtype=torch.bool)
    mask[..., length - 2 :] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("softmax", ["fp32", "half"])
def test_softmax_switch_matches_its_reference(tiny_config, softmax, dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 6, 16, generator=g).to(dtype) for _ in range(3))
    mask, layer = blocked_last_two(6), 2
    context = reference_attention(tiny_config, softmax, q, k, v, mask, layer)
    expected = reference_attention_probs(q, k, layer, mask, softmax == "fp32") @ v
    assert context.dtype == dtype
    torch.testing.assert_close(context, expected, rtol=0, atol=0)


def test_half_softmax_overflows_where_the_fp32_one_does_not(tiny_config):
    """The failure the fp32 softmax removed: layer l's scores are computed divided by l (in range)
    and multiplied back by l for the softmax; in fp16, back above 65504 they become inf and the
    softmax NaN. Here every score is 200 * 200 * 16 / (4 * 8) = 20000 at layer 8: x 8 = 160000."""
    q = k = v = torch.full((1, 4, 6, 16), 200.0, dtype=torch.float16)
    mask = blocked_last_two(6)
    fp32 = reference_attention(tiny_config, "fp32", q, k, v, mask, layer=8)
    half = reference_attention(tiny_config, "half", q, k, v, mask, layer=8)
    torch.testing.assert_close(fp32, v, rtol=0, atol=0)  # equal scores: the mean of the values, 200
    assert torch.isnan(half).all()


def test_half_softmax_runs_in_bf16_under_autocast(tiny_config):
    """Under autocast the compute dtype is the autocast dtype: the half path multiplies the scores
    back by l in bf16, which rounds at layer 3 (x 1 and x 2 are exact; softmax kernels accumulate
    in fp32 either way, so that product, and its overflow in fp16, is what the switch changes)."""
    # fp32 rotary tables: CPU autocast to bf16 refuses torch.cat of the fp16 ones
    config = GLMConfig.from_dict(
        {**tiny_config.to_dict(), "num_layers": 3, "attention_backend": "reference", "rotary_dtype": "fp32"}
    )
    batch = build_generation_batch([[5, 6, 9, T.gmask, T.sop, 7, 8]], T)
    logits = {}
    for softmax in ("fp32", "half"):
        model = initialize_glm(GLM(GLMConfig.from_dict({**config.to_dict(), "attention_softmax": softmax})), seed=0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits[softmax] = model(batch.input_ids, batch.position_ids, batch.attention_mask).float()
    assert not torch.equal(logits["fp32"], logits["half"])
    torch.testing.assert_close(logits["half"], logits["fp32"], rtol=0, atol=0.1)


def test_half_softmax_needs_the_reference_backend(tiny_config):
    with pytest.raises(ConfigError, match="attention_softmax 'half' needs attention_backend 'reference'"):
        GLMConfig.from_dict({**tiny_config.to_dict(), "attention_softmax": "half"})
    with pytest.raises(ConfigError, match="layernorm_order must be one of deepnorm, post, pre, sandwich"):
        GLMConfig.from_dict({**tiny_config.to_dict(), "layernorm_order": "peri"})
