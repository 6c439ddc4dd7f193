"""Properties of bf16 compute over fp32 master weights, against an fp32 reference: on the CPU in
every run (the autocast path GPUs take), and on CUDA where a device is present (never here: no
GPU; `python bench.py gpu MODEL_DIR` runs the gpu-marked ones first on a machine with one)."""

import pytest
import torch

import model
import parallel
import rollout
import sandbox

CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
)
DEVICES = ["cpu", CUDA]
# bf16 keeps 8 bits of mantissa: a log-prob near -6 (a 512-token vocabulary) moves by a few
# hundredths through a 2-layer model; 0.1 absolute and 5% relative hold it with room.
ATOL, RTOL = 0.1, 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_log_probs_stay_close_to_an_fp32_reference_and_weights_stay_fp32(device):
    """Token log-probs in bf16 compute are within bf16's precision of the same model's fp32
    log-probs, not equal to them (bf16 really ran), and the master weights stay fp32."""
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0).to(device, torch.float32)
    ids = torch.randint(0, len(tokenizer), (4, 64), device=device, generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        exact = parallel.LogProbs(policy, torch.float32)(ids, mask)
        fast = parallel.LogProbs(policy, torch.bfloat16)(ids, mask)
    assert fast.isfinite().all() and not torch.equal(fast, exact)
    torch.testing.assert_close(fast.float(), exact, atol=ATOL, rtol=RTOL)
    assert all(p.dtype == torch.float32 for p in policy.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_rollout_records_what_fp32_teacher_forcing_scores(device):
    """A sampled rollout in bf16 compute records per-token log-probs that an fp32 teacher-forced
    pass over the same tokens recomputes, to bf16 precision: rollouts stay token-exact."""
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0).to(device, torch.float32).eval()
    cfg = rollout.RolloutConfig(
        max_turns=2, max_turn_tokens=24, max_total_tokens=200, temperature=1.0, record_logprobs=True
    )
    prompts = [model.chat_prompt_ids(tokenizer, f"What is {k} times 7?", system=None) for k in range(4)]
    with sandbox.Pool(max_workers=4, timeout=5) as pool, torch.no_grad():
        with parallel.mixed_precision(policy, torch.bfloat16):  # as train.py's rollouts
            trajs = rollout.rollout(policy, tokenizer, prompts, pool, cfg, seeds=list(range(4)))
        batch = {k: v.to(device) for k, v in rollout.collate(trajs, tokenizer.pad_token_id).items()}
        logp = parallel.LogProbs(policy, torch.float32)(batch["input_ids"], batch["attention_mask"])  # (N, L)
    width = batch["input_ids"].shape[1]
    sampler = torch.tensor([t.sample_logp + [0.0] * (width - len(t.sample_logp)) for t in trajs], device=device)
    sampled = batch["loss_mask"]
    assert sampled.any()
    torch.testing.assert_close(logp[sampled], sampler[sampled], atol=ATOL, rtol=RTOL)
