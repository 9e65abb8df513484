"""The runner: `instructblip eval` end to end on the tiny checkpoint, resuming, refusing to mix settings, the Table 1
printout, missing data, and torchrun with 2 CPU processes giving what one process gives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from eval_fixtures import tiny_checkpoint, write_gqa, write_hatefulmemes

import instructblip
from instructblip import cli
from instructblip.evaluation.runner import evaluate, format_table

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint("t5")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, writer in (("gqa", write_gqa), ("hatefulmemes", write_hatefulmemes)):
        (root / name).mkdir()
        writer(root / name)
    return root


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_writes_predictions_and_results(ckpt, data, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["eval", "--model", str(ckpt), "--benchmark", "gqa", "--data", str(data / "gqa"),
                     "--output", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("gqa (testdev, 3 samples): accuracy ")
    records = lines(out / "gqa_testdev.predictions.jsonl")
    assert [r["id"] for r in records] == ["20968379", "20968380", "201307251"]  # the dataset's order
    assert records[0]["prompt"] == "Question: What is the woman wearing? Short answer:"
    assert records[0]["target"] == "suit" and isinstance(records[0]["prediction"], str)
    results = json.loads((out / "gqa_testdev.results.json").read_text())
    assert results["benchmark"] == "gqa" and results["split"] == "testdev" and results["model"] == str(ckpt)
    assert results["metric"] == "accuracy" and results["num_samples"] == 3
    assert results["settings"]["prompt"] == "Question: {question} Short answer:"
    assert results["settings"]["generation"]["num_beams"] == 5
    assert results["settings"]["image_processor"]["size"] == {"height": 224, "width": 224}
    assert results["paper"]["InstructBLIP (Vicuna-7B)"] == 49.2
    correct = sum(instructblip.evaluation.metrics.exact_match(r["prediction"], r["target"]) for r in records)
    assert results["score"] == pytest.approx(100 * correct / 3)


def test_an_interrupted_run_resumes(ckpt, data, tmp_path, monkeypatch):
    vlm = instructblip.load(ckpt, device="cpu")
    out = tmp_path / "out"
    real_generate = vlm.model.generate
    calls = []

    def dies_on_the_second_batch(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(**kwargs)

    monkeypatch.setattr(vlm.model, "generate", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(vlm, "gqa", data / "gqa", output_dir=out, batch_size=1, model_name="tiny")
    path = out / "gqa_testdev.predictions.jsonl"
    assert [r["id"] for r in lines(path)] == ["20968379"]  # the first batch was written at once
    assert not (out / "gqa_testdev.results.json").exists()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "2096838')  # as if a foreign writer had been cut off mid-line: ignored

    seen = []

    def counted(**kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        return real_generate(**kwargs)

    monkeypatch.setattr(vlm.model, "generate", counted)
    results = evaluate(vlm, "gqa", data / "gqa", output_dir=out, batch_size=1, model_name="tiny")
    assert seen == [1, 1]  # only the two samples left
    ids = [r["id"] for r in lines(path)]
    assert ids == ["20968379", "20968380", "201307251"]  # each once, in order
    assert results["num_samples"] == 3

    # a complete run is not redone; other settings are refused rather than mixed in
    seen.clear()
    again = evaluate(vlm, "gqa", data / "gqa", output_dir=out, batch_size=1, model_name="tiny")
    assert seen == [] and again["score"] == results["score"]
    with pytest.raises(ValueError, match="other settings.*model"):
        evaluate(vlm, "gqa", data / "gqa", output_dir=out, model_name="another model")


def test_all_prints_table1_and_skips_missing_data(ckpt, data, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["eval", "--model", str(ckpt), "--all", "--data", str(data), "--output", str(out), "--limit", "2",
                     "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "nocaps: skipped" in captured.err and "nocaps_val_4500_captions.json" in captured.err
    table = captured.out[captured.out.index("| Model"):].splitlines()
    header = [c.strip() for c in table[0].split("|")[1:-1]]
    assert header == ["Model", "NoCaps", "Flickr30K", "GQA", "VSR", "IconQA", "TextVQA", "Visdial", "HM", "VizWiz",
                      "SciQA", "MSVD-QA", "MSRVTT-QA", "iVQA"]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in table[2:]}
    assert rows["InstructBLIP (Vicuna-7B)"][0] == "123.1" and rows["Flamingo-3B"][0] == "–"
    ours = rows[f"**ours: {ckpt}**"]
    gqa = json.loads((out / "gqa_testdev.results.json").read_text())["score"]
    hm = json.loads((out / "hatefulmemes_dev_seen.results.json").read_text())["score"]
    assert ours[2] == f"{gqa:.1f}" and ours[7] == f"{hm:.1f}"
    assert [c for i, c in enumerate(ours) if i not in (2, 7)] == ["–"] * 11
    assert (out / "table1.md").read_text().strip() == "\n".join(table).strip()


def test_format_table_compares_with_the_matching_paper_row():
    table = format_table({"gqa": 50.0, "hatefulmemes": 60.0}, "Salesforce/instructblip-vicuna-7b").splitlines()
    delta = [r for r in table if r.startswith("| ours - InstructBLIP (Vicuna-7B)")][0]
    cells = [c.strip() for c in delta.split("|")[2:-1]]
    assert cells[2] == "+0.8" and cells[7] == "+0.4" and cells[0] == "–"


def test_missing_data_and_bad_arguments_exit_2(ckpt, tmp_path, capsys):
    code = cli.main(["eval", "--model", str(ckpt), "--benchmark", "gqa", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "testdev_balanced_questions.json" in err and "https://cs.stanford.edu/people/dorarud/gqa" in err
    assert cli.main(["eval", "--benchmark", "nope", "--data", str(tmp_path)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert cli.main(["eval", "--benchmark", "gqa", "--data", str(tmp_path / "absent")]) == 2
    assert cli.main(["eval", "--benchmark", "gqa", "--data", str(tmp_path), "--prompt", "{question}"]) == 2
    assert "easy-vqa only" in capsys.readouterr().err
    assert cli.main(["eval", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "visdial_1.0_val.json" in listing and "https://textvqa.org/dataset" in listing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(ckpt, data, tmp_path):
    """Data-parallel over 2 CPU processes (gloo) gives the same predictions files and metrics as one process: a
    generation benchmark (easy-vqa, from the package) and a ranking one (HatefulMemes fixture, AUC)."""
    args = ["-m", "instructblip", "eval", "--model", str(ckpt), "--benchmark", "easy-vqa,hatefulmemes", "--data",
            str(data), "--limit", "5", "--batch-size", "2", "--quiet"]
    one = subprocess.run([sys.executable, *args, "--output", str(tmp_path / "one")], capture_output=True, text=True,
                         env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), *args, "--output", str(tmp_path / "two")], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("easy-vqa (test, 5 samples)") == 1 and two.stdout.count("| Model") == 1  # rank 0
    for stem, n in (("easy-vqa_test", 5), ("hatefulmemes_dev_seen", 3)):
        predictions = f"{stem}.predictions.jsonl"
        assert (tmp_path / "two" / predictions).read_text() == (tmp_path / "one" / predictions).read_text()
        assert len(lines(tmp_path / "two" / predictions)) == n
        results = [json.loads((tmp_path / d / f"{stem}.results.json").read_text()) for d in ("one", "two")]
        assert results[0]["metrics"] == results[1]["metrics"]
        assert (results[0]["world_size"], results[1]["world_size"]) == (1, 2)
