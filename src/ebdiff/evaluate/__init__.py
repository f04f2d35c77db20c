"""Evaluation and reports: sampling finished runs, metrics, evaluation during training, tables and figures.

`evaluate` (sample a run or an export, score it: `sample_run`, `evaluate_run`, `Scorer`), `metrics` (FD /
FID / KID over classifier or Inception features), `training_eval` (`EvalHook`: quality points during
training, TA-EB ensemble curves), `tracking` (TensorBoard / W&B trackers, sample grids during training),
`report`, `curves` and `quality_curves` (tables, figures, time to quality, speed-up at equal quality),
`bench` (training-step throughput, MFU).
"""
