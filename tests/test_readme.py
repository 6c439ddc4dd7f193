"""The guide against the code: every shell command in the code blocks of README.md and docs/
(usage, results, the real run) that calls one of this project's scripts parses through that
script's own parser; the install and test commands are the ones CI runs; the commands that can
run here in seconds run for real, on a tiny model; every relative link leads somewhere. So the
guide cannot drift from the code.

Commands are read from ```bash / ```sh / ```shell blocks (every line) and from any other
non-Python block (the lines that start with "$ ", as in a console transcript); backslash
continuations are joined, `VAR=value` lines of a block are expanded in its later lines, and
`a; b`, `a && b` are two commands."""

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from conftest import ROOT, constraint_pins, requirement_lines

DOCS = ("README.md", "docs/usage.md", "docs/results.md", "docs/real_run.md")
SHELL_BLOCKS = {"bash", "sh", "shell", "zsh"}
NOT_SHELL = {"python", "py", "python3", "json", "yaml", "toml"}
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Command:
    doc: str
    line: int
    text: str  # as written, continuations joined
    argv: list  # words, variables expanded, without leading VAR=value words and redirections
    env: dict = field(default_factory=dict)

    def __str__(self):
        return f"{self.doc}:{self.line}: {self.text.strip()}"


def logical_lines(body, first_line):
    """(line number, text) of each line of a block, backslash continuations joined."""
    lines, pending, start = [], "", None
    for k, raw in enumerate(body.split("\n")):
        start = first_line + k if start is None else start
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + raw))
        pending, start = "", None
    return lines


