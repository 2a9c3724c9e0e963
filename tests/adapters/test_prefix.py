"""P-tuning v2 prefixes (glm130b.adapters.prefix) through SelfAttention.prefix: a prefix acts as
past keys and values every token sees (ChatGLM's P-tuning v2 feeds it as past_key_values; our KV
cache is the reference), it composes with the static-cache decode path, and only it trains."""

import pytest
import torch
import torch.nn.functional as F

from glm130b import GLM, KVCache
from glm130b.adapters.folder import freeze
from glm130b.adapters.prefix import PrefixKeyValues, add_prefix, prefix_length, prefix_state
from glm130b.generate.decode import decode_one_token, decode_state, new_cache, prefill
from glm130b.generate.inputs import build_generation_batch
from tests.generate.helpers import TOK, full_forward_last_logits, tiny_glm

P = 3


def prefixed(model: GLM, seed: int = 1) -> GLM:
    add_prefix(model, P, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # spread them out so that the prefix changes every output clearly
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 1.0, generator=generator)
    return model


@pytest.mark.parametrize("encoding", ["1d", "2d"])
def test_a_prefix_equals_past_keys_and_values_in_the_cache(encoding):
    model = prefixed(tiny_glm(position_encoding=encoding, embedding_std=0.3).eval())
    plain = tiny_glm(position_encoding=encoding, embedding_std=0.3).eval()
    batch = build_generation_batch(
        [[7, 8, 9, TOK.gmask, TOK.sop, 10], [11, TOK.mask, 12, TOK.eos, TOK.sop]], TOK, encoding
    )
    with torch.no_grad():
        ours = model(batch.input_ids, batch.position_ids, batch.attention_mask)
        cache = KVCache(plain.config, 2, P + batch.input_ids.shape[1])
        for layer, block in enumerate(model.transformer.layers):
            cache.keys[layer][:, :, :P] = block.attention.prefix.key  # [H, P, D] for every row
            cache.values[layer][:, :, :P] = block.attention.prefix.value
        cache.length = P
        mask = F.pad(batch.attention_mask, (P, 0), value=False)  # every token sees the past
        reference = plain(batch.input_ids, batch.position_ids, mask, kv_cache=cache)
        without = plain(batch.input_ids, batch.position_ids, batch.attention_mask)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (ours - without).abs().max() > 0.1  # the prefix matters


def test_prefix_decoding_over_the_static_cache_equals_full_forwards():
    model = prefixed(tiny_glm(embedding_std=0.3).eval())
    contexts = [[7, 8, TOK.gmask, TOK.sop], [9, TOK.mask, 10, 11, TOK.eos, TOK.sop]]
    forced = torch.randint(7, 15, (2, 5), generator=torch.Generator().manual_seed(0))
    cache = new_cache(model, 2, 16)
    state = decode_state(contexts, TOK, cache.max_length, False, torch.device("cpu"))
    with torch.no_grad():
        logits = prefill(model, cache, contexts, TOK)
        for j in range(forced.shape[1]):
            sequences = [c + forced[b, :j].tolist() for b, c in enumerate(contexts)]
            torch.testing.assert_close(logits, full_forward_last_logits(model, sequences, TOK), atol=1e-5, rtol=1e-5)
            logits = decode_one_token(model, cache, forced[:, j : j + 1], torch.tensor(j), state)


def test_only_the_prefix_trains_and_its_state_is_one_key_and_value_per_layer():
    model = add_prefix(freeze(tiny_glm()), P)
    assert prefix_length(model) == P
    batch = build_generation_batch([[7, 8, TOK.gmask, TOK.sop, 9]], TOK)
    model(batch.input_ids, batch.position_ids, batch.attention_mask).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert (
        grads
        == set(prefix_state(model))
        == {f"transformer.layers.{i}.attention.prefix.{kind}" for i in range(2) for kind in ("key", "value")}
    )
    assert all(isinstance(m.attention.prefix, PrefixKeyValues) for m in model.transformer.layers)
