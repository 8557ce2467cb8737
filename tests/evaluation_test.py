"""Metrics against scipy / numpy formulas, NaN safety, evaluate and the report."""

import json
import os

import numpy as np
import pytest
import scipy.stats

import simfluence_jax as sj

ev = sj.evaluation


def _pair(seed=0, runs=5, steps=6, num_test=7):
  rng = np.random.default_rng(seed)
  actual = rng.normal(size=(runs, steps + 1, num_test))
  actual[:, 0] = actual[0, 0]  # shared initial losses
  pred = actual + 0.5 * rng.normal(size=actual.shape)
  pred[:, 0] = actual[:, 0]
  return pred, actual


def test_mse():
  pred, actual = _pair()
  assert ev.all_steps_mse(pred, actual) == pytest.approx(
      np.mean((pred[:, 1:] - actual[:, 1:]) ** 2))
  assert ev.final_step_mse(pred, actual) == pytest.approx(
      np.mean((pred[:, -1] - actual[:, -1]) ** 2))


def test_spearman_matches_scipy():
  pred, actual = _pair()
  expected = np.mean([scipy.stats.spearmanr(pred[r, -1], actual[r, -1])[0]
                      for r in range(pred.shape[0])])
  assert ev.spearman(pred, actual) == pytest.approx(expected)
  across = np.mean([scipy.stats.spearmanr(pred[:, -1, m], actual[:, -1, m])[0]
                    for m in range(pred.shape[2])])
  assert ev.spearman_across_runs(pred, actual) == pytest.approx(across)
  # Shared initial losses: LDS equals spearman_across_runs (so only that is reported).
  assert ev.lds(pred, actual) == pytest.approx(across)
  assert "lds" not in ev.METRICS


@pytest.mark.parametrize("num_runs", [8, 16, 64])
def test_spearman_across_runs_is_biased_low_as_moran_gives(num_runs):
  # Why the default holds out 32 runs (docs/design.md §2): for bivariate normal
  # outcomes with correlation r, the sample Spearman over n runs has the exact mean
  # 6/(π(n+1))·[asin(r) + (n − 2)·asin(r/2)] (Moran, 1948), below the population
  # rank correlation (6/π)·asin(r/2). 4000 test examples are 4000 replicates.
  r, num_test = 0.9, 4000
  rng = np.random.default_rng(num_runs)
  actual = rng.normal(size=(num_runs, 2, num_test))
  pred = r * actual + np.sqrt(1 - r * r) * rng.normal(size=actual.shape)
  actual[:, 0], pred[:, 0] = 1.0, 1.0
  expected = 6 / (np.pi * (num_runs + 1)) * (np.arcsin(r) +
                                             (num_runs - 2) * np.arcsin(r / 2))
  assert ev.spearman_across_runs(pred, actual) == pytest.approx(expected, abs=0.006)
  assert expected < 6 / np.pi * np.arcsin(r / 2)


def test_lds_uses_curriculum_effect():
  pred, actual = _pair()
  actual[:, 0] = np.arange(actual.shape[0])[:, None] * 10.0  # differing starts
  effect = [scipy.stats.spearmanr(pred[:, -1, m] - actual[:, 0, m],
                                  actual[:, -1, m] - actual[:, 0, m])[0]
            for m in range(pred.shape[2])]
  assert ev.lds(pred, actual) == pytest.approx(np.mean(effect))


def test_nan_safe():
  pred, actual = _pair()
  pred[:, -1, 0] = 1.0  # constant across runs for example 0: skipped
  expected = np.mean([scipy.stats.spearmanr(pred[:, -1, m], actual[:, -1, m])[0]
                      for m in range(1, pred.shape[2])])
  assert ev.spearman_across_runs(pred, actual) == pytest.approx(expected)
  assert np.isnan(ev.spearman_across_runs(pred[:1], actual[:1]))
  constant = np.ones_like(pred)
  assert np.isnan(ev.spearman(constant, actual))


