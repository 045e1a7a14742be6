import json

import pytest

from nsd.client.specs import prepare_spec, read_spec
from nsd.spec import SpecError, validate

GOOD = {"name": "t", "model": {"shared": True}, "recipe": {"kind": "python", "file": "/r.py"},
        "tuning": {"config_set": [{"rtn": {"bits": [4, 8]}}], "tolerable_loss": 0.01}}


def problems(raw) -> str:
    with pytest.raises(SpecError) as info:
        validate(raw)
    return "\n".join(info.value.problems)


def test_defaults():
    spec = validate(GOOD)
    assert spec.tuning.criterion == "relative" and spec.tuning.higher_is_better
    assert spec.tuning.max_trials == 100 and spec.resources.workers == 0


def test_validate_fills_every_default_from_the_dataclass_fields():
    from dataclasses import MISSING, fields

    from nsd.spec import ModelSpec, RecipeSpec, ResourcesSpec, TuningSpec

    spec = validate(GOOD)
    for section, cls in (("model", ModelSpec), ("recipe", RecipeSpec), ("tuning", TuningSpec),
                         ("resources", ResourcesSpec)):
        for f in fields(cls):
            if f.name not in GOOD.get(section, {}) and f.default is not MISSING:
                assert getattr(getattr(spec, section), f.name) == f.default, (section, f.name)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["tuning"].pop("config_set"), "tuning.config_set: required"),
    (lambda s: s["tuning"].update(config_set=[]), "tuning.config_set: must be a non-empty list"),
    (lambda s: s["tuning"].update(config_set=[{"rnt": {}}]), "unknown INC config 'rnt' (did you mean 'rtn'?)"),
    (lambda s: s["tuning"].update(config_set=[{"rtn": {"bits": []}}]), "rtn.bits: an empty list"),
    (lambda s: s["tuning"].update(config_set=[{"rtn": {}, "gptq": {}}]), "exactly one INC config name"),
    (lambda s: s["tuning"].update(tolerable_loss=-1), "tuning.tolerable_loss: must be at least 0.0"),
    (lambda s: s["tuning"].update(tolerable_loss="1%"), "tuning.tolerable_loss: must be a number"),
    (lambda s: s["tuning"].update(criterion="relatve"), "tuning.criterion: must be one of relative, absolute"),
    (lambda s: s["tuning"].update(max_trials=0), "tuning.max_trials: must be between 1"),
    (lambda s: s["tuning"].update(max_trials=2.5), "tuning.max_trials: must be a whole number"),
    (lambda s: s["tuning"].update(tolerable_los=0.1), "tuning.tolerable_los: unknown field (did you mean "
                                                      "'tolerable_loss'?)"),
    (lambda s: s["recipe"].pop("file"), "recipe.file: required for a python recipe"),
    (lambda s: s["recipe"].update(kind="magic"), "recipe.kind: must be one of python"),
    (lambda s: s.update(resources={"workers": -1}), "resources.workers: must be between 0"),
    (lambda s: s.update(name=""), "name: must be a non-empty string"),
    (lambda s: s.update(extra=1), "extra: unknown field"),
    (lambda s: s.update(tuning=[1]), "tuning: must be a table"),
])
def test_invalid_specs_name_the_field(change, message):
    raw = json.loads(json.dumps(GOOD))
    change(raw)
    assert message in problems(raw)


def test_every_problem_is_reported_at_once():
    text = problems({"tuning": {"tolerable_loss": -1, "criterion": "x"}, "recipe": {}})
    assert "tolerable_loss" in text and "criterion" in text and "recipe.file" in text and "config_set" in text


def test_not_a_table():
    assert "must be a table" in problems([1, 2])


def test_spec_file_paths_are_relative_to_the_spec(tmp_path):
    (tmp_path / "r.py").write_text("")
    (tmp_path / "t.toml").write_text('[recipe]\nfile = "r.py"\n[tuning]\nconfig_set = [{rtn = {bits = 4}}]\n')
    raw = read_spec(tmp_path / "t.toml")
    assert raw["recipe"]["file"] == str(tmp_path / "r.py") and raw["name"] == "t"
    assert prepare_spec(tmp_path / "t.toml")["recipe"]["file"] == str(tmp_path / "r.py")


