"""What TensorBoard shows of a run, beside the metrics a fit logs: ``extras`` (the callback: the HPARAMS entry, the
custom-scalars layout, the fit picture at every validation), ``hparams`` (the HPARAMS plugin's summaries) and
``fit_picture`` (the picture of the fit against the targets)."""
