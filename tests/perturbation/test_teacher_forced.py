"""The teacher-forced replay (the perturbation command's sweep mode): exact zeros where nothing is compressed,
and the cache's own states."""

from __future__ import annotations

import pytest
import torch

from analysis.compress import PolicyOptions
from analysis.jobs.job import Job
from analysis.perturbation.teacher_forced import teacher_forced_layer
from analysis.runtime.cache import CompressedCache
from analysis.runtime.capture import capture_sequences
from analysis.text.corpora import load_documents, token_sequences

SPECS = [("full", None), ("weightedkv", 12), ("weightedkv_evict", 12), ("h2o", 12), ("tova", 12), ("cam", 12),
         ("streaming_llm", 12), ("random", 12), ("weightedkv", 40), ("weightedkv", 99)]
JOBS = [Job.of(m, b, PolicyOptions(sinks=2)) for m, b in SPECS]


def random_layer(seed: int, B: int = 2, T: int = 40):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 6, T, 8, generator=gen)
    k = torch.randn(B, 3, T, 8, generator=gen)
    v = torch.randn(B, 3, T, 8, generator=gen)
    return q, k, v


def test_error_is_exactly_zero_without_compression_and_positive_with_it():
    result = teacher_forced_layer(*random_layer(0), JOBS)
    error = dict(zip(result.jobs, result.error))
    assert result.error.shape == (len(JOBS), 2, 3, 40)
    for job in (("full", 40), ("weightedkv", 40), ("weightedkv", 99)):  # budget >= T never compresses
        assert torch.equal(error[job], torch.zeros_like(error[job])), job
    squeezed = error["weightedkv", 12]
    # before the cache fills nothing is evicted; the rows attend over budget + 1 slots, the reference over
    # T + 1, so only the summation order differs
    assert float(squeezed[..., :12].max()) < 1e-5
    assert (squeezed[..., 13:] > 0).float().mean() > 0.9  # after it, the output moves
    mean = result.mean_after_fill()
    assert mean.shape == (len(JOBS), 2, 3) and float(mean[1].min()) > 0


def test_jobs_side_by_side_equal_each_job_alone():
    q, k, v = random_layer(1)
    together = teacher_forced_layer(q, k, v, JOBS)
    for job, error in zip(JOBS, together.error):
        alone = teacher_forced_layer(q, k, v, [job])
        torch.testing.assert_close(alone.error[0], error, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["weightedkv", "cam", "tova"])
def test_sweep_state_is_what_the_compressed_cache_holds(embedded, method):
    """Layer 0 sees the same tokens whatever the cache does, so its teacher-forced state after T tokens
    must be the one CompressedCache holds inside the model after decoding them one by one."""

    seqs = token_sequences(embedded.tokenizer, load_documents(corpus="books"), 48, 1)
    cap = capture_sequences(embedded, seqs, layers=[0], kinds=("query_post_rope", "key_post_rope", "value"),
                            progress=False)
    result = teacher_forced_layer(cap.get(0, "query_post_rope"), cap.get(0, "key_post_rope"), cap.get(0, "value"),
                                  [Job.of(method, 20)], layer=0)
    ids = torch.tensor([seqs[0][1]])
    with torch.inference_mode(), CompressedCache(embedded.model, method, 20) as cache:
        for t in range(ids.shape[1]):
            embedded.model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.tensor([[t]]), use_cache=True)
    ours, theirs = result.state.ordered(), cache.layers[0].state.ordered()
    assert torch.equal(ours.positions, theirs.positions)  # the same slots kept
    torch.testing.assert_close(ours.values, theirs.values, rtol=0, atol=1e-5)  # the same (merged) values
    torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=1e-5)
