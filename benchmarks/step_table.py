"""Step table: images/s, step time and peak memory of No XS / TAP / RRR / RBR beside the paper's Table 1,
and the MNIST protocol's wall time. The logic lives in :mod:`tap_fast.bench` (also ``tap-fast bench``).

    python benchmarks/step_table.py --help
    python benchmarks/step_table.py --device cpu --configs cnn2@28:64 cnn2@28:256 resnet18@64:16
"""
import sys

from tap_fast.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
