"""Inputs of the evaluation and its summaries that once gave a silent wrong answer
or crashed at the end of a job: the mean over seeds, removal LDS, the sweep's values
and map, NaN in reports, the TensorBoard writer's arguments."""

import json
import os

import numpy as np
import pytest

from simfluence_jax import config_lib
from simfluence_jax import evaluation
from simfluence_jax import sweep
from simfluence_jax import trace as trace_lib
from simfluence_jax.evaluation import _report
from simfluence_jax.evaluation import _tables
from simfluence_jax.pipeline import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "default.py:tiny")
NAN = float("nan")


def _seed(min_loss, mse, blind_mse, rho=0.9, undefined=None):
  """One seed's payload: a method `sim` and curriculum_blind, as `run_seed`'s."""
  sim = {"all_steps_mse": mse, "final_step_mse": 2 * mse, "spearman": 0.9,
         "spearman_across_runs": rho, "min_loss": min_loss,
         "all_steps_mse_ratio": mse / blind_mse,
         "final_step_mse_ratio": mse / blind_mse}
  if undefined:
    sim["undefined"] = undefined
  blind = {"all_steps_mse": blind_mse, "final_step_mse": 2 * blind_mse,
           "spearman": 0.9, "spearman_across_runs": NAN, "min_loss": 1.0,
           "all_steps_mse_ratio": 1.0, "final_step_mse_ratio": 1.0,
           "undefined": {"spearman_across_runs": "the prediction is the same for "
                                                 "every run"}}
  return {"curriculum_blind": blind, "sim": sim,
          "regime": {"mean_loss_drop": 0.3, "final_loss_std_across_runs": 0.1}}


def _mean_payload(payloads):
  mean, std = experiment._mean_and_std(payloads)  # pylint: disable=protected-access
  return mean, std, _report.clean_json(dict(mean, std=std, seeds=[0, 1]))


# --- 1. the mean over seeds keeps each seed's flags and reasons -------------------

def test_seed_mean_keeps_the_lowest_min_loss_and_each_seeds_undefined_reason():
  reason = "needs at least 3 held-out runs, got 2"
  payloads = [_seed(-0.4, 0.01, 0.02),
              _seed(0.6, 0.40, 0.10, rho=NAN,
                    undefined={"spearman_across_runs": reason})]
  mean, std, payload = _mean_payload(payloads)
  # A seed simulating a loss below 0 stays flagged (the mean, 0.1, hid it).
  assert mean["sim"]["min_loss"] == -0.4
  assert std["sim"]["min_loss"] == pytest.approx(0.5)  # of the per-seed values
  assert mean["curriculum_blind"]["min_loss"] == 1.0
  assert mean["sim"]["undefined"] == {"spearman_across_runs": f"seed_1/: {reason}"}
  assert mean["curriculum_blind"]["undefined"] == {
      "spearman_across_runs": "seed_0/, seed_1/: the prediction is the same for "
                              "every run"}
  assert "undefined" not in std["sim"] and "undefined" not in std["curriculum_blind"]
  flags = _report._warnings(payload)  # pylint: disable=protected-access
  assert ("- **sim** simulates losses below 0 (min -0.4): physically impossible for "
          "a cross-entropy loss; its MSEs include extrapolation.") in flags
  assert (f"- sim: `spearman_across_runs` is undefined: seed_1/: {reason}."
          in flags)
  report = "\n".join(_report.report_lines(payload))
  assert "- **sim** simulates losses below 0 (min -0.4)" in report
  assert f"seed_1/: {reason}" in report
  # Valid seeds keep their numbers: the means, and the lowest min_loss.
  mean, std, payload = _mean_payload([_seed(0.2, 0.01, 0.02), _seed(0.6, 0.03, 0.02)])
  assert mean["sim"]["min_loss"] == 0.2
  assert mean["sim"]["all_steps_mse"] == pytest.approx(0.02)
  assert mean["sim"]["spearman_across_runs"] == pytest.approx(0.9)
  assert std["sim"]["all_steps_mse"] == pytest.approx(0.01)
  assert "undefined" not in mean["sim"]
  assert not [f for f in _report._warnings(payload)  # pylint: disable=protected-access
              if "sim" in f and "blind" not in f]


