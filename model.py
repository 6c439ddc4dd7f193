"""Policies and tokenizers: loading Qwen2.5, the chat template, token log-probabilities, saving,
and a tiny Qwen2 model and tokenizer built in code for tests and the demo.

    model, tokenizer = load_policy("Qwen/Qwen2.5-7B-Instruct")     # hub id (needs the hub)
    model, tokenizer = load_policy("/ckpt/qwen2.5-coder-0.5b")     # a local directory
    model, tokenizer = load_policy("demo")                         # tiny, built in code
    logp = token_logprobs(model, input_ids, attention_mask)        # (B, L), chunked over L
    export("runs/x/checkpoints/step_200", "qwen-gtpo-bf16")         # a plain HF directory, bf16

    python model.py export SRC OUT [--dtype bfloat16|float16|float32]

Shapes: B sequences, L tokens, H hidden size, V vocabulary size.
"""

import argparse
import json
import os
import shutil
import sys

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2.5-Instruct writes it; a system message is optional.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SYSTEM_PROMPT = (
    "Solve the problem step by step. You may run Python by writing a ```python code block; "
    "its output comes back in an ```output block. Put the final answer in \\boxed{}."
)


# ---------------------------------------------------------------- the tiny model, built in code


def _tiny_corpus():
    """Text in the shapes the tokenizer will see: chat markers, prose, numbers, Python, fences."""
    lines = [
        "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n",
        "<|im_start|>user\nWhat is 12345 * 6789 modulo 97?<|im_end|>\n<|im_start|>assistant\n",
        "Let me compute it.\n```python\nx = 12345 * 6789\nprint(x % 97)\n```\n```output\n42\n```\n",
        "The answer is \\boxed{42}.<|im_end|>\n",
        "for i in range(10):\n    total += i ** 2\nprint(total)\n",
        "def f(n):\n    return sum(d for d in range(1, n + 1) if n % d == 0)\n",
        "Traceback (most recent call last):\nNameError: name 'y' is not defined\n",
        "import math\nprint(math.gcd(120, 84), math.factorial(10), pow(3, 200, 1000))\n",
    ]
    lines += [  # the toy task's shapes (tasks.toy_problems), so its fixed strings get their own tokens
        "<|im_start|>user\nWhat is 19^592 mod 1133?<|im_end|>\n<|im_start|>assistant\n",
        "```python\nprint(pow(19, 592, 1133))\n```\n```output\n97\n```\n\\boxed{97}<|im_end|>\n",
        "How many n from 1 to 6319 are multiples of 8 or 5?\n",
        "```python\nprint(sum(1 for n in range(1, 6319 + 1) if n % 8 == 0 or n % 5 == 0))\n```\n",
        "Let x = 51^453 mod 134. What is x * 723?\nLet s be the digit sum of 31^85. What is s * 978?\n",
        "```python\nprint(sum(int(d) for d in str(31 ** 85)))\n```\n```output\n607\n```\n",
        "```python\nprint(5295 * 8079)\n```\n",
        'Traceback (most recent call last):\n  File "<cell 1>", line 1, in <module>\n    print(powmod(2, 3))\n',
        "           ^^^^^^\nNameError: name 'powmod' is not defined\n",
    ] * 3
    words = "the of and to a in is that for it as with be on by this we are count number sum product"
    lines += [" ".join(words.split()[i:] + words.split()[:i]) + ".\n" for i in range(20)]
    lines += [f"{a} + {b} = {a + b}\n" for a in range(0, 200, 7) for b in range(3, 60, 11)]
    return lines * 4


def tiny_tokenizer(vocab_size=512):
    """A byte-level BPE trained in code with Qwen2's own normaliser and split pattern, so that a
    copy reloaded through AutoTokenizer (which rebuilds Qwen2's pipeline) encodes identically."""
    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_tiny_corpus(), trainer=trainer)
    merges = [tuple(m) for m in json.loads(raw.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=raw.get_vocab(), merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})  # else BPE splits it
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer, seed=0, hidden_size=64, num_hidden_layers=2, dtype=torch.float32, vocab_size=None):
    """A randomly initialised Qwen2 (about 0.1M parameters at the defaults) for tokenizer's
    vocabulary; vocab_size: more head rows than the tokenizer has entries, as Qwen2.5's."""
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(dtype).eval()


# ---------------------------------------------------------------- loading and saving


def default_dtype(device):
    """bf16 on a CUDA device that computes it natively (compute capability 8.0 and later: A100,
    H100, RTX 30xx on), fp32 elsewhere: older GPUs (V100, T4) only emulate bf16, and on a CPU
    without AVX-512 bf16 its matmuls are slow (docs/results.md#bf16-on-the-cpu)."""
    native = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native else torch.float32


