import json

import numpy as np
import pytest
import torch

from ebdiff.errors import EbdiffError
from ebdiff.evaluate.metrics import (
    ClassifierFeatures,
    InceptionFeatures,
    fd_from_features,
    feature_stats,
    frechet_distance,
    kid,
    train_classifier,
)


def test_fd_identical_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(fd_from_features(f, f)) < 1e-8


def test_fd_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert abs(frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) - expected) < 1e-9


def test_fd_general_against_scipy_reference_and_samples():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + np.eye(4), b @ b.T + np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    r = linalg.sqrtm(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(r @ s2 @ r).real)
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-8
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    assert abs(fd_from_features(x, y) - expected) / expected < 0.02


def test_fd_invariant_to_order_and_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(400, 16)), rng.normal(0.3, 1.2, size=(300, 16))
    d = fd_from_features(x, y)
    assert abs(d - fd_from_features(x[rng.permutation(400)], y[rng.permutation(300)])) < 1e-9
    assert abs(d - calculate_frechet_distance(*feature_stats(x), *feature_stats(y))) < 1e-9


def test_kid():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same, _ = kid(x, y, subsets=20, subset_size=300)
    shifted, _ = kid(x, y + 1.0, subsets=20, subset_size=300)
    assert abs(same) < 0.01 and shifted > 0.1


def _toy_split(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (torch.rand(n, 1, 32, 32, generator=g) * 60).to(torch.uint8)
    x[y == 1, :, 8:24, 8:24] += 150  # class 1: a bright square
    return x, y


def test_classifier_learns_and_features_are_deterministic(tmp_path):
    tr, te = _toy_split(512, 0), _toy_split(256, 1)
    clf = ClassifierFeatures.load_or_train("toy", tr, te, epochs=2, progress=False, root=tmp_path)
    assert clf.info["test_accuracy"] > 0.95 and clf.metric == "FD-TOY"
    a, b = clf(te[0]), clf(te[0])
    assert a.shape == (256, 256) and np.array_equal(a, b)
    again = ClassifierFeatures.load_or_train("toy", tr, te, epochs=2, progress=False, root=tmp_path)
    assert np.array_equal(again(te[0]), a)  # cached weights give the same features
    assert json.loads(next((tmp_path / "classifiers").glob("*.json")).read_text())["test_accuracy"] > 0.95
    # another number of epochs than the recipe's (3) is another classifier, keying other reference features
    recipe = ClassifierFeatures.load_or_train("toy", tr, te, progress=False, root=tmp_path)
    assert clf.name == recipe.name + "-e2" and len(list((tmp_path / "classifiers").glob("*.json"))) == 2
    assert not np.array_equal(recipe(te[0]), a)


def test_inception_offline_without_weights(tmp_path, monkeypatch):
    with pytest.raises(EbdiffError, match="no such file"):
        InceptionFeatures(str(tmp_path / "missing.pth"))
    import pytorch_fid.inception as pfi

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(pfi, "load_state_dict_from_url", offline)
    with pytest.raises(EbdiffError) as e:
        InceptionFeatures(None)
    msg = str(e.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and str(tmp_path) in msg and "\n" not in msg
