"""The ADE20K-C builder's earlier name: `data/make_corrupted.py` (`--dataset ade20k`, the default) under it.

    python data/make_ade20k_c.py --ade_root PATH/ADEChallengeData2016 --out PATH/ade20k_c [...]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from data.make_corrupted import *  # noqa: E402,F401,F403 (the builder's API under its old name)
from data.make_corrupted import (RECORD, BuildError, build, check_ade_root, corrupt_image, fit_size,  # noqa: E402,F401
                                 job_seed, main, plan, run_job)

if __name__ == "__main__":
    main()
