"""The sample builders and their config (glm130b.objective.samples), SPEC.md sections 5 and 10:
the recipe and its scaling, refused configs, MIP segments and the MIP loader, and the statistics of
the [gMASK] suffix and the [MASK] spans against their exact expectations."""

import json
import math

import numpy as np
import pytest

from glm130b.core.errors import ConfigError, GLMError
from glm130b.objective.samples import ObjectiveConfig, load_mip_pairs, mask_sample, mip_sample, mip_segment
from tests.objective.helpers import SIGMAS, SPECIALS, check_span_statistics, make_pairs


# ---------------------------------------------------------------------- config
def test_recipe_preset_and_scaling():
    recipe = ObjectiveConfig()
    assert (
        recipe.sequence_length,
        recipe.gmask_raw_length,
        recipe.mask_segments,
        recipe.mask_segment_length,
        recipe.mip_segments,
    ) == (2048, 2000, 4, 512, 4)
    assert (recipe.gmask_share, recipe.mip_share, recipe.mask_ratio, recipe.poisson_lambda, recipe.max_span_length) == (
        0.7,
        0.05,
        0.15,
        3.0,
        39,
    )
    assert ObjectiveConfig.for_sequence_length(2048) == recipe
    small = ObjectiveConfig.for_sequence_length(256)
    assert (small.gmask_raw_length, small.mask_segment_length, small.mip_segments) == (250, 64, 1)
    assert small.max_span_length < 39  # a 64-token segment cannot be sure to place 39-token spans
    assert ObjectiveConfig.from_dict(small.to_dict()) == small


@pytest.mark.parametrize(
    "fields",
    [
        dict(gmask_raw_length=2048),
        dict(mask_segment_length=600),
        dict(mask_ratio=0.3),
        dict(max_span_length=300),
        dict(suffix_fraction_min=0.0),
        dict(mip_share=1.5),
    ],
)
def test_config_refuses_unbuildable_values(fields):
    with pytest.raises(ConfigError):
        ObjectiveConfig(**fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(mask_segments=0), "mask_segments must be a positive integer, got 0"),
        (dict(sequence_length=True), "sequence_length must be a positive integer, got True"),
        (dict(gmask_share="0.5"), r"gmask_share must be in \[0, 1\], got '0.5'"),
        (dict(mask_ratio=0.0), r"mask_ratio must be in \(0, 0.25\) so that spans, masks and <sop>s fit"),
        (dict(poisson_lambda=-3.0), "poisson_lambda must be a positive number"),
        (dict(suffix_fraction_min=0.9, suffix_fraction_max=0.5), "0 < min <= max <= 1"),
    ],
)
def test_config_errors_name_the_field_and_the_allowed_values(fields, message):
    with pytest.raises(ConfigError, match=message):
        ObjectiveConfig(**fields)
    with pytest.raises(ConfigError, match="sequence_length must be an integer"):
        ObjectiveConfig.for_sequence_length(512.0)


def test_config_names_unknown_fields():
    with pytest.raises(ConfigError, match="unknown ObjectiveConfig field"):
        ObjectiveConfig.from_dict({"sequence_lenght": 512})


# ---------------------------------------------------------------------- MIP segments
def test_mip_prompt_is_cut_on_the_left_and_target_kept():
    pair = make_pairs([(600, 20)])[0]
    sample = mip_segment(pair, 64, SPECIALS)
    assert len(sample) == 64
    assert (sample.input_ids[:42] == pair.prompt[-42:]).all()  # 64 - 20 - [MASK] - <sop>
    assert (sample.targets[sample.loss_mask] == np.append(pair.target, SPECIALS.eop)).all()
    with pytest.raises(GLMError, match="does not fit"):
        mip_segment(make_pairs([(0, 63)])[0], 64, SPECIALS)


# ---------------------------------------------------------------------- statistics
def test_gmask_suffix_length_is_uniform_over_its_range(small):
    """Suffix t uniform on the integers [ceil(0.2 n), n]: mean (a+b)/2, variance ((b-a+1)^2-1)/12;
    the sample mean is within 5 standard errors, and each half of the range holds its share."""
    config, _, stats, _ = small
    n = config.gmask_raw_length
    a, b = math.ceil(config.suffix_fraction_min * n), n
    t = stats["suffix"]
    assert t.min() >= a and t.max() <= b
    sd = math.sqrt(((b - a + 1) ** 2 - 1) / 12)
    assert abs(t.mean() - (a + b) / 2) <= SIGMAS * sd / math.sqrt(len(t))
    lower = (b - a + 1) // 2  # values a .. a+lower-1
    p = lower / (b - a + 1)
    assert abs((t < a + lower).mean() - p) <= SIGMAS * math.sqrt(p * (1 - p) / len(t))


