"""What checksumming a checkpoint costs per GB, per rank: the manifest's SHA-256 against zlib's CRC-32
and BLAKE2b, and plain reading.

Each rank hashes the shards it has just written (`CheckpointManager.save`: the pages are still in
its node's cache, "warm") and, on resume, re-reads and hashes its share (`verify`: "cold", from
the file system). The shards here are random bytes written to `--dir` (put it on the file system
the runs use); the cold pass drops them from the page cache first (posix_fadvise DONTNEED).

    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint_checksum.py --gb 2 --files 4 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

CHUNK = 16 << 20


def sha256(path: Path) -> None:
    with open(path, "rb") as handle:
        hashlib.file_digest(handle, "sha256")  # what piip6b.engine.checkpoint.file_digest does


def blake2b(path: Path) -> None:
    with open(path, "rb") as handle:
        hashlib.file_digest(handle, "blake2b")


def crc32(path: Path) -> None:
    value = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            value = zlib.crc32(chunk, value)


def read_only(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(CHUNK):
            pass


def drop_from_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="total size of the shards")
    parser.add_argument("--files", type=int, default=4, help="number of shard files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write them (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="piip6b_checksum_") as tmp:
        per_file = int(args.gb * 1e9 / args.files)
        files = [Path(tmp) / f"bf16_zero_pp_rank_{i}_mp_rank_00_optim_states.pt" for i in range(args.files)]
        for path in files:
            with open(path, "wb") as handle:
                for start in range(0, per_file, CHUNK):
                    handle.write(os.urandom(min(CHUNK, per_file - start)))
        gb = per_file * args.files / 1e9
        print(f"{args.files} files, {gb:.2f} GB in {tmp}; seconds per GB (median of {args.repeats}):")
        print(f"{'':10s} {'warm (save)':>12s} {'cold (resume)':>14s}")
        for name, fn in (("read only", read_only), ("sha256", sha256), ("crc32", crc32), ("blake2b", blake2b)):
            timings = {}
            for cache in ("warm", "cold"):
                runs = []
                for _ in range(args.repeats):
                    for path in files:
                        drop_from_cache(path) if cache == "cold" else read_only(path)
                    started = time.perf_counter()
                    for path in files:
                        fn(path)
                    runs.append((time.perf_counter() - started) / gb)
                timings[cache] = statistics.median(runs)
            print(f"{name:10s} {timings['warm']:12.2f} {timings['cold']:14.2f}")


if __name__ == "__main__":
    main()
