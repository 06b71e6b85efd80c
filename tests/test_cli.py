import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEFAULT, FAST, ROOT, TINY, error_of, last, plain_loop, result, run_dir

from dynnet.cli import main
from dynnet.cli.help import FIT_EPILOG, SUBCOMMANDS
from dynnet.module import DynamicNet
from dynnet.runs.checkpoint import load_checkpoint


def test_short_fit_learns_and_writes_its_run(fit_output, tmp_path):
    out, _ = fit_output("-c", str(ROOT / "configs" / "default.yaml"), *TINY)
    logs = Path(out.split("Logs: ")[1].split()[0])
    assert logs == run_dir(tmp_path)  # one folder holds the run: config, events, checkpoints
    assert list(logs.glob("events.out.tfevents.*"))
    assert yaml.safe_load((logs / "config.yaml").read_text())["trainer"]["max_steps"] == 200
    checkpoint = load_checkpoint(last(tmp_path))
    assert checkpoint["global_step"] == 200
    assert sum(checkpoint["degree_counts"]) == 200
    assert list((logs / "checkpoints").glob("best-step=*.ckpt"))
    # The expected loss at the end is far below where training started.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs)).Reload()
    losses = [e.value for e in events.Scalars("val/expected_loss")]
    assert [e.step for e in events.Scalars("val/expected_loss")][-1] == 200
    assert losses[-1] < 0.9 * losses[0]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(20, 201, 20))
    assert result(out)  # the Result line is printed


@pytest.mark.slow
def test_seeded_run_matches_the_tutorial_loop_step_for_step(fit_output):
    out, _ = fit_output(
        "-c", str(ROOT / "configs" / "default.yaml"), "--seed_everything", "7", "--trainer.enable_progress_bar", "false"
    )
    ours = torch.tensor(result(out), dtype=torch.float64)
    tutorial = torch.tensor(plain_loop("--seed", "7", "--steps", "30000"), dtype=torch.float64)
    torch.testing.assert_close(ours, tutorial, rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.stem != "sweep"))
def test_every_fit_config_runs(fit_output, config):
    out, _ = fit_output(
        "-c", str(ROOT / "configs" / config), *TINY, "--trainer.accelerator", "cpu", "--trainer.devices", "1"
    )
    assert len(result(out)) == 5


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--model.min_degree", "-1", "min_degree must be between 0 and 24, got -1"),
        ("--model.min_degree", "6", "min_degree must not exceed max_degree, got min_degree=6 and max_degree=5"),
        ("--data.n_points", "1", "n_points must be at least 2, got 1"),
        ("--data.low", "4", "low must be below high and both finite, got low=4.0"),
        ("--data.steps_per_epoch", "0", "steps_per_epoch must be at least 1, got 0"),
    ],
)
def test_bad_values_get_one_line(tmp_path, capsys, flag, value, message):
    error = error_of(["fit", flag, value, "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert "\n" not in error
    assert message in error
    assert not (tmp_path / "lightning_logs").exists()  # refused before training


def test_main_takes_an_argument_list(tmp_path, capsys):
    main(["validate", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert "val/expected_loss" in capsys.readouterr().out


def test_a_fit_and_its_evaluations_end_with_the_answers_quality(fit_output, tmp_path, capsys):
    out, _ = fit_output("-c", FAST, "--trainer.enable_progress_bar", "false")
    lines = out.splitlines()
    quality = lines[next(i for i, line in enumerate(lines) if line.startswith("Result: ")) + 1]
    assert re.fullmatch(r"Expected loss: 8\.755\d, 0\.0\d+% above its closed-form minimum 8\.7553", quality), quality
    for command in ("validate", "test"):
        main([command, "-c", FAST, "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path)])
        assert capsys.readouterr().out.strip().splitlines()[-1] == quality
    assert DynamicNet.load_from_checkpoint(last(tmp_path)).quality() == quality  # the README's line in Python


def test_a_poor_fit_says_so_and_what_to_try(fit_output):
    out, _ = fit_output(*TINY, "--optimizer", "torch.optim.Adam")
    assert re.search(
        r"^Expected loss: \S+, [\d,]+ times its closed-form minimum 8\.7553: a poor fit; train longer \(max_steps\), "
        r"or search optimizers and learning rates with dynnet-sweep$",
        out,
        re.M,
    ), out


def test_evaluation_says_when_the_run_had_another_config_or_other_points(fit_output, tmp_path, capsys):
    fit_output("-c", FAST, "--trainer.max_steps", "200", "--trainer.enable_progress_bar", "false")
    run = run_dir(tmp_path)
    main(["predict", "-c", DEFAULT, "--ckpt_path", "last", "--data.n_points", "100",
          "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    note = f"Note: run version_0 was trained with another config than {DEFAULT} ({run / 'config.yaml'}): "
    assert note in out and "optimizer.class_path is torch.optim.Adam, not torch.optim.SGD" in out
    assert "Note: evaluating on other points than the run trained on: data.n_points 100 (the run's: 2000)" in out


def test_help_speaks_of_dynnet(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    assert all(" ".join(sentence.split()) in listing for sentence in SUBCOMMANDS.values())
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert text.rstrip().endswith(FIT_EPILOG)  # the flags people use, where the help ends
    for flag in ("limit_train_batches", "overfit_batches", "accumulate_grad_batches"):
        assert re.search(rf"^  --trainer\.{flag} {flag.upper()}\n +Refused by dynnet: ", text, re.M), flag
    for option in ("trainer.val_check_interval", "trainer.strategy", "ckpt_path", "weights_only"):
        described = text.split(f"\n  --{option} ")[1].split("\n  --")[0]
        assert "refused by dynnet" in " ".join(described.split()), option
