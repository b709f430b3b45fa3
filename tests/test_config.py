"""Config parsing: types, unknown keys with suggestions, overrides, base files, presets."""
import pytest

from fairdistill.config import RunConfig, apply_overrides, from_dict, load_config, parse_override, read_yaml, stage_list
from fairdistill.errors import ConfigError
from fairdistill.methods.objective import annealed


def test_defaults_and_types():
    cfg = from_dict(RunConfig, {"epochs": 3, "optim": {"lr": 1, "name": "sgd"}, "data": {"batch_size": 32}})
    assert cfg.epochs == 3 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 32 and cfg.data.name == "digits-s"


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key\. Did you mean 'lr'\?"):
        from_dict(RunConfig, {"optim": {"lrr": 0.1}})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"epochs: expected int, got str"):
        from_dict(RunConfig, {"epochs": "ten"})
    with pytest.raises(ConfigError, match=r"data\.flip: expected bool"):
        from_dict(RunConfig, {"data": {"flip": 3}})
    with pytest.raises(ConfigError, match=r"seed: expected int, got bool"):
        from_dict(RunConfig, {"seed": True})


def test_overrides_parse_yaml_scalars():
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)
    assert parse_override("data.options.skew=0.9") == (["data", "options", "skew"], 0.9)
    assert parse_override("schedule.milestones=[100,150]") == (["schedule", "milestones"], [100, 150])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("epochs")
    data = apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr=0.5", "terms.kd.T=4"])
    assert data == {"optim": {"lr": 0.5}, "terms": {"kd": {"T": 4}}}


def test_base_files_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 7\noptim: {name: sgd, lr: 0.1}\ndata: {batch_size: 64}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\noptim: {lr: 0.05}\n")
    data = read_yaml(tmp_path / "run.yaml")
    assert data == {"epochs": 7, "optim": {"name": "sgd", "lr": 0.05}, "data": {"batch_size": 64}}
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        read_yaml(tmp_path / "loop.yaml")


def test_load_config_validates_names(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("model: {name: mfd-cnm}\n")
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'mfd-cnm'\. Did you mean 'mfd-cnn'\?"):
        load_config(f)
    f.write_text("data: {name: digitss}\n")
    with pytest.raises(ConfigError, match=r"data\.name: unknown data set 'digitss'.*digits-s"):
        load_config(f)
    f.write_text("method: hkdd\n")
    with pytest.raises(ConfigError, match=r"method: unknown method 'hkdd'\. Did you mean 'hkd'\?"):
        load_config(f)
    f.write_text("schedule: {name: platau}\n")
    with pytest.raises(ConfigError, match=r"schedule\.name: 'platau' is not valid\. Did you mean 'plateau'\?"):
        load_config(f)
    f.write_text("terms: {kd: {type: kdd}}\n")
    with pytest.raises(ConfigError, match=r"terms\.kd\.type: unknown method term 'kdd'"):
        load_config(f)
    f.write_text("stages: [{terms: [nope]}]\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.terms: no term named 'nope'"):
        load_config(f)


def test_presets_expand_under_explicit_values(tmp_path):
    f = tmp_path / "hkd.yaml"
    f.write_text("method: ss+hkd\nterms: {kd: {T: 1}}\n")
    cfg = load_config(f)
    assert cfg.name == "hkd"
    assert cfg.data.sampler == "balanced"
    assert cfg.terms["kd"] == {"type": "kd", "weight": 4.0, "weight_end": 1.0, "T": 1}
    cfg = load_config(f, ["terms.kd.weight_end=null"])
    assert cfg.terms["kd"]["weight_end"] is None


def test_stage_epochs():
    cfg = from_dict(RunConfig, {"epochs": 10, "stages": [{"name": "hint", "epochs_scale": 0.5, "ce_weight": 0}, {"name": "main"}]})
    st = stage_list(cfg)
    assert [s.epochs for s in st] == [5, 10] and st[0].ce_weight == 0


def test_annealing_is_linear_from_first_to_last_epoch():
    # MFD: lambda_h 4 -> 1 over 50 epochs, minus 3/49 per epoch
    assert annealed(4.0, 1.0, 0, 50) == 4.0
    assert annealed(4.0, 1.0, 1, 50) == pytest.approx(4.0 - 3 / 49)
    assert annealed(4.0, 1.0, 49, 50) == pytest.approx(1.0)
    assert annealed(4.0, None, 30, 50) == 4.0


def test_overrides_reach_into_preset_stages_and_unstaged_terms_join_the_last_stage(tmp_path):
    f = tmp_path / "adfit.yaml"
    f.write_text("method: ad+fitnet\nepochs: 4\n")
    cfg = load_config(f, ["stages.0.epochs=1"])
    st = stage_list(cfg)
    assert [s.name for s in st] == ["hint", "main"]
    assert [s.epochs for s in st] == [1, 4]
    assert st[0].terms == ["fitnet"] and st[1].terms == ["kd", "adversary"]
    with pytest.raises(ConfigError, match="not an index"):
        load_config(f, ["stages.5.epochs=1"])


def test_every_preset_and_pairwise_combination_validates():
    from fairdistill.config import PRESETS

    for a in PRESETS:
        for b in PRESETS:
            cfg = load_config(data={"method": f"{a}+{b}"})
            named = {t for s in stage_list(cfg) for t in (s.terms if s.terms is not None else cfg.terms)}
            assert named == set(cfg.terms), (a, b)