def split_commands(text, variables):
    """The simple commands of one shell line: [(words, env)]; `VAR=value` alone sets a variable."""
    text = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split, lexer.commenters = True, ""  # a comment starts a word, as in the shell
    commands, words = [], []
    for word in lexer:
        if word.startswith("#"):
            break
        if word and set(word) <= set(";&|"):
            commands.append(words)
            words = []
        else:
            words.append(word)
    commands.append(words)
    result = []
    for words in commands:
        redirected = {k + 1 for k, w in enumerate(words) if w[:1] in ("<", ">")}  # the redirection's target
        words = [w for k, w in enumerate(words) if w[:1] not in ("<", ">") and k not in redirected]
        env = {}
        while words and ASSIGNMENT.match(words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        if words:
            result.append((words, env))
        else:
            variables.update(env)
    return result


def doc_commands(doc):
    """Every shell command in the code blocks of doc (a path relative to the repository)."""
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in FENCE.finditer(text):
        info = block.group("info").strip().split()
        lang = info[0].lower() if info else ""
        if lang in NOT_SHELL:
            continue
        first_line = text.count("\n", 0, block.start("body")) + 1
        variables = {}
        for number, line in logical_lines(block.group("body"), first_line):
            stripped = line.strip()
            if stripped.startswith("$ "):
                stripped = stripped[2:]
            elif lang not in SHELL_BLOCKS:
                continue  # a transcript's output, or a block that is not shell
            if not stripped or stripped.startswith("#"):
                continue
            for words, env in split_commands(stripped, variables):
                commands.append(Command(doc, number, stripped, words, env))
    return commands


def classify(argv):
    """('pip', args), ('pytest', args), ('script', script, args, ranks), or None: not a command of
    this project (python -c, another program)."""
    program, rest = os.path.basename(argv[0]), argv[1:]
    if program in ("pip", "pip3"):
        return ("pip", rest)
    if program == "pytest":
        return ("pytest", rest)
    if program == "torchrun":
        return torchrun(rest)
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        k = 0
        while k < len(rest) and rest[k].startswith("-"):
            if rest[k] == "-m":
                module, args = rest[k + 1], rest[k + 2 :]
                if module in ("pip", "pytest"):
                    return (module, args)
                if module.startswith("tools."):  # python bench.py: the script bench.py
                    return ("script", module.replace(".", "/") + ".py", args, 1)
                return torchrun(args) if module == "torch.distributed.run" else None
            if rest[k] == "-c":
                return None
            k += 2 if rest[k] in ("-W", "-X") else 1
        if k < len(rest):
            return ("script", rest[k], rest[k + 1 :], 1)
    return None


def torchrun(args):
    """torchrun's own options, then the script: ('script', script, args, number of ranks)."""
    options = {}
    for k, word in enumerate(args):
        if word.endswith(".py") and not word.startswith("-"):
            ranks = 1
            for name in ("nproc_per_node", "nnodes"):
                value = options.get(name, "1")
                ranks *= int(value) if value.isdigit() else 1
            return ("script", word, args[k + 1 :], ranks)
        if word.startswith("--"):
            name, _, value = word[2:].replace("-", "_").partition("=")
            options[name] = value or (args[k + 1] if k + 1 < len(args) else "")
    return None


def all_commands(docs=DOCS):
    """Every shell command of the given documents, in document order."""
    return [c for doc in docs if os.path.exists(os.path.join(ROOT, doc)) for c in doc_commands(doc)]


def of_kind(kind, docs=DOCS):
    """The commands of one kind: "pip", "pytest" or "script" (a project script, torchrun included)."""
    return [c for c in all_commands(docs) if (classify(c.argv) or ("",))[0] == kind]


SCRIPT_COMMANDS = of_kind("script")


# ---------------------------------------------------------------- CI's commands


def ci_commands(kind):
    """The pip or pytest commands of .ci/run, as argument lists."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
    found = []
    for line in lines:
        for words, _ in split_commands(line, {}):
            kind_args = classify(words)
            if kind_args and kind_args[0] == kind:
                found.append(kind_args[1])
    return found


def pip_install(args):
    """pip install's arguments without the quiet flags."""
    return [a for a in args if a not in ("-q", "--quiet")]


def test_the_readme_holds_the_test_command_ci_runs():
    """README.md has, in a code block, exactly the pytest command .ci/run runs (CI runs "the
    README's test command"), and the install commands of torch and requirements.txt that CI runs."""
    (ci_test,) = ci_commands("pytest")
    readme_tests = [classify(c.argv)[1] for c in of_kind("pytest", ("README.md",))]
    wanted = f"python -m pytest {' '.join(ci_test)}"
    assert ci_test in readme_tests, f"README.md has no ```bash block with `{wanted}`"
    readme_installs = [pip_install(classify(c.argv)[1]) for c in of_kind("pip", ("README.md",))]
    for args in ci_commands("pip")[:2]:
        wanted = f"pip {' '.join(pip_install(args))}"
        assert pip_install(args) in readme_installs, f"README.md lacks CI's `{wanted}`"


@pytest.mark.parametrize("command", of_kind("pip"), ids=lambda c: f"{c.doc}:{c.line}")
def test_pip_commands_are_the_ones_ci_runs(command):
    """A documented pip command installs what one of .ci/run's pip commands installs, and every
    requirements or constraints file it names exists."""
    args = pip_install(classify(command.argv)[1])
    assert args and args[0] == "install", f"{command}: not a pip install"
    for k, arg in enumerate(args):
        if arg in ("-r", "--requirement", "-c", "--constraint"):
            assert os.path.isfile(os.path.join(ROOT, args[k + 1])), f"{command}: {args[k + 1]} does not exist"
    ci = [pip_install(a) for a in ci_commands("pip")]
    assert args in ci, f"{command}: CI installs {ci}, not this"


def test_constraints_pin_every_requirement_within_its_bounds():
    """constraints.txt pins each package of requirements.txt, and the extras CI installs, to one
    exact version that requirements.txt's bounds allow; CI installs with it."""
    from packaging.requirements import Requirement

    pins = constraint_pins()
    for line in requirement_lines("requirements.txt"):
        wanted = Requirement(line)
        assert wanted.name in pins, f"constraints.txt does not pin {wanted.name}"
        assert wanted.specifier.contains(pins[wanted.name]), f"{wanted.name}=={pins[wanted.name]} is not {wanted}"
    ci = [pip_install(a) for a in ci_commands("pip")]
    torch_installs = [a for a in ci if any(p.startswith("torch==") for p in a)]
    assert torch_installs == [["install", f"torch=={pins['torch']}"]], "CI's torch is constraints.txt's"
    others = [a for a in ci if a not in torch_installs]
    assert others and all(a[-2:] == ["-c", "constraints.txt"] for a in others), others
    named = [p for a in others for k, p in enumerate(a) if k and not p.startswith("-") and a[k - 1] not in ("-r", "-c")]
    assert named and all(p in pins for p in named), f"CI installs {named} beyond constraints.txt's pins"


@pytest.mark.parametrize("command", of_kind("pytest"), ids=lambda c: f"{c.doc}:{c.line}")
def test_pytest_commands_are_the_one_ci_runs(command):
    """A documented pytest command is CI's, plus at most a marker selection (-m) over the markers
    pyproject.toml declares, test files that exist, and a hypothesis profile conftest registers."""
    from hypothesis import settings

    (ci_test,) = ci_commands("pytest")
    args = list(classify(command.argv)[1])
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        declared = set(re.findall(r'^\s*"(\w+):', f.read(), re.M))
    if "-m" in args:
        k = args.index("-m")
        words = set(re.findall(r"\w+", args[k + 1])) - {"and", "or", "not"}
        assert words <= declared, f"{command}: markers {words - declared} are not declared in pyproject.toml"
        del args[k : k + 2]
    for path in [a for a in args if a.startswith("tests/")]:
        assert os.path.exists(os.path.join(ROOT, path.split("::")[0])), f"{command}: {path} does not exist"
        args.remove(path)
    assert args == ci_test, f"{command}: CI runs `pytest {' '.join(ci_test)}`"
    if "HYPOTHESIS_PROFILE" in command.env:
        settings.get_profile(command.env["HYPOTHESIS_PROFILE"])  # raises if conftest registers none such


# ---------------------------------------------------------------- parsing with each script's parser


class Parsed(Exception):
    """Raised when a script's outermost argparse call has parsed its command line."""

    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def refused(command, what, error):
    """The failure message: the documented command, and what refused it with which error."""
    return f"{command}\n{what} refuses it: {error}"


def call_parser(command, what, fn):
    """fn(), its stderr captured; a SystemExit or exception fails the test naming the command."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return fn()
    except SystemExit as e:
        pytest.fail(refused(command, what, err.getvalue().strip() or f"exit code {e.code}"))
    except Exception as e:  # noqa: BLE001 (a ConfigError, a ValueError: the message is what matters)
        pytest.fail(refused(command, what, f"{type(e).__name__}: {e}"))


def parse_train(command, args, ranks, monkeypatch):
    """train.parse_args, then check_config for the command's number of ranks."""
    import torch

    import config
    import parallel
    import train

    cfg = call_parser(command, "train.parse_args", lambda: train.parse_args(args))
    world = parallel.World(0, ranks, torch.device("cpu"))
    call_parser(command, "config.check_config", lambda: config.check_config(cfg, world))
    return cfg


def parse_eval(command, args, ranks, monkeypatch):
    """eval.py's parser (as its __main__ calls it), then eval.resolve, which checks the flags."""
    import config
    import eval as evaluation

    parse = getattr(evaluation, "parse_args", None) or (
        lambda argv: config.parse_config(config.EvalConfig, "eval.py", evaluation.__doc__, argv)
    )
    cfg = call_parser(command, "eval.py's parser", lambda: parse(args))
    call_parser(command, "eval.resolve", lambda: evaluation.resolve(cfg))
    return cfg


def parse_with_argparse(command, script, args, monkeypatch):
    """The script run as __main__, stopped right after its outermost argparse call returns: its own
    parser (subcommands included) reads the command line, and nothing else runs."""
    path = os.path.join(ROOT, script)
    with open(path, encoding="utf-8") as f:
        if "argparse" not in f.read():
            pytest.fail(f"{command}\n{script} does not use argparse: teach tests/test_readme.py its parser")
    depth = 0

    def stop_after(original):
        def method(self, *a, **k):
            nonlocal depth
            depth += 1
            try:
                result = original(self, *a, **k)
            finally:
                depth -= 1
            if depth == 0:
                raise Parsed(result)
            return result

        return method

    err = io.StringIO()
    try:
        quiet = contextlib.redirect_stdout(io.StringIO())
        with monkeypatch.context() as patch, contextlib.redirect_stderr(err), quiet:
            for name in ("parse_args", "parse_known_args"):
                original = getattr(argparse.ArgumentParser, name)
                patch.setattr(argparse.ArgumentParser, name, stop_after(original))
            patch.setattr(sys, "argv", [script, *args])
            runpy.run_path(path, run_name="__main__")
    except Parsed as parsed:
        return parsed.namespace
    except SystemExit as e:
        pytest.fail(refused(command, f"{script}'s parser", err.getvalue().strip() or f"exit code {e.code}"))
    pytest.fail(f"{command}\n{script} ran without parsing a command line with argparse")


def run_here(args, timeout=600):
    """Run a command in the working directory with the repository importable, one thread per process."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=timeout)


def run_data(command, args, ranks, monkeypatch):
    """tasks.py has no flags to parse (it takes an output directory): it runs, for real, here."""
    done = run_here([sys.executable, os.path.join(ROOT, "tasks.py"), *args], timeout=120)
    assert done.returncode == 0, refused(command, "tasks.py", done.stderr[-2000:])


PARSERS = {"train.py": parse_train, "eval.py": parse_eval, "tasks.py": run_data}


@pytest.mark.parametrize("command", SCRIPT_COMMANDS, ids=lambda c: f"{c.doc}:{c.line}")
def test_every_script_command_parses(command, monkeypatch, tmp_path):
    """Each documented command of a project script names a script that exists, and its flags pass
    that script's own parser and flag checks (train.parse_args and check_config; eval.py's parser
    and resolve; the argparse parser of bench.py, tools/repro.py, model.py); tools/repro.py's train.py flags
    after `--` pass train.py's. Paths and hub models that do not exist here are fine."""
    _, script, args, ranks = classify(command.argv)
    name = os.path.normpath(script)
    if not os.path.isfile(os.path.join(ROOT, name)):
        pytest.fail(f"{command}\n{script} does not exist in the repository")
    monkeypatch.chdir(tmp_path)  # relative paths of the docs (runs/demo/...) resolve to nothing here
    if name in PARSERS:
        PARSERS[name](command, args, ranks, monkeypatch)
    else:
        parse_with_argparse(command, name, args, monkeypatch)
    if name == "tools/repro.py" and "--" in args:
        parse_train(command, args[args.index("--") + 1 :], 1, monkeypatch)