def test_seed_mean_of_a_number_missing_or_none_in_a_seed_is_nan_with_a_reason():
  for missing_in in (0, 1):  # seed 0 was dropped silently, a later seed gave NaN
    payloads = [_seed(0.2, 0.01, 0.02), _seed(0.6, 0.03, 0.02)]
    payloads[missing_in]["sim"]["spearman"] = None
    del payloads[1 - missing_in]["sim"]["final_step_mse"]
    mean, _, payload = _mean_payload(payloads)
    assert np.isnan(mean["sim"]["spearman"])
    assert np.isnan(mean["sim"]["final_step_mse"])
    assert mean["sim"]["undefined"] == {
        "spearman": f"seed_{missing_in}/: no value (None)",
        "final_step_mse": f"seed_{1 - missing_in}/: missing from its results"}
    assert mean["sim"]["all_steps_mse"] == pytest.approx(0.02)
    row = [line for line in _report.report_lines(payload)
           if line.startswith("| sim |")]
    assert row == ["| sim | 0.02 ± 0.01 (1.00×) | NaN | NaN | 0.9 ± 0 |"]
  # Also outside the methods: a regime number one seed lacks is NaN, not dropped.
  payloads = [_seed(0.2, 0.01, 0.02), _seed(0.6, 0.03, 0.02)]
  payloads[0]["regime"]["mean_loss_drop"] = None
  mean, _, _ = _mean_payload(payloads)
  assert np.isnan(mean["regime"]["mean_loss_drop"])
  assert mean["regime"]["final_loss_std_across_runs"] == pytest.approx(0.1)


def test_seed_mean_refuses_seeds_of_other_methods():
  payloads = [_seed(0.2, 0.01, 0.02), _seed(0.6, 0.03, 0.02)]
  del payloads[1]["sim"]
  with pytest.raises(ValueError) as info:
    experiment._mean_and_std(payloads)  # pylint: disable=protected-access
  assert str(info.value) == (
      "payloads: seed_0/ has methods ['curriculum_blind', 'sim'], of seed_1/ "
      "['curriculum_blind']: the seeds' methods differ.")


# --- 2. the ratio over seeds is that of the mean MSEs -----------------------------

def test_seed_mean_ratio_is_the_ratio_of_the_mean_mses():
  payloads = [_seed(0.2, 0.01, 0.02), _seed(0.6, 0.40, 0.10)]
  mean, std, payload = _mean_payload(payloads)
  # 0.205 / 0.06, not the mean of the per-seed ratios 0.5 and 4 (2.25).
  assert mean["sim"]["all_steps_mse_ratio"] == pytest.approx(0.205 / 0.06)
  assert mean["sim"]["final_step_mse_ratio"] == pytest.approx(0.41 / 0.12)
  assert std["sim"]["all_steps_mse_ratio"] == pytest.approx(1.75)  # per-seed ratios
  assert mean["curriculum_blind"]["all_steps_mse_ratio"] == 1.0
  assert "| sim | 0.205 ± 0.195 (3.42×) | 0.41 ± 0.39 (3.42×) |" in "\n".join(
      _report.report_lines(payload))
  assert any("ratio of the mean MSEs" in line for line in _report.report_lines(payload))
  rows = _tables.methods_table(payload)
  assert "| sim | 0.205 ± 0.195 (3.42×) | 0.410 ± 0.390 (3.42×) |" in "\n".join(rows)
  text = _tables.render(payload, "none", "w")
  assert "over seeds, the ratio of the mean MSEs" in text
  # One seed: its own ratio, unchanged, and no mean named.
  one = _report.clean_json(payloads[1])
  assert "| sim | 0.400 (4.00×) | 0.800 (4.00×) |" in "\n".join(
      _tables.methods_table(one))
  assert "ratio of the mean MSEs" not in _tables.render(one, "none", "w")


def test_a_sweep_of_seeds_maps_the_ratio_of_the_mean_mses(tmp_path):
  config = config_lib.load_config(TINY)
  config.num_seeds = 2

  def cell(cell_config, workdir, overwrite):
    del cell_config, workdir, overwrite
    mean, std, _ = _mean_payload([_seed(0.2, 0.01, 0.02), _seed(0.6, 0.40, 0.10)])
    return dict(mean, std=std, seeds=[0, 1])

  sweep.run(config, str(tmp_path), ["learning_rate:0.5"], run_fn=cell)
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert saved[0]["metrics"]["sim"]["all_steps_mse_ratio"] == pytest.approx(
      0.205 / 0.06)
  lines = _tables.sweep_table(str(tmp_path), warn=lambda _: None)
  assert lines[2] == "| learning_rate=0.5 | 30% | 0.10 | 0.90 ± 0.00 / 3.42× |"
  assert "(over seeds, the ratio of the mean MSEs)" in lines[-1]


