"""The ADE20K-C builder's earlier name: `data/make_corrupted.py` (`--dataset ade20k`, the default) under it.

    python data/make_ade20k_c.py --ade_root PATH/ADEChallengeData2016 --out PATH/ade20k_c [...]
"""
from __future__ import annotations

from data.make_corrupted import *  # noqa: F401,F403 (the builder's API under its old name)
from data.make_corrupted import (RECORD, BuildError, build, check_ade_root, corrupt_image, fit_size,  # noqa: F401
                                 job_seed, main, plan, run_job)

if __name__ == "__main__":
    main()
