#!/usr/bin/env python3
"""Evaluate a checkpoint on one split with timm's validate.py flag names: see :mod:`shared.validate`.

    python validate.py --checkpoint output/RUN/model_best.pth.tar --data-dir DATA --split test [--use-ema]
"""
import sys

from shared.validate import main

if __name__ == "__main__":
    sys.exit(main())
