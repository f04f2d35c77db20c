import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# torch.compile (inductor) builds C++ extension modules on the CPU: the compile tests need a
# compiler and Python's headers
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    or not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
    reason="torch.compile on the CPU needs a C++ compiler and Python.h")

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="session")
def has_fmnist():
    if not FMNIST.is_file():
        pytest.fail("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); .ci/run installs it")
    return True


def tiny_args(out, *extra):
    """Overrides for a fast CPU run of the tiny preset on a slice of Fashion-MNIST."""
    return ["--out", str(out), "model.preset=tiny", "data.limit=256", "train.batch_size=8",
            "train.device=cpu", "train.progress=false", "train.log_every=5", "train.ckpt_every=5",
            "train.keep_last=10", "sample.steps=5", *extra]