# --- 3. removal LDS refuses a non-finite retrained change -------------------------

def test_removal_lds_refuses_a_non_finite_actual_change():
  rng = np.random.default_rng(0)
  actual = rng.normal(size=(8, 3))
  assert evaluation.removal_lds(actual, actual) == pytest.approx(1.0)
  assert evaluation.removal_lds(-actual, actual) == pytest.approx(-1.0)
  for row, col, bad in ((0, 0, np.nan), (2, 1, np.inf)):
    broken = actual.copy()
    broken[row, col] = bad
    with pytest.raises(ValueError) as info:
      evaluation.removal_lds(actual, broken)
    assert str(info.value) == (
        f"actual_change: contains NaN or inf (first at removal {row}, test example "
        f"{col}: a diverged retrain).")
  # A non-finite prediction is a diverging simulator: NaN, as documented.
  predicted = actual.copy()
  predicted[0, 0] = np.nan
  assert np.isnan(evaluation.removal_lds(predicted, actual))


# --- 4. the sweep's map and plot show every cell's methods ------------------------

def test_the_sweep_map_and_plot_take_methods_from_every_cell(tmp_path):
  config = config_lib.load_config(TINY)

  def cell(cell_config, workdir, overwrite):
    del workdir, overwrite
    payload = {"simfluence_linear": {"spearman_across_runs": 0.5,
                                     "all_steps_mse_ratio": 0.5},
               "regime": {"mean_loss_drop": 0.3, "final_loss_std_across_runs": 0.1}}
    if cell_config.learning_rate > 0.002:  # a method only the second cell has
      payload["tracin_per_step"] = {"spearman_across_runs": 0.9,
                                    "all_steps_mse_ratio": 0.2}
    return payload

  results = sweep.run(config, str(tmp_path), ["learning_rate:0.001,0.003"],
                      run_fn=cell)
  lines = _tables.sweep_table(str(tmp_path), warn=lambda _: None)
  assert lines[:4] == [
      "| cell | loss drop | across-run std | simfluence_linear | tracin_per_step |",
      "|---|---|---|---|---|",
      "| learning_rate=0.001 | 30% | 0.10 | 0.50 / 0.50× | – |",
      "| learning_rate=0.003 | 30% | 0.10 | 0.50 / 0.50× | 0.90 / 0.20× |"]
  assert sweep.plotted_methods(results) == ["simfluence_linear", "tracin_per_step"]
  assert sweep.plotted_methods(results[::-1]) == ["simfluence_linear",
                                                  "tracin_per_step"]
  assert sweep.plotted_methods(results[:1]) == ["simfluence_linear"]
  assert os.path.getsize(tmp_path / "sweep.png") > 0


# --- 5. sweep values: empty strings, equal values ---------------------------------

def test_sweep_values_keep_an_empty_string_and_refuse_an_empty_number():
  config = config_lib.load_config(TINY)
  assert sweep.parse_sweeps(["model.checkpoint:,/ckpt"], config) == [
      ("model.checkpoint", ["", "/ckpt"])]
  assert sweep.parse_sweeps(["data.seqio_task:t, "], config) == [
      ("data.seqio_task", ["t", ""])]
  for spec, message in (
      ("batch_size:8,", "--sweep=batch_size:...: an empty value is not an int."),
      ("learning_rate:,0.1", "--sweep=learning_rate:...: an empty value is not a "
                             "float."),
      ("record_grads:true,", "--sweep=record_grads:...: an empty value is not a "
                             "bool."),
      ("influence.query_rank:4,", "--sweep=influence.query_rank:...: an empty "
                                  "value is not an int.")):
    with pytest.raises(ValueError) as info:
      sweep.parse_sweeps([spec], config)
    assert str(info.value) == message
  # Valid values keep their types and numbers.
  assert sweep.parse_sweeps(["batch_size:8,32", "learning_rate:0.001,0.003",
                             "influence.query_rank:4"], config) == [
      ("batch_size", [8, 32]), ("learning_rate", [0.001, 0.003]),
      ("influence.query_rank", [4])]


