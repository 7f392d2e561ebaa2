"""Config schema: composition from parts, overrides, and errors that name the key and its source."""

import argparse
from pathlib import Path

import pytest

from ds_linclip.config import ConfigError, add_config_arguments, cli_config, load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]


def test_laion_configs_compose_parts_and_presets():
    cfg = load_config([REPO / "configs/vit_l16_laion400m.yaml"])
    assert cfg.model.preset == "vit_l16"
    assert (cfg.model.image.width, cfg.model.image.layers, cfg.model.text.width) == (1024, 24, 768)
    assert cfg.model.image.attention == cfg.model.text.attention == "linear-affine"
    assert cfg.data.mode == "resampled"  # from the data part
    assert cfg.train.warmup_steps == 2000  # from the train part
    assert cfg.train.zero_stage == 2  # the top file wins over its parts


def test_overrides_compose_on_top_of_files():
    cfg = load_config(
        [REPO / "configs/vit_b16_laion400m.yaml"],
        ["model.image.attention=softmax", "train.micro_batch_size=64", "model.image.image_size=384"],
    )
    assert cfg.model.image.attention == "softmax"
    assert cfg.model.text.attention == "linear-affine"
    assert cfg.train.micro_batch_size == 64
    assert cfg.model.image.image_size == 384
    assert cfg.model.image.width == 768  # preset still applies underneath


def test_preset_from_override_replaces_file_preset_shapes():
    cfg = load_config([REPO / "configs/vit_b16_laion400m.yaml"], ["model.preset=tiny"])
    assert (cfg.model.image.width, cfg.model.image.patch_size) == (128, 4)


def test_unknown_key_names_key_source_and_closest():
    with pytest.raises(ConfigError) as err:
        load_config([], ["train.micro_batch=3"])
    msg = str(err.value)
    assert "'train.micro_batch'" in msg and "override 'train.micro_batch=3'" in msg
    assert "did you mean 'train.micro_batch_size'" in msg


def test_unknown_key_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config([bad])
    msg = str(err.value)
    assert "train.lerning_rate" in msg and str(bad) in msg and "did you mean" in msg


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as err:
        load_config([], ["train.steps=many"])
    assert "'train.steps'" in str(err.value) and "many" in str(err.value)


def test_bad_enum_value_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config([], ["model.text.attention=linear-afine"])
    msg = str(err.value)
    assert "'model.text.attention'" in msg and "did you mean 'linear-affine'" in msg


def test_bad_preset_and_bad_shapes():
    with pytest.raises(ConfigError, match="model.preset.*did you mean 'vit_b16'"):
        load_config([], ["model.preset=vit_b61"])
    with pytest.raises(ConfigError, match="model.image.heads"):
        load_config([], ["model.preset=tiny", "model.image.heads=3"])


def test_missing_required_value_names_key():
    with pytest.raises(ConfigError, match="'data.train_shards'.*required"):
        load_config([], [], required=["data.train_shards"])


def test_missing_file_and_circular_parts(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("defaults: [b]\n")
    b.write_text("defaults: [a]\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config([a])


def test_deepspeed_passthrough_accepts_any_key():
    cfg = load_config([], ["+deepspeed.wall_clock_breakdown=true", "+deepspeed.zero_optimization.overlap_comm=false"])
    assert cfg.deepspeed.wall_clock_breakdown is True
    assert cfg.deepspeed.zero_optimization.overlap_comm is False


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_cli_exits_2_on_config_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_config(_parse(["train.zero_stage=7"]))
    assert exit_info.value.code == 2
    assert "train.zero_stage" in capsys.readouterr().err


def test_cli_print_config_round_trips(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_config(_parse(["--config", str(REPO / "configs/vit_s16_laion400m.yaml"), "--print-config"]))
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    from omegaconf import OmegaConf

    assert OmegaConf.create(printed).model.image.width == 384
    assert printed == to_yaml(load_config([REPO / "configs/vit_s16_laion400m.yaml"]))


def test_every_shipped_top_level_config_resolves_and_the_recipes_pair_up():
    """Each configs/*.yaml loads against the schema; every paper recipe (linear-affine) has a
    focused-variant twin that differs only in the attention description and the run name."""
    from omegaconf import OmegaConf

    from ds_linclip.config import load_config
    from ds_linclip.models.attention import resolve_attention

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 7
    for path in configs:
        load_config([path])
    for size in ("s16", "b16", "l16"):
        paper = load_config([REPO / f"configs/vit_{size}_laion400m.yaml"])
        focused = load_config([REPO / f"configs/vit_{size}_laion400m_focused.yaml"])
        assert resolve_attention(paper.model.image).name == "linear-affine"
        assert resolve_attention(focused.model.image).name == "linear-focused-local3"
        assert resolve_attention(focused.model.text, causal=True).name == "linear-focused"
        a, b = OmegaConf.to_container(paper), OmegaConf.to_container(focused)
        for tower in ("image", "text"):
            for key in ("attention", "local_kernel"):
                a["model"][tower].pop(key, None), b["model"][tower].pop(key, None)
        a["train"].pop("run_name"), b["train"].pop("run_name")
        assert a == b, size
    for size in ("b16", "l16"):  # the accuracy pick's twins: only the attention and the run name differ
        paper = OmegaConf.to_container(load_config([REPO / f"configs/vit_{size}_laion400m.yaml"]))
        pola = load_config([REPO / f"configs/vit_{size}_laion400m_pola.yaml"])
        assert resolve_attention(pola.model.image).name == "linear-pola"
        assert resolve_attention(pola.model.text, causal=True).name == "linear-pola"
        b = OmegaConf.to_container(pola)
        for tower in ("image", "text"):
            paper["model"][tower].pop("attention"), b["model"][tower].pop("attention")
        paper["train"].pop("run_name"), b["train"].pop("run_name")
        assert paper == b, size


def test_loss_keys_and_siglip_initialisation():
    import math

    from ds_linclip.config import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE

    clip = load_config([], ["model.preset=tiny"])
    assert (clip.train.loss, clip.train.accum_freq, clip.model.init_logit_bias) == ("clip", 1, None)
    assert clip.model.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    siglip = load_config([], ["model.preset=tiny", "train.loss=siglip"])
    assert (siglip.model.init_logit_scale, siglip.model.init_logit_bias) == (SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS)
    # what a file or override sets wins; an explicit null means no bias
    own = load_config([], ["train.loss=siglip", "model.init_logit_scale=2.0", "model.init_logit_bias=null"])
    assert (own.model.init_logit_scale, own.model.init_logit_bias) == (2.0, None)
    # siglip_dist is checked under the clip loss too (a typo is a typo)
    with pytest.raises(ConfigError, match="config key 'train.siglip_dist'.*'ring' is not one of bidir, gather"):
        load_config([], ["train.siglip_dist=ring"])
    assert load_config([], ["train.siglip_dist=gather"]).train.loss == "clip"
    with pytest.raises(ConfigError, match="config key 'train.loss'.*'foo' is not one of clip, siglip"):
        load_config([], ["train.loss=foo"])
    with pytest.raises(ConfigError, match="config key 'model.init_logit_bias'.*train.loss=siglip"):
        load_config([], ["model.init_logit_bias=-10"])
