"""Runs and checkpoints: a run is one folder, written by one process, whose ``last.ckpt`` is its latest state.

- ``folder``: run folders under ``<default_root_dir>/lightning_logs``, finding the newest, the run lock, entering a
  run for a fit.
- ``run``: ``Run``, the callback that keeps a fit's folder (config, last and best checkpoints, signals, its lines).
- ``files``: every file dynnet writes, whole or not at all, and never in place of what is not a regular file.
- ``checkpoint``: reading a checkpoint weights-only, bounded and checked record by record; saving finite ones.
- ``checkpoint_state``: a resumed checkpoint's states, compared with what this fit's own objects write.
- ``resume``: what a checkpoint records of how its run trains, and what a resumed fit may change.
- ``yaml_files``: YAML read within bounds (configs, hparams files).
"""