def test_sweep_values_that_parse_equal_are_refused(tmp_path):
  config = config_lib.load_config(TINY)
  for spec, message in (
      ("learning_rate:1e-3,0.001", "--sweep=learning_rate:...: '1e-3' and '0.001' "
                                   "are the same value (0.001): each value is one "
                                   "cell."),
      ("num_steps:8,4,08", "--sweep=num_steps:...: '8' and '08' are the same value "
                           "(8): each value is one cell."),
      ("record_grads:False,0", "--sweep=record_grads:...: 'False' and '0' are the "
                               "same value (False): each value is one cell."),
      ("model.checkpoint:,", "--sweep='model.checkpoint:,': expected FIELD:V1,V2,...")):
    with pytest.raises(ValueError) as info:
      sweep.parse_sweeps([spec], config)
    assert str(info.value) == message
  ran = []
  with pytest.raises(ValueError, match="'1e-3' and '0.001' are the same value"):
    sweep.run(config, str(tmp_path), ["learning_rate:1e-3,0.001"],
              run_fn=lambda *a: ran.append(a))
  assert not ran and not (tmp_path / "sweep.json").exists()


# --- 6, 7. NaN in a report is "–", and the report is written ----------------------

def _report_files(tmp_path, payload):
  evaluation.write_report(str(tmp_path), payload=payload)
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  return metrics, (tmp_path / "report.md").read_text()


def test_a_nan_derivative_growth_reads_as_a_dash(tmp_path):
  regime = {"mean_loss_drop": 0.3, "final_loss_std_across_runs": 0.1,
            "removal_derivative_growth": NAN}
  payload = {"sim": {"all_steps_mse": 1.0, "spearman_across_runs": 0.5},
             "regime": regime}
  metrics, report = _report_files(tmp_path / "one", payload)
  assert metrics["regime"]["removal_derivative_growth"] is None
  assert "about 1 or less: stable): –." in report
  assert _report.growth_text(metrics["regime"]) == "–"
  assert "(`training.derivative_growth`, about 1 or less: stable): –." in (
      _tables.render(metrics, "none", "w"))
  by_seed = dict(regime, removal_derivative_growth=1.2,
                 removal_derivative_growth_by_seed=[1.2345, NAN])
  metrics, report = _report_files(tmp_path / "seeds", dict(payload, regime=by_seed))
  assert metrics["regime"]["removal_derivative_growth_by_seed"] == [1.2345, None]
  assert "stable): 1.23 / – (seeds)." in report
  # Finite growths keep their numbers.
  assert _report.growth_text({"removal_derivative_growth": 8.534}) == "8.53"
  assert _report.growth_text({"removal_derivative_growth_by_seed": [8.5, 0.9]}) == (
      "8.50 / 0.90 (seeds)")


def _counterfactual(simulated):
  return {"targets": [0, 1], "num_searched_per_method": 2, "num_random": 4,
          "random": {"actual_final": [1.0, 2.0, 3.0, 4.0], "median_actual": 2.5,
                     "simulated_final": {"sim": [simulated] * 4},
                     "mean_curve": [3.0, 2.5], "curve_low": [3.0, 2.0],
                     "curve_high": [3.0, 3.0]},
          "searched": {"sim": {"actual_final": [2.0, 2.2],
                               "simulated_final": [simulated] * 2,
                               "actual_improvement": 0.4,
                               "simulated_improvement": simulated - 2.5,
                               "fraction_beating_median": 1.0,
                               "mean_curve": [3.0, 2.1]}}}


