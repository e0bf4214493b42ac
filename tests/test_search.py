import itertools
import json

import numpy as np
import optuna
import pytest
import torch

from oaq_search.cli import main
from oaq_search.config import DataConfig, ModelConfig, SearchConfig, StudyConfig, dump_study_config
from oaq_search.data import ImageSplit
from oaq_search.errors import UserError
from oaq_search.evaluate import split_scorer
from oaq_search.pipeline import export_plans, layer_graph, load_model, run_study
from oaq_search.plan import Plan
from oaq_search.planning import PlanFactory, Setting
from oaq_search.ptq import post_training_quantize
from oaq_search.pruning import ScreeningPruner
from oaq_search.samplers import EVALUATED_PARAMS, NeighborhoodSampler
from oaq_search.seeds import AllocationProblem, greedy_seed, integer_program_seed, uniform_seed


def toy_problem(budget=20.0):
    rng = np.random.default_rng(3)
    candidates = [[Setting(2), Setting(4), Setting(8)]] * 5
    sizes = rng.integers(1, 5, size=5)
    costs = np.array([[s * b / 2 for b in (2, 4, 8)] for s in sizes], dtype=float)
    sensitivity = np.array([[w * 4.0, w * 1.0, 0.0] for w in rng.random(5)])
    return AllocationProblem(candidates, sensitivity, {"weight_bytes": costs}, {"weight_bytes": 2.0},
                             {"weight_bytes": budget})


def test_integer_program_is_optimal_against_brute_force():
    problem = toy_problem()
    best = min((c for c in itertools.product(range(3), repeat=5) if problem.fits(list(c))),
               key=lambda c: sum(problem.sensitivity[g][k] for g, k in enumerate(c)))
    found = integer_program_seed(problem)
    total = lambda c: sum(problem.sensitivity[g][k] for g, k in enumerate(c))  # noqa: E731
    assert problem.fits(found) and total(found) == pytest.approx(total(best))
    for seed in (greedy_seed(problem), uniform_seed(problem)):
        assert problem.fits(seed) and total(seed) >= total(found) - 1e-9


def test_repair_lowers_least_sensitive_groups_first():
    problem = toy_problem()
    repaired = problem.lower_until_fits([2] * 5)
    assert problem.fits(repaired)
    lowered = [g for g in range(5) if repaired[g] < 2]
    untouched = [g for g in range(5) if repaired[g] == 2]
    if lowered and untouched:  # something lowered has a smaller cost of lowering than some kept group
        cost = lambda g: problem.sensitivity[g][1] / (problem.costs["weight_bytes"][g][2] - problem.costs["weight_bytes"][g][1])  # noqa: E731
        assert min(cost(g) for g in lowered) <= max(cost(g) for g in untouched)


def test_fill_raises_groups_into_the_slack_until_no_step_fits():
    problem = toy_problem()
    filled = problem.raise_while_fits([0] * 5)
    assert problem.fits(filled) and filled != [0] * 5
    for group in range(5):  # no group can go up one more step and still fit
        if filled[group] < 2:
            assert not problem.fits(filled[:group] + [filled[group] + 1] + filled[group + 1:])
    assert problem.raise_while_fits(filled) == filled
    assert problem.lower_until_fits(filled) == filled  # it fits, so repair leaves it alone


def test_infeasible_problem_gives_no_seed():
    problem = toy_problem(budget=1.0)
    assert integer_program_seed(problem) is None and greedy_seed(problem) is None and uniform_seed(problem) is None


