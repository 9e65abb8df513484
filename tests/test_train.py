"""The training loop: it learns, trains only what it should, resumes exactly after SIGKILL (even during a checkpoint
write), gives the same weights on 2 processes as on 1, and exports a model transformers loads. CPU, tiny models."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from train_helpers import (
    color_image,
    metrics,
    one_thread,
    paused_checkpoint_command,
    subprocess_env,
    tiny_checkpoint,
    trained_state,
    write_color_dataset,
    write_yaml,
)

from instructblip import InstructBlipForConditionalGeneration, InstructBlipProcessor
from instructblip.cli import train_config
from instructblip.training import TrainConfig, train
from instructblip.training.checkpointing import checkpoint_dirs, load_checkpoint
from instructblip.training.loop import learning_rate, optimizer_groups, trainable_prefixes


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "colors": str(write_color_dataset(root, 32, "colors")),
        "captions": str(write_color_dataset(root, 12, "captions", seed=1, task="caption")),
        "val": str(write_color_dataset(root, 4, "val", seed=2)),
        "root": root,
    }


def _config(data, output_dir, family="t5", **overrides) -> TrainConfig:
    values = dict(model=tiny_checkpoint(family), train_data=[data["colors"], data["captions"]],
                  output_dir=str(output_dir), max_steps=8, global_batch_size=4, micro_batch_size=2, lr=1e-3,
                  warmup_steps=2, num_workers=0, checkpoint_every=2, log_every=1, val_every=1000)
    values.update(overrides)
    return TrainConfig(**values)


# ----------------------------------------------------------------------------------------------------------------------
# Recipe pieces


def test_learning_rate_schedule_is_the_papers():
    config = TrainConfig(model="m", train_data=["d.jsonl"], max_steps=60_000)
    assert learning_rate(0, config) == pytest.approx(1e-8)
    assert learning_rate(500, config) == pytest.approx(1e-8 + (1e-5 - 1e-8) / 2)
    assert learning_rate(1000, config) == pytest.approx(1e-5)
    assert learning_rate(30_500, config) == pytest.approx(0.5e-5)
    assert learning_rate(60_000, config) == pytest.approx(0.0, abs=1e-15)
    assert (config.beta1, config.beta2, config.weight_decay, config.grad_clip) == (0.9, 0.999, 0.05, None)


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    decay, no_decay = optimizer_groups(model, TrainConfig(model="m", train_data=["d.jsonl"]))
    assert [p.shape for p in decay["params"]] == [(3, 3)] and len(no_decay["params"]) == 3
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_progress_bar_only_on_a_tty_or_when_asked(tmp_path, capsys):
    import dataclasses

    from instructblip.training.loop import Logger

    config = TrainConfig(model="m", train_data=["d.jsonl"], output_dir=str(tmp_path), max_steps=10,
                         tensorboard=False)
    logger = Logger(config, enabled=True, start_step=0)  # stderr is captured, not a tty: plain lines at log steps
    logger.progress(1, 2.5, 1e-5, 10.0, force_line=False)
    logger.progress(2, 2.4, 1e-5, 12.0, force_line=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "step 1/10" not in err and "step 2/10 | loss 2.4000 | lr 1e-05 | 12.0 samples/s" in err
    logger = Logger(dataclasses.replace(config, progress=True), enabled=True, start_step=0)
    logger.progress(5, 2.0, 1e-5, 11.0, force_line=False)
    logger.close()
    err = capsys.readouterr().err
    assert "training" in err and "5/10" in err and "loss 2.0000 | lr 1e-05" in err  # a tqdm bar
    Logger(config, enabled=False, start_step=0).progress(1, 1.0, 1.0, 1.0, force_line=True)  # ranks > 0: silent
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------------------------
# A real run


def test_loss_falls_only_trained_parameters_change_and_export_loads_in_transformers(data, tmp_path):
    import transformers

    # a dataset with a missing image and an unusable line: both are skipped and counted, the run goes on
    bad = write_color_dataset(data["root"], 6, "bad", seed=3, extra_records=[
        {"image": "images/does-not-exist.png", "question": "What color is the square?", "answer": "red"},
        {"image": "images/bad-0.png", "question": "What color is the square?", "answer": ""},
    ])
    config = _config(data, tmp_path / "run", family="llama", train_data=[data["colors"], data["captions"], str(bad)],
                     val_data=[{"path": data["val"], "name": "held_out"}], max_steps=30, global_batch_size=8,
                     micro_batch_size=8, lr=1e-2,
                     warmup_steps=3, checkpoint_every=15, val_every=30, val_max_new_tokens=3, log_every=1)
    result = train(config)

    logged = [m for m in metrics(tmp_path / "run") if "loss" in m]
    losses = [m["loss"] for m in logged]
    assert [m["step"] for m in logged] == list(range(1, 31))
    # a frozen random LLM steered through 4 query tokens only: about one nat in 30 steps (deterministic on CPU)
    assert np.mean(losses[-10:]) < np.mean(losses[:2]) - 0.7, losses
    assert all(m["samples_per_s"] > 0 and m["lr"] >= 0 for m in logged)
    assert result.steps == 30 and result.skipped >= 1 and logged[-1]["skipped_total"] == result.skipped
    assert {"val/loss", "val/exact_match", "val/vqa_accuracy", "val/held_out/loss"} <= set(result.validation)
    assert [step for step, _ in checkpoint_dirs(config.output_dir)] == [15, 30]

    # frozen parameters bit-identical, the trained ones moved
    before = InstructBlipForConditionalGeneration.from_pretrained(config.model).state_dict()
    ours = InstructBlipForConditionalGeneration.from_pretrained(result.export_dir).eval()
    after = ours.state_dict()
    prefixes = trainable_prefixes(config)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert all(name.startswith(prefixes) for name in changed), sorted(changed - set(p for p in prefixes))[:5]
    for must in ("query_tokens", "language_projection.weight", "qformer.layers.0.qkv.weight",
                 "qformer.word_embeddings.weight", "vision_model.post_layernorm.weight"):
        assert must in changed
    assert not any(n.startswith(("vision_model.layers", "language_model.")) for n in changed)

    # the export is a complete HF-layout model: transformers loads it and computes the same logits
    processor = InstructBlipProcessor.from_pretrained(result.export_dir)
    inputs = processor(images=color_image("blue", 7), text="Question: What color is the square? Short answer:")
    theirs = transformers.InstructBlipForConditionalGeneration.from_pretrained(result.export_dir).eval()
    their_processor = transformers.InstructBlipProcessor.from_pretrained(result.export_dir)
    assert their_processor(images=color_image("blue", 7), text="Question: What color is the square? Short answer:",
                           return_tensors="pt")["input_ids"].tolist() == inputs["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "run" / "model" / "train_config.json").read_text())["max_steps"] == 30


def test_sigkill_during_a_checkpoint_write_then_resume_is_exact(data, tmp_path):
    """8 steps straight vs: a subprocess killed (SIGKILL) while writing the step-6 checkpoint, resumed from step 4.
    Dropout is on (Q-Former and T5 0.1), so the RNG states must be restored for the weights to agree."""
    straight = _config(data, tmp_path / "straight")
    train(straight)
    expected = trained_state(tmp_path / "straight")

    killed = tmp_path / "killed"
    yaml_file = write_yaml(tmp_path / "run.yaml", {
        **{k: v for k, v in vars(straight).items() if k not in ("train_data", "val_data", "output_dir")},
        "train_data": [data["colors"], data["captions"]], "output_dir": str(killed)})
    with open(tmp_path / "stderr.txt", "w") as log:
        process = subprocess.Popen(paused_checkpoint_command(6, 120, str(yaml_file)), stderr=log,
                                   stdout=subprocess.DEVNULL, env=subprocess_env())
        try:
            deadline = time.time() + 90
            while "[test hook]" not in (tmp_path / "stderr.txt").read_text():
                assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.time() < deadline, "the run never reached the step-6 checkpoint"
                time.sleep(0.1)
            process.kill()  # SIGKILL, half-way through writing step-00000006
        finally:
            process.kill()
            process.wait()
    partial = list((killed / "checkpoints").glob("step-00000006.tmp-*"))
    assert len(partial) == 1 and [s for s, _ in checkpoint_dirs(str(killed))] == [2, 4]
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(str(partial[0]))  # truly half-written
    assert load_checkpoint(str(killed / "checkpoints" / "step-00000004"))["step"] == 4

    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_config(data, killed))  # a fresh run must not mix with the killed one's checkpoints
    result = train(_config(data, killed, resume="latest"))  # continues with steps 5..8
    assert result.steps == 8
    resumed = trained_state(killed)
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)
    # the metrics file holds each step once, with the losses of the uninterrupted run
    straight_losses = {m["step"]: m["loss"] for m in metrics(tmp_path / "straight") if "loss" in m}
    resumed_losses = [(m["step"], m["loss"]) for m in metrics(killed) if "loss" in m]
    assert [s for s, _ in resumed_losses] == list(range(1, 9))
    for step, loss in resumed_losses:
        assert loss == pytest.approx(straight_losses[step], abs=1e-6)


def test_torchrun_two_processes_give_the_weights_of_one(data, tmp_path):
    """Same global batch (8): one process with one micro-batch of 8 vs 2 processes x micro-batches of 2 x 2
    accumulation steps; dropout off. Equal only if the loss is the mean over all answer tokens of the global batch
    (a mean of per-micro-batch means would weight the samples differently). The single process also recomputes
    activations (gradient checkpointing), which must not change the numbers either."""
    common = dict(family="llama", max_steps=3, global_batch_size=8, micro_batch_size=8, dropout=0.0, export=False,
                  gradient_checkpointing=True)
    train(_config(data, tmp_path / "one", **common))
    yaml_file = write_yaml(tmp_path / "ddp.yaml", {"model": tiny_checkpoint("llama"),
                                                    "train_data": [data["colors"], data["captions"]],
                                                    "max_steps": 3, "global_batch_size": 8, "micro_batch_size": 2,
                                                    "lr": 1e-3, "warmup_steps": 2, "num_workers": 0,
                                                    "checkpoint_every": 2, "log_every": 1, "dropout": 0.0,
                                                    "export": False})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "instructblip", "train", str(yaml_file), "--output-dir", str(tmp_path / "two")]
    result = subprocess.run(command, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=150)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es) x 2 accumulation" in result.stderr and result.stderr.count("trained parameters") == 1

    one, two = trained_state(tmp_path / "one"), trained_state(tmp_path / "two")
    D = 32  # Q-Former width
    for name in one:
        a, b = one[name].clone(), two[name].clone()
        # The key biases of attention have an exactly zero gradient (softmax ignores a shift shared by all keys);
        # their rounding noise differs with the summation order and Adam normalises it to lr-sized steps.
        if name.endswith("qkv.bias"):
            a[D:2 * D] = b[D:2 * D] = 0
        if name.endswith("cross_kv.bias"):
            a[:D] = b[:D] = 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    losses_one = [m["loss"] for m in metrics(tmp_path / "one") if "loss" in m]
    losses_two = [m["loss"] for m in metrics(tmp_path / "two") if "loss" in m]
    np.testing.assert_allclose(losses_two, losses_one, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Command line and configuration errors


def test_yaml_presets_and_flags_override(tmp_path, data):
    yaml_file = write_yaml(tmp_path / "c.yaml", {
        "model": "some/model", "max_steps": 100, "lr": "2e-5",
        "train_data": [data["colors"], {"path": data["captions"], "weight": 2.0, "task": "captioning"}]})
    config = train_config([str(yaml_file), "--max-steps", "7", "--augment", "--resume", "--grad-clip", "1.0",
                         "--val-max-samples", "none", "--progress", "false"])
    assert (config.max_steps, config.lr, config.augment, config.resume, config.grad_clip) == (7, 2e-5, True,
                                                                                                "latest", 1.0)
    assert config.val_max_samples is None and config.progress is False
    assert config.train_data[1].weight == 2.0 and config.train_data[1].task == "caption"
    assert config.train_data[0].name == "colors"
    flags_only = train_config(["--model", "m", "--train-data", "a.jsonl", "b.jsonl", "--resume", "ckpt/step-1"])
    assert [s.path for s in flags_only.train_data] == ["a.jsonl", "b.jsonl"] and flags_only.resume == "ckpt/step-1"


@pytest.mark.parametrize("content, error", [
    ("model: m\ntrain_data: [a.jsonl]\nmax_step: 3\n", "unknown key 'max_step'; did you mean max_steps"),
    ("model: m\ntrain_data: [a.jsonl]\nmax_steps: ten\n", "max_steps must be an integer"),
    ("model: m\ntrain_data: [a.jsonl]\nprecision: fp8\n", "precision must be one of"),
    ("model: m\ntrain_data: [{path: a.jsonl, wieght: 2}]\n", "unknown key"),
    ("train_data: [a.jsonl]\n", "'model' is required"),
    ("model: m\ntrain_data: [a.jsonl\n", "not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_bad_configs_give_clear_errors(tmp_path, content, error):
    (tmp_path / "c.yaml").write_text(content)
    with pytest.raises(ValueError, match=error):
        train_config([str(tmp_path / "c.yaml")])


def test_shipped_presets_are_valid_configs():
    from pathlib import Path

    from instructblip.training import config_from_dict, load_yaml

    presets = sorted((Path(__file__).parent.parent / "configs" / "train").glob("*.yaml"))
    assert len(presets) >= 2
    for preset in presets:
        config = config_from_dict(load_yaml(str(preset)), str(preset))
        assert config.global_batch_size % config.micro_batch_size == 0
    paper = config_from_dict(load_yaml(str(presets[[p.name for p in presets].index("instructblip-flan-t5-xl.yaml")])))
    assert len(paper.train_data) == 13 and paper.lr == 1e-5 and paper.max_steps == 60_000
    assert {s.task for s in paper.train_data} == {"caption", "vqa", "vqg", "instruction"}
    with pytest.raises(ValueError, match="named"):
        TrainConfig(model="m", train_data=["a/train.jsonl", "b/a.jsonl"])


def test_cli_reports_user_errors_in_one_line(tmp_path, data, capsys):
    from instructblip.cli import main as cli_main

    model = tiny_checkpoint("t5")
    capsys.readouterr()
    assert cli_main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli_main(["train", "--model", model, "--train-data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "x.png", "question": "q?", "answer": ""}) + "\n")
    assert cli_main(["train", "--model", model, "--train-data", str(bad), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "empty answer" in err and err.count("\n") == 1
