import json

import pytest

from oaq_search.budget import format_quantity, parse_budget
from oaq_search.config import dump_study_config, load_study_config
from oaq_search.errors import UserError
from oaq_search.graph import build_layer_graph
from oaq_search.models import build_model
from oaq_search.plan import LayerPlan, Plan
from oaq_search.schema import parse

STUDY = """
name = "t"
[model]
name = "resnet20"
[search]
n_trials = 3
weight_bits = [2, 4]
[budget]
memory = "98KiB"
"""


def write(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_study_file_parses_with_defaults(tmp_path):
    config = load_study_config(write(tmp_path, STUDY))
    assert config.search.weight_bits == [2, 4] and config.search.first_last_bits == 8
    assert config.storage_url == "sqlite:///runs/t/study.db"


def test_study_file_round_trips_through_toml(tmp_path):
    config = load_study_config(write(tmp_path, STUDY))
    again = load_study_config(write(tmp_path, dump_study_config(config)))
    assert again == config


@pytest.mark.parametrize("text, pattern", [
    (STUDY.replace("n_trials = 3", "n_trails = 3"), r"unknown key 'search\.n_trails'"),
    (STUDY.replace("n_trials = 3", 'n_trials = "three"'), r"'search\.n_trials' must be an integer, got 'three'"),
    (STUDY.replace("weight_bits = [2, 4]", "weight_bits = [2, 12]"), r"weight_bits must be an integer from 2 to 8"),
    (STUDY.replace('memory = "98KiB"', 'memory = "98 parsecs"'), r"budget memory='98 parsecs'"),
    (STUDY.replace('name = "resnet20"', ""), r"study file .*needs exactly one of name \(a registered model\) or factory"),
    (STUDY + "\n[[oops", "not valid TOML"),
    (STUDY.replace("n_trials = 3", "n_trials = 3\nmeasured_sensitivity_images = -1"),
     r"measured_sensitivity_images must be 0 \(use the sensitivity table\) or more, got -1"),
    (STUDY.replace("n_trials = 3", "n_trials = 3\nseed_margin = -1.0"), r"seed_margin must be 0 .* or more, got -1.0"),
    (STUDY.replace("n_trials = 3", 'n_trials = 3\nscore = "loss"'), r"score must be one of accuracy, kl, got 'loss'"),
    (STUDY.replace("n_trials = 3", 'n_trials = 3\nscore = "kl"\nscreen_images = 100'),
     r"with score = 'kl' set screen_images = 0"),
    (STUDY.replace("n_trials = 3", 'n_trials = 3\ngrid = ["uniform", "hex"]'), r"grid must be one of .*got 'hex'"),
    (STUDY.replace("n_trials = 3", 'n_trials = 3\ngrid = ["uniform", "uniform"]'), r"each once"),
    (STUDY.replace("n_trials = 3", "n_trials = 3\nactivation_bits = [4, 16]"),
     r"activation_bits \(or 32, a float input\) must be an integer from 2 to 8, got 16"),
    (STUDY.replace("n_trials = 3", "n_trials = 3\nactivation_bits = [4, 8]\nmeasured_sensitivity_images = 0"),
     r"searching grids or activation bits .* set measured_sensitivity_images above 0"),
])
def test_malformed_study_files_name_the_key(tmp_path, text, pattern):
    with pytest.raises(UserError, match=pattern) as error:
        load_study_config(write(tmp_path, text))
    assert "\n" not in str(error.value) and "study.toml" in str(error.value)


def test_budgets_parse_in_user_units():
    assert parse_budget("memory=80KiB, latency=1.2ms") == {"weight_bytes": 80 * 1024, "latency_s": pytest.approx(1.2e-3)}
    assert parse_budget({"bops": "2G"}) == {"bops": 2e9}
    for bad in ("memory", "speed=3", "memory=-1KiB", "latency=3KiB"):
        with pytest.raises(UserError):
            parse_budget(bad)


def test_budgets_print_in_readable_units():
    assert format_quantity("weight_bytes", 80 * 1024) == "80.0 KiB"
    assert format_quantity("weight_bytes", 10) == "10 B"  # a unit-less memory budget is bytes, not "0.0 KiB"
    assert format_quantity("latency_s", 1.2e-3) == "1.200 ms"


def test_plan_round_trips_through_json(tmp_path):
    graph = build_layer_graph(build_model("resnet20"), (3, 32, 32))
    plan = Plan.uniform("resnet20", graph, 3, grid="pot", scale_factor=0.2, threshold=1.9)
    plan = plan.with_layers({"conv1": {"weight_bits": 8, "activation_bits": 8}})
    plan.totals = {"weight_bytes": 1234.0}
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan and loaded.key() == plan.key()
    assert loaded.layer("conv1").weight_bits == 8


def test_plan_with_unknown_layer_or_illegal_bits_is_rejected(tmp_path):
    graph = build_layer_graph(build_model("resnet20"), (3, 32, 32))
    with pytest.raises(UserError, match="'layer9.conv', which is not a quantizable layer"):
        Plan("resnet20", [LayerPlan("layer9.conv", 4)]).check_against(graph, "resnet20")
    data = json.loads(Plan("resnet20", [LayerPlan("conv1", 4)]).to_json())
    data["layers"][0]["weight_bits"] = 11
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"bad\.json.*weight_bits must be an integer from 2 to 8"):
        Plan.load(tmp_path / "bad.json")
    data["layers"][0]["weight_bits"] = 4
    data["schema_version"] = 99
    with pytest.raises(UserError, match="schema_version 99"):
        Plan.from_dict(data)


def test_schema_checks_nested_types():
    with pytest.raises(UserError, match=r"'layers\[0\]\.per_channel' must be true or false"):
        parse(Plan, {"model": "m", "layers": [{"name": "a", "weight_bits": 4, "per_channel": "yes"}]}, "plan x")
