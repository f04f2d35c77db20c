import pytest

from ebdiff.config import Config, load_config, parse_override
from ebdiff.errors import ConfigError


def test_defaults_follow_reference_recipe():
    c = load_config()
    assert c.train.lr == 2e-4 and c.train.batch_size == 128 and c.train.grad_clip == 1.0
    assert c.train.ema_decay == 0.9999 and c.model.dropout == 0.1
    assert c.diffusion.timesteps == 1000 and c.diffusion.beta_start == 1e-4 and c.diffusion.beta_end == 0.02
    assert c.diffusion.timestep_sampler == "antithetic"
    assert c.early_bird.eta == 0.1 and c.early_bird.queue == 5


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  preset: fmnist\ntrain:\n  iters: 50\n  lr: 1\n")
    c = load_config(p, ["train.iters=200", "model.preset=tiny", "early_bird.ratio=0.5", "early_bird.check_every=7"])
    assert c.train.iters == 200 and c.model.preset == "tiny"
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert c.early_bird.ratio == 0.5 and c.early_bird.check_every == 7
    assert load_config(None, ["early_bird.check_every=epoch"]).early_bird.check_every == "epoch"


@pytest.mark.parametrize("override,needle", [
    ("train.foo=1", "train.foo"),
    ("bogus.iters=1", "bogus"),
    ("train.iters=abc", "train.iters"),
    ("train.iters=1.5", "train.iters"),
    ("train.iters=-3", "train.iters"),
    ("train.iters=0", "train.iters"),
    ("model.preset=huge", "model.preset"),
    ("early_bird.ratio=1.2", "early_bird.ratio"),
    ("early_bird.ratio=0", "early_bird.ratio"),
    ("early_bird.eta=0", "early_bird.eta"),
    ("early_bird.queue=1", "early_bird.queue"),
    ("early_bird.criterion=l1", "early_bird.criterion"),
    ("early_bird.check_every=week", "early_bird.check_every"),
    ("early_bird.round_channels=0", "early_bird.round_channels"),
    ("train.layout_opt=maybe", "train.layout_opt"),
    ("train.progress=maybe", "train.progress"),
    ("noequals", "section.key=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_carry_state_and_reinit_exclude_each_other():
    assert load_config(None, ["early_bird.carry_state=true"]).early_bird.carry_state is True
    with pytest.raises(ConfigError, match="early_bird.carry_state.*reinit"):
        load_config(None, ["early_bird.carry_state=true", "early_bird.reinit=true"])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  itres: 5\n")
    with pytest.raises(ConfigError, match="train.itres"):
        load_config(p)


def test_parse_override_types():
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4
    assert parse_override("data.root=null") == ("data", "root", None)
    assert parse_override("train.adam_betas=[0.9, 0.99]") == ("train", "adam_betas", [0.9, 0.99])


def test_round_trip_dump(tmp_path):
    from ebdiff.config import dump_yaml

    c = load_config(None, ["train.iters=7"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(c))
    assert load_config(p).to_dict() == c.to_dict()


def test_yaml_booleans_for_a_string_choice(tmp_path):
    """YAML 1.1 reads `no` as False: the documented choice `mixed_precision=no` must still mean "no"."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["sample.mixed_precision=off"]).sample.mixed_precision == "no"
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  mixed_precision: no\n  channels_last: no\n")
    cfg = load_config(p)
    assert cfg.train.mixed_precision == "no" and cfg.train.channels_last is False  # bool-or-str keeps the bool
    with pytest.raises(ConfigError, match="train.mixed_precision.*'yes'"):
        load_config(None, ["train.mixed_precision=yes"])