def test_shape_errors():
  pred, actual = _pair()
  with pytest.raises(ValueError, match="pred"):
    ev.all_steps_mse(pred[:, :3], actual)
  with pytest.raises(ValueError, match="actual"):
    ev.spearman(pred[0], actual[0])


def _trace(seed, runs):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 10, (runs, 8, 2)).astype(np.int32)
  B = rng.normal(scale=0.05, size=(10, 4)).astype(np.float32)
  sim = sj.simulators.additive_from_scores(B)
  losses = np.asarray(sim.simulate(ids, np.full((runs, 4), 2.0, np.float32)))
  losses = losses + 0.01 * rng.normal(size=losses.shape)
  return sj.Trace(batch_ids=ids, losses=losses.astype(np.float32),
                  learning_rates=np.full((runs, 8), 0.1, np.float32),
                  num_train_examples=10), sim


def test_nan_prediction_is_nan_in_every_metric():
  pred, actual = _pair()
  pred[2, 3, 1] = np.nan  # one exploded run
  metrics = ev.compute_metrics(pred, actual)
  assert all(np.isnan(v) for v in metrics.values()), metrics
  reasons = ev.undefined_reasons(pred, actual)
  assert set(reasons) == set(ev.METRICS)
  assert "run 2, step 3, test example 1" in reasons["spearman"]


def test_fewer_than_three_runs_is_undefined_with_a_reason():
  pred, actual = _pair(runs=2)
  assert np.isnan(ev.spearman_across_runs(pred, actual))
  assert "at least 3 held-out runs" in ev.undefined_reasons(pred, actual)[
      "spearman_across_runs"]
  pred3, actual3 = _pair(runs=3)
  assert np.isfinite(ev.spearman_across_runs(pred3, actual3))


def test_curriculum_blind_is_the_mean_fitted_trajectory():
  _, fitted = _pair(runs=4)
  blind = ev.curriculum_blind(fitted, 3)
  assert blind.shape == (3,) + fitted.shape[1:]
  np.testing.assert_allclose(blind[1], fitted.mean(0), rtol=1e-6)
  assert "ignores the curriculum" in ev.undefined_reasons(blind, fitted[:3])[
      "spearman_across_runs"]


def test_rounding_noise_across_runs_is_not_ranked():
  """An order-blind prediction on runs that differ only in order differs by float32
  rounding: ρ over that noise is undefined, not a weak signal; a real spread of
  1e-3 still ranks, equal to scipy's."""
  rng = np.random.default_rng(5)
  actual = 30.0 + rng.normal(size=(8, 4, 3))
  blind = np.broadcast_to(actual.mean(0), actual.shape).copy()
  noisy = (blind.astype(np.float32)
           + rng.choice([-2, 0, 2], blind.shape) * np.float32(30.0 * 2**-23))
  assert np.ptp(noisy[:, -1], axis=0).max() > 0  # not exactly constant
  assert np.isnan(ev.spearman_across_runs(noisy, actual))
  assert "only by float rounding" in ev.undefined_reasons(noisy, actual)[
      "spearman_across_runs"]
  # One test example with a real spread: ρ over it alone.
  real = noisy.astype(np.float64)
  real[:, -1, 1] = 30.0 + 1e-3 * (actual[:, -1, 1] + rng.normal(size=8))
  expected = scipy.stats.spearmanr(real[:, -1, 1], actual[:, -1, 1])[0]
  assert ev.spearman_across_runs(real, actual) == pytest.approx(expected)
  assert "spearman_across_runs" not in ev.undefined_reasons(real, actual)


def test_removal_lds_matches_scipy():
  rng = np.random.default_rng(3)
  actual = rng.normal(size=(32, 5))
  predicted = actual + rng.normal(size=actual.shape)
  expected = np.mean([scipy.stats.spearmanr(predicted[:, m], actual[:, m])[0]
                      for m in range(5)])
  assert ev.removal_lds(predicted, actual) == pytest.approx(expected)
  assert np.isnan(ev.removal_lds(predicted[:2], actual[:2]))
  with pytest.raises(ValueError, match="predicted_change"):
    ev.removal_lds(predicted[:, :3], actual)


