#!/usr/bin/env python
"""Evaluate a sample batch like the paper: ``python evaluation/evaluate.py REF.npz SAMPLES.npz``.

Same as ``guided-pipelines evaluate`` (see ``guided_pipelines/evaluator.py`` and
``docs/evaluate.md``): prints Inception Score, FID, sFID, Precision and Recall as the original
openai/guided-diffusion evaluator does, then N and FID_inf / IS_inf."""

import sys

from guided_pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
