#!/usr/bin/env python
"""What a fork costs the run's process while it holds the page-locked snapshot of the adapted weights.

    python bench/fork_cost.py --out bench/results      # on one GPU: seconds

The DataLoader forks its workers anew for every task. The snapshot of SD3-medium's float32 weights (8 GiB) is
page-locked memory registered with the driver (pipeline/dusa/engine.py host_copy), and Linux copies pages
pinned for DMA into a forked child instead of sharing them. Rows: a fork with no such buffer, with the buffer,
and with the buffer marked `keep_out_of_forks` (madvise MADV_DONTFORK), as host_copy now does; each the median
of --forks forks of a child that exits at once. Writes <out>/<date>-<card>-fork-cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Run as a script, Python puts bench/ first on the path, where bench/bench.py would stand in for the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from bench.layer_throughput import result_path  # noqa: E402
from pipeline.dusa.engine import fast_pinned_allocation, keep_out_of_forks  # noqa: E402
from pipeline.run.log import LOG  # noqa: E402


def fork_seconds(forks: int) -> float:
    times = []
    for _ in range(forks):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for <date>-<card>-fork-cost.json")
    parser.add_argument("--gib", type=float, default=8.0, help="size of the page-locked buffer")
    parser.add_argument("--forks", type=int, default=3, help="forks per row (the median is kept)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no GPU here: page-locked memory needs one")
    card = torch.cuda.get_device_name()
    weights = torch.ones(int(args.gib * 2**30) // 4, device="cuda")
    rows = {"no page-locked buffer": fork_seconds(args.forks)}
    fast_pinned_allocation()
    t0 = time.perf_counter()
    host = torch.empty(weights.shape, pin_memory=True)
    host.copy_(weights)
    rows["buffer made (s)"] = time.perf_counter() - t0
    rows[f"{args.gib:g} GiB registered page-locked buffer"] = fork_seconds(args.forks)
    kept = keep_out_of_forks(host)
    rows["the buffer kept out of forks"] = fork_seconds(args.forks)
    intact = bool(host[:: 1 << 20].eq(1).all())
    path = result_path(args.out, card, False, "fork-cost")
    path.write_text(json.dumps(dict(date=path.name[:10], card=card, torch=torch.__version__, fork_s=rows,
                                    madvise_ok=kept, buffer_intact=intact, command="python " + " ".join(
                                        [f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])), indent=1) + "\n")
    for name, seconds in rows.items():
        LOG.info(f"{name}: {seconds:.3f} s")
    LOG.info(f"saved {path}")


if __name__ == "__main__":
    main()
