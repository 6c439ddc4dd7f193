"""train.py's command under torchrun, counting the weight files each rank reads, for
tests/test_train.py: only rank 0 may read them (the others get rank 0's weights by broadcast).
Usage: torchrun --nproc_per_node 2 tests/dist_train.py TRAIN_FLAGS... (writes
OUT_DIR/reads_rank{r}.json: the from_pretrained loads and safetensors files this rank read).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoint
import model
import parallel
import train

reads = {"from_pretrained": 0, "safetensors": 0}


def counted(name, fn):
    def call(*args, **kwargs):
        reads[name] += 1
        return fn(*args, **kwargs)

    return call


def main(cfg):
    train.main(cfg)
    with open(os.path.join(cfg.out_dir, f"reads_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(reads, f)


if __name__ == "__main__":
    auto = model.AutoModelForCausalLM
    auto.from_pretrained = counted("from_pretrained", auto.from_pretrained)
    checkpoint.load_file = counted("safetensors", checkpoint.load_file)
    parallel.run_command(main, train.parse_args(), prog="train.py", input_errors=train.INPUT_ERRORS)
