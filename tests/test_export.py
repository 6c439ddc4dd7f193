"""model.export and `python model.py export`: a checkpoint as a plain Hugging Face directory, and
the README's plain-transformers example run against one."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import model as policies
import sft

from conftest import ROOT, run_script

QUESTION = "What is 19^592 mod 1133?"

# The README's example sits between these markers: the test runs the README's own text.
README_START, README_END = "<!-- example:plain-transformers -->", "<!-- /example -->"


def example_code():
    """The example: the fenced Python block between the README markers."""
    text = open(os.path.join(ROOT, "docs", "usage.md"), encoding="utf-8").read()
    assert README_START in text, f"README.md: no {README_START} marker"
    section = text.split(README_START, 1)[1].split(README_END, 1)[0]
    # The code holds ``` inside its lines, so the block ends only at a line that is its fence alone.
    block = re.search(r"^([`~]{3,})[ \t]*python[^\n]*\n(.*?)^\1[ \t]*$", section, re.DOTALL | re.MULTILINE)
    assert block, f"README.md: no fenced python block between {README_START} and {README_END}"
    return block.group(2)


# ---------------------------------------------------------------- fixtures


def fake_training_checkpoint(path, policy, tokenizer):
    """A directory shaped like checkpoint.save's: the policy, the tokenizer, trainer.json,
    optimizer/, rng_rank0.pt, and Qwen2.5-Instruct's sampling settings in generation_config.json."""
    policy.generation_config = GenerationConfig(
        eos_token_id=policy.config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )
    policies.save_policy(policy, tokenizer, path)
    with open(os.path.join(path, "trainer.json"), "w") as f:
        json.dump({"step": 3, "optimizer": True}, f)
    os.makedirs(os.path.join(path, "optimizer"))
    torch.save({"exp_avg": torch.zeros(3)}, os.path.join(path, "optimizer", "__0_0.distcp"))
    torch.save({"torch": torch.get_rng_state()}, os.path.join(path, "rng_rank0.pt"))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = policies.tiny_tokenizer()
    policy = policies.tiny_model(tokenizer, seed=1)
    path = str(tmp_path_factory.mktemp("run") / "step_3")
    return fake_training_checkpoint(path, policy, tokenizer), policy, tokenizer


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "bf16")
    assert policies.export(checkpoint[0], out) == out
    return out


def memorised_checkpoint(path):
    """A tiny policy trained until it reproduces one tool-using answer to QUESTION (with the
    system prompt): a call, then \\boxed{} of its output. Its samples follow the protocol."""
    tokenizer = policies.tiny_tokenizer()
    policy = policies.tiny_model(tokenizer, seed=0).train()
    messages = [{"role": "system", "content": policies.SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = str(pow(19, 592, 1133))
    reply = "```python\nprint(pow(19, 592, 1133))\n```\n"
    reply += f"```output\n{answer}\n```\n\\boxed{{{answer}}}<|im_end|>"
    n = len(tokenizer.encode(prompt, add_special_tokens=False))
    ids = torch.tensor([tokenizer.encode(prompt + reply, add_special_tokens=False)])
    mask = torch.arange(ids.shape[1])[None] >= n
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(300):
        loss = sft.nll(policies.token_logprobs(policy, ids, torch.ones_like(ids)), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    return fake_training_checkpoint(path, policy.eval(), tokenizer), answer


def run_example(model_dir, tmp_path, max_new_tokens):
    """The example run as a user would: its own process, outside the repository (no import of
    it can work), warnings as errors, no progress bars; seeded. (stdout, stderr)."""
    code, n = re.subn(r"max_new_tokens=\d+", f"max_new_tokens={max_new_tokens}", example_code())
    assert n == 1, "the example sets max_new_tokens once"
    script = tmp_path / "example.py"
    script.write_text("import torch; torch.manual_seed(0)\n" + code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script), model_dir],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


# ---------------------------------------------------------------- export


def test_export_writes_bfloat16_safetensors(exported):
    """Every tensor in the exported safetensors is bf16, and config.json says so."""
    files = [f for f in os.listdir(exported) if f.endswith(".safetensors")]
    assert files
    for name in files:
        with safe_open(os.path.join(exported, name), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.load(open(os.path.join(exported, "config.json")))["dtype"] == "bfloat16"


def test_export_carries_nothing_of_the_trainer(checkpoint, exported):
    """The export holds the model, config, tokenizer and generation_config only: no trainer.json,
    no optimizer/, no rng_rank*.pt (the source has them), nothing pickled."""
    assert {"trainer.json", "optimizer", "rng_rank0.pt"} <= set(os.listdir(checkpoint[0]))
    names = set(os.listdir(exported))
    assert not names & {"trainer.json", "optimizer"}, names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))], names
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= names


def test_export_loads_with_weights_equal_to_bf16_rounding(checkpoint, exported):
    """AutoModelForCausalLM loads the export as bf16, each weight equal to the source's rounded to
    bf16, the tied embeddings still one matrix, and its logits the source's to bf16 precision."""
    _, source, tokenizer = checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    rounded = policies.tiny_model(tokenizer, seed=1).to(torch.bfloat16)
    rounded.load_state_dict(source.state_dict())
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    got, want = loaded.state_dict(), rounded.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.bfloat16, name
        assert torch.equal(got[name], want[name]), name
    ids = torch.tensor([policies.chat_prompt_ids(tokenizer, QUESTION)])
    with torch.no_grad():  # the same function, to bf16 precision
        torch.testing.assert_close(loaded(ids).logits.float(), source(ids).logits, atol=3e-2, rtol=0)