def test_rankdata_matches_scipy_with_ties():
  values = np.random.default_rng(0).integers(0, 4, size=(6, 9)).astype(float)
  np.testing.assert_allclose(ev.rankdata(values, 1),
                             scipy.stats.rankdata(values, axis=1))
  np.testing.assert_allclose(ev.rankdata(values, 0),
                             scipy.stats.rankdata(values, axis=0))


def test_evaluate_and_report(tmp_path):
  train, _ = _trace(0, 30)
  held_out, oracle = _trace(1, 6)
  sim = sj.simulators.fit("additive", train, l2=1e-2)
  metrics = {"fit": ev.evaluate(sim, held_out), "oracle": ev.evaluate(oracle, held_out)}
  assert set(metrics["fit"]) == set(ev.METRICS)
  pred = {k: np.array(s.simulate(held_out.batch_ids, held_out.losses[:, 0]))
          for k, s in (("fit", sim), ("oracle", oracle))}
  pred["fit"][0, 1, 0] = -1.0  # an impossible loss is flagged
  metrics["fit"]["min_loss"] = ev.min_loss(pred["fit"])
  bands = {"fit": sim.simulate_with_bands(held_out.batch_ids, held_out.losses[:, 0],
                                          num_samples=8)}
  payload = dict(metrics, timings={"fit": 1.5},
                 stages={"fit": {"seconds": 1.5, "reused": True}},
                 summary={"num_held_out_runs": 6})
  paths = ev.write_report(str(tmp_path), payload=payload, predictions=pred,
                          bands=bands, actual=held_out.losses, test_texts=list("abcd"))
  with open(tmp_path / "metrics.json") as f:
    data = json.load(f)
  assert set(data) == {"fit", "oracle", "timings", "stages", "summary"}
  assert data["fit"]["all_steps_mse"] == pytest.approx(metrics["fit"]["all_steps_mse"])
  report = (tmp_path / "report.md").read_text()
  assert "| fit |" in report and "spearman_across_runs" in report
  assert "**fit** simulates losses below 0" in report
  assert "| fit | 1.50 | reused |" in report
  assert len(paths["plots"]) == 4  # bars, two trajectory panels, scatter
  for p in paths["plots"]:
    assert os.path.getsize(p) > 0
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_report_and_tables_flag_each_seed_whose_removal_reference_amplifies():
  from simfluence_jax.evaluation import _tables as tables  # pylint: disable=g-import-not-at-top
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  regime = {"mean_loss_drop": 0.35, "final_loss_std_across_runs": 0.5,
            "removal_derivative_growth": 3.5,
            "removal_derivative_growth_by_seed": [8.5, 0.9, 1.2]}
  payload = {"regime": regime, "seeds": [0, 1, 2]}
  flags = [line for line in _report.report_lines(payload) if "amplifies perturbations" in line]
  assert len(flags) == 1 and "(seed 0)" in flags[0] and "8.5×" in flags[0], flags
  assert "8.50 / 0.90 / 1.20 (seeds)" in tables.render(payload, "none", "w")
  stable = {"regime": dict(regime, removal_derivative_growth=0.9)}
  del stable["regime"]["removal_derivative_growth_by_seed"]
  assert not [line for line in _report.report_lines(stable)
              if "amplifies perturbations" in line]
  assert "first steps; about 1 or less: stable): 0.90." in "\n".join(
      _report.report_lines(stable))


def test_report_and_tables_name_what_computed_a_result():
  """The same code and seeds on two machines gave other numbers (README: Results):
  a result names its packages and CPU; a payload from before says nothing."""
  from simfluence_jax.evaluation import _tables as tables  # pylint: disable=g-import-not-at-top
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  from simfluence_jax.pipeline import experiment  # pylint: disable=g-import-not-at-top
  env = experiment.environment()
  import jax  # pylint: disable=g-import-not-at-top
  assert env["packages"]["jax"] == jax.__version__
  assert env["packages"]["numpy"] == np.__version__
  assert env["python"].count(".") == 2 and env["cpu"]
  payload = {"summary": {"environment": env}}
  sentence = (f"Computed with Python {env['python']}, jax {jax.__version__}, ")
  assert sentence in tables.render(payload, "none", "w")
  assert any(line.startswith(sentence.strip()) for line in
             _report.report_lines(payload))
  assert "Computed with" not in tables.render({}, "none", "w")
  assert not any("Computed with" in line for line in _report.report_lines({}))


