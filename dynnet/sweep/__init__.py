"""``dynnet-sweep``: search learning rates, optimizers and seeds for dynnet fits with Optuna.

A sweep config (YAML) names the fit config every trial starts from, the search space, the objective and the
sampler and pruner (config, space). Each trial is a real ``dynnet fit`` into its own run folder,
``<root>/lightning_logs/trial_NNNN`` (fit, trial), so TensorBoard shows every trial as a sibling run. Trials run in
worker processes (workers) that share one Optuna study through a database (storage): SQLite in the sweep's root by
default, or any database Optuna supports, so the same command started again, or on several machines, continues the
same study until it holds ``--trials`` finished trials. The study records the experiment its trials run and
refuses a sweep that would run another in it (study). At the end the command prints the best trial, its Result
line and the command that reproduces it, and writes ``trials.csv`` and ``sweep.png`` into the sweep's root
(report, picture). TensorBoard's HPARAMS tab on the root's ``lightning_logs`` is a table of the trials, its
columns the swept settings (hparams).
"""

from dynnet.sweep.command import main

__all__ = ["main"]
