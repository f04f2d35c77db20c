"""Training: the start of a run, the loop and its hooks, the step, TA-EB's branch specs. (The folder is
`training`, not `train`: `ebdiff.train` is the public function that trains a run.)

`start.start_run` decides once what a run starts from (fresh, resumed, pruned from a finished run) and
which hooks it needs; `trainer.Trainer` is only the loop (iterations, timing, logging and checkpoint
cadence, `adopt`, `paused`); `hooks` (`Hook`, the narrow `RunContext` hooks see); `search`
(`EarlyBirdSearch` and its hook: check, extract, adopt the ticket); `baselines` (prune-from-run); `step`
(`TrainStep` and the GPU fast path) with `autocompile` and `compile_cache`; `distributed`; `taeb_spec`
(TA-EB's pure branch specs and accounting; the launcher is `ebdiff.app.taeb`). Nothing here imports
evaluation: the application layer (`ebdiff.app.assemble`) hands its hooks in.
"""
