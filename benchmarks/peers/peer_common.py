"""What every peer script shares: its command line and its peak-memory reading. Imported by
scripts that run inside the peers' virtual environments, so it needs nothing but the
standard library (the scripts' own directory is on their path)."""

from __future__ import annotations

import argparse
from pathlib import Path


def peer_parser() -> argparse.ArgumentParser:
    """MODEL_DIR CALIB.safetensors OUT_DIR --bits B --group-size G [--threads T] [--dtype D],
    as benchmarks/peers/run.py calls every script (benchmarks/gptq_time.py adds --dtype)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"],
        help="the dtype the model is loaded and calibrated in",
    )  # fmt: skip
    return ap


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
