"""What users of transformers, the hub and command lines expect: transformers' `from_pretrained` keywords against a
local hub cache, the image-text-to-text pipeline's output shape (transformers as the oracle), the built-in model's
notice, `info` reading headers only, one sampling rule for `ask` and the server, and the command line's manners."""

from __future__ import annotations

import http.server
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_checkpoint import make_full_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EASYVQA_IMAGE = ROOT / "examples" / "easyvqa-test-0.png"
REPO = "tiny-org/instructblip-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_full_checkpoint(tmp_path_factory.mktemp("tiny-t5"), "t5")


@pytest.fixture(scope="module")
def hub_cache(ckpt, tmp_path_factory):
    """A Hugging Face cache holding the tiny checkpoint as REPO at COMMIT, which `main` points to."""
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(ckpt, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    from assets import photo

    path = tmp_path_factory.mktemp("photo") / "chelsea.jpg"
    Image.fromarray(photo("chelsea")).convert("RGB").save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# from_pretrained with transformers' keywords


def _snippet(lib, name: str, image: Image.Image, **hub) -> str:
    """transformers' documented InstructBLIP snippet with the common keywords added."""
    model = lib.InstructBlipForConditionalGeneration.from_pretrained(
        name, torch_dtype=torch.float32, device_map="cpu", low_cpu_mem_usage=True, attn_implementation="eager", **hub)
    processor = lib.InstructBlipProcessor.from_pretrained(name, use_fast=True, **hub)
    inputs = processor(images=image, text="What is unusual about this image?", return_tensors="pt").to(model.device)
    outputs = model.generate(**inputs, do_sample=False, num_beams=5, max_length=256, min_length=1, top_p=0.9,
                             repetition_penalty=1.5, length_penalty=1.0, temperature=1)
    return processor.batch_decode(outputs, skip_special_tokens=True)[0].strip(), outputs


def test_documented_snippet_with_hub_keywords_gives_todays_tokens(ckpt, hub_cache, photo_path, monkeypatch):
    """Today's tokens: those of the snippet on the directory without keywords, which equal transformers' (test_cli).
    (transformers 5.23 itself, given this cache by cache_dir, reads the Q-Former tokenizer from the top folder
    instead of qformer_tokenizer/ and answers otherwise, so it is no oracle here.)"""
    import instructblip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = Image.open(photo_path).convert("RGB")
    today_text, today = _snippet(instructblip, str(ckpt), image)  # a plain directory, no keywords: as before
    text, tokens = _snippet(instructblip, REPO, image, revision="main", local_files_only=True, cache_dir=hub_cache,
                            token=False)
    assert torch.equal(tokens, today) and text == today_text and text
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))  # the cache found through HF_HOME, a commit by its prefix
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    text, tokens = _snippet(instructblip, REPO, image, revision=COMMIT[:10], local_files_only=True)
    assert torch.equal(tokens, today)


def test_hub_keywords_fail_clearly(hub_cache, tmp_path):
    from instructblip import CheckpointNotFoundError, InstructBlipForConditionalGeneration, InstructBlipProcessor
    from instructblip.hub import resolve_checkpoint_dir, resolve_config_dir

    # what `instructblip info` leaves in the cache (the JSON files, a shard index among them) is not a checkpoint
    snapshot = tmp_path / "hub" / "models--org--json-only" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    assert resolve_config_dir("org/json-only", cache_dir=tmp_path / "hub", local_files_only=True) == str(snapshot)
    with pytest.raises(CheckpointNotFoundError, match="not in the local Hugging Face cache"):
        resolve_checkpoint_dir("org/json-only", cache_dir=tmp_path / "hub", local_files_only=True)

    with pytest.raises(CheckpointNotFoundError, match="local_files_only.*hf download tiny-org/instructblip-tiny "
                                                      "--revision v9"):
        InstructBlipForConditionalGeneration.from_pretrained(REPO, revision="v9", local_files_only=True,
                                                             cache_dir=hub_cache)
    with pytest.raises(TypeError, match="trust_me.*torch_dtype.*device_map.*revision"):
        InstructBlipForConditionalGeneration.from_pretrained(REPO, trust_me=True, cache_dir=hub_cache)
    with pytest.raises(TypeError, match="padding_sid.*use_fast"):
        InstructBlipProcessor.from_pretrained(REPO, padding_sid="left", cache_dir=hub_cache)
    with pytest.raises(ValueError, match="flash_attention_2"):
        InstructBlipForConditionalGeneration.from_pretrained(REPO, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="disagree"):
        InstructBlipForConditionalGeneration.from_pretrained(REPO, dtype="bfloat16", torch_dtype=torch.float16)