def test_command_extraction_finds_the_guides_commands():
    """The extraction sees the guide's commands: the demo, an evaluation, a benchmark, the
    miniature runner, an export, a torchrun line with its number of ranks, and the real run's
    commands with their shell variables expanded."""
    scripts = {(os.path.normpath(classify(c.argv)[1]), c.doc) for c in SCRIPT_COMMANDS}
    for script in ("train.py", "eval.py", "bench.py", "tools/repro.py", "model.py"):
        assert (script, "README.md") in scripts, f"README.md: no ```bash command of {script} found"
    assert ("tasks.py", "docs/usage.md") in scripts
    ranks = {classify(c.argv)[3] for c in SCRIPT_COMMANDS if c.argv[0] == "torchrun"}
    assert 8 in ranks, ranks
    real = [c for c in SCRIPT_COMMANDS if c.doc == "docs/real_run.md" and "train.py" in c.argv]
    assert real and "--max_turns" in real[0].argv and not any("$" in w for w in real[0].argv), real


# ---------------------------------------------------------------- running the commands that can run here


@pytest.fixture(scope="module")
def tiny():
    """An untrained tiny policy and its tokenizer, built in code."""
    import model as policies

    tokenizer = policies.tiny_tokenizer()
    return policies.tiny_model(tokenizer, seed=0), tokenizer