def load_tokenizer(name):
    """The tokenizer of "demo" (built in code), a local directory or a hub id, with a pad token and
    the chat template set. A local directory must hold config.json; a path that does not exist is
    an error naming what was looked for (hub ids are only tried for names that are not paths)."""
    if name == "demo":
        tokenizer = tiny_tokenizer()
    else:
        path = _model_path(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise OSError(f"could not load the model {name!r} (local directory or hub id): {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _model_path(name):
    looks_like_path = name.startswith(("/", ".", "~")) or os.path.exists(name)
    path = os.path.expanduser(name)
    if looks_like_path and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"no model at {path!r}: looked for {os.path.join(path, 'config.json')} "
            "(a Hugging Face checkpoint directory), 'demo', or a hub id"
        )
    return path


def load_policy(
    name, device="cpu", dtype=None, activation_checkpointing=False, demo_size=(64, 2), seed=0, tokenizer=None
):
    """(model, tokenizer) from "demo" (tiny, built in code: demo_size = (hidden size, layers),
    initialised from seed), a local directory, or a hub id (see load_tokenizer; pass the
    tokenizer if it is loaded already). A local directory must hold safetensors weights. On the
    meta device only the architecture is built and no weight is read (ranks other than 0, which
    get rank 0's weights by broadcast: parallel.replicate)."""
    dtype = dtype or default_dtype(device)
    tokenizer = tokenizer or load_tokenizer(name)
    meta = torch.device(device).type == "meta"
    if name == "demo":
        with torch.device("meta" if meta else "cpu"):  # CPU: the same initial weights on any device
            model = tiny_model(tokenizer, seed, *demo_size, dtype=dtype)
    else:
        path = _model_path(name)
        try:
            if meta:
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
                if os.path.isfile(os.path.join(path, "generation_config.json")):
                    model.generation_config = GenerationConfig.from_pretrained(path)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise OSError(f"could not load the model {name!r} (local directory or hub id): {e}") from e
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device), tokenizer


def save_policy(model, tokenizer, out_dir):
    """Save in Hugging Face format (safetensors + config + tokenizer), written to out_dir.tmp-PID
    then renamed, so a crash mid-save never leaves a half-written out_dir. (Replacing an existing
    out_dir takes two renames; a crash between them leaves it at out_dir.old-PID.)"""
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def chat_prompt_ids(tokenizer, problem, system=SYSTEM_PROMPT):
    """Token ids of the chat prompt for a problem, ending with the assistant's header."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": problem}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- token log-probabilities


def position_ids_of(attention_mask):
    """Positions counted over real tokens only, so a left-padded row starts at 0, as in generate."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)


def _chunk_logprobs(hidden, targets, weight, temperature):
    logits = (hidden @ weight.T).float() / temperature  # (C, V) fp32 for this chunk only
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)  # (C,)