def test_missing_files_and_bad_syntax_are_clear(tmp_path):
    (tmp_path / "t.toml").write_text('[recipe]\nfile = "nope.py"\n[tuning]\nconfig_set = [{rtn = {}}]\n')
    with pytest.raises(FileNotFoundError, match="recipe.file: .*nope.py does not exist"):
        prepare_spec(tmp_path / "t.toml")
    (tmp_path / "bad.toml").write_text("[recipe\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        read_spec(tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError, match="cannot read spec"):
        read_spec(tmp_path / "absent.toml")


def test_a_validated_spec_validates_again_unchanged():
    for raw in (GOOD, {"model": {"path": "/m", "shared": True}, "recipe": {"kind": "causal-lm", "data": "/d.txt"},
                       "tuning": {"preset": "auto"}}):
        spec = validate(raw).to_dict()
        assert validate(spec).to_dict() == spec


def test_presets_builtin_recipes_and_metric_direction():
    spec = validate({"model": {"path": "/m", "shared": True}, "recipe": {"kind": "causal-lm", "data": "/d.txt"},
                     "tuning": {"preset": "woq"}})
    assert spec.recipe.metric == "perplexity" and spec.tuning.higher_is_better is False
    assert spec.tuning.config_set[0] == {"rtn": {"bits": 8, "group_size": -1, "use_sym": True,
                                                 "use_layer_wise": False}}
    assert "perplexity is lower-is-better" in problems({"model": {"path": "/m"}, "recipe": {
        "kind": "causal-lm", "data": "/d"}, "tuning": {"preset": "woq", "higher_is_better": True}})
    assert "preset: must be one of static, dynamic, woq, auto" in problems({**GOOD, "tuning": {"preset": "x"}})
    assert "either preset or config_set" in problems({**GOOD, "tuning": {"preset": "static",
                                                                         "config_set": [{"rtn": {}}]}})
    text = problems({"recipe": {"kind": "text-classification", "metric": "bleu"}, "tuning": {"preset": "static"}})
    assert "model.path: required" in text and "recipe.data: required" in text
    assert "recipe.metric: must be one of accuracy, f1" in text


def test_unshared_specs_reach_the_broker_with_blob_references_only(tmp_path):
    """model.shared = false: a plain path would reach workers as is (a file of the submitter's machine,
    or any file on the worker). The broker's validation refuses it; the client validates the same
    document with local paths allowed, then uploads them and sends references."""
    from nsd.blobs import make_ref

    ref = make_ref("a" * 64, "r.py")
    unshared = {**GOOD, "model": {"shared": False}}
    for field, change in [("recipe.file", {"recipe": {"kind": "python", "file": "/etc/passwd"}}),
                          ("model.path", {"model": {"path": "../../model.pt"}, "recipe": {"kind": "python",
                                                                                          "file": ref}}),
                          ("recipe.data", {"model": {"path": make_ref("b" * 64, "m")},
                                           "recipe": {"kind": "causal-lm", "data": "/d.txt"},
                                           "tuning": {"preset": "woq"}})]:
        text = problems({**unshared, **change})
        assert f"{field}: with model.shared = false this must be a blob reference" in text, text
        assert validate({**unshared, **change}, local_paths=True)  # the client's check, before uploading
    assert validate({**unshared, "recipe": {"kind": "python", "file": ref}}).recipe.file == ref
    assert validate({**GOOD, "recipe": {"kind": "python", "file": "/etc/r.py"}}).model.shared  # shared: as is
    (tmp_path / "r.py").write_text("")
    (tmp_path / "t.toml").write_text('[recipe]\nfile = "r.py"\n[tuning]\nconfig_set = [{rtn = {bits = 4}}]\n')
    assert prepare_spec(tmp_path / "t.toml")["recipe"]["file"] == str(tmp_path / "r.py")  # uploaded next


def test_the_broker_gets_a_stored_spec_back_whole_and_an_old_one_with_its_old_meaning():
    import json

    from nsd.broker.core import stored_spec

    spec = validate({"model": {"path": "m", "shared": True}, "recipe": {"file": "r.py"},
                     "tuning": {"config_set": [{"rtn": {"bits": [4, 8]}}], "early_stop": False},
                     "resources": {"priority": 3}})
    assert stored_spec(json.dumps(spec.to_dict())) == spec
    old = spec.to_dict()
    del old["tuning"]["strategy"], old["tuning"]["cache"], old["resources"]["cores_per_trial"]  # an older nsd's
    old["recipe"]["retired_field"] = 1
    back = stored_spec(json.dumps(old))
    assert back.tuning.strategy == "list"  # tasks from before the fallback search ran the config set only
    assert back.tuning.cache is True and back.resources.cores_per_trial == 0 and back.tuning.early_stop is False
    assert back.resources.priority == 3 and back.tuning.config_set == spec.tuning.config_set
