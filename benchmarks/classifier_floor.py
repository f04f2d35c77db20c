"""Train (or load) ebdiff's feature classifier for a dataset; report test accuracy and the FD/KID floor
(train split vs test split), and check the FD against pytorch-fid's implementation on the same features.

    python benchmarks/classifier_floor.py --dataset fashion-mnist --out floor.json
    python benchmarks/classifier_floor.py --dataset cifar10 --root /tmp/cifar10 --out c10.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from ebdiff.config import DataConfig
from ebdiff.data.datasets import load_dataset
from ebdiff.evaluate.metrics import ClassifierFeatures, fd_from_features, feature_stats, kid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--root")
    ap.add_argument("--epochs", type=int, help="default: the classifier recipe's")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from pytorch_fid.fid_score import calculate_frechet_distance

    dcfg = DataConfig(name=a.dataset, root=a.root)
    t0 = time.perf_counter()
    train = load_dataset(replace(dcfg, split="train"), 32)
    test = load_dataset(replace(dcfg, split="test"), 32)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    clf = ClassifierFeatures.load_or_train(a.dataset, (train.images, train.labels), (test.images, test.labels),
                                           epochs=a.epochs)
    t_clf = time.perf_counter() - t0
    ftr, fte = clf(train.images, progress=True), clf(test.images, progress=True)
    fd = fd_from_features(fte, ftr)
    fd_pf = calculate_frechet_distance(*feature_stats(fte), *feature_stats(ftr))
    k = kid(fte, ftr, subsets=50, subset_size=1000)
    res = {"dataset": a.dataset, "metric": clf.metric, "classifier": clf.info, "train_images": len(train),
           "test_images": len(test), "floor_fd_test_vs_train": fd, "floor_fd_pytorch_fid": float(fd_pf),
           "abs_diff_vs_pytorch_fid": abs(fd - float(fd_pf)), "floor_kid": k, "data_s": t_data,
           "classifier_s": t_clf}
    print(json.dumps(res, indent=2))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
