"""`instructblip batch` at scale (instructblip/batch/): torchrun shards with a killed rank, Ray Data, exit codes and
--retry-failed, the path checks, parquet input, the merge, and memory that stays flat in the number of records.

The model is the small one shipped inside (trained on easy-vqa), on easy-vqa test images."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ENV["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])
GREEDY = ["--num-beams", "1", "--max-new-tokens", "6"]


def easy_vqa_records(n: int, start: int = 0) -> list[dict]:
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [{"id": f"q{i}", "image": paths[image_ids[i]], "instruction": questions[i]} for i in range(start, start + n)]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch(*args, timeout=300):
    """The command in a fresh process (for what must be a process of its own: torchrun's ranks)."""
    return subprocess.run([sys.executable, "-m", "instructblip", "batch", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def cli(capsys, *args) -> tuple[int, str]:
    """The command in this process (no interpreter start-up): (exit status, stderr)."""
    from instructblip.cli import main

    capsys.readouterr()
    code = main(["batch", *map(str, args)])
    return code, capsys.readouterr().err


def answers(path) -> dict:
    return {r["id"]: r.get("answer", r.get("error")) for r in read_jsonl(path)}


# ----------------------------------------------------------------------------------------------------------------------
# torchrun


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank, read from /proc."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_torchrun_with_a_killed_rank_finishes_on_rerun_with_the_single_process_answers(tmp_path, capsys):
    n = 32
    write_jsonl(tmp_path / "in.jsonl", easy_vqa_records(n))
    # one record per batch, so that rank 1 is still running when it is killed after its first lines
    flags = [*GREEDY, "--batch-size", "1"]
    code, _ = cli(capsys, tmp_path / "in.jsonl", "-o", tmp_path / "single.jsonl", *flags)
    assert code == 0
    output = tmp_path / "out.jsonl"
    part1 = tmp_path / "out.rank-00001-of-00002.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "instructblip", "batch", str(tmp_path / "in.jsonl"), "-o", str(output), *flags]
    torchrun = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not part1.exists() or part1.read_text().count("\n") < 2):
        time.sleep(0.01)
    pid = _rank_pid(torchrun.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert torchrun.wait(timeout=120) != 0  # torchrun ends the other rank and fails
    written = part1.read_text().count("\n")
    assert 2 <= written < n // 2 - 2  # killed mid-run (a precondition of the test); about n / 2 records are rank 1's
    assert not output.exists()  # no merge happened
    with open(part1, "a") as f:
        f.write('{"id": "q0", "answer": "tor')  # what a kill in the middle of a write could leave

    # the progress bar forced on: rank 0's counts the records of both ranks
    rerun = subprocess.run(command, env={**ENV, "INSTRUCTBLIP_PROGRESS": "1"}, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "already answered" in rerun.stderr and "merged 2 part files" in rerun.stderr
    todo = sum(int(m) for m in re.findall(r"rank \d of 2: \d+ records, \d+ already answered in \S+, (\d+) to do",
                                          rerun.stderr))
    assert 0 < todo < n and f"{todo}/{todo}" in rerun.stderr, rerun.stderr
    rows = read_jsonl(output)
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(n))  # each id exactly once
    assert answers(output) == answers(tmp_path / "single.jsonl")
    assert not list(tmp_path.glob("out.rank-*"))  # the parts are merged and gone
    code, err = cli(capsys, tmp_path / "in.jsonl", "-o", output, *flags)
    assert code == 0 and f"{n} already answered" in err and "0 to do" in err


# ----------------------------------------------------------------------------------------------------------------------
# Ray Data


def test_ray_data_gives_the_single_process_answers(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    from instructblip.batch import BatchConfig, run

    records = easy_vqa_records(12, start=100)
    records[3]["image"] = "missing.png"  # relative to the input file: an error row, not a failed run
    write_jsonl(tmp_path / "in.jsonl", records)
    generation = {"num_beams": 1, "max_new_tokens": 6}
    run(BatchConfig(str(tmp_path / "in.jsonl"), str(tmp_path / "single.jsonl"), generation=generation),
        log=lambda _: None)
    expected = answers(tmp_path / "single.jsonl")
    assert "missing.png" in expected["q103"]
    (tmp_path / "ray.jsonl").write_text(json.dumps({"id": "q100", "answer": expected["q100"]}) + "\n")  # resumed

    # the actors import this checkout's package, wherever Ray starts them
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}})
    try:
        # `--ray`: the input read by Ray Data, map_batches(InstructBlipPredictor) on a pool of 2 model actors
        code, err = cli(capsys, tmp_path / "in.jsonl", "-o", tmp_path / "ray.jsonl", "--ray", "--ray-actors", "2",
                        "--batch-size", "4", *GREEDY)
    finally:
        ray.shutdown()
    assert code == 1 and "1 of 12 records failed" in err  # the missing image
    assert answers(tmp_path / "ray.jsonl") == expected
    assert len(read_jsonl(tmp_path / "ray.jsonl")) == 12  # q100 was not answered again


# ----------------------------------------------------------------------------------------------------------------------
# exit codes, retries, checks


def test_exit_codes_retry_failed_and_merge(tmp_path, capsys):
    records = easy_vqa_records(6, start=200)
    image = records[2]["image"]
    records[2]["image"] = str(tmp_path / "later.png")
    write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    code, err = cli(capsys, tmp_path / "in.jsonl", "-o", out, *GREEDY)
    assert code == 1
    assert "1 of 6 records failed" in err and "--retry-failed" in err
    assert "later.png" in answers(out)["q202"]
    code, err = cli(capsys, tmp_path / "in.jsonl", "-o", out, *GREEDY)  # still failed: not retried without the flag
    assert code == 1 and "0 to do" in err
    with open(image, "rb") as src, open(tmp_path / "later.png", "wb") as dst:  # the image is restored
        dst.write(src.read())
    code, err = cli(capsys, tmp_path / "in.jsonl", "-o", out, "--retry-failed", *GREEDY)
    assert code == 0, err
    assert "1 to do" in err
    lines = read_jsonl(out)
    assert [r["id"] for r in lines].count("q202") == 2 and "answer" in lines[-1]  # appended: the last line counts
    code, err = cli(capsys, tmp_path / "in.jsonl", "-o", out, *GREEDY)
    assert code == 0 and "0 to do" in err
    code, err = cli(capsys, "--merge", out)
    assert code == 0, err
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in records)
    assert all("answer" in r for r in rows)


