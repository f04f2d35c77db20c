import json

import pytest

from ebdiff.backbones import build_model, count_macs_params
from ebdiff.cli import main

# REFERENCE.md section 3 (Torch-Pruning counting): exact numbers
EXPECTED = {"cifar10": (35_746_307, 6_064_135_040), "celeba64": (78_700_803, 23_921_622_912),
            "lsun256": (113_673_219, 248_688_433_920)}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_preset_sizes_exact(preset):
    macs, params = count_macs_params(build_model(preset))
    assert (params, macs) == EXPECTED[preset]
    assert f"{params / 1e6:.2f}" in {"35.75", "78.70", "113.67"}


def test_small_presets():
    m, p = count_macs_params(build_model("fmnist"))
    assert 5e6 < p < 15e6 and m < 2e9
    m, p = count_macs_params(build_model("tiny"))
    assert p < 5e5 and m < 1e8


def test_info_json(capsys):
    assert main(["info", "--preset", "cifar10", "--ratio", "0.5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["params"] == EXPECTED["cifar10"][0]
    assert rows[1]["ratio"] == 0.5 and abs(rows[1]["params"] / 9.0e6 - 1) < 0.02