def test_local_search_proposes_untried_neighbours_of_the_incumbent():
    names = [f"weight_bits/g{i}" for i in range(4)]
    centre = {name: 2 for name in names}
    sampler = NeighborhoodSampler(optuna.samplers.RandomSampler(seed=0), lambda study: centre, local_share=1.0, seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial(centre)
    study.optimize(lambda trial: float(sum(trial.suggest_int(name, 0, 4) for name in names)), n_trials=13)
    moves = [t.params for t in study.trials[1:]]
    for move in moves:  # one group a step up, another a step down
        assert sorted(move[n] - centre[n] for n in names) == [-1, 0, 0, 1]
    assert len({tuple(sorted(m.items())) for m in moves}) == 12  # all 12 neighbours, none twice
    study.optimize(lambda trial: float(sum(trial.suggest_int(name, 0, 4) for name in names)), n_trials=1)
    assert study.trials[-1].params not in moves + [centre]  # none left: the base sampler explores


def test_local_search_skips_moves_that_settle_onto_a_tried_plan():
    names = [f"weight_bits/g{i}" for i in range(4)]
    centre = {name: 2 for name in names}
    cap = lambda params: {name: min(value, 2) for name, value in params.items()}  # noqa: E731 (a budget at 2 each)
    sampler = NeighborhoodSampler(optuna.samplers.RandomSampler(seed=0), lambda study: centre, local_share=1.0,
                                  seed=0, settle=cap)

    def objective(trial):
        evaluated = cap({name: trial.suggest_int(name, 0, 4) for name in names})
        trial.set_user_attr(EVALUATED_PARAMS, evaluated)
        return float(sum(evaluated.values()))

    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial(centre)
    study.optimize(objective, n_trials=5)
    evaluated = [t.user_attrs[EVALUATED_PARAMS] for t in study.trials[1:]]
    for plan in evaluated:  # the raised group is capped back: what is left is one group a step down
        assert sorted(plan[n] - centre[n] for n in names) == [-1, 0, 0, 0]
    assert len({tuple(sorted(plan.items())) for plan in evaluated}) == 4  # each once


def test_screening_pruner_stops_only_plans_clearly_below_the_best():
    def objective(trial):
        screened = trial.suggest_float("screened", 0, 100)  # the accuracy on 500 screening images
        trial.report(screened, 0)
        if trial.should_prune():
            raise optuna.TrialPruned()
        return screened

    study = optuna.create_study(direction="maximize", pruner=ScreeningPruner(images=500))
    for screened in (90.0, 88.5, 85.0):  # at 90 %, 2 standard errors of 500 images are 2.7 points
        study.enqueue_trial({"screened": screened})
    study.optimize(objective, n_trials=3)
    complete, pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    assert [t.state for t in study.trials] == [complete, complete, pruned]


@pytest.fixture
def config(quick_study):
    quick_study.search.n_trials = 4
    return quick_study


@pytest.mark.shared
def test_pareto_mode_exports_a_front_and_apply_packs_a_plan(config, tmp_path, capsys):
    config.search.pareto_metric = "weight_bytes"
    config.search.seeds = ["uniform"]
    run_study(config, progress=False)
    front = export_plans(config, pareto=True)
    assert front and all(p.totals["weight_bytes"] <= 104 * 1024 for p in front)
    sizes = [p.totals["weight_bytes"] for p in front]
    accuracies = [p.metadata["search_score"] for p in front]
    assert sizes == sorted(sizes) and accuracies == sorted(accuracies)  # a front: more bytes, more accuracy

    study_path = tmp_path / "s.toml"
    study_path.write_text(dump_study_config(config))
    assert main(["export", str(study_path), "--trial", "0", "--out", str(tmp_path / "t0.json")]) == 0
    plan = Plan.load(tmp_path / "t0.json")
    assert plan.metadata["trial"] == 0
    assert main(["apply", "--model", "resnet20", "--checkpoint", config.model.checkpoint, "--data-root",
                 config.data.root, "--plan", str(tmp_path / "t0.json"), "--split", "search",
                 "--out", str(tmp_path / "packed.pt")]) == 0
    assert "quantized" in capsys.readouterr().out and (tmp_path / "packed.pt").stat().st_size < 300_000


@pytest.mark.shared
def test_screening_prunes_and_pruned_trials_count(config):
    config.search.n_trials = 10
    config.search.eval_images, config.search.screen_images = 400, 100
    config.search.seeds = []
    config.search.weight_bits = [2, 3, 8]  # wide spread: some plans are clearly worse
    result = run_study(config, progress=False)
    study = optuna.load_study(study_name=config.name, storage=config.storage_url)
    states = [t.state for t in study.trials]
    assert len(states) == 10 and result.finished_trials == 10
    assert all(0 in t.intermediate_values for t in study.trials)


def test_unknown_layer_in_applied_plan_is_refused(tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps({"model": "resnet20", "layers": [{"name": "layer9", "weight_bits": 4}]}))
    assert main(["apply", "--model", "resnet20", "--plan", str(tmp_path / "p.json")]) == 2
    assert "'layer9', which is not a quantizable layer" in capsys.readouterr().err


@pytest.mark.shared
def test_prune_sensitivity_drops_hopeless_bit_widths(config):
    from oaq_search.pipeline import prepare

    config.search.prune_sensitivity = 0.2
    prepared = prepare(config)
    assert any(len(c) < len(config.search.weight_bits) for c in prepared.space.settings)
    assert all(c for c in prepared.space.settings)


def test_missing_study_for_worker_says_create_first(tmp_path, synthetic_cifar, capsys):
    (tmp_path / "s.toml").write_text(f'name = "w"\nstorage = "sqlite:///{tmp_path}/db.sqlite"\n[model]\nname = "resnet20"\n'
                                     f'[data]\nroot = "{synthetic_cifar}"\nsearch_size = 50\n[search]\neval_images = 20\n'
                                     '[budget]\nmemory = "200KiB"\n')
    assert main(["worker", str(tmp_path / "s.toml")]) == 2
    assert "create it first" in capsys.readouterr().err


@pytest.mark.shared
def test_run_writes_a_report_whose_numbers_are_the_plans(config, tmp_path):
    from html.parser import HTMLParser

    from PIL import Image

    config.search.n_trials = 5
    config.finetune.mode, config.finetune.epochs, config.finetune.images_per_epoch = "scale", 1, 64
    config.ptq.reconstruct, config.ptq.iterations, config.ptq.images = True, 10, 64  # reconstructed, then fine-tuned
    result = run_study(config, progress=False)
    page = result.report_path.read_text()
    plan, tuned = Plan.load(result.plan_path), result.finetuned.plan
    for accuracy in (plan.metadata["fp_test_accuracy"], plan.metadata["nearest_test_accuracy"],
                     plan.metadata["test_accuracy"], tuned.metadata["finetune"]["test_accuracy"]):
        assert f"<td>{accuracy:.2f} %</td>" in page
    assert plan.metadata["reconstruction"]["iterations"] == 10 and "reconstruction" in tuned.metadata
    assert tuned.metadata["finetune"]["ptq_test_accuracy"] == plan.metadata["test_accuracy"]
    assert f"{plan.metadata['search_score']:.2f} %" in page
    assert all(f"<td>W{bits}</td>" in page for bits in config.search.weight_bits)  # the uniform references
    config.data.root, config.model.checkpoint = str(tmp_path / "gone"), str(tmp_path / "gone.pt")
    study_path = tmp_path / "s.toml"
    study_path.write_text(dump_study_config(config))  # the report reads the study alone: no data, no weights
    assert main(["report", str(study_path), "--out", str(tmp_path / "report")]) == 0

    class Sources(HTMLParser):
        found: list = []

        def handle_starttag(self, tag, attrs):
            self.found += [value for key, value in attrs if key in ("src", "href")]

    parser = Sources()
    parser.feed((tmp_path / "report" / "index.html").read_text())
    assert len(parser.found) == 3 and not any("://" in source for source in parser.found)  # nothing from the network
    for source in parser.found:
        with Image.open(tmp_path / "report" / source) as image:
            image.verify()
    page = (tmp_path / "report" / "index.html").read_text()
    assert "layer1.0.conv1:" in page and "% of the weight bytes" in page
    plan = export_plans(config)[0]
    assert all(layer.cost["weight_bytes"] > 0 for layer in plan.layers)  # each layer's cost is in the plan


@pytest.mark.shared
def test_measured_sensitivity_drives_the_seeds_and_is_cached(config):
    from oaq_search.pipeline import prepare
    from oaq_search.cache import default_cache_dir

    config.search.weight_bits, config.search.measured_sensitivity_images = [2, 8], 64
    prepared = prepare(config)
    scores = prepared.objective.problem.sensitivity
    assert scores.shape == (len(prepared.space.groups), 2)
    assert np.all(scores[:, 1] == scores[0, 1])  # a group at 8 bits is the all-widest plan, for every group
    assert np.all(scores[:, 0] > scores[:, 1])  # 2 bits moves the output further than 8, in every group
    assert prepared.seeds[0] == (prepared.space.params(integer_program_seed(prepared.objective.problem)),
                                 "integer_program")
    stored = sorted(default_cache_dir().glob("measured-*.json"))
    assert stored and np.array_equal(prepare(config).objective.problem.sensitivity, scores)
    assert sorted(default_cache_dir().glob("measured-*.json")) == stored  # read back, not measured again


@pytest.mark.shared
def test_uniform_baselines_are_read_back_for_a_study_like_one_that_ran(config, monkeypatch):
    from oaq_search.engine import uniform_baselines
    from oaq_search.pipeline import prepare

    config.search.weight_bits = [2, 8]
    engine = prepare(config)
    first = uniform_baselines(engine)
    assert first[0]["score"] < first[1]["score"]
    monkeypatch.setattr(engine.objective, "score", lambda plan: pytest.fail("scored again"))
    assert uniform_baselines(engine) == first
    engine.fingerprint = {**engine.fingerprint, "search split": "other images"}
    with pytest.raises(pytest.fail.Exception, match="scored again"):
        uniform_baselines(engine)


@pytest.mark.shared
def test_search_with_activation_bits_calibrates_every_trial(config):
    config.search.n_trials, config.search.activation_bits = 3, 4
    result = run_study(config, progress=False)
    bits = {layer.name: layer.activation_bits for layer in result.plan.layers}
    assert bits["conv1"] == 8 and bits["linear"] == 8  # the pinned ends keep 8-bit inputs (the image)
    assert {b for name, b in bits.items() if name not in ("conv1", "linear")} == {4}
    study = optuna.load_study(study_name=config.name, storage=config.storage_url)
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.value > 30 for t in study.trials)


