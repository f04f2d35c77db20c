"""Data: a registry of datasets and data sources, and the deterministic batch stream.

`datasets` holds the registry (`data.name` choices, labelled or not, default flips, the FD reference) with
the built-in loaders (Fashion-MNIST, CIFAR-10, CelebA, LSUN, image folders) and `BatchStream` (batch =
function of seed and iteration); `latents` registers the autoencoder stage as a data source (the sharded
latent cache); `hf` reads Hugging Face datasets from disk; `imagecheck` finds unreadable image files
before training starts.
"""

# the Hugging Face dataset and the latent data source register themselves (`datasets` imports neither)
from . import hf, latents  # noqa: E402,F401
