"""The application layer: where runs are assembled from the layers below, and what the CLI calls.

`assemble` (`train`, `make_trainer`: the loop with the hooks that are not training handed in: evaluation
during training, sample grids, trackers, the search's figures), `taeb` / `taeb_worker` (TA-EB's launcher:
one Early-Bird branch per region, in parallel processes, then the ensemble's accounting and curve),
`experiment` (a comparison table of runs: train, skip finished, resume, evaluate, report), `demo` (the
CPU demos) and `info` (preset and ticket sizes). Nothing below imports this layer.
"""

# the library assembled: diffusers' schedulers become the samplers `diffusers-<name>` before any config is
# validated (a TA-EB worker, `python -m ebdiff.app.taeb_worker`, reads its run's config through here)
from ..runs.interop import register_diffusers_samplers  # noqa: E402

register_diffusers_samplers()