@pytest.mark.shared
def test_finalists_and_the_seed_are_rescored_and_the_seed_kept_unless_clearly_beaten(config):
    config.search.n_trials, config.search.finalists, config.search.seed_margin = 3, 2, 0.0
    result = run_study(config)
    study = optuna.load_study(study_name=config.name, storage=config.storage_url)
    scores = study.user_attrs["finalist_scores"]
    distinct = {}  # the two best distinct plans, each by its first trial
    for trial in sorted((t for t in study.trials if t.values), key=lambda t: (-t.values[0], t.number)):
        distinct.setdefault(trial.user_attrs["plan_key"], trial)
    seed = next(t for t in study.trials if t.user_attrs.get("seed") == "integer_program")
    assert sorted(scores) == sorted({str(t.number) for t in list(distinct.values())[:2]} | {str(seed.number)})
    # margin 0: the best re-score wins, as plain finalists would
    assert result.plan.metadata["finalist_score"] == max(scores.values())
    assert scores[str(result.plan.metadata["trial"])] == max(scores.values())
    assert export_plans(config)[0].metadata["trial"] == result.plan.metadata["trial"]

    config.search.seed_margin = 1e9  # resumed with no trials left: only the choice is made again
    assert run_study(config).plan.metadata["trial"] == seed.number
    assert export_plans(config)[0].metadata["trial"] == seed.number


