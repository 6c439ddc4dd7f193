"""Properties of the CUDA path: bf16 autocast over fp32 master weights, and a rollout on the GPU.
Skipped without a CUDA device (never run here: no GPU); `python bench.py gpu MODEL_DIR` runs
them first on a machine with one."""

import pytest
import torch

import launch
import model
import rollout
import sandbox

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_autocast_log_probs_stay_close_to_fp32_and_weights_stay_fp32():
    """Token log-probs computed under compute_dtype (bf16 autocast on CUDA) are within bf16's
    precision of the fp32 ones, and the master weights stay fp32."""
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0).to("cuda", torch.float32)
    scorer = launch.LogProbs(policy)
    ids = torch.randint(0, len(tokenizer), (4, 64), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        exact = scorer(ids, mask)
        with launch.compute_dtype("cuda"):
            fast = scorer(ids, mask)
    assert fast.isfinite().all()
    torch.testing.assert_close(fast.float(), exact, atol=0.1, rtol=0.05)
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def test_a_cuda_rollout_records_what_teacher_forcing_scores():
    """A sampled rollout on the GPU records per-token log-probs that a teacher-forced pass over
    the same tokens recomputes (to bf16 precision): rollouts stay token-exact on CUDA."""
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0).to("cuda", torch.float32).eval()
    cfg = rollout.RolloutConfig(max_turns=2, max_turn_tokens=24, max_total_tokens=200, temperature=1.0,
                                record_logprobs=True)  # fmt: skip
    prompts = [model.chat_prompt_ids(tokenizer, f"What is {k} times 7?", system=None) for k in range(4)]
    with sandbox.Pool(max_workers=4, timeout=5) as pool, torch.no_grad(), launch.compute_dtype("cuda"):  # as train.py
        trajs = rollout.rollout(policy, tokenizer, prompts, pool, cfg, seeds=list(range(4)))
        batch = {k: v.to("cuda") for k, v in rollout.collate(trajs, tokenizer.pad_token_id).items()}
        logp = launch.LogProbs(policy)(batch["input_ids"], batch["attention_mask"])  # (N, L), bf16 autocast
    width = batch["input_ids"].shape[1]
    sampler = torch.tensor([t.sample_logp + [0.0] * (width - len(t.sample_logp)) for t in trajs], device="cuda")
    sampled = batch["loss_mask"]
    assert sampled.any()
    torch.testing.assert_close(logp[sampled].float(), sampler[sampled], atol=0.1, rtol=0.05)