def test_masked_fraction_and_span_length_match_the_recipe(small):
    config, _, stats, _ = small
    rho, mu = check_span_statistics(stats["covered"], stats["spans"], config)
    # Poisson(3) restricted to >= 1 has mean 3 / (1 - e^-3); the cap at 23 removes < 1e-12 of it.
    assert mu == pytest.approx(3 / (1 - math.exp(-3)), rel=1e-9)
    # int(15 %) plus the last span's overshoot, which weighs more in 64-token segments
    assert 0.15 < rho < 0.18  # exact: 17.1 %


def test_span_order_is_shuffled_in_the_text_and_in_the_generated_part(small):
    """Generated part: in a uniformly random order of k spans the number of ascents (a span
    followed by one further right in the text) has mean (k-1)/2 and variance (k+1)/12; summed over
    independent segments, within 5 sigma. Text: the stopping rule makes the last draw long (size
    biased), so unshuffled text would end with longer spans: the first and last spans in text
    order must have the same mean length (difference within 5 standard errors)."""
    _, _, stats, _ = small
    orders = [(a, lengths) for a, lengths in stats["orders"] if len(a) >= 2]
    ascents = sum(int((np.diff(a) > 0).sum()) for a, _ in orders)
    k = np.array([len(a) for a, _ in orders])
    assert abs(ascents - ((k - 1) / 2).sum()) <= SIGMAS * math.sqrt(((k + 1) / 12).sum())
    in_text = [lengths[np.argsort(a)] for a, lengths in orders]
    first, last = np.array([t[0] for t in in_text]), np.array([t[-1] for t in in_text])
    standard_error = math.sqrt((first.var() + last.var()) / len(orders))
    assert abs(last.mean() - first.mean()) <= SIGMAS * standard_error


def test_masked_fraction_and_span_length_at_the_recipe_length():
    """4000 segments of 512 built by mask_sample directly; counts from the token ids only:
    k = number of [MASK] tokens in a segment, C = scored tokens - k (each span adds <eop>)."""
    config = ObjectiveConfig()
    raw = np.arange(config.mask_window_length) + 10
    samples = [mask_sample(raw, np.random.default_rng([11, i]), config, SPECIALS) for i in range(1000)]
    seg = np.stack([s.segment_ids for s in samples])
    is_mask = np.stack([s.input_ids == SPECIALS.mask for s in samples])
    scored = np.stack([s.loss_mask for s in samples])
    spans = np.stack([(is_mask & (seg == i)).sum(1) for i in range(1, 5)], 1).ravel()
    covered = np.stack([(scored & (seg == i)).sum(1) for i in range(1, 5)], 1).ravel() - spans
    rho, _ = check_span_statistics(covered, spans, config)
    assert 0.15 < rho < 0.155  # exact: 15.2 %; the official rule gives 15.3 % of its 500-token chunks


# ---------------------------------------------------------------------- MIP loader
class CharTokenizer:
    def encode(self, text):
        return [1000 + ord(c) for c in text]


def test_load_mip_pairs_reads_text_and_token_lists(tmp_path):
    path = tmp_path / "mip.jsonl"
    lines = [{"prompt": "Translate: chat", "target": "cat"}, {"prompt": [7, 8, 9], "target": [10]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    pairs = load_mip_pairs(path, CharTokenizer())
    assert [list(p.target) for p in pairs] == [[1000 + ord(c) for c in "cat"], [10]]
    assert list(pairs[1].prompt) == [7, 8, 9]
    sample = mip_sample(pairs, np.random.default_rng(0), ObjectiveConfig.for_sequence_length(256), SPECIALS)
    assert sample.input_ids[-1] in (1000 + ord("t"), 10)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a"}', "'prompt' and 'target'"),
        ("{not json", "not valid JSON"),
        ('{"prompt": "a", "target": "b"}', "no tokenizer"),
        ('{"prompt": [1, -2], "target": [3]}', "non-negative"),
    ],
)
def test_load_mip_pairs_explains_bad_lines(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(GLMError, match=message):
        load_mip_pairs(path)