@pytest.mark.shared
def test_kl_score_ranks_trials_by_distance_from_full_precision(config, capsys):
    config.search.score, config.search.n_trials, config.search.finalists = "kl", 3, 2
    config.search.seeds = ["uniform"]
    result = run_study(config, progress=False)
    study = optuna.load_study(study_name=config.name, storage=config.storage_url)
    scores = [t.values[0] for t in study.trials]
    assert all(score < 0 for score in scores)  # minus a KL divergence: quantization always moves the outputs
    assert result.plan.metadata["score"] == "kl" and result.plan.metadata["search_score"] == max(scores)
    assert result.test_accuracy > 70  # the chosen plan is still a working model
    assert all(score <= 0 for score in study.user_attrs["finalist_scores"].values())


def test_kl_scorer_is_zero_for_the_reference_and_negative_once_quantized():
    torch.manual_seed(0)
    model = load_model("resnet20").eval()
    split = ImageSplit("random", torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,)))
    scorer = split_scorer("kl", split, model, batch_size=32)
    quantized = post_training_quantize(model, PlanFactory("resnet20", model, layer_graph("resnet20", model),
                                                          "oaq", "uniform", False).uniform(2), bn_correction=False)
    assert scorer(model) == pytest.approx(0.0, abs=1e-6)
    assert scorer(quantized) < -1e-4


