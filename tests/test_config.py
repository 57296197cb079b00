import json
from pathlib import Path

import pytest

from musiclm.config import (Config, ConfigError, ModelConfig, apply_overrides, from_dict, load_config,
                            load_json, load_model_config, model_preset, preset, save_json, to_dict)

OPEN_MUSICLM = Path(__file__).parent / "data" / "open_musiclm_large_small_context.json"


def test_open_musiclm_model_json_loads_as_is_and_matches_large_preset():
    cfg = load_model_config(OPEN_MUSICLM)
    large = model_preset("large")
    for stage in ("semantic", "coarse", "fine"):
        assert (cfg.stage(stage).dim, cfg.stage(stage).depth, cfg.stage(stage).heads) == (1024, 24, 16)
        assert cfg.stage(stage).depth == large.stage(stage).depth
    assert cfg.hubert_kmeans_cfg.model_name == "m-a-p/MERT-v0" and cfg.hubert_kmeans_cfg.embed_layer == 7
    ts = cfg.token_system()
    assert ts.clap_rvq_cfg.rq_num_quantizers == 12 and ts.encodec_cfg.bandwidth == 6.0
    assert (ts.num_coarse_quantizers, ts.num_fine_quantizers) == (3, 5)
    assert isinstance(load_config(OPEN_MUSICLM), Config)  # a bare model JSON is accepted as a full config


def test_presets_have_open_musiclm_sizes():
    assert model_preset("small").semantic_cfg.depth == 6 and model_preset("small").semantic_cfg.heads == 8
    assert model_preset("large").fine_cfg.depth == 24 and model_preset("large").fine_cfg.heads == 16
    tiny = preset("tiny", "coarse")
    assert tiny.model.coarse_cfg.dim < 256 and tiny.train.stage == "coarse"
    assert preset("large", "coarse").train.lr_warmup == 6000 and preset("large", "fine").train.lr_warmup == 0
    with pytest.raises(ConfigError, match="preset"):
        model_preset("huge")


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    data = json.loads(OPEN_MUSICLM.read_text())
    data["semantic_cfg"]["dept"] = 4
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"semantic_cfg\.dept.*did you mean 'depth'"):
        load_model_config(tmp_path / "bad.json")


@pytest.mark.parametrize("section,key,value,pattern", [
    ("semantic_cfg", "depth", "four", r"semantic_cfg\.depth: expected an integer"),
    ("semantic_cfg", "depth", 0, r"semantic_cfg\.depth: must be >= 1"),
    ("coarse_cfg", "relative_position_bias_type", "rotary", r"coarse_cfg\.relative_position_bias_type"),
    ("clap_rvq_cfg", "rq_ema_decay", 1.5, r"clap_rvq_cfg\.rq_ema_decay"),
    ("global_cfg", "num_fine_quantizers", True, r"global_cfg\.num_fine_quantizers: expected an integer"),
])
def test_wrong_value_is_named(section, key, value, pattern):
    data = json.loads(OPEN_MUSICLM.read_text())
    data[section][key] = value
    with pytest.raises(ConfigError, match=pattern):
        from_dict(ModelConfig, data)


def test_overrides_from_cli_strings_and_tune_dicts():
    cfg = preset("tiny")
    out = apply_overrides(cfg, ["train.lr=1e-4", "model.semantic_cfg.depth=3",
                                "model.coarse_cfg.relative_position_bias_type=none"])
    assert out.train.lr == 1e-4 and out.model.semantic_cfg.depth == 3
    assert out.model.coarse_cfg.relative_position_bias_type == "none"
    assert cfg.train.lr != 1e-4  # the original is untouched
    assert apply_overrides(cfg, {"train.zero_stage": 3}).train.zero_stage == 3
    with pytest.raises(ConfigError, match=r"train\.lrr.*did you mean 'train\.lr'"):
        apply_overrides(cfg, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"train\.zero_stage: must be 0, 1, 2 or 3"):
        apply_overrides(cfg, {"train.zero_stage": 4})
    # a combination that would fail in every worker's first step is refused before anything starts
    assert apply_overrides(cfg, {"train.compile": True}).train.compile
    with pytest.raises(ConfigError, match=r"train\.compile: is not supported with zero_stage 3; use zero_stage 2"):
        apply_overrides(cfg, {"train.compile": True, "train.zero_stage": 3})
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(cfg, ["train.lr"])


def test_json_round_trip(tmp_path):
    cfg = apply_overrides(preset("small", "fine"), ["train.lr=2e-4"])
    save_json(cfg, tmp_path / "c.json")
    assert load_json(Config, tmp_path / "c.json") == cfg
    assert to_dict(load_config(tmp_path / "c.json")) == to_dict(cfg)


def test_missing_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(tmp_path / "broken.json")


@pytest.mark.parametrize("override,pattern", [
    ("train.lr=1e400", r"train\.lr: inf is not a finite number"),  # JSON's 1e400 is infinity
    ("train.lr=Infinity", r"train\.lr: inf is not a finite number"),
    ("train.lr=NaN", r"train\.lr: nan is not a finite number"),
    ("train.max_grad_norm=-1", r"train\.max_grad_norm: must be >= 0"),
    ("train.wd=-5", r"train\.wd: must be >= 0"),
    ("train.betas=[5,-3]", r"train\.betas: must be two numbers in \[0, 1\)"),
    ("model.semantic_cfg.dim_head=0", r"model\.semantic_cfg\.dim_head: must be >= 1"),
    ("model.semantic_cfg.heads=1000", r"model\.semantic_cfg\.heads: x dim_head = 32000 is more than 8 x dim"),
    ("train.num_train_steps=1e30", r"train\.num_train_steps: must be between 1 and 1,000,000,000"),
    ("data.min_seconds=Infinity", r"data\.min_seconds: inf is not a finite number"),
    ("data.min_seconds=40", r"data\.min_seconds: must be > 0 and at most clip_seconds"),
    ("model.hubert_kmeans_cfg.output_hz=0", r"model\.hubert_kmeans_cfg\.output_hz"),
])
def test_every_number_setting_is_checked_for_its_range(override, pattern):
    """Each of these was accepted and trained (lr=1e400: 200 steps of NaN loss, exit 0)."""
    from musiclm.config import stage_config

    with pytest.raises(ConfigError, match=pattern):
        stage_config("semantic", "tiny", None, [override])


