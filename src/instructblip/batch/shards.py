"""Many processes on one output: ranks, their part files, and the merge into one file.

Under torchrun every rank answers the records whose id key falls to it (key % world size; `records.id_key`), and
appends to a part file of its own, `OUT.rank-00003-of-00008.jsonl` for rank 3 of 8 and OUT = `OUT.jsonl`. A rerun
reads OUT and every part file (of any world size) to find what is done, so a killed rank loses nothing and the world
size may change between runs. When all ranks are done, rank 0 merges OUT and the parts into OUT, each id once (its
last line), through a temporary file renamed over OUT, and then deletes the parts.

The process group (gloo, also on GPU machines: it carries a barrier and a few counts, never tensors of the model)
is set up from torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from array import array
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from instructblip.batch.records import output_lines

# The barrier before the merge waits for the slowest rank; torchrun ends every rank when one dies, so a long
# timeout cannot hang a failed run.
BARRIER_TIMEOUT = timedelta(days=1)


def part_path(output: str, rank: int, world: int) -> str:
    """`out.jsonl` -> `out.rank-00003-of-00008.jsonl` (rank 3 of 8)."""
    root, ext = os.path.splitext(output)
    return f"{root}.rank-{rank:05d}-of-{world:05d}{ext or '.jsonl'}"


def part_files(output: str) -> list[str]:
    """The part files of `output` left by runs of any world size, in (world size, rank) order."""
    root, ext = os.path.splitext(output)
    ext = ext or ".jsonl"
    pattern = re.compile(re.escape(os.path.basename(root)) + r"\.rank-(\d{5})-of-(\d{5})" + re.escape(ext) + "$")
    found = []
    for path in glob.glob(glob.escape(root) + ".rank-*-of-*" + glob.escape(ext)):
        match = pattern.match(os.path.basename(path))
        if match:
            found.append((int(match.group(2)), int(match.group(1)), path))
    return [path for _, _, path in sorted(found)]


# ----------------------------------------------------------------------------------------------------------------------
# the process group


@dataclass
class Dist:
    """This process's place: rank, world size and the rank on this machine (which GPU it uses)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def init_distributed() -> Dist:
    """The process group from torchrun's environment (gloo), or a single process when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(place: Dist) -> None:
    if place.world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_sum(place: Dist, values: list[int]) -> list[int]:
    """Each value summed over the ranks."""
    if place.world <= 1:
        return list(values)
    import torch
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(total)
    return total.tolist()


def close_distributed(place: Dist) -> None:
    if place.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# merging


@dataclass
class MergeReport:
    records: int  # ids in the merged output
    failed: int  # of which the last line carries an error
    parts: int  # part files merged and removed


def merge(output: str) -> MergeReport:
    """Merge `output` and its part files into `output`: each id once, its last line (output first, then the parts in
    order), in the order those lines come. Atomic: a temporary file beside `output` is renamed over it, so a crash
    leaves the old output and the parts as they were. Memory: 17 bytes per line read, the lines themselves
    streamed."""
    parts = part_files(output)
    # the sizes now: both passes read the same bytes even if something appends meanwhile
    sources = [(path, os.path.getsize(path)) for path in (output, *parts) if os.path.exists(path)]
    # pass 1: which line (its number among all valid lines) is the last of each id
    keys, errors = array("Q"), bytearray()
    for path, size in sources:
        for _, key, error in output_lines(path, size):
            keys.append(key)
            errors.append(error)
    reversed_keys = np.frombuffer(keys, dtype=np.uint64)[::-1]
    _, first = np.unique(reversed_keys, return_index=True)
    keep = np.sort(len(keys) - 1 - first)  # numbers of the lines to keep, ascending
    failed = int(np.frombuffer(bytes(errors), dtype=np.bool_)[keep].sum()) if len(keep) else 0
    del keys, errors, reversed_keys, first
    # pass 2: copy those lines
    folder = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".merging", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            number, at = 0, 0
            for path, size in sources:
                for raw, _, _ in output_lines(path, size):
                    if at < len(keep) and keep[at] == number:
                        out.write(raw)
                        at += 1
                    number += 1
            out.flush()
            os.fsync(out.fileno())
        if os.path.exists(output):  # mkstemp's file is 0600: give it the output's mode, or a new file's
            os.chmod(tmp, os.stat(output).st_mode & 0o777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for path in parts:  # their lines are in `output` now; a crash before this only leaves lines merged twice
        os.unlink(path)
    return MergeReport(records=len(keep), failed=failed, parts=len(parts))