def test_goals_break_a_tie_at_three_decimals_by_the_lower_mse():
  from simfluence_jax.evaluation import _tables as tables  # pylint: disable=g-import-not-at-top
  entry = lambda rho, ratio: {"spearman_across_runs": rho, "all_steps_mse_ratio": ratio,
                              "spearman": 0.97}
  tied = {"metagradient": entry(0.93488, 0.38), "simfluence_hybrid": entry(0.93454, 0.19)}
  checked = {goal: met for goal, _, met in tables.goals(tied, "default")}
  assert ("best method (simfluence_hybrid; tied with metagradient at 3 decimals, "
          "lower MSE) spearman_across_runs ≥ 0.9") in checked
  assert checked["simfluence_hybrid: all_steps_mse ≤ 0.3 × curriculum_blind's"]
  ahead = dict(tied, metagradient=entry(0.936, 0.38))
  checked = {goal: met for goal, _, met in tables.goals(ahead, "default")}
  assert "best method (metagradient) spearman_across_runs ≥ 0.9" in checked
  assert not checked["metagradient: all_steps_mse ≤ 0.3 × curriculum_blind's"]


def test_goal_values_are_shown_with_the_digits_their_verdict_needs():
  """0.29996 read "0.300 **missed**"; the loss drop read as a fraction (0.333)
  beside its "≥ 30%" goal."""
  from simfluence_jax.evaluation import _tables as tables  # pylint: disable=g-import-not-at-top
  payload = {"regime": {"mean_loss_drop": 0.3333, "final_loss_std_across_runs": 0.29996},
             "simfluence_linear": {"spearman_across_runs": 0.95,
                                   "all_steps_mse_ratio": 0.2, "spearman": 0.97}}
  text = tables.render(payload, "default", "w")
  assert "| mean test loss drops ≥ 30% | 33.3% | met |" in text
  assert ("| across-run std of final test losses ≥ 0.3 | 0.29996 | **missed** |"
          in text)
  assert ("| best method (simfluence_linear) spearman_across_runs ≥ 0.9 | 0.950 | "
          "met |" in text)


def test_sweep_table_shows_derivative_growth_only_where_cells_have_it(tmp_path):
  from simfluence_jax.evaluation import _tables as tables  # pylint: disable=g-import-not-at-top
  metrics = {"curriculum_blind": {}, "simfluence_linear": {
      "spearman_across_runs": 0.9, "all_steps_mse_ratio": 0.2}}
  cells = [{"overrides": {"learning_rate": 0.001}, "metrics": metrics,
            "regime": {"mean_loss_drop": 0.35, "final_loss_std_across_runs": 0.5,
                       "removal_derivative_growth": 8.53}},
           {"overrides": {"learning_rate": 0.0007}, "metrics": metrics,
            "regime": {"mean_loss_drop": 0.3, "final_loss_std_across_runs": 0.4}}]
  (tmp_path / "sweep.json").write_text(json.dumps(cells))
  lines = tables.sweep_table(str(tmp_path))
  assert lines[0] == ("| cell | loss drop | across-run std | derivative growth | "
                      "simfluence_linear |")
  assert lines[2] == "| learning_rate=0.001 | 35% | 0.50 | 8.53 | 0.90 / 0.20× |"
  assert lines[3] == "| learning_rate=0.0007 | 30% | 0.40 | – | 0.90 / 0.20× |"
  del cells[0]["regime"]["removal_derivative_growth"]
  (tmp_path / "sweep.json").write_text(json.dumps(cells))
  lines = tables.sweep_table(str(tmp_path))
  assert "derivative growth" not in lines[0] and "Derivative growth" not in lines[-1]
  assert lines[2] == "| learning_rate=0.001 | 35% | 0.50 | 0.90 / 0.20× |"
  assert "(one seed)" in lines[-1]
  # Cells of several seeds: ρ as mean ± std, and the seeds named.
  for cell in cells:
    cell.update(std={"simfluence_linear": {"spearman_across_runs": 0.031}},
                seeds=[0, 1, 2])
  (tmp_path / "sweep.json").write_text(json.dumps(cells))
  lines = tables.sweep_table(str(tmp_path))
  assert lines[2] == "| learning_rate=0.001 | 35% | 0.50 | 0.90 ± 0.03 / 0.20× |"
  assert "(mean ± std over seeds [0, 1, 2])" in lines[-1]
  # Method columns in alphabetical order, whatever order a cell lists them in.
  cells[0]["metrics"] = {"simfluence_linear": {}, "curriculum_blind": {},
                         "simfluence_additive": {}}
  (tmp_path / "sweep.json").write_text(json.dumps(cells))
  assert tables.sweep_table(str(tmp_path))[0].endswith(
      "| simfluence_additive | simfluence_linear |")