def test_dominated_settings_are_dropped_and_the_rest_ordered_by_cost():
    from oaq_search.space import SearchSpace

    settings = [[Setting(4, activation_bits=4), Setting(4, activation_bits=8), Setting(8, activation_bits=4),
                 Setting(8, activation_bits=8)]]
    latency = np.array([[1.0, 2.0, 2.0, 4.0]])
    # (8, a4) costs what (4, a8) costs and moves the output further: dominated; the others trade off
    sensitivity = np.array([[3.0, 1.0, 2.0, 0.5]])
    problem = AllocationProblem(settings, sensitivity, {"latency_s": latency}, {"latency_s": 0.0}, {"latency_s": 3.0})
    space, pruned = SearchSpace([["a"]], settings, {}, "setting").without_dominated(problem)
    assert space.settings == [[Setting(4, activation_bits=4), Setting(4, activation_bits=8), Setting(8, activation_bits=8)]]
    assert pruned.sensitivity.tolist() == [[3.0, 1.0, 0.5]] and pruned.costs["latency_s"].tolist() == [[1.0, 2.0, 4.0]]
    assert space.parameter_names == ["setting/a"] and uniform_seed(pruned) == [1]  # w4a8: the best that fits
    assert integer_program_seed(pruned) == [1] and pruned.lower_until_fits([2]) == [1]


def test_a_setting_costing_no_budget_less_but_damaging_more_never_stays():
    """Under a weight-memory budget, fewer input bits save nothing: only the widest inputs remain."""
    from oaq_search.space import SearchSpace

    settings = [[Setting(2, activation_bits=4), Setting(2, activation_bits=8), Setting(8, activation_bits=4),
                 Setting(8, activation_bits=8)]] * 2
    memory = np.array([[2.0, 2.0, 8.0, 8.0]] * 2)
    sensitivity = np.array([[5.0, 4.0, 1.0, 0.0], [6.0, 6.0, 2.0, 0.0]])  # group 1: a tie at 2 bits keeps the first
    problem = AllocationProblem(settings, sensitivity, {"weight_bytes": memory}, {"weight_bytes": 0.0},
                                {"weight_bytes": 12.0})
    space, _ = SearchSpace([["a"], ["b"]], settings, {}, "setting").without_dominated(problem)
    assert space.settings == [[Setting(2, activation_bits=8), Setting(8, activation_bits=8)],
                              [Setting(2, activation_bits=4), Setting(8, activation_bits=8)]]


def synthetic_study(root, tmp_path, **search) -> StudyConfig:
    """A study on an untrained ResNet-20 and random images: seconds, for what does not need accuracy."""
    search = {"n_trials": 3, "eval_images": 20, "finalists": 1, "measured_sensitivity_images": 16,
              "sensitivity_metric": "mse", **search}
    return StudyConfig("synthetic", ModelConfig("resnet20"), DataConfig(root=str(root), search_size=50, test_images=20),
                       SearchConfig(**search), output_dir=str(tmp_path / "run"))


def assert_each_step_buys_less_damage_for_more_budget(prepared):
    problem = prepared.objective.problem
    for group, settings in enumerate(prepared.space.settings):
        cost = problem.costs["weight_bytes"][group][:len(settings)]
        damage = problem.sensitivity[group][:len(settings)]
        assert np.all(np.diff(cost) > 0) and np.all(np.diff(damage) < 0)


def test_input_bits_searched_under_a_memory_budget_leave_one_setting_per_weight_bit_width(synthetic_cifar, tmp_path):
    """Input bits cost no weight memory, so of a group's settings at one weight bit-width only the
    one that moves the output least stays (on a trained model, the widest inputs)."""
    from oaq_search.pipeline import prepare

    config = synthetic_study(synthetic_cifar, tmp_path, weight_bits=[8], activation_bits=[4, 8])
    config.budget = {"memory": "300KiB"}
    prepared = prepare(config)
    problem = prepared.objective.problem
    assert [len(settings) for settings in prepared.space.settings] == [1] * len(prepared.space.groups)
    assert prepared.space.parameter_names[0] == "setting/layer1.0.conv1"
    assert prepared.fingerprint["search space"] != prepare(synthetic_study(synthetic_cifar, tmp_path)).fingerprint[
        "search space"]  # the settings kept are part of the study's fingerprint
    assert np.isfinite(problem.sensitivity).all()


