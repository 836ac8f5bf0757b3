#!/usr/bin/env python
"""Generate samples like the paper, resumably and on any number of processes:

    accelerate launch evaluation/generate.py --pipeline DIR_OR_REPO --num-samples 50000 --out samples.npz \\
        [--classifier-scale S] [--respacing ddim25 --use-ddim] [--batch-size B] [--seed 0]

Same as ``guided-pipelines generate`` (see ``guided_pipelines/generation.py``): sample i depends only
on (seed, i), finished batches are kept in OUT.parts/ so a killed run continues where it stopped, and
OUT is the original format (arr_0 uint8 NHWC, arr_1 labels) for ``guided-pipelines evaluate``."""

import sys

from guided_pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
