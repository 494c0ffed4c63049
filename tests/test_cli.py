"""The command line, run as real processes and in-process, on the real MNIST digits."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from aligndraw import allocator
from aligndraw.cli import build_parser, keeps_freed_memory, main

TINY = ["model.steps=3", "model.embed_dim=8", "model.lang_hidden=8", "model.align_dim=8",
        "model.enc_hidden=16", "model.dec_hidden=16", "model.z_dim=4", "model.read_n=3",
        "model.write_n=3", "data.train_scenes_per_epoch=64", "data.val_scenes=16",
        "data.test_scenes=32", "--batch-size", "8", "--no-progress"]
CAPTION = "the digit 3 is at the top of the digit 1 ."


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "aligndraw", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["train", "--out", str(out), "--max-steps", "6", *TINY]) == 0
    return out


@pytest.mark.parametrize("command", [[], ["data", "mnist"], ["train"], ["generate"],
                                     ["evaluate"]])
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: aligndraw" in result.stdout and len(result.stdout) > 200


@pytest.mark.realdata
def test_dry_run_writes_a_loadable_checkpoint(tmp_path, mnist_dir):
    result = run_cli("train", "--out", str(tmp_path / "r"), "--dry-run", *TINY)
    assert result.returncode == 0, result.stderr
    for name in ("last/config.json", "last/model.safetensors", "last/vocab.json",
                 "last/trainer_state.pt", "best/model.safetensors", "samples/epoch_000.png",
                 "metrics.jsonl"):
        assert (tmp_path / "r" / name).is_file(), name
    state = torch.load(tmp_path / "r" / "last" / "trainer_state.pt", weights_only=True)
    assert state["progress"]["step"] == 1


@pytest.mark.realdata
def test_generate_writes_images_grid_alignment_and_gif(run_dir, tmp_path):
    out = tmp_path / "gen"
    code = main(["generate", CAPTION, "the digit 7 is at the top left of the image .",
                 "--model", str(run_dir), "--num", "3", "--seed", "1", "--gif",
                 "--out", str(out)])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["grid.png", "caption00_alignment.png", "caption01_alignment.png",
                            "caption00_drawing.gif", "caption01_drawing.gif"]
                           + [f"caption{c:02d}_sample{k:02d}.png" for c in range(2)
                              for k in range(3)])
    again = tmp_path / "again"
    main(["generate", CAPTION, "the digit 7 is at the top left of the image .", "--model",
          str(run_dir), "--num", "3", "--seed", "1", "--out", str(again)])
    assert (out / "caption01_sample02.png").read_bytes() == \
        (again / "caption01_sample02.png").read_bytes()


@pytest.mark.realdata
def test_evaluate_reports_seen_and_held_out(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(run_dir), "--split", "test", "--out", str(out),
                 "--metrics", "nll,iwae,retrieval,ssim,fidelity", "--iwae-k", "3",
                 "--retrieval-samples", "1", "--shortlist", "16", "--ssim-samples", "2",
                 "--max-captions", "4", "--batch-size", "64"]) == 0
    payload = json.loads(out.read_text())
    metrics = payload["metrics"]
    assert list(metrics) == ["nll", "iwae", "retrieval_nn", "retrieval_random", "ssim", "fidelity"]
    result = metrics["nll"]
    assert result["seen"]["count"] + result["held_out"]["count"] == 32
    assert result["seen"]["count"] > 0 and result["held_out"]["count"] > 0
    for group in ("all", "seen", "held_out"):
        r = result[group]
        assert r["bound"] == pytest.approx(r["nll"] + r["kl"])
        assert 0 < r["bound"] < 5000
        assert metrics["iwae"][group]["count"] == r["count"]
    assert metrics["iwae"]["all"]["iwae"] < metrics["iwae"]["all"]["bound"] + 1
    assert metrics["retrieval_nn"]["all"]["count"] == 4 and metrics["ssim"]["all"]["count"] == 4
    assert 1 <= metrics["retrieval_random"]["all"]["med_r"] <= 16
    assert metrics["fidelity"]["all"]["ceiling"] > 50  # the bundled reader on real scenes
    assert set(payload["definitions"]) == set(metrics)
    table = out.with_suffix(".md").read_text()
    assert "| held_out |" in table and "Random shortlist" in table
    cold = tmp_path / "cold.json"
    assert main(["evaluate", "--model", str(run_dir), "--out", str(cold), "--metrics", "fidelity",
                 "--temperature", "0", "--max-captions", "4"]) == 0
    payload = json.loads(cold.read_text())
    assert payload["settings"]["temperature"] == 0
    assert "prior samples at temperature 0 per caption" in payload["definitions"]["fidelity"]


@pytest.mark.realdata
def test_evaluate_compiled_gives_the_eager_results(run_dir, tmp_path):
    args = ["evaluate", "--model", str(run_dir), "--metrics", "nll,retrieval,ssim",
            "--retrieval-samples", "1", "--shortlist", "8", "--ssim-samples", "2",
            "--max-captions", "4", "--batch-size", "12"]  # 32 scenes: batches of 12, 12 and 8
    eager, compiled = tmp_path / "eager.json", tmp_path / "compiled.json"
    assert main([*args, "--out", str(eager)]) == 0
    torch._dynamo.reset()  # a test process compiles many models; each code object takes only so many graphs
    assert main([*args, "--compile", "--out", str(compiled)]) == 0
    want, got = json.loads(eager.read_text()), json.loads(compiled.read_text())
    assert (want["settings"]["compile"], got["settings"]["compile"]) == (False, True)
    assert "compiled" not in want
    # nll and retrieval share the forward graph; ssim's 4 × 2 samples are one call of 8 rows
    assert [(c["graph"], c["rows"]) for c in got["compiled"]] == [("forward", 12), ("sample", 8)]
    for name in ("retrieval_nn", "retrieval_random"):  # ranks: a near tie may fall either way
        for group, row in want["metrics"][name].items():
            assert got["metrics"][name][group]["count"] == row["count"]
            assert got["metrics"][name][group]["med_r"] == pytest.approx(row["med_r"], abs=1)
            for k in ("R@1", "R@5", "R@10", "R@50") if row["count"] else ():  # one rank flipped at most
                assert abs(got["metrics"][name][group][k] - row[k]) <= 100 / row["count"] + 1e-9
    for metric in ("nll", "ssim"):
        for group, row in want["metrics"][metric].items():
            # abs: the tiny model's KL is about 1e-5 nats, where fp32 rounding is relatively large
            assert got["metrics"][metric][group] == pytest.approx(row, rel=1e-5, abs=1e-6), (metric, group)


@pytest.mark.realdata
@pytest.mark.parametrize("args, message", [
    (["generate", "the digit 3 is above the digit 1 .", "--out", "X"], "'above'"),
    (["generate", "", "--out", "X"], "at least one word"),
    (["generate", "digit " * 40, "--out", "X"], "32"),
    (["evaluate", "--metrics", "bleu"], "unknown metric"),
    (["generate", CAPTION, "--temperature", "-1", "--out", "X"], "temperature must be"),
])
def test_bad_input_exits_2_with_one_clear_line(run_dir, tmp_path, args, message):
    args = [a.replace("X", str(tmp_path / "out")) for a in args]
    result = run_cli(*args, "--model", str(run_dir))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_preset_and_missing_model_exit_2(tmp_path):
    result = run_cli("train", "--preset", "imagenet", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "invalid choice: 'imagenet'" in result.stderr
    result = run_cli("generate", CAPTION, "--model", str(tmp_path / "missing"))
    assert result.returncode == 2 and "neither a directory nor a bundled model" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_override_exits_2(tmp_path):
    result = run_cli("train", "--out", str(tmp_path / "r"), "model.hidden=3")
    assert result.returncode == 2 and "unknown model field 'hidden'" in result.stderr
    result = run_cli("train", "--out", str(tmp_path / "r"), "--optimizer", "sgd")
    assert result.returncode == 2 and "'rmsprop'" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.realdata
def test_training_into_an_existing_run_needs_resume(run_dir):
    before = load_file(str(run_dir / "last" / "model.safetensors"))
    result = run_cli("train", "--out", str(run_dir), "--max-steps", "1", *TINY)
    assert result.returncode == 2 and "--resume" in result.stderr
    after = load_file(str(run_dir / "last" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.realdata
def test_list_words(run_dir):
    result = run_cli("generate", "--list-words", "--model", str(run_dir))
    assert result.returncode == 0
    words = result.stdout.split()
    assert len(words) == 22 and "digit" in words and "7" in words


@pytest.mark.realdata
@pytest.mark.slow
def test_torchrun_data_parallel_two_processes(tmp_path, mnist_dir):
    out = tmp_path / "data_parallel"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "aligndraw", "train", "--out", str(out), "--max-steps", "4", "--log-every", "2",
           *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4]  # rank 0 logs alone: no duplicate lines
    assert json.loads((out / "last" / "config.json").read_text())["train"]["batch_size"] == 8
    state = torch.load(out / "last" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["noise_rng"]) == 2
    assert result.stdout.count("trained to step 4") == 1


@pytest.mark.parametrize(("argv", "env", "keeps"), [
    (["generate", CAPTION], None, True),
    (["evaluate", "--device", "cpu"], "1", True),
    (["reader", "evaluate"], None, True),
    (["report", "RUN", "--out", "r.md"], None, True),
    (["serve"], None, False),  # a long-lived server: left as it is
    (["generate", CAPTION, "--device", "cuda:0"], None, False),  # the GPU's allocator holds the tensors
    (["train", "--out", "run"], None, False),  # its trainer keeps it (tests/test_trainer.py)
    (["data", "mnist"], None, False),  # runs no model
    (["generate", CAPTION], "0", False),  # turned off
])
def test_model_commands_on_the_cpu_keep_freed_memory(monkeypatch, argv, env, keeps):
    if env is None:
        monkeypatch.delenv("ALIGNDRAW_KEEP_FREED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("ALIGNDRAW_KEEP_FREED_MEMORY", env)
    assert keeps_freed_memory(build_parser().parse_args(argv)) is keeps


@pytest.mark.parametrize("env", [None, "0"])
def test_generate_asks_the_allocator_to_keep_freed_memory_unless_turned_off(monkeypatch, tmp_path, env):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or 0)
    if env is None:
        monkeypatch.delenv("ALIGNDRAW_KEEP_FREED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("ALIGNDRAW_KEEP_FREED_MEMORY", env)
    assert main(["generate", CAPTION, "--num", "1", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "caption00_sample00.png").is_file()
    assert calls == ([1] if env is None else [])