def test_generation_settings_refuse_non_finite_numbers():
    from musiclm.generation.generate import GenerateSettings

    with pytest.raises(ConfigError, match=r"duration: inf is not a finite number"):
        GenerateSettings(duration=float("inf"))


def test_a_partial_config_file_keeps_the_presets_other_settings(tmp_path):
    """A --config without semantic_cfg trained the library's default model (width 1024, depth 6: a 334 MB
    checkpoint) instead of the preset's, and one without train ran 200,000 steps: what a file leaves out is the
    preset's. The run's first line says the model's shape."""
    from musiclm.config import stage_config
    from musiclm.train.run import describe_run

    (tmp_path / "partial.json").write_text(json.dumps({"model": {"coarse_cfg": {"depth": 3}},
                                                       "train": {"lr": 1e-3}}))
    cfg = stage_config("semantic", "tiny", tmp_path / "partial.json")
    tiny = preset("tiny", "semantic")
    assert cfg.model.semantic_cfg == tiny.model.semantic_cfg and cfg.model.coarse_cfg.depth == 3
    assert cfg.train.num_train_steps == tiny.train.num_train_steps == 200 and cfg.train.lr == 1e-3
    assert describe_run(cfg).startswith("semantic stage: dim 64, depth 2, 2 heads, 1.8M parameters; 200 steps")
    for text, pattern in (("", "not valid JSON"), ("[1]", "expected a JSON object"),
                          ('{"train": {"lrr": 1}}', r"partial\.json: unknown config key 'train\.lrr'")):
        (tmp_path / "partial.json").write_text(text)
        with pytest.raises(ConfigError, match=pattern) as err:
            stage_config("semantic", "tiny", tmp_path / "partial.json")
        assert "partial.json" in str(err.value)


def test_imports_flow_one_way():
    """jobs/ uses tune/ and musiclm/; tune/ uses musiclm/ only; musiclm/ uses neither (read from the source, every
    import statement, also those inside functions)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    forbidden = {"musiclm": {"jobs", "tune"}, "tune": {"jobs"}}
    found = []
    for package, banned in forbidden.items():
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                found += [f"{path.relative_to(root)}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] in banned]
    assert not found, found


def test_num_workers_is_a_count_or_an_elastic_range_from_json_the_command_line_and_tune(tmp_path):
    base = preset("tiny", "coarse")
    assert apply_overrides(base, ["train.num_workers=2:3"]).train.num_workers == "2:3"  # --set / --num-workers
    elastic = apply_overrides(base, {"train.num_workers": "2:3"}).train  # as Tune gives it
    assert (elastic.min_workers, elastic.max_workers, elastic.elastic) == (2, 3, True)
    fixed = apply_overrides(base, ["train.num_workers=2"]).train
    assert fixed.num_workers == 2 and not fixed.elastic and (fixed.min_workers, fixed.max_workers) == (2, 2)
    assert apply_overrides(base, ["train.num_workers=3:3"]).train.num_workers == 3  # a range of one is a count
    save_json(apply_overrides(base, ["train.num_workers=1:4"]), tmp_path / "c.json")
    assert load_json(Config, tmp_path / "c.json").train.max_workers == 4
    for bad in ("3:2", "0:2", "0", "two", "1:2:3", "-1"):
        with pytest.raises(ConfigError, match=r"num_workers: .* neither a number of workers .* nor a range MIN:MAX"):
            apply_overrides(base, [f"train.num_workers={bad}"])
    with pytest.raises(ConfigError, match="train.num_workers: "):
        apply_overrides(base, ["train.num_workers=2.5"])


def test_the_batch_per_optimizer_step_stays_where_the_worker_counts_divide_it():
    from musiclm.train.loop import batch_plan

    t = apply_overrides(preset("tiny", "coarse"), ["train.batch_size=2", "train.grad_accum_every=2"]).train
    assert batch_plan(t, 4, 4) == (2, "the batch per optimizer step stays 16")
    assert batch_plan(t, 2, 4) == (4, "the batch per optimizer step stays 16 (gradient accumulation 2 -> 4)")
    assert batch_plan(t, 1, 4) == (8, "the batch per optimizer step stays 16 (gradient accumulation 2 -> 8)")
    assert batch_plan(t, 3, 4) == (2, "the batch per optimizer step changes 16 -> 12 (2 x 4 accumulated batches do "
                                      "not divide among 3 workers)")
    assert batch_plan(t, 8, 4) == (1, "the batch per optimizer step stays 16 (gradient accumulation 2 -> 1)")
    free = apply_overrides(preset("tiny", "coarse"), ["train.batch_size=2", "train.grad_accum_every=2",
                                                      "train.keep_global_batch=false"]).train
    assert batch_plan(free, 2, 4) == (2, "the batch per optimizer step changes 16 -> 8 (train.keep_global_batch is "
                                         "false)")
