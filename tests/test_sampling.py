"""top-k / top-p on hand-built distributions: support and frequencies."""

import jax
import jax.numpy as jnp
import numpy as np

from llm.infer.sampling import filter_logits, sample_logits

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])


def draw(n=20000, **kw):
    logits = jnp.log(jnp.asarray(PROBS))[None].repeat(n, 0)
    return np.asarray(sample_logits(jax.random.PRNGKey(0), logits, **kw))


def freq(samples):
    return np.bincount(samples, minlength=len(PROBS)) / len(samples)


def test_top_k_support_and_frequencies():
    s = draw(top_k=3)
    assert set(np.unique(s)) <= {0, 1, 2}
    want = PROBS[:3] / PROBS[:3].sum()
    np.testing.assert_allclose(freq(s)[:3], want, atol=0.015)  # ~3 sigma at n=20000


def test_top_p_keeps_the_smallest_nucleus():
    # Mass before token i: 0, .4, .65, .8, .9 -> with p=0.78 tokens 0..2 are kept (0.65 < 0.78),
    # token 3 is dropped (its preceding mass 0.8 is not < 0.78).
    s = draw(top_p=0.78)
    assert set(np.unique(s)) <= {0, 1, 2}
    np.testing.assert_allclose(freq(s)[:3], PROBS[:3] / PROBS[:3].sum(), atol=0.015)
    s = draw(top_p=0.82)
    assert set(np.unique(s)) == {0, 1, 2, 3}


def test_combined_and_temperature_and_greedy():
    s = draw(top_k=4, top_p=0.7)  # top-k keeps 4, nucleus then keeps 3
    assert set(np.unique(s)) <= {0, 1, 2}
    assert np.all(draw(n=50, temperature=0.0) == 0)
    # Temperature 0.5 squares the probabilities (then renormalises).
    s = draw(temperature=0.5)
    sq = PROBS**2 / (PROBS**2).sum()
    np.testing.assert_allclose(freq(s), sq, atol=0.015)


def test_filter_is_noop_by_default():
    logits = jnp.log(jnp.asarray(PROBS))[None]
    np.testing.assert_allclose(np.asarray(filter_logits(logits)), np.asarray(logits), rtol=1e-6)


def test_same_seed_same_samples():
    a = draw(n=100, top_k=5)
    b = draw(n=100, top_k=5)
    np.testing.assert_array_equal(a, b)