def test_nan_simulated_counterfactual_finals_read_as_a_dash(tmp_path):
  cf = _counterfactual(NAN)  # a diverging simulator, reported on purpose
  payload = {"sim": {"all_steps_mse": 1.0, "spearman_across_runs": 0.5},
             "counterfactual": cf,
             "counterfactual_summary": experiment.counterfactual_summary(cf)}
  metrics, report = _report_files(tmp_path / "nan", payload)
  assert metrics["counterfactual"]["searched"]["sim"]["simulated_final"] == [None] * 2
  assert "| sim | 2.1000 | +0.4000 | – | 100% |" in report
  text = _tables.render(metrics, "none", "w")
  assert "| sim | 2.100 | +0.400 | – | 100% |" in text
  # The mean over seeds' table (`counterfactual_summary`, ± std) too.
  summary = _report.counterfactual_summary_table(
      metrics["counterfactual_summary"], {"sim": {"simulated_improvement": 0.2,
                                                  "actual_improvement": 0.05}})
  assert summary[2] == "| sim | 2.100 | +0.400 ± 0.050 | – | 100% |"
  # Finite finals keep their numbers.
  cf = _counterfactual(2.0)
  payload = dict(payload, counterfactual=cf,
                 counterfactual_summary=experiment.counterfactual_summary(cf))
  metrics, report = _report_files(tmp_path / "finite", payload)
  assert "| sim | 2.1000 | +0.4000 | -0.5000 | 100% |" in report
  assert "| sim | 2.100 | +0.400 | -0.500 | 100% |" in _tables.render(
      metrics, "none", "w")


# --- 8. the TensorBoard writer's arguments ----------------------------------------

def _trace(runs=3, steps=4, num_test=2):
  return trace_lib.Trace(
      batch_ids=np.zeros((runs, steps, 2), np.int32),
      losses=np.arange(runs * (steps + 1) * num_test, dtype=np.float32).reshape(
          runs, steps + 1, num_test),
      learning_rates=np.full((runs, steps), 0.1, np.float32), num_train_examples=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(run_names=["a", "b"]),
     "run_names: expected 3 names (one per run of the trace), got 2."),
    (dict(run_names=["a", "b", "c", "d"]),
     "run_names: expected 3 names (one per run of the trace), got 4."),
    (dict(run_names=["a", "b", "a"]),
     "run_names: ['a'] given more than once (two runs would write into one "
     "folder)."),
    (dict(train_losses=np.ones((3, 5))),
     "train_losses: expected float[3, T'] with T' ≤ 4 (the trace's runs and steps), "
     "got shape (3, 5)."),
    (dict(train_losses=np.ones((2, 4))),
     "train_losses: expected float[3, T'] with T' ≤ 4 (the trace's runs and steps), "
     "got shape (2, 4)."),
    (dict(train_losses=np.ones(3)),
     "train_losses: expected float[3, T'] with T' ≤ 4 (the trace's runs and steps), "
     "got shape (3,)."),
])
def test_training_metrics_refuse_run_names_and_train_losses_of_other_shapes(
    tmp_path, kwargs, message):
  train_losses = kwargs.pop("train_losses", None)
  with pytest.raises(ValueError) as info:
    evaluation.write_training_metrics(str(tmp_path), _trace(), train_losses, **kwargs)
  assert str(info.value) == message
  assert not (tmp_path / "runs").exists()


def test_training_metrics_of_valid_arguments_keep_their_numbers(tmp_path):
  pytest.importorskip("tensorboard")
  written = evaluation.write_training_metrics(
      str(tmp_path), _trace(), np.ones((3, 3)), run_names=["a", "b", "c"])
  # Per run 5 test + 3 train losses; means over runs 5 + 3.
  assert written == 3 * (5 + 3) + 5 + 3
  assert sorted(os.listdir(tmp_path / "runs")) == ["a", "b", "c"]


def test_held_out_runs_over_another_number_of_train_examples_are_refused():
  """Review h38: a held-out trace of another dataset (8 train examples, the
  simulator's 10) was scored, its ids all in range."""
  rng = np.random.default_rng(0)
  def trace(num_train):
    return trace_lib.Trace(
        batch_ids=rng.integers(0, 8, (6, 4, 2)).astype(np.int32),
        losses=rng.uniform(1, 3, (6, 5, 3)).astype(np.float32),
        learning_rates=np.full((6, 4), 0.1, np.float32),
        num_train_examples=num_train)
  from simfluence_jax import simulators  # pylint: disable=g-import-not-at-top
  simulator = simulators.fit("linear", trace(10), l2=1.0)
  assert np.isfinite(evaluation.evaluate(simulator, trace(10))["all_steps_mse"])
  with pytest.raises(ValueError, match=(
      r"^held_out_trace: num_train_examples=8, but the simulator was fitted on runs "
      r"over 10 train examples\.$")):
    evaluation.evaluate(simulator, trace(8))
