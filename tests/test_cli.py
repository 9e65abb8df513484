"""The `instructblip` command end to end (subprocesses) and the Python API on a tiny checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoint import make_full_checkpoint

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_full_checkpoint(tmp_path_factory.mktemp("tiny-t5"), "t5")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from assets import photo

    d = tmp_path_factory.mktemp("images")
    paths = []
    for name in ("astronaut", "chelsea", "coffee"):
        path = d / f"{name}.jpg"
        Image.fromarray(photo(name)).convert("RGB").save(path)
        paths.append(path)
    return paths


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "instructblip", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_ask_and_caption_match_the_python_api(ckpt, images):
    import instructblip

    vlm = instructblip.load(ckpt)
    expected = vlm.ask(images[0], "What is in the picture?", max_new_tokens=8, num_beams=2)
    out = run("ask", images[0], "What is in the picture?", "--model", ckpt, "--max-new-tokens", 8, "--num-beams", 2)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected and expected  # random tiny weights: some text, the same both ways
    captions = vlm.caption(images[:2], max_new_tokens=6, min_new_tokens=2)
    out = run("caption", *images[:2], "--model", ckpt, "--max-new-tokens", 6, "--min-new-tokens", 2)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [f"{p}\t{c}" for p, c in zip(images[:2], captions, strict=True)]
    streamed = run("ask", images[1], "Describe it.", "--model", ckpt, "--stream", "--max-new-tokens", 6)
    assert streamed.returncode == 0 and streamed.stdout.strip() == vlm.ask(
        images[1], "Describe it.", max_new_tokens=6, num_beams=1)


def test_api_accepts_paths_pil_arrays_and_bytes(ckpt, images):
    import instructblip

    vlm = instructblip.load(ckpt)
    pil = Image.open(images[0]).convert("RGB")
    forms = [images[0], str(images[0]), pil, np.asarray(pil), images[0].read_bytes()]
    answers = {vlm.ask(f, "What is this?", max_new_tokens=5, num_beams=1) for f in forms}
    assert len(answers) == 1
    ranking = vlm.rank(images[0], "Is this a cat?", ["yes", "no", "maybe"])
    assert ranking.best in ("yes", "no", "maybe") and set(ranking.scores) == {"yes", "no", "maybe"}
    assert ranking.best == max(ranking.scores, key=ranking.scores.get)


def test_five_instructions_about_one_image_run_the_vision_encoder_once(ckpt, images):
    import instructblip

    vlm = instructblip.load(ckpt)
    calls = []
    vlm.model.vision_model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    questions = ["What is this?", "Where is it?", "What colour?", "How many?", "Why?"]
    cached = [vlm.ask(images[0], q, max_new_tokens=5) for q in questions]
    assert calls == [1]
    plain = instructblip.load(ckpt, vision_cache_size=0)
    assert [plain.ask(images[0], q, max_new_tokens=5) for q in questions] == cached


def test_batch_writes_every_record_once_and_reports_bad_ones(ckpt, images, tmp_path):
    records = [{"id": f"r{i}", "image": str(images[i % 3]), "instruction": f"Question {i}?"} for i in range(5)]
    lines = [json.dumps(r) for r in records]
    lines.insert(2, "{not json")
    lines.append(json.dumps({"id": "no-image", "instruction": "What?"}))
    lines.append(json.dumps({"id": "missing-file", "image": "nope.jpg", "instruction": "What?"}))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines.append(json.dumps({"id": "corrupt", "image": "bad.png", "instruction": "What?"}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = run("batch", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--model", ckpt,
              "--max-new-tokens", 4, "--batch-size", 3)
    assert out.returncode == 1, out.stderr  # some records failed
    assert "4 of 9 records failed" in out.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == len(by_id) == 9
    assert all("answer" in by_id[f"r{i}"] for i in range(5))
    assert "not JSON" in by_id["line-3"]["error"]
    assert "lacks image" in by_id["no-image"]["error"]
    assert "nope.jpg" in by_id["missing-file"]["error"]
    assert "error" in by_id["corrupt"]
    again = run("batch", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", "--model", ckpt)
    assert again.returncode == 1 and "0 to do" in again.stderr  # the failed ones are not retried without the flag


def test_batch_over_a_folder(ckpt, images, tmp_path):
    out = run("batch", images[0].parent, "--instruction", "What is this?", "--output", tmp_path / "o.jsonl",
              "--model", ckpt, "--max-new-tokens", 3)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]


def test_batch_resumes_after_sigkill(ckpt, images, tmp_path):
    n = 24
    records = [{"id": i, "image": str(images[i % 3]), "instruction": f"Tell me about picture {i}."} for i in range(n)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "instructblip", "batch", str(tmp_path / "in.jsonl"), "--output", str(output),
            "--model", str(ckpt), "--batch-size", "1", "--num-beams", "1", "--max-new-tokens", "40",
            "--min-new-tokens", "40"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not output.exists() or output.read_text().count("\n") < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = output.read_text().count("\n")
    assert 3 <= written < n  # killed mid-run (precondition of the test)
    with open(output, "a") as f:
        f.write('{"id": 999, "answer": "torn')  # what a kill in the middle of a write could leave
    out = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]  # every line valid JSON
    assert sorted(r["id"] for r in rows) == list(range(n))  # every record exactly once


@pytest.mark.parametrize("args,status,message", [
    (["ask", "missing.jpg", "What?"], 2, "missing.jpg: no such file"),
    (["ask", "{notimage}", "What?"], 2, "cannot identify|not an image|Unable"),
    (["ask", "{corrupt}", "What?"], 2, "truncated|corrupt|broken"),
    (["ask", "{image}", "What?", "--model", "no/such-model"], 2, "no/such-model"),
    (["ask", "{image}", "What?", "--num-beams", "0"], 2, "--num-beams must be at least 1"),
    (["batch", "{badjsonl}", "--output", "{out}"], 1, "1 of 1 records failed"),
    (["info", "{tmp}"], 2, "not a model checkpoint|config.json"),
    (["ask", "{image}", "What?", "--quantize", "int8", "--device", "cuda"], 2, "--quantize runs on the CPU only"),
])
def test_bad_input_gives_one_line_and_the_right_status(ckpt, images, tmp_path, args, status, message):
    (tmp_path / "notimage.jpg").write_text("hello")
    data = images[0].read_bytes()
    (tmp_path / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    subs = {"{notimage}": tmp_path / "notimage.jpg", "{corrupt}": tmp_path / "corrupt.jpg", "{image}": images[0],
            "{badjsonl}": tmp_path / "bad.jsonl", "{out}": tmp_path / "out.jsonl", "{tmp}": tmp_path}
    argv = [str(subs.get(a, a)) for a in args]
    if "--model" not in argv and argv[0] != "info":
        argv += ["--model", str(ckpt)]
    out = run(*argv)
    assert out.returncode == status, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    if argv[0] == "batch":  # the bad line is written with its error, and counted
        assert "error" in json.loads((tmp_path / "out.jsonl").read_text())
        assert message in out.stderr
    else:
        import re

        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and re.search(message, lines[0]), lines


def test_info_and_help(ckpt):
    out = run("info", ckpt)
    assert out.returncode == 0, out.stderr
    assert "query tokens" in out.stdout and "total" in out.stdout and "float32" in out.stdout
    table = out.stdout[out.stdout.index("memory to load"):]
    assert all(flag in table for flag in ("--dtype float32", "--dtype bfloat16", "--quantize int8", "--quantize int4"))
    assert table.count("  fits") == 4  # a tiny model fits every way
    assert "ask" in run("--help").stdout


SNIPPET = '''
{import_line}
import torch
from PIL import Image

model = InstructBlipForConditionalGeneration.from_pretrained("{ckpt}")
processor = InstructBlipProcessor.from_pretrained("{ckpt}")

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)
image = Image.open("{image}").convert("RGB")
prompt = "What is unusual about this image?"
inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)

outputs = model.generate(
    **inputs,
    do_sample=False,
    num_beams=5,
    max_length=256,
    min_length=1,
    top_p=0.9,
    repetition_penalty=1.5,
    length_penalty=1.0,
    temperature=1,
)
generated_text = processor.batch_decode(outputs, skip_special_tokens=True)[0].strip()
print(generated_text)
'''


def test_transformers_documentation_snippet_runs_with_only_the_import_changed(ckpt, images):
    texts = {}
    for lib in ("instructblip", "transformers"):
        line = f"from {lib} import InstructBlipProcessor, InstructBlipForConditionalGeneration"
        code = SNIPPET.format(import_line=line, ckpt=ckpt, image=images[0])
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        texts[lib] = out.stdout.strip().splitlines()[-1]
    assert texts["instructblip"] == texts["transformers"] and texts["instructblip"]  # T5: the same text


def test_module_and_console_script_agree():
    script = subprocess.run([os.path.join(os.path.dirname(sys.executable), "instructblip"), "serve", "--help"],
                            capture_output=True, text=True, env=ENV)
    module = run("serve", "--help")
    assert script.returncode == module.returncode == 0 and "--allow-remote-images" in script.stdout
    assert script.stdout == module.stdout


def test_default_model_is_used_when_none_is_named():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = run("ask", os.path.join(root, "examples", "chelsea.jpg"), "What is in this picture?", "--max-new-tokens", 5)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_info_of_a_hub_id_fetches_the_json_files_only(tmp_path, monkeypatch, capsys):
    """`info` on a hub id that is not in the cache asks the hub for the JSON files only (config, shard index), never
    the weights, and prints the sizes and the memory table from the config."""
    import huggingface_hub

    from instructblip.cli import main
    from instructblip.models.config import InstructBlipConfig

    asked = []

    def fake_download(repo_id, allow_patterns=None, **_):
        asked.append((repo_id, allow_patterns))
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir(exist_ok=True)
        data = InstructBlipConfig.from_name("vicuna-7b").to_dict() | {"torch_dtype": "float32"}
        (snapshot / "config.json").write_text(json.dumps(data))
        (snapshot / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"query_tokens": "model-00001-of-00004.safetensors"}}))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the weights' headers cannot be read
    assert main(["info", "Salesforce/instructblip-vicuna-7b"]) == 0
    out = capsys.readouterr().out
    assert asked == [("Salesforce/instructblip-vicuna-7b", ["*.json"])]
    assert "7,91" in out  # 7,914 M parameters in all
    assert "float32 (from config.json; the safetensors headers could not be read" in out
    assert all(flag in out for flag in ("--dtype bfloat16", "--quantize int8", "--quantize int4"))
