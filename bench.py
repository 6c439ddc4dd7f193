"""Benchmarks that print figures measured side by side in one run (never asserted in tests).

    python bench.py advantages            # GTPO's advantage pipeline + loss vs GRPO's, N=1024 K=8 L=4096
    python bench.py sandbox               # sandbox call and session start-up vs a fresh `python -I -c`
    python bench.py rollout [--model DIR] # multi-turn rollout vs plain generate; log-prob memory
    python bench.py rewards               # grading throughput and shaping cost vs a rollout step
    python bench.py step [--model DIR]    # one RL step's time split, GTPO vs GRPO on the same rollouts
    python bench.py peer [--turns 3]      # TRL's GRPOTrainer vs ours, same model, data and reward;
                                          # --turns K: multi-turn tool calling on both sides
    python bench.py gpu MODEL_DIR         # the GPU check, ready to run (without a GPU: a CPU dry run)
    python bench.py dtype [--model DIR]   # fp32 vs bf16 compute: a rollout and an update pass

The benchmarks live in tools/: parts.py the first five, peer.py the side-by-side with TRL, gpu.py
the last two. Each alternates the variants it compares (A, B, A, B, ...), so that load from
elsewhere on a shared machine falls on both alike.
"""

import argparse

from tools import gpu, parts, peer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    for module in (parts, peer, gpu):
        module.add_parsers(sub)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
