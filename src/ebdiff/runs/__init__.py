"""Run folders and what leaves them: everything that reads or writes a run on disk.

`checkpoint` (`TrainState`, atomic safetensors checkpoints, locks, metrics records), `facts` (the typed
run record: `RunFacts`, `TicketInfo`, `PrunedFrom`), `folders` (which kind of folder a path is: run, TA-EB
run, export; a run's config and regions), `confine` (paths read from a folder stay inside it), `interop`
(`ebdiff.load`, `ebdiff.export`, diffusers models and schedulers) and `export_formats` (ONNX and
torch.export files that run without ebdiff). Below training and evaluation, which both read runs.
"""
