"""The embedding gradient shrink changes gradients, never values."""

import torch

from glm130b import GLM
from glm130b.generate.inputs import build_generation_batch
from tests.helpers import ORACLE_TOKENS as T


def embedding_grad_and_logits(config, scale):
    torch.manual_seed(0)
    model = GLM(config)
    model.embedding_grad_scale = scale
    batch = build_generation_batch([[5, 6, T.gmask, T.sop, 7, 8]], T)
    logits = model(batch.input_ids, batch.position_ids, batch.attention_mask)
    logits.square().mean().backward()
    return model.transformer.word_embeddings.weight.grad.clone(), logits.detach()


def test_shrink_scales_the_embedding_gradient_only(tiny_config):
    full_grad, full_logits = embedding_grad_and_logits(tiny_config, 1.0)
    shrunk_grad, shrunk_logits = embedding_grad_and_logits(tiny_config, 0.1)
    torch.testing.assert_close(shrunk_logits, full_logits, atol=1e-4, rtol=1e-5)  # equal up to fp32 rounding
    # both uses of the tied weight (lookup and logits) pass 10 % of their gradient
    torch.testing.assert_close(shrunk_grad, 0.1 * full_grad, atol=1e-7, rtol=1e-5)
