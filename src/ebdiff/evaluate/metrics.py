"""Quality metrics: Frechet distance and KID over feature sets, and the feature extractors.

Two extractors:
- `InceptionFeatures`: pytorch-fid's Inception-v3 (pool3, 2048-d), the convention of the paper's FID
  numbers. Weights come from a local file (`--inception-weights PATH`), torch hub's cache, or a
  download when online; offline without them it stops with one line naming the file.
- `ClassifierFeatures`: a small CNN that ebdiff trains once on the dataset's own training split and
  caches with its test accuracy and a hash. Its penultimate features give "FD-<dataset>" (e.g.
  FD-FMNIST) and KID: an offline quality number for any labelled dataset. It is *not* Inception FID.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EbdiffError
from ..files import atomic_save, atomic_write_json, cache_dir
from ..progress import progress_bar

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


# ---------------------------------------------------------------------- distances (pure numpy)
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), with pytorch-fid's safeguards."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    s1, s2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError("feature statistics of different dimensions")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the matrix square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (unbiased MMD^2, cubic polynomial kernel), mean and std over subsets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


# ---------------------------------------------------------------------- extractors
def _batches(images: torch.Tensor, batch: int, progress: bool, desc: str) -> Iterable[torch.Tensor]:
    for i in progress_bar(range(0, len(images), batch), desc=desc, disable=not progress, leave=False):
        yield images[i: i + batch]


class FeatureClassifier(nn.Module):
    """A small CNN for 32x32 grey images (width 24: ~6M MACs per image, a few minutes of CPU training
    for Fashion-MNIST); `features()` is its 256-d penultimate layer."""

    def __init__(self, channels: int, classes: int = 10, width: int = 24, feature_dim: int = 256):
        super().__init__()
        w = width

        def block(i, o, stride=1, pool=True):
            layers = [nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        self.body = nn.Sequential(block(channels, w, stride=2, pool=False), block(w, 2 * w), block(2 * w, 4 * w),
                                  nn.Flatten(), nn.Linear(4 * w * 16, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _cbr(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = _cbr(c, c), _cbr(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class ResNet9Classifier(nn.Module):
    """The DAWNBench ResNet-9 layout at a quarter of its width (16-32-64-128: 0.41M params, ~80 s per
    CIFAR-10 epoch on 2 CPU cores); `features()` is the 128-d global-max-pooled last stage."""

    def __init__(self, channels: int, classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(_cbr(channels, w), _cbr(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w),
                                  _cbr(2 * w, 4 * w), nn.MaxPool2d(2), _cbr(4 * w, 8 * w), nn.MaxPool2d(2),
                                  _Residual(8 * w), nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(8 * w, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)) * 0.125  # the reference ResNet-9's logit scale


# Per-architecture recipe: grey 32x32 data (Fashion-MNIST) needs only the small CNN; colour data
# (CIFAR-10) needs ResNet-9 with crop augmentation to pass 85%.
CLASSIFIERS = {
    "cnn-small": dict(build=FeatureClassifier, epochs=3, batch=128, optimizer="adamw", lr=3e-3, wd=5e-4,
                      crop=0, smoothing=0.1),
    "resnet9-w16": dict(build=ResNet9Classifier, epochs=16, batch=256, optimizer="sgd", lr=0.4, wd=5e-4,
                        crop=4, smoothing=0.2),
}


def default_classifier(channels: int) -> str:
    return "cnn-small" if channels == 1 else "resnet9-w16"


def _to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW or float in [-1, 1] -> float in [-1, 1]."""
    if x.dtype == torch.uint8:
        return x.float().div(127.5).sub(1)
    return x.float()


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Per-image random translation by up to `pad` pixels with reflect padding (the standard CIFAR crop)."""
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (pad,) * 4, mode="reflect")
    oy, ox = (torch.randint(0, 2 * pad + 1, (b,), generator=g) for _ in range(2))
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None].to(x.device)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :].to(x.device)
    return xp[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
              rows, cols]


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     arch: str = "cnn-small", epochs: int | None = None, seed: int = 0,
                     device: str = "cpu", progress: bool = True) -> tuple[nn.Module, float]:
    r = CLASSIFIERS[arch]
    epochs, batch = epochs or r["epochs"], r["batch"]
    torch.manual_seed(seed)
    model = r["build"](train_x.shape[1], int(train_y.max()) + 1).to(device).to(memory_format=torch.channels_last)
    if r["optimizer"] == "sgd":
        decay = [p for p in model.parameters() if p.ndim > 1]
        rest = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": r["wd"]}, {"params": rest, "weight_decay": 0}],
                              lr=r["lr"], momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["wd"])
    steps = epochs * (len(train_x) // batch)
    # one-cycle needs a few steps per phase (it divides by their lengths); a few-step classifier (tests, a tiny
    # data.limit) trains at the constant peak rate
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=steps, pct_start=0.25)
             if steps >= 8 else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    g = torch.Generator().manual_seed(seed)
    bar = progress_bar(total=steps, desc=f"training feature classifier ({arch})", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=g)
        model.train()
        for i in range(len(train_x) // batch):
            idx = perm[i * batch: (i + 1) * batch]
            x = random_crop(_to_input(train_x[idx]), r["crop"], g).to(device)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
            x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), train_y[idx].to(device), label_smoothing=r["smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval(), classifier_accuracy(model, test_x, test_y, device)


@torch.no_grad()
def classifier_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str = "cpu") -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 512):
        correct += int((model(_to_input(x[i: i + 512]).to(device)).argmax(1).cpu() == y[i: i + 512]).sum())
    return correct / len(x)


def _data_hash(x: torch.Tensor) -> str:
    h = hashlib.sha1()
    h.update(str(tuple(x.shape)).encode())
    h.update(x[:: max(1, len(x) // 256)].contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class ClassifierFeatures:
    """Penultimate features of the dataset's own classifier (trained once, cached)."""

    def __init__(self, model: nn.Module, info: dict, device: str = "cpu", metric: str | None = None):
        # one memory format for fresh and reloaded weights, so that their features agree bit for bit
        self.model = model.to(device).to(memory_format=torch.channels_last).eval()
        self.info, self.device = info, device
        arch = info.get("arch", "cnn-small")
        epochs = "" if info.get("epochs", CLASSIFIERS[arch]["epochs"]) == CLASSIFIERS[arch]["epochs"] else \
            f"-e{info['epochs']}"
        self.name = f"classifier-{info['dataset']}-{arch}-{info['hash']}{epochs}"  # keys the reference features
        self.metric = metric or f"FD-{info['dataset'].upper()}"  # the dataset's `data.Dataset.fd_metric`

    @classmethod
    def load_or_train(cls, dataset: str, train: tuple, test: tuple, device: str = "cpu", epochs: int | None = None,
                      progress: bool = True, root: Path | None = None, arch: str | None = None,
                      metric: str | None = None) -> "ClassifierFeatures":
        """The cached classifier for (dataset, architecture, training data), training it on first use. metric:
        the name its FD goes by (default FD-<DATASET>)."""
        from safetensors.torch import load_file, save_file

        arch = arch or default_classifier(train[0].shape[1])
        if arch not in CLASSIFIERS:
            raise EbdiffError(f"unknown classifier {arch!r} (choose from {', '.join(CLASSIFIERS)})")
        epochs = epochs or CLASSIFIERS[arch]["epochs"]
        h = _data_hash(train[0])
        root = (root or cache_dir()) / "classifiers"
        # a classifier trained for other than its recipe's epochs is cached apart, never served as the recipe's
        stem = root / (f"{dataset}-{arch}-{h}" + ("" if epochs == CLASSIFIERS[arch]["epochs"] else f"-e{epochs}"))
        meta_path = stem.with_suffix(".json")
        model = CLASSIFIERS[arch]["build"](train[0].shape[1], int(train[1].max()) + 1)
        if meta_path.is_file() and stem.with_suffix(".safetensors").is_file():
            info = json.loads(meta_path.read_text())
            model.load_state_dict(load_file(str(stem.with_suffix(".safetensors"))))
            return cls(model, info, device, metric)
        model, acc = train_classifier(*train, *test, arch=arch, epochs=epochs, device=device, progress=progress)
        with torch.no_grad():
            feature_dim = model.features(_to_input(test[0][:2]).to(device)).shape[1]
        info = {"dataset": dataset, "arch": arch, "hash": h, "test_accuracy": acc,
                "epochs": epochs, "train_images": len(train[0]),
                "test_images": len(test[0]), "feature_dim": feature_dim}
        atomic_save(stem.with_suffix(".safetensors"),
                    lambda p: save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, p))
        atomic_write_json(meta_path, info)
        return cls(model, info, device, metric)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 500, progress: bool = False) -> np.ndarray:
        out = [self.model.features(_to_input(b).to(self.device).contiguous(memory_format=torch.channels_last)).float().cpu()
               for b in _batches(images, batch, progress, "features")]
        return torch.cat(out).numpy()


