"""What ``dynnet --help`` and ``dynnet fit --help`` say where Lightning's own text would mislead: the subcommands in
dynnet's sentences, the options dynnet gives another meaning or refuses, and the flags people use most."""

import argparse

from jsonargparse import DefaultHelpFormatter

from dynnet.lightning_internals import parser_actions, subcommand_choices, subcommand_parser

SUBCOMMANDS = {
    "fit": "Train the polynomial, or resume a run (--ckpt_path last).",
    "validate": "Evaluate a checkpoint's model on the points and print its expected loss.",
    "test": "Evaluate as validate does, reporting the metrics as test/*.",
    "predict": "Write a checkpoint's predictions at every point to a CSV file.",
}
# The flags people use most, at the end of `dynnet fit --help`, below Lightning's many.
FIT_EPILOG = """the flags people use most:
  -c configs/default.yaml        the tutorial's run (configs/fast.yaml: Adam, a tenth of the steps)
  --trainer.max_steps N          how many optimizer steps to train
  --optimizer CLASS              another optimizer (torch.optim.Adam), from its own defaults
  --optimizer.lr LR              the learning rate
  --lr_scheduler CLASS           a schedule (torch.optim.lr_scheduler.CosineAnnealingLR), stepped every step
  --seed_everything S            the seed of the initial coefficients and the degree draws
  --data.n_points N              how many points on [data.low, data.high]
  --trainer.precision 64-true    train in float64
  --trainer.devices N            N processes training as one (with --trainer.accelerator gpu, N GPUs)
  --ckpt_path last               resume the newest run (--run NAME: that run)"""
# Options whose Lightning text would mislead: what they mean in dynnet, or that dynnet refuses them.
REFUSED = "Refused by dynnet: "
OPTION_HELP = {
    "trainer.max_steps": "Stop after this many optimizer steps; -1 for no limit (default: 30000, the tutorial's).",
    "trainer.limit_train_batches": REFUSED + "a train batch holds many optimizer steps; shorten training with "
    "--trainer.max_steps or --data.steps_per_epoch.",
    "trainer.overfit_batches": REFUSED + "every step trains on all the points.",
    "trainer.accumulate_grad_batches": REFUSED + "every step already uses all the points; change the step size "
    "with --optimizer.lr.",
    "trainer.gradient_clip_val": "Clip the gradient before every optimizer step to this norm (or value, with "
    "--trainer.gradient_clip_algorithm value); dynnet gives it to DynamicNet, which clips its own steps.",
    "trainer.val_check_interval": "Validate every this many optimizer steps (an int), or this fraction of an epoch "
    "(a float); a time between validations is refused by dynnet (batches hold many steps). Default: once an epoch.",
    "trainer.strategy": "Lightning's strategy: auto, or ddp for several processes (ddp_spawn is refused by dynnet: "
    "use ddp).",
    "ckpt_path": "The checkpoint to start from: last (the newest run's last.ckpt, or --run NAME's), best (its best "
    "checkpoint) or a file. hpc and registry are refused by dynnet.",
    "weights_only": "Checkpoints are always read weights-only, never running code: false is refused by dynnet.",
}


class EpilogAsWritten(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, keeping the lines of dynnet's list of flags as written."""


PARSER_KWARGS = {
    "prog": "dynnet",
    "description": "Train, evaluate and use the tutorial's random-depth polynomial with Lightning.",
    "formatter_class": EpilogAsWritten,  # which jsonargparse gives the subcommands too
    "fit": {"epilog": FIT_EPILOG},
}


def reword(cli) -> None:
    """Give a LightningCLI's help dynnet's words. LightningCLI lists each subcommand with the first line of the
    Trainer method's docstring, which can stop mid-sentence; its options' text describes Lightning's defaults and
    batches, not dynnet's."""
    for choice in subcommand_choices(cli):
        choice.help = SUBCOMMANDS[choice.dest]
    for subcommand in SUBCOMMANDS:
        for action in parser_actions(subcommand_parser(cli, subcommand)):
            action.help = OPTION_HELP.get(action.dest, action.help)