def demo_tree(root, tiny):
    """A directory shaped like the demo's after `python train.py`: runs/demo/checkpoints/step_0 and
    step_40 (an untrained tiny model), and metrics.jsonl files (the real run's) under runs/demo and
    runs/grpo."""
    import model as policies

    for step in (0, 40):
        policies.save_policy(*tiny, str(root / "runs" / "demo" / "checkpoints" / f"step_{step}"))
    for run in ("demo", "grpo"):
        (root / "runs" / run).mkdir(parents=True, exist_ok=True)
        metrics = os.path.join(ROOT, "docs", "real_run", "metrics.jsonl")
        shutil.copy(metrics, root / "runs" / run / "metrics.jsonl")


# Small overrides for commands that sample: a few problems, short turns.
EVAL_SMALL = ["--limit", "4", "--max_turn_tokens", "24", "--max_total_tokens", "192", "--sandbox_workers", "2"]
TRAIN_SMALL = [
    "--sft_steps",
    "8",
    "--sft_check_every",
    "0",
    "--sft_stop_at",
    "0",
    "--max_steps",
    "1",
    "--prompts_per_step",
    "2",
    "--group_size",
    "2",
    "--eval_size",
    "2",
    "--toy_size",
    "40",
    "--max_turn_tokens",
    "24",
    "--max_total_tokens",
    "160",
    "--sandbox_workers",
    "2",
]