def test_path_checks_come_before_the_model_loads(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", easy_vqa_records(2))
    cases = [
        (["-o", tmp_path / "in.jsonl"], "is the input file"),
        (["-o", tmp_path / "no" / "such" / "out.jsonl"], "does not exist; create it first"),
        (["-o", tmp_path], "is a folder"),
    ]
    for args, message in cases:
        # a model that does not exist: had it been loaded first, the error would name it
        code, err = cli(capsys, tmp_path / "in.jsonl", *args, "--model", tmp_path / "no-model")
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "no-model" not in lines[0], lines
    assert (tmp_path / "in.jsonl").read_text().count("\n") == 2  # the input untouched
    (tmp_path / "locked").mkdir()
    os.chmod(tmp_path / "locked", 0o500)
    try:
        if not os.access(tmp_path / "locked", os.W_OK):  # root may write anywhere
            code, err = cli(capsys, tmp_path / "in.jsonl", "-o", tmp_path / "locked" / "o.jsonl", "--model",
                            tmp_path / "no-model")
            assert code == 2 and "not writable" in err and "no-model" not in err
    finally:
        os.chmod(tmp_path / "locked", 0o700)
    for args, message in [([tmp_path, "-o", tmp_path / "o.jsonl"], "--instruction"),
                          ([tmp_path / "none.jsonl", "-o", tmp_path / "o.jsonl"], "no such file"),
                          (["-o", tmp_path / "o.jsonl"], "needs INPUT"),
                          ([tmp_path / "in.jsonl", "-o", tmp_path / "o.jsonl", "--num-workers", "-1"], "--num-workers"),
                          (["--merge", tmp_path / "nothing.jsonl"], "neither")]:
        code, err = cli(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert message in err
    # the whole command: one line on stderr, status 2, no traceback
    out = batch(tmp_path / "in.jsonl", "-o", tmp_path / "in.jsonl")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "is the input file" in out.stderr


def test_workers_parquet_and_progress_give_the_same_answers(tmp_path, capsys, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    records = easy_vqa_records(10, start=300)
    write_jsonl(tmp_path / "in.jsonl", records)
    code, plain = cli(capsys, tmp_path / "in.jsonl", "-o", tmp_path / "plain.jsonl", *GREEDY, "--num-workers", "0")
    assert code == 0, plain
    assert "rec/s" not in plain  # stderr is not a terminal: no bar
    monkeypatch.setenv("INSTRUCTBLIP_PROGRESS", "1")
    code, pooled = cli(capsys, tmp_path / "in.jsonl", "-o", tmp_path / "pooled.jsonl", *GREEDY, "--num-workers", "2",
                       "--batch-size", "3")
    assert code == 0, pooled
    assert "rec/s" in pooled and "10/10" in pooled  # tqdm's bar, forced on without a terminal
    from instructblip import progress

    monkeypatch.setattr(progress, "_disabled", False)  # --no-progress turns bars off for the process: undone after
    code, quiet = cli(capsys, tmp_path / "in.jsonl", "-o", tmp_path / "quiet.jsonl", *GREEDY, "--no-progress")
    assert code == 0 and "rec/s" not in quiet
    assert answers(tmp_path / "pooled.jsonl") == answers(tmp_path / "plain.jsonl")
    order = [r["id"] for r in read_jsonl(tmp_path / "pooled.jsonl")]
    assert order[:6] == ["q300", "q302", "q304", "q301", "q303", "q305"]  # each worker its own batches, in turns
    monkeypatch.delenv("INSTRUCTBLIP_PROGRESS")

    # parquet: image bytes in `datasets`' {"bytes", "path"} layout, or a path
    def image(i, path):
        with open(path, "rb") as f:
            return {"bytes": f.read(), "path": None} if i % 2 else {"bytes": None, "path": path}

    images = [image(i, r["image"]) for i, r in enumerate(records)]
    table = pa.table({"id": [r["id"] for r in records], "image": images,
                      "instruction": [r["instruction"] for r in records]})
    pq.write_table(table, tmp_path / "in.parquet")
    code, err = cli(capsys, tmp_path / "in.parquet", "-o", tmp_path / "parquet.jsonl", *GREEDY, "--num-workers", "1")
    assert code == 0, err
    assert answers(tmp_path / "parquet.jsonl") == answers(tmp_path / "plain.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# the machinery without a model


def test_merge_keeps_the_last_line_of_each_id_and_skips_torn_lines(tmp_path):
    from instructblip.batch.records import OutputIndex, cut_torn_tail, id_key
    from instructblip.batch.shards import merge, part_files, part_path

    out = str(tmp_path / "out.jsonl")
    (tmp_path / "out.jsonl").write_text('{"id": 1, "error": "x"}\n{"id": "1", "answer": "str id"}\n')
    (tmp_path / "out.rank-00000-of-00002.jsonl").write_text('{"id": 2, "answer": "a"}\n{"id": 1, "answer": "b"}\n')
    (tmp_path / "out.rank-00001-of-00002.jsonl").write_text('{"id": 3, "error": "y"}\n{"id": 3, "ans')
    assert part_path(out, 1, 2) == str(tmp_path / "out.rank-00001-of-00002.jsonl")
    assert len(part_files(out)) == 2
    index = OutputIndex.scan([out, *part_files(out)])
    assert index.status(id_key(1)) == "done" and index.status(id_key(3)) == "failed"
    assert index.status(id_key(4)) is None and index.status(id_key("1")) == "done"
    report = merge(out)
    assert (report.records, report.failed, report.parts) == (4, 1, 2)
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [(r["id"], r.get("answer", r.get("error"))) for r in rows] == [("1", "str id"), (2, "a"), (1, "b"),
                                                                          (3, "y")]
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]  # no temporary file, no parts
    (tmp_path / "t.jsonl").write_bytes(b'{"id": 1}\n{"id": 2, "ans')
    cut_torn_tail(str(tmp_path / "t.jsonl"))
    assert (tmp_path / "t.jsonl").read_bytes() == b'{"id": 1}\n'


MEMORY_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    from instructblip.batch.loader import RecordStream
    from instructblip.batch.records import OutputIndex

    def probe(n, folder):
        os.makedirs(folder)
        with open(f"{folder}/in.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": i, "image": f"images/{i:08d}.png", "instruction": "What colour is the "
                                    "shape in this picture?"}) + "\\n")
        with open(f"{folder}/out.jsonl", "w") as f:  # half of them answered already
            for i in range(0, n, 2):
                f.write(json.dumps({"id": i, "image": "x.png", "instruction": "?", "answer": "blue " * 20}) + "\\n")
        pixels = np.zeros((3, 4, 4), np.float32)
        index = OutputIndex.scan([f"{folder}/out.jsonl"])
        stream = RecordStream(f"{folder}/in.jsonl", None, lambda image: pixels, rank=1, world=2, index=index)
        plan = stream.plan()
        seen = sum(1 for item in stream)
        assert plan.todo == seen, (plan, seen)
        return seen, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    small, small_peak = probe(1_000, sys.argv[1] + "/small")
    large, large_peak = probe(100_000, sys.argv[1] + "/large")
    print(json.dumps({"seen": [small, large], "grew_mb": [small_peak - start, large_peak - start]}))
""")


def test_memory_is_flat_in_the_number_of_records(tmp_path):
    """Reading, resuming and sharding 100,000 records holds the index of the output's ids (9 bytes an id), not the
    records or the answers: peak memory grows by a few MB more than over a thousand records. A list of the records
    alone would take ~40 MB; the answers read back on resume ~15 MB."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                         env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert 200 < result["seen"][0] < 300 and 20_000 < result["seen"][1] < 30_000  # rank 1's half of the unanswered
    small, large = result["grew_mb"]
    assert large - small < 8, result