def test_counterfactual_summary_is_averaged_over_seeds_and_tabled_not_a_method():
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  from simfluence_jax.evaluation import _tables as tables  # pylint: disable=g-import-not-at-top
  from simfluence_jax.pipeline import experiment  # pylint: disable=g-import-not-at-top

  def seed_payload(median, finals):
    result = {"random": {"median_actual": median, "actual_final": [median] * 3},
              "searched": {"metagradient": {
                  "actual_final": finals, "actual_improvement": median - np.mean(finals),
                  "simulated_improvement": 2.0, "fraction_beating_median": 1.0,
                  "mean_curve": [3.0, 2.0]}}}
    return {"fit": {"all_steps_mse": 0.1, "spearman": 0.9},
            "counterfactual": result,
            "counterfactual_summary": experiment.counterfactual_summary(result)}

  payloads = [seed_payload(3.0, [1.0, 2.0]), seed_payload(4.0, [2.0, 2.0])]
  assert payloads[0]["counterfactual_summary"]["metagradient"]["actual_final"] == 1.5
  mean, std = experiment._mean_and_std(payloads)  # pylint: disable=protected-access
  assert "counterfactual" not in mean  # per-seed curves and lists stay per seed
  summary = mean["counterfactual_summary"]
  assert summary["median_random"] == 3.5
  assert summary["metagradient"]["actual_improvement"] == pytest.approx(1.75)
  assert std["counterfactual_summary"]["metagradient"]["actual_improvement"] == (
      pytest.approx(0.25))
  payload = dict(mean, std=std, seeds=[0, 1])
  assert _report.methods_of(payload) == ["fit"]
  text = tables.render(payload, "none", "w")
  assert "| metagradient | 1.750 ± 0.250 | +1.750 ± 0.250 | +2.000 | 100% |" in text
  assert "| counterfactual_summary |" not in text
  report = "\n".join(_report.report_lines(payload))
  assert "| metagradient | 1.750 ± 0.250 | +1.750 ± 0.250 |" in report


def test_methods_of_a_payload_are_the_entries_holding_metrics():
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  payload = {"linear": {"all_steps_mse": 0.1, "spearman": 0.9},
             "diverged": {"all_steps_mse": None, "spearman": None},
             "learning_curve": {"num_runs": [4, 8], "all_steps_mse": [0.2, 0.1]},
             "counterfactual_summary": {"median_random": 3.0,
                                        "linear": {"actual_improvement": 1.0}},
             "cost": {"linear": {"run_equivalents": 50.0}},
             "removal_lds": {"linear": {"1%": 0.7}}, "regime": {"mean_loss_drop": 0.3},
             "seeds": [0, 1]}
  assert _report.methods_of(payload) == ["linear", "diverged"]