def runnable_here(cfg):
    """Whether an eval.py configuration reads only what exists here (relative to the working
    directory): its model, its data sets, and the reports or metrics it shows, compares or plots."""
    paths = [*(d for d in cfg.data if d != "toy"), *cfg.compare, *cfg.plot, *([cfg.show] if cfg.show else [])]
    paths += [cfg.model] if cfg.model and cfg.model != "demo" else []
    return all(os.path.exists(p) for p in paths)


@pytest.mark.parametrize(
    "docs", [pytest.param(("README.md",), id="README.md"), pytest.param(DOCS, id="docs", marks=pytest.mark.slow)]
)
def test_the_commands_that_can_run_here_run(docs, tiny, tmp_path, monkeypatch):
    """In a directory shaped like the demo's run, the documented commands that need nothing absent
    here run for real, in document order (each may read what an earlier one wrote), and exit 0:
    eval.py's evaluations (on 4 problems with short turns), --compare, --show, --html and --plot;
    model.py export (of a tiny checkpoint made where the command's source is); tasks.py; and, in
    the slow variant, train.py's demo commands with a tiny configuration."""
    demo_tree(tmp_path, tiny)
    monkeypatch.chdir(tmp_path)
    ran = []
    for command in [c for c in SCRIPT_COMMANDS if c.doc in docs]:
        _, script, args, ranks = classify(command.argv)
        name, extra = os.path.normpath(script), []
        if ranks > 1 or command.env:
            continue
        if name == "eval.py":
            cfg = parse_eval(command, args, ranks, monkeypatch)
            if not runnable_here(cfg):
                continue
            extra = EVAL_SMALL if cfg.data else []
        elif name == "model.py" and args[:1] == ["export"]:
            source = args[1]
            if not os.path.exists(source):
                import model as policies

                policies.save_policy(*tiny, source)
        elif name == "train.py" and len(docs) > 1:
            cfg = parse_train(command, args, ranks, monkeypatch)
            if cfg.model != "demo" or cfg.data != "toy":
                continue
            extra = [*TRAIN_SMALL, "--out_dir", str(tmp_path / "train" / str(command.line))]
        elif name != "tasks.py":
            continue
        done = run_here([sys.executable, os.path.join(ROOT, name), *args, *extra])
        assert done.returncode == 0, f"{command}\nexit {done.returncode}: {done.stderr[-3000:]}"
        ran.append(str(command))
    assert any("eval.py" in r for r in ran) and any("model.py export" in r for r in ran), ran
    if len(docs) > 1:
        assert any("--compare" in r for r in ran) and any("--show" in r for r in ran), ran
        assert any("train.py" in r for r in ran) and any("tasks.py" in r for r in ran), ran


# ---------------------------------------------------------------- links


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    """The anchors of a Markdown file's headings (outside code blocks)."""
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", [d for d in DOCS if os.path.exists(os.path.join(ROOT, d))])
def test_every_relative_link_leads_somewhere(doc):
    """Every relative link and image of the guide and docs/ names a file that exists, and every
    #anchor a heading of that file."""
    path = os.path.join(ROOT, doc)
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(linked):
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(linked, ROOT)}")
    assert not broken, f"{doc}: {broken}"