def token_logprobs(
    model, input_ids, attention_mask=None, temperature=1.0, chunk_tokens=None, needed=None, vocab_size=None
):
    """log p(input_ids[b, t] | input_ids[b, :t]) under the logits / temperature, as sampled: (B, L).
    vocab_size: the tokenizer's length; the head's rows beyond it (Qwen2.5 has 271 or more) are
    never sampled (rollout.KnownTokens), so they are left out of the softmax too.

    Position 0 has no prediction and holds 0. The hidden states are computed once; the
    vocabulary projection and log-softmax run over chunks of chunk_tokens positions, each
    recomputed in the backward pass, so no more than (chunk_tokens, V) fp32 logits exist at once.
    By default a chunk holds 2^24 logits (64 MiB) or 1024 positions, whichever is more: 1024
    positions for Qwen's 152k vocabulary, a whole batch for the tiny model's 512. needed (B, L),
    True where a log-prob is used (the loss mask): only those positions are projected, the rest
    hold 0; prompts and tool outputs then cost no vocabulary projection (with a 152k vocabulary,
    about a third of an update's compute on a short completion).
    """
    assert input_ids.dim() == 2, f"input_ids must be (B, L), got {tuple(input_ids.shape)}"
    assert temperature > 0, f"temperature must be > 0 (greedy rollouts are scored at 1), got {temperature}"
    if input_ids.shape[1] < 2:  # nothing is predicted
        return torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B, L = input_ids.shape
    hidden = model.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_of(attention_mask)
    ).last_hidden_state  # (B, L, H)
    hidden = hidden[:, :-1].reshape(B * (L - 1), -1)  # (B(L-1), H) predicts the next token
    targets = input_ids[:, 1:].reshape(-1)  # (B(L-1),)
    rows = None if needed is None else needed[:, 1:].reshape(-1).nonzero().squeeze(1)  # (n,) projected
    if rows is not None and rows.numel() == 0:  # none needed: all, so that the head stays in the graph (DDP)
        rows = None
    if rows is not None:
        hidden, targets = hidden[rows], targets[rows]
    weight = model.get_output_embeddings().weight[:vocab_size]  # (V, H)
    chunk_tokens = chunk_tokens or max(1024, (1 << 24) // weight.shape[0])
    chunks = []
    for start in range(0, targets.numel(), chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            chunks.append(checkpoint(_chunk_logprobs, h, t, weight, temperature, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(h, t, weight, temperature))
    logp = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
    if rows is not None:
        logp = logp.new_zeros(B * (L - 1)).index_put((rows,), logp)  # (B(L-1),) zero where not needed
    return torch.cat([logp.new_zeros(B, 1), logp.view(B, L - 1)], dim=1)  # (B, L)


# ---------------------------------------------------------------- export


EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _check_checkpoint_dir(src):
    """A ValueError naming src unless it holds a Hugging Face model (config.json, safetensors
    weights) and its tokenizer."""
    if not os.path.isdir(src):
        raise ValueError(f"no checkpoint at {src!r}: not a directory")
    names = os.listdir(src)
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        hint = ""
        root = os.path.join(src, "checkpoints")
        if os.path.isdir(root):  # a run directory: name its checkpoints
            steps = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())
            hint = f"; it is a run directory: export one of its checkpoints, {root}/step_N"
            hint += f" (N in {', '.join(map(str, steps))})" if steps else " (it has none yet)"
        raise ValueError(f"no model in {src!r}: expected config.json and *.safetensors weights{hint}")
    if "tokenizer_config.json" not in names and "tokenizer.json" not in names:
        raise ValueError(f"no tokenizer in {src!r}: expected tokenizer_config.json or tokenizer.json")


def export(src, out, dtype="bfloat16"):
    """Write the policy of the checkpoint directory src (a save_policy directory or a training
    checkpoint RUN/checkpoints/step_N) to out as a plain Hugging Face directory: safetensors
    weights in dtype, config.json, the tokenizer files (with the chat template) and a neutral
    generation_config.json. Nothing of the trainer is carried over (trainer.json, optimizer/, rng_rank*.pt):
    only what save_pretrained writes. Tied embeddings stay tied (config.tie_word_embeddings; the
    shared matrix is stored once). Returns out.

    A ValueError naming the path when dtype is unknown, out exists and is not an empty
    directory, or src holds no model or no tokenizer. out is written to out.tmp-PID, then renamed.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    src, out = os.path.expanduser(src), os.path.expanduser(out).rstrip("/") or "/"
    _check_checkpoint_dir(src)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ValueError(f"{out!r} exists and is not an empty directory: give a new path")
    model, tokenizer = load_policy(src, "cpu", EXPORT_DTYPES[dtype])
    # Only the token ids, no sampling settings. generate() fills every setting a call leaves
    # unset from the model's generation_config, so a checkpoint that started from Qwen2.5-Instruct
    # would carry temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05 silently into a
    # user's generate: not the distribution the policy was trained to sample from (rollout.py
    # samples from softmax(logits / T) with every other setting neutral). Without them a call gets
    # transformers' documented defaults (greedy; top_k=50 when do_sample=True), and the README
    # example gives every setting explicitly.
    source = model.generation_config
    eos = source.eos_token_id if source.eos_token_id is not None else model.config.eos_token_id
    pad = source.pad_token_id if source.pad_token_id is not None else tokenizer.pad_token_id
    bos = source.bos_token_id if source.bos_token_id is not None else model.config.bos_token_id
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    save_policy(model, tokenizer, out)
    return out


def main(argv=None):
    """The command line: `python model.py export SRC OUT [--dtype ...]`."""
    parser = argparse.ArgumentParser(
        prog="model.py", description="export: a checkpoint as a plain Hugging Face directory (export --help)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ex = commands.add_parser(
        "export",
        help="write a checkpoint's policy as a plain Hugging Face directory",
        description="Write the policy of a checkpoint directory as a plain Hugging Face directory "
        "(safetensors weights in --dtype, config, tokenizer with its chat template, a generation_config "
        "holding only token ids), without the trainer's files (trainer.json, optimizer/, rng_rank*.pt). Load it with "
        "AutoModelForCausalLM.from_pretrained(OUT) and AutoTokenizer.from_pretrained(OUT).",
    )
    ex.add_argument(
        "src",
        metavar="SRC",
        help="checkpoint directory, e.g. RUN/checkpoints/step_200 (config.json, *.safetensors and the tokenizer)",
    )
    ex.add_argument("out", metavar="OUT", help="directory to write; must not exist or be empty")
    ex.add_argument(
        "--dtype",
        choices=list(EXPORT_DTYPES),
        default="bfloat16",
        help="dtype of the written weights (default: bfloat16)",
    )

    def one_line_error(prog):
        def error(message):
            print(f"{prog}: error: {message} (see --help)", file=sys.stderr)
            sys.exit(2)

        return error

    parser.error, ex.error = one_line_error("model.py"), one_line_error("model.py export")
    args = parser.parse_args(argv)
    try:
        out = export(args.src, args.out, args.dtype)
    except (ValueError, OSError) as e:
        print(f"model.py export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {args.src} -> {out} ({args.dtype})")


if __name__ == "__main__":
    main()