def test_weight_and_input_bits_are_searched_together_under_a_latency_budget(synthetic_cifar, tmp_path):
    import hwmodels

    config = synthetic_study(synthetic_cifar, tmp_path, weight_bits=[4, 8], activation_bits=[4, 8],
                             cost_model="bitfusion")
    config.budget = {"latency": "75us"}  # between uniform W4A4 (61 us) and W4A8 (100 us) on this target
    result = run_study(config, progress=False)
    target = hwmodels.get_cost_model("bitfusion")
    graph = layer_graph("resnet20", load_model("resnet20"))
    assert target.evaluate(graph, result.plan).totals["latency_s"] <= 75e-6  # legal on the target, and fits
    inputs = {layer.activation_bits for layer in result.plan.layers[1:-1]}
    assert inputs <= {4, 8} and result.plan.layers[0].activation_bits == 8
    study = optuna.load_study(study_name=config.name, storage=config.storage_url)
    assert all(name.startswith("setting/") for name in study.trials[0].params)


def test_a_search_chooses_per_group_which_inputs_stay_float_on_a_runtime_with_8_bit_integer_kernels(
        synthetic_cifar, tmp_path):
    """activation_bits = [8, 32]: each group's input at 8 bits (an integer kernel, twice as fast on this
    table) or float (no input error); a latency budget between the two uniform plans mixes them."""
    import hwmodels

    table = tmp_path / "runtime.toml"
    table.write_text('[target]\nname = "int8-runtime"\ndefault_activation_bits = 32\n[capabilities]\n'
                     'weight_bits = { conv2d = [4, 8], linear = [4, 8] }\n'
                     'activation_bits = { conv2d = [8, 32], linear = [8, 32] }\nscale_formats = ["float32"]\n'
                     '[rates]\nconv2d = { w8a8 = { macs_per_s = 2e9 }, w8a32 = { macs_per_s = 1e9 } }\n'
                     'linear = { w8a8 = { macs_per_s = 2e9 }, w8a32 = { macs_per_s = 1e9 } }\n')
    config = synthetic_study(synthetic_cifar, tmp_path, weight_bits=[4, 8], activation_bits=[8, 32],
                             cost_model=f"target:{table}")
    config.budget = {"latency": "30ms"}  # all float inputs: 41 ms; all 8-bit: 21 ms
    result = run_study(config, progress=False)
    graph = layer_graph("resnet20", load_model("resnet20"))
    assert hwmodels.get_cost_model(f"target:{table}").evaluate(graph, result.plan).totals["latency_s"] <= 30e-3
    inputs = [layer.activation_bits for layer in result.plan.layers]
    assert set(inputs[1:-1]) == {None, 8} and inputs[0] is None  # the pinned ends at the widest: float
    with pytest.raises(UserError, match=r"activation_bits \(a list of them may hold 32, a float input\) must be"):
        SearchConfig(activation_bits=32)