def test_export_tokenizer_round_trips(checkpoint, exported):
    """AutoTokenizer loads the export's tokenizer; it encodes and decodes as the source does,
    with the same special tokens and chat template."""
    tokenizer = checkpoint[2]
    loaded = AutoTokenizer.from_pretrained(exported)
    texts = [
        "<|im_start|>user\nWhat is 12345 * 6789 modulo 97?<|im_end|>\n",
        "```python\nprint(sum(d for d in range(1, 13) if 12 % d == 0))\n```\n```output\n28\n```\n\\boxed{28}",
        "naïve Unicode — ünïcödé 数学 🙂",
    ]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text
    assert (loaded.eos_token, loaded.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)
    assert policies.chat_prompt_ids(loaded, QUESTION) == policies.chat_prompt_ids(tokenizer, QUESTION)


def test_export_generation_config_has_no_sampling_settings(checkpoint, exported):
    """generation_config.json holds token ids only: the source's top_k=20, top_p=0.8,
    temperature=0.7, repetition_penalty=1.05 do not reach a user's generate."""
    written = json.load(open(os.path.join(exported, "generation_config.json")))
    assert set(written) <= {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version"}, written
    source = checkpoint[1]
    assert written["eos_token_id"] == source.config.eos_token_id
    assert written["pad_token_id"] == checkpoint[2].pad_token_id
    loaded = GenerationConfig.from_pretrained(exported)
    assert (loaded.top_k, loaded.top_p, loaded.temperature, loaded.repetition_penalty) == (None,) * 4


def test_export_refuses_a_non_empty_out_and_a_source_without_model(checkpoint, tmp_path):
    """A ValueError naming the path when out exists and is not empty (left untouched), when src
    has no model (a run directory: its checkpoints are named) or does not exist, or the dtype is
    unknown; an empty out directory is filled."""
    src = checkpoint[0]
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=re.escape(str(full))):
        policies.export(src, str(full))
    assert os.listdir(full) == ["notes.txt"]
    run = tmp_path / "run"
    (run / "checkpoints" / "step_5").mkdir(parents=True)
    (run / "checkpoints" / "step_10").mkdir()
    with pytest.raises(ValueError, match=rf"{re.escape(str(run))}.*run directory.*N in 5, 10"):
        policies.export(str(run), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "missing"))):
        policies.export(str(tmp_path / "missing"), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="int8"):
        policies.export(src, str(tmp_path / "c"), dtype="int8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    policies.export(src, str(empty), dtype="float32")
    assert "model.safetensors" in os.listdir(empty)


def test_export_command(checkpoint, tmp_path, capsys):
    """`python model.py export SRC OUT --dtype float16` writes an fp16 export (run in this
    process); an error (out not empty) is one line on stderr with exit code 2 and no traceback
    (the real command); --help explains SRC, OUT and --dtype."""
    out = str(tmp_path / "fp16")
    policies.main(["export", checkpoint[0], out, "--dtype", "float16"])
    capsys.readouterr()
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    done = run_script([sys.executable, "model.py", "export", checkpoint[0], out])
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert done.stderr.startswith("model.py export: error:") and out in done.stderr
    for argv, code in (([checkpoint[0]], 2), (["--help"], 0)):  # parsed in this process
        with pytest.raises(SystemExit) as done:
            policies.main(["export", *argv])
        assert done.value.code == code
        out, err = capsys.readouterr()
        if code:
            assert err.strip().count("\n") == 0 and "OUT" in err
    for word in ("SRC", "OUT", "--dtype", "bfloat16", "float16", "float32", "trainer.json"):
        assert word in out, word


# ---------------------------------------------------------------- the plain-transformers example


def test_example_fits_and_does_not_import_the_project():
    """The example is at most 40 lines, imports only the standard library, torch and
    transformers, and its system prompt is model.SYSTEM_PROMPT's text."""
    code = example_code()
    assert len(code.strip().splitlines()) <= 40
    tree = ast.parse(code)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m.split(".")[0] for m in imported} <= {"re", "subprocess", "sys", "torch", "transformers"}
    names = {n: [ast.unparse(t) for t in n.targets] for n in tree.body if isinstance(n, ast.Assign)}
    system = [n.value for n, targets in names.items() if targets == ["system"]]
    assert [ast.literal_eval(v) for v in system] == [policies.SYSTEM_PROMPT]


def test_example_runs_a_random_model_without_warnings(exported, tmp_path):
    """The example runs to completion on the exported tiny random model (garbage text, most
    likely no tool call) with Python warnings as errors and nothing at all on stderr (so no
    transformers warning about the sampling settings either)."""
    stdout, stderr = run_example(exported, tmp_path, max_new_tokens=24)
    assert stderr == ""
    assert stdout.strip()


def test_example_runs_the_tool_call_and_continues(tmp_path):
    """On a tiny policy that memorised a tool-using answer, the example stops at the closing
    fence, runs the code, appends its ```output block and continues to the \\boxed{} answer,
    with nothing on stderr."""
    src, answer = memorised_checkpoint(str(tmp_path / "step_1"))
    out = policies.export(src, str(tmp_path / "export"))
    stdout, stderr = run_example(out, tmp_path, max_new_tokens=48)
    assert stderr == ""
    assert stdout.startswith("```python\nprint(pow(19, 592, 1133))\n```"), stdout
    assert f"```output\n{answer}\n```\n" in stdout, stdout
    assert f"\\boxed{{{answer}}}" in stdout.split("```output", 1)[1], stdout