class InceptionFeatures:
    """pytorch-fid's Inception-v3 pool3 features (2048-d): paper-comparable FID."""

    metric = "FID"
    name = "inception-pool3"

    def __init__(self, weights: str | None = None, device: str = "cpu"):
        try:
            from pytorch_fid import inception as pfi
        except ImportError:
            raise EbdiffError("Inception FID needs the pytorch-fid package: pip install pytorch-fid") from None
        hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        path = Path(weights).expanduser() if weights else hub
        if weights and not path.is_file():
            raise EbdiffError(f"--inception-weights {path}: no such file (need {INCEPTION_FILE})")
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            orig = pfi.load_state_dict_from_url
            pfi.load_state_dict_from_url = lambda *a, **k: state  # the package would download it
            try:
                self.model = pfi.InceptionV3([3]).to(device).eval()
            finally:
                pfi.load_state_dict_from_url = orig
        else:
            try:
                self.model = pfi.InceptionV3([3]).to(device).eval()
            except Exception:
                raise EbdiffError(
                    f"Inception FID weights not found and not downloadable: put {INCEPTION_FILE} "
                    f"({pfi.FID_WEIGHTS_URL}) at {hub} or pass --inception-weights PATH"
                ) from None
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 200, progress: bool = False) -> np.ndarray:
        out = []
        for b in _batches(images, batch, progress, "inception"):
            x = (_to_input(b) + 1) / 2  # pytorch-fid takes [0, 1]
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            out.append(self.model(x.to(self.device))[0].squeeze(-1).squeeze(-1).float().cpu())
        return torch.cat(out).numpy()


def reference_stats(extractor: Callable, name: str, images: torch.Tensor, key: str,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, sigma, features) of a reference set, cached as .npz per dataset split and extractor. images: a
    uint8 tensor, or a sequence of batches with a `digest()` (`data.ImageRows`, a streamed dataset)."""
    digest = _data_hash(images) if torch.is_tensor(images) else images.digest()
    path = cache_dir() / "stats" / f"{key}-{name}-{digest}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["mu"], z["sigma"], z["features"]
    feats = extractor(images, progress=progress)
    mu, sigma = feature_stats(feats)

    def _w(p):
        with open(p, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=feats.astype(np.float32))

    atomic_save(path, _w)
    return mu, sigma, feats