def test_device_map_per_part_and_torch_dtype(ckpt):
    from instructblip import InstructBlipForConditionalGeneration as Model

    plain = Model.from_pretrained(ckpt)
    mapped = Model.from_pretrained(ckpt, device_map={"vision_model": "cpu", "language_model": "cpu", "": "cpu"})
    g = torch.Generator().manual_seed(0)
    inputs = dict(pixel_values=torch.randn(1, 3, 224, 224, generator=g), qformer_input_ids=torch.tensor([[101, 102]]),
                  input_ids=torch.tensor([[32100] * 4 + [37, 1]]), decoder_input_ids=torch.tensor([[0, 5]]))
    assert torch.equal(plain(**inputs).logits, mapped(**inputs).logits)
    half = Model.from_pretrained(ckpt, torch_dtype=torch.bfloat16, device_map="cpu")
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    with pytest.raises(ValueError, match="does not place query_tokens, qformer, language_projection"):
        Model.from_pretrained(ckpt, device_map={"vision_model": "cpu", "language_model": "cpu"})
    with pytest.raises(ValueError, match="'decoder'.*not parts of the model"):
        Model.from_pretrained(ckpt, device_map={"decoder": "cpu", "": "cpu"})
    with pytest.raises(ValueError, match="offloading is not supported"):
        Model.from_pretrained(ckpt, device_map={"": "disk"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_map_splits_the_model_over_devices(ckpt, photo_path):
    """The vision side on the GPU, the language model on the CPU (or the second GPU): the forward pass and generate
    move the activations between them and give what one device gives."""
    import instructblip
    from instructblip import InstructBlipForConditionalGeneration as Model

    other = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    split = Model.from_pretrained(ckpt, device_map={"vision_model": 0, "query_tokens": 0, "qformer": 0,
                                                    "language_projection": other, "language_model": other})
    assert split.vision_model.patch_embed.weight.device.type == "cuda"
    assert str(split.language_model.lm_head.weight.device) == other
    plain = Model.from_pretrained(ckpt)
    processor = instructblip.InstructBlipProcessor.from_pretrained(ckpt)
    inputs = processor(images=Image.open(photo_path), text="What is this?", return_tensors="pt")
    torch.testing.assert_close(split(**inputs, decoder_input_ids=torch.tensor([[0, 5]])).logits.cpu(),
                               plain(**inputs, decoder_input_ids=torch.tensor([[0, 5]])).logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(split.generate(**inputs.to("cuda:0"), max_new_tokens=5).cpu(),
                       plain.generate(**inputs.to("cpu"), max_new_tokens=5))


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline


def _same_shape(ours, theirs) -> None:
    """Equal nesting, keys and types, all the way down."""
    assert type(ours) is type(theirs), (ours, theirs)
    if isinstance(ours, list):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _same_shape(a, b)
    elif isinstance(ours, dict):
        assert set(ours) == set(theirs)
        for key in ours:
            if key != "image":  # the image part of a chat is the caller's object, handed back
                _same_shape(ours[key], theirs[key])


def test_pipeline_output_equals_transformers_pipeline(ckpt, photo_path):
    import transformers

    import instructblip

    theirs = transformers.pipeline("image-text-to-text", model=str(ckpt), device="cpu")
    ours = instructblip.pipeline("image-text-to-text", model=ckpt, device="cpu")
    image = Image.open(photo_path).convert("RGB")
    greedy = {"num_beams": 1, "repetition_penalty": 1.0}
    calls = [
        ((image,), {"text": "What is this?"}),
        ((image,), {"text": "What is this?", "return_full_text": False}),
        ((), {"images": [image, image.rotate(90)], "text": ["What is this?", "Where is it?"]}),
    ]
    for args, kwargs in calls:
        expected = theirs(*args, **kwargs, max_new_tokens=6, generate_kwargs=dict(greedy))
        got = ours(*args, **kwargs, max_new_tokens=6, generate_kwargs=dict(greedy))
        _same_shape(got, expected)
        assert got == expected
    vlm_answer = instructblip.load(ckpt)(image, "What is this?", max_new_tokens=6, generate_kwargs=dict(greedy))
    assert vlm_answer == ours(image, text="What is this?", max_new_tokens=6, generate_kwargs=dict(greedy))

    # chats: transformers needs a chat template (InstructBLIP ships none): the instruction's text alone
    theirs.processor.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
                                      "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    for text in (chat, [chat, chat]):
        for full in (True, False):
            expected = theirs(text=text, max_new_tokens=6, generate_kwargs=dict(greedy), return_full_text=full)
            got = ours(text=text, max_new_tokens=6, generate_kwargs=dict(greedy), return_full_text=full)
            _same_shape(got, expected)


# ----------------------------------------------------------------------------------------------------------------------
# The built-in model


def test_unlike_easyvqa_tells_photos_from_easyvqa_pictures():
    from assets import photo

    from instructblip.api import unlike_easyvqa

    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        assert unlike_easyvqa(photo(name)) is not None, name
    small = Image.fromarray(photo("astronaut")).resize((64, 64))  # a photo at easy-vqa's size: its colours tell
    assert "colour" in unlike_easyvqa(small) or "pale" in unlike_easyvqa(small)
    assert unlike_easyvqa(EASYVQA_IMAGE) is None
    try:
        import easy_vqa
    except ImportError:
        return
    folder = Path(easy_vqa.__file__).parent / "data" / "test" / "images"
    for path in sorted(folder.glob("*.png"))[:200]:
        assert unlike_easyvqa(path) is None, path


def test_builtin_model_notice_once_per_process_on_stderr_and_a_warning_for_photos(ckpt, photo_path, capsys,
                                                                                 monkeypatch):
    from instructblip import cli

    monkeypatch.setattr(cli, "_notice_shown", False)  # a fresh process
    assert cli.main(["ask", str(photo_path), "What is this?", "--model", str(ckpt), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert "built-in" not in out.err and "easy-vqa" not in out.err  # a model named: nothing to say
    assert cli.main(["caption", str(EASYVQA_IMAGE), str(photo_path), "--max-new-tokens", "3", "--num-beams", "1"]) == 0
    assert cli.main(["ask", str(EASYVQA_IMAGE), "What shape is in the image?"]) == 0
    out = capsys.readouterr()
    notices = [line for line in out.err.splitlines() if "built-in model, a small InstructBLIP" in line]
    assert len(notices) == 1 and "--model Salesforce/instructblip-flan-t5-xl" in notices[0]  # once per process
    warnings = [line for line in out.err.splitlines() if "not an easy-vqa picture" in line]
    assert len(warnings) == 1 and str(photo_path) in warnings[0] and "unreliable" in warnings[0]
    answers = out.out.strip().splitlines()  # two captions and an answer, nothing else
    assert len(answers) == 3 and answers[2] in {"circle", "rectangle", "triangle"}
    assert "built-in" not in out.out and "easy-vqa" not in out.out


# ----------------------------------------------------------------------------------------------------------------------
# info on a hub id: headers only


class _Hub(http.server.BaseHTTPRequestHandler):
    """`/{repo}/resolve/{revision}/{file}` with byte ranges, counting the bytes sent of each file."""

    root: Path
    sent: dict[str, list[tuple[int, int]]]

    def do_GET(self):  # noqa: N802 (http.server's name)
        prefix = f"/{REPO}/resolve/main/"
        path = self.root / self.path[len(prefix):] if self.path.startswith(prefix) else None
        if path is None or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        spec = self.headers.get("Range")
        if spec:
            first, last = spec.removeprefix("bytes=").split("-")
            start, end = int(first), min(int(last), len(data) - 1)
        self.send_response(206 if spec else 200)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start:end + 1])
        self.sent.setdefault(path.name, []).append((start, end + 1))

    def log_message(self, *args):
        pass


def test_info_on_a_hub_id_reads_no_weight_bytes(ckpt, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from instructblip.cli import main

    _Hub.root, _Hub.sent = Path(ckpt), {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def json_only(repo_id, allow_patterns=None, **_):  # what the hub's snapshot_download gives for ["*.json"]
        assert allow_patterns == ["*.json"]
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir(exist_ok=True)
        shutil.copy(Path(ckpt) / "config.json", snapshot / "config.json")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", json_only)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        assert main(["info", REPO]) == 0
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    weights = (Path(ckpt) / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(weights[:8], "little")
    assert _Hub.sent["model.safetensors"] == [(0, 8), (8, header_end)]  # the header, and not a byte after it
    assert "float32 (the headers of 1 safetensors file(s)" in out and "no weights" in out
    assert all(flag in out for flag in ("--dtype bfloat16", "--quantize int8", "--quantize int4"))


# ----------------------------------------------------------------------------------------------------------------------
# The command line


def test_one_sampling_rule_for_ask_and_the_server():
    from instructblip.cli import ask_parser, generation_config, generation_warnings
    from instructblip.serving.protocol import ChatRequest, ServerConfig
    from instructblip.serving.protocol import generation_config as server_config

    cases = [([], None), (["--temperature", "0.9", "--top-p", "0.5"], 0.9), (["--temperature", "0"], None),
             (["--top-p", "0.5"], 1.0), (["--do-sample"], 1.0), (["--temperature", "0.00001"], 0.00001)]
    for flags, sampled_at in cases:
        config = generation_config(ask_parser().parse_args(["x.png", "What?", *flags]))
        assert config.do_sample == (sampled_at is not None), flags
        if sampled_at is not None:
            assert config.temperature == sampled_at and config.num_beams == 1
        request = {"model": "m", "messages": [{"role": "user", "content": "What?"}], "max_tokens": 8}
        for flag, value in zip(flags[::2], flags[1::2], strict=False):
            request[flag.removeprefix("--").replace("-", "_")] = float(value)
        if "--do-sample" not in flags:  # the server has no do_sample: the same decision from the same numbers
            server, _ = server_config(ChatRequest(**request), ServerConfig(), prompt_positions=4, context=None)
            assert server.do_sample == config.do_sample, flags
    args = ask_parser().parse_args(["x.png", "What?", "--top-k", "5", "--seed", "1", "--length-penalty", "2",
                                    "--num-beams", "1"])
    warnings = generation_warnings(args, generation_config(args))
    assert [w.split(" ", 1)[0] for w in warnings] == ["--top-k", "--seed", "--length-penalty"]
    args = ask_parser().parse_args(["x.png", "What?", "--temperature", "0.7", "--num-beams", "3"])
    assert generation_warnings(args, generation_config(args)) == [
        "--num-beams 3 has no effect when sampling (one sample per answer)"]


def _exit(argv: list[str], capsys) -> tuple[int, str, str]:
    from instructblip.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    out = capsys.readouterr()
    return stopped.value.code, out.out, out.err


def test_mistyped_flag_shows_the_commands_usage_and_a_suggestion(capsys):
    code, out, err = _exit(["ask", str(EASYVQA_IMAGE), "What?", "--beams", "3"], capsys)
    assert code == 2 and not out and err.startswith("usage: instructblip ask ")
    assert "unrecognized arguments: --beams 3; did you mean --num-beams?" in err
    code, _, err = _exit(["aks", str(EASYVQA_IMAGE), "What?"], capsys)
    assert code == 2 and "did you mean ask?" in err
    code, _, err = _exit(["serve", "--max-batch", "4"], capsys)
    assert code == 2 and "usage: instructblip serve" in err and "did you mean --max-batch-size?" in err
    code, _, err = _exit(["eval", "--list", "--device", "tpu"], capsys)
    assert code == 2 and "invalid choice: 'tpu'" in err


def test_every_default_shown_once_and_device_choices_everywhere():
    import argparse

    from instructblip.cli import COMMANDS

    for name, (make_parser, _, _) in COMMANDS.items():
        parser = make_parser()
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0]
            assert action.help, f"{name} {flag} has no help"
            text = formatter._expand_help(action) if action.help else ""
            shown = text.lower().count("default")
            assert shown <= 1, f"{name} {flag}: {text}"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert shown == 1, f"{name} {flag} does not show its default {action.default!r}: {text}"
            if flag == "--device":
                assert list(action.choices)[:3] == ["auto", "cpu", "cuda"] and "cuda:1" in action.choices, name
            if flag in ("--dtype", "--precision"):
                assert action.choices, f"{name} {flag} has no choices"


def test_version_names_package_torch_and_device(capsys):
    from instructblip.cli import main

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("instructblip 0.") and f"torch {torch.__version__}" in out
    assert "device: cuda" in out if torch.cuda.is_available() else "device: cpu" in out


def test_progress_bars_only_on_a_terminal_and_not_with_no_progress(ckpt, monkeypatch, capsys):
    from instructblip import progress
    from instructblip.modeling import InstructBlipForConditionalGeneration as Model
    from instructblip.weights.checkpoint import load_pretrained

    monkeypatch.delenv("INSTRUCTBLIP_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    load_pretrained(Model, ckpt)
    drawn = capsys.readouterr().err
    assert "loading" in drawn and "B/s" in drawn  # by bytes
    monkeypatch.setattr(progress, "_disabled", True)  # what --no-progress does
    load_pretrained(Model, ckpt)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "_disabled", False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    load_pretrained(Model, ckpt)
    assert capsys.readouterr().err == ""
