"""The ablation rows are short overlays on configs/pathldm.yaml that give the published configs.

``tests/fixtures/full_configs`` holds each row's complete config as it was before it became an
overlay, with the ``configs/pathldm.yaml`` of that moment: every overlay merged on that base must
give its row key for key, however ``configs/pathldm.yaml`` evolves later.
"""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.config import merge_configs
from ldm.trainer_setup import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "tests" / "fixtures" / "full_configs"
ROWS = sorted(p.name for p in (FULL / "ablations").glob("*.yaml"))
OVERLAYS = sorted((ROOT / "configs" / "ablations").glob("*.yaml"))


def test_every_overlay_has_its_row():
    # besides the rows: the paper's optimisation settings and a model beyond the paper
    assert {p.name for p in OVERLAYS} == {*ROWS, "paper_hparams.yaml", "levels_vector_text.yaml"}


@pytest.mark.parametrize("name", ROWS)
def test_overlay_on_the_base_is_the_published_row(name):
    merged = merge_configs(OmegaConf.load(FULL / "pathldm.yaml"),
                           OmegaConf.load(ROOT / "configs" / "ablations" / name))
    expected = OmegaConf.load(FULL / "ablations" / name)
    assert OmegaConf.to_container(merged) == OmegaConf.to_container(expected)


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_overlays_are_short_and_name_their_row(path):
    text = path.read_text()
    body = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert len(body) <= 32, f"{path.name}: {len(body)} lines of YAML"
    assert "target" not in OmegaConf.load(path).get("model", {})  # an overlay, not a model
    assert "Table" in text or "paper" in text


@pytest.mark.parametrize("name", ROWS)
def test_readmes_give_the_command_of_every_row(name):
    command = f"python main.py --base configs/pathldm.yaml configs/ablations/{name}"
    for readme in (ROOT / "README.md", ROOT / "configs" / "ablations" / "README.md"):
        assert command in readme.read_text(), f"{readme.name} lacks `{command}`"


def test_main_merges_overlays_and_explains_a_lone_one():
    cfg = load_config([ROOT / "configs" / "pathldm.yaml",
                       ROOT / "configs" / "ablations" / "vq_f4_class_finetune.yaml"],
                      ["data.params.batch_size=8"])
    assert cfg.model.params.cond_stage_config.params == {
        "embed_dim": 512, "n_classes": 5, "key": "class_label"}
    assert "summary_mode" not in cfg.data.params.train and cfg.data.params.batch_size == 8
    with pytest.raises(ConfigError, match="--base configs/pathldm.yaml configs/ablations/"):
        load_config([ROOT / "configs" / "ablations" / "clip_text.yaml"], [])


def test_replace_and_drop():
    base = OmegaConf.create({"a": {"x": 1, "y": {"z": 2}}, "b": {"k": 1, "j": 2}, "c": [1, 2]})
    before = OmegaConf.to_container(base)
    overlay = {"a": {"_replace_": True, "w": 3}, "b": {"_drop_": ["k"], "m": 4}, "c": [3]}
    merged = merge_configs(base, overlay, {"b": {"n": 5}})
    assert OmegaConf.to_container(merged) == {"a": {"w": 3}, "b": {"j": 2, "m": 4, "n": 5},
                                              "c": [3]}
    assert OmegaConf.to_container(base) == before  # inputs are not changed
    assert merge_configs(base) == base  # without directives it is OmegaConf.merge


@pytest.mark.parametrize("overlay, message", [
    ({"b": {"_drop_": ["nope"]}}, r"b\._drop_: 'nope' is not a key of b"),
    ({"b": {"_drop_": "k"}}, r"b\._drop_ must be a list"),
    ({"a": {"_replace_": "yes"}}, r"a\._replace_ must be true or false"),
    ({"a": {"_replace_": True, "q": {"_drop_": ["x"]}}}, r"a\.q\._drop_: 'x'"),
])
def test_bad_directives_name_the_key(overlay, message):
    base = {"a": {"x": 1, "q": {"x": 1}}, "b": {"k": 1}}
    with pytest.raises(ValueError, match=message):
        merge_configs(base, overlay)