def test_ptq_finalists_picks_among_the_reconstructed_finalists_once_and_keeps_the_choice(
        synthetic_cifar, tmp_path, monkeypatch):
    from oaq_search import ptq as ptq_module
    from oaq_search.objective import FINALIST_SCORES, RECONSTRUCTED_PICK

    config = synthetic_study(synthetic_cifar, tmp_path, n_trials=6, finalists=3, eval_images=10)
    config.budget = {"memory": "100KiB"}
    config.ptq.reconstruct, config.ptq.finalists, config.ptq.images, config.ptq.iterations = True, True, 16, 4
    result = run_study(config, progress=False)
    study = optuna.load_study(study_name=config.name, storage=config.storage_url)
    pick = study.user_attrs[RECONSTRUCTED_PICK]
    assert set(pick["scores"]) == set(study.user_attrs[FINALIST_SCORES]) and len(pick["scores"]) > 1
    assert result.plan.metadata["trial"] == pick["trial"] and result.plan.metadata["reconstruction"]["images"] == 16
    assert export_plans(config)[0].key() == Plan.from_dict(study.trials[pick["trial"]].user_attrs["plan"]).key()
    reconstructed = []  # resumed: the choice is read from the study; only the chosen plan is reconstructed
    real = ptq_module.reconstruct  # what every reconstruction, of a finalist or of the chosen plan, runs
    monkeypatch.setattr(ptq_module, "reconstruct", lambda *a, **k: reconstructed.append(1) or real(*a, **k))
    assert run_study(config, progress=False).plan.metadata["trial"] == pick["trial"] and len(reconstructed) == 1
    config.ptq.finalists = False  # the choice rounded to nearest again, for export too
    assert run_study(config, progress=False).plan.metadata["trial"] == study.user_attrs["finalist_winner"]["trial"]
    assert not optuna.load_study(study_name=config.name, storage=config.storage_url).user_attrs[RECONSTRUCTED_PICK]
    config.ptq.finalists, config.ptq.images = True, 50
    with pytest.raises(UserError, match=r"search images past the 50 reconstruction fits on"):
        run_study(config, progress=False)


def test_grids_searched_per_group_keep_one_grid_per_bit_width_when_they_cost_the_same(synthetic_cifar, tmp_path):
    from oaq_search.pipeline import prepare

    config = synthetic_study(synthetic_cifar, tmp_path, weight_bits=[2, 3], grid=["uniform", "midrise"])
    config.budget = {"memory": "90KiB"}
    fields = prepare(config)
    widths = [[s.weight_bits for s in settings] for settings in fields.space.settings]
    assert all(len(set(w)) == len(w) for w in widths)  # the two grids cost the same: the worse one went
    assert_each_step_buys_less_damage_for_more_budget(fields)
    config.search.cost_model = "memory-base3"  # ternary 2-bit codes now cost less than midrise's four levels
    assert_each_step_buys_less_damage_for_more_budget(prepare(config))
    plan = run_study(config, progress=False).plan
    assert all(layer.code_packing == ("base3" if (layer.weight_bits, layer.grid) == (2, "uniform") else "fields")
               for layer in plan.layers)


def test_the_engine_reproduces_the_quickstart_plan_of_the_code_before_it(quick_study):
    """Golden values from commit 0954131, the last before the engine took model and data as objects:
    the quickstart shrunk as below, run there on one thread (as a pytest-xdist worker). The same seed
    must give the same plan and the same accuracies through the new engine. Renewed once, when plans
    began holding OAQ's mu where int8 reaches it (`oaq.REVISION` 2; it was 94.0, 89.0, 87.4 before)."""
    config = quick_study
    config.search.n_trials, config.search.eval_images, config.search.finalists = 4, 200, 2
    config.search.measured_sensitivity_images = 64
    config.data.test_images = 500
    result = run_study(config)
    assert result.plan.key() == "ffbbd6f3888b7c68"
    assert (result.search_score, result.fp_test_accuracy, result.test_accuracy) == (93.0, 89.0, 87.6)
    assert result.plan.metadata["trial"] == 0


def test_a_peak_activation_budget_is_met_by_seeds_and_every_repaired_trial(synthetic_cifar, tmp_path):
    """Peak activation memory does not add up over layers: the seeds and the repair measure it on whole
    plans (before the budget object, they saw only per-layer costs and every trial broke this budget)."""
    config = synthetic_study(synthetic_cifar, tmp_path, n_trials=5, weight_bits=[4, 8], activation_bits=[2, 4, 8])
    config.budget = {"activation_memory": "40KiB"}  # uniform 8-bit inputs need 48 KiB, 4-bit 32 KiB
    run_study(config)
    trials = optuna.load_study(study_name=config.name, storage=config.storage_url).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 5 and {t.user_attrs.get("seed") for t in complete} > {None}
    assert all(t.user_attrs["costs"]["peak_activation_bytes"] <= 40 * 1024 for t in complete)
    assert all(value <= 0 for t in complete for value in t.constraints.values())
