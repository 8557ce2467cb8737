"""Summaries are never rendered from stale parts, and say what their parts say.

* `tables --sweep` shows each cell's removal derivative growth per seed, as the
  report does (a mean over seeds hides one unstable seed).
* sweep.json records the digest of each cell's metrics.json, a multi-seed job's
  metrics.json that of each `seed_<k>/metrics.json`; `tables` refuses a summary
  whose cell or seed was rerun alone since (one line naming it and what to rerun),
  and renders one written before these records with a warning.
* `--sweep` refuses a field that is a reference to another (`data.seed` is
  `seed`): its cells would silently run other settings than their names say.
"""

import json
import os
import subprocess
import sys

import pytest

from simfluence_jax import _io
from simfluence_jax import config_lib
from simfluence_jax import sweep
from simfluence_jax.evaluation import _report
from simfluence_jax.evaluation import _tables
from simfluence_jax.pipeline import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "default.py:tiny")


def _tables_cli(*flags):
  return subprocess.run([sys.executable, "-m", "simfluence_jax.tables", *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def _write_metrics(workdir, payload) -> None:
  """metrics.json as `evaluation.write_report` writes it (clean JSON, sorted)."""
  _io.write_text(os.path.join(os.fspath(workdir), "metrics.json"),
                 json.dumps(_report.clean_json(payload), indent=2, sort_keys=True))


def _read(path):
  with open(path) as f:
    return json.load(f)


# --- 1. derivative growth per seed -----------------------------------------------

def test_sweep_table_shows_each_seeds_derivative_growth_as_the_report(tmp_path):
  regime = {"mean_loss_drop": 0.35, "final_loss_std_across_runs": 0.5,
            "removal_derivative_growth": 1.4,  # the mean: hides seed 2's 2.2
            "removal_derivative_growth_by_seed": [1.0, 1.0, 2.2]}
  metrics = {"curriculum_blind": {}, "simfluence_linear": {
      "spearman_across_runs": 0.9, "all_steps_mse_ratio": 0.2}}
  cells = [{"overrides": {"learning_rate": 0.001}, "metrics": metrics,
            "regime": regime, "seeds": [0, 1, 2],
            "std": {"simfluence_linear": {"spearman_across_runs": 0.031}}},
           {"overrides": {"learning_rate": 0.0007}, "metrics": metrics,
            "regime": {"mean_loss_drop": 0.3, "final_loss_std_across_runs": 0.4,
                       "removal_derivative_growth": 8.53}}]
  (tmp_path / "sweep.json").write_text(json.dumps(cells))
  lines = _tables.sweep_table(str(tmp_path), warn=lambda _: None)
  assert lines[2] == ("| learning_rate=0.001 | 35% | 0.50 | 1.00 / 1.00 / 2.20 "
                      "(seeds) | 0.90 ± 0.03 / 0.20× |")
  assert _report.growth_text(regime) in lines[2] and "1.40" not in lines[2]
  # A one-seed cell: its growth as before.
  assert lines[3] == "| learning_rate=0.0007 | 30% | 0.40 | 8.53 | 0.90 / 0.20× |"
  assert "per seed where a cell ran several" in lines[-1]


# --- 2a. a sweep's cells ---------------------------------------------------------

def _cell_payload(cell_config, **extra):
  rho = 0.1 * cell_config.batch_size
  return dict({"simfluence_linear": {"spearman_across_runs": rho,
                                     "all_steps_mse_ratio": 0.5},
               "curriculum_blind": {"spearman_across_runs": float("nan"),
                                    "all_steps_mse_ratio": 1.0},
               "timings": {"data": 1.0},
               "regime": {"mean_loss_drop": 0.01 * cell_config.batch_size,
                          "final_loss_std_across_runs": 0.25}}, **extra)


def _fake_main_job(cell_config, workdir, overwrite):
  """A main job: writes its metrics.json, returns its payload."""
  del overwrite
  payload = _cell_payload(cell_config)
  _write_metrics(workdir, payload)
  return payload


EXPECTED_SWEEP = [
    "| cell | loss drop | across-run std | simfluence_linear |",
    "|---|---|---|---|",
    "| batch_size=2 | 2% | 0.25 | 0.20 / 0.50× |",
    "| batch_size=4 | 4% | 0.25 | 0.40 / 0.50× |",
]


@pytest.fixture(name="swept")
def fixture_swept(tmp_path):
  sweep.run(config_lib.load_config(TINY), str(tmp_path), ["batch_size:2,4"],
            run_fn=_fake_main_job)
  return tmp_path


def test_sweep_json_records_each_cells_metrics_digest(swept):
  saved = _read(swept / "sweep.json")
  assert [c["workdir"] for c in saved] == ["batch_size=2", "batch_size=4"]
  assert saved[1]["metrics_digest"] == _tables.metrics_digest(
      str(swept / "batch_size=4"))
  warnings = []
  assert _tables.sweep_table(str(swept), warn=warnings.append)[:4] == EXPECTED_SWEEP
  assert not warnings
  # A rerun of the cell that computes the same results (new timings) still renders.
  config = config_lib.load_config(TINY)
  config.batch_size = 4
  _write_metrics(swept / "batch_size=4",
                 _cell_payload(config, timings={"data": 7.0}, stages={"data": {}}))
  assert _tables.sweep_table(str(swept), warn=warnings.append)[:4] == EXPECTED_SWEEP


def test_a_cell_rerun_after_the_sweep_is_refused(swept):
  config = config_lib.load_config(TINY)
  config.batch_size = 4
  rerun = _cell_payload(config)
  rerun["simfluence_linear"]["spearman_across_runs"] = 0.9  # other settings
  _write_metrics(swept / "batch_size=4", rerun)
  with pytest.raises(ValueError, match=(
      rf"^--sweep='{swept}': cell batch_size=4 was rerun after sweep.json was "
      r"written; rerun the sweep \(its other cells are reused\)\.$")):
    _tables.sweep_table(str(swept))
  # From the command line: one line, no traceback.
  proc = _tables_cli(f"--sweep={swept}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --sweep={str(swept)!r}: cell batch_size=4 was rerun after sweep.json "
      "was written; rerun the sweep (its other cells are reused).")
  assert not proc.stdout.strip()


def test_a_cell_whose_rerun_did_not_finish_is_refused(swept):
  os.remove(swept / "batch_size=2" / "metrics.json")  # a rerun cleared it, then died
  with pytest.raises(ValueError, match=(
      rf"^--sweep='{swept}': cell batch_size=2 has no metrics.json: its last main "
      "job did not finish; rerun the sweep")):
    _tables.sweep_table(str(swept))


def test_a_sweep_json_without_digests_renders_with_one_warning(swept):
  saved = _read(swept / "sweep.json")
  for cell in saved:  # as written before the digests were recorded
    del cell["metrics_digest"], cell["workdir"]
  (swept / "sweep.json").write_text(json.dumps(saved))
  os.remove(swept / "batch_size=2" / "metrics.json")  # nothing is checked
  warnings = []
  assert _tables.sweep_table(str(swept), warn=warnings.append)[:4] == EXPECTED_SWEEP
  assert len(warnings) == 1 and warnings[0].startswith(
      f"--sweep={str(swept)!r}: sweep.json has no digest of some cells'"), warnings
  proc = _tables_cli(f"--sweep={swept}")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[:4] == EXPECTED_SWEEP
  assert proc.stderr.count("warning: ") == 1, proc.stderr


# --- 2b. a multi-seed job's seeds ------------------------------------------------

def _seed_payload(seed_config, spearman=None):
  rho = 0.5 + 0.1 * seed_config.seed if spearman is None else spearman
  return {"simfluence_linear": {"spearman_across_runs": rho,
                                "all_steps_mse_ratio": 0.5},
          "regime": {"mean_loss_drop": 0.3, "final_loss_std_across_runs": 0.4},
          "timings": {"data": 1.0}, "stages": {"data": {"seconds": 1.0,
                                                        "reused": False}},
          "summary": {"config": seed_config.to_dict()}}


def _multi_seed_job(monkeypatch, workdir, learning_rate=0.5):
  """`experiment._run` with 2 seeds, each seed a fake one-seed job."""
  def run_seed(seed_config, seed_dir, overwrite=False, runs_settled=None):
    del overwrite
    if runs_settled is not None:
      runs_settled()
    payload = _seed_payload(seed_config)
    _write_metrics(seed_dir, payload)
    return payload

  monkeypatch.setattr(experiment, "run_seed", run_seed)
  config = config_lib.load_config(TINY)
  config.num_seeds = 2
  config.learning_rate = learning_rate
  return experiment._run(config, str(workdir), False)  # pylint: disable=protected-access


def test_a_multi_seed_metrics_json_records_each_seeds_digest(monkeypatch, tmp_path):
  _multi_seed_job(monkeypatch, tmp_path)
  metrics = _read(tmp_path / "metrics.json")
  assert metrics["seeds"] == [0, 1]
  assert metrics[_tables.SEED_DIGESTS] == {
      f"seed_{k}": _tables.metrics_digest(str(tmp_path / f"seed_{k}"))
      for k in range(2)}
  warnings = []
  payload = _tables.load_metrics(str(tmp_path), warn=warnings.append)
  assert not warnings
  assert payload["simfluence_linear"]["spearman_across_runs"] == pytest.approx(0.55)
  assert ("| simfluence_linear | – (0.50×) | – | – | 0.550 ± 0.050 | – |"
          in _tables.render(payload, "none", str(tmp_path)))
  # Seeds that agree show "± 0.000" (the value read as one seed's before); a
  # single seed's metrics have no std and show none.
  agreeing = {"simfluence_linear": {"spearman_across_runs": 0.2},
              "std": {"simfluence_linear": {"spearman_across_runs": 0.0}}}
  assert _tables.methods_table(agreeing)[-1].endswith("| 0.200 ± 0.000 | – |")
  del agreeing["std"]
  assert _tables.methods_table(agreeing)[-1].endswith("| 0.200 | – |")


def test_a_seed_rerun_alone_is_refused(monkeypatch, tmp_path):
  _multi_seed_job(monkeypatch, tmp_path)
  # A README that is a directory: one line (an IsADirectoryError traceback; h28).
  proc = _tables_cli(f"--workdir={tmp_path}", "--goals=none", f"--readme={tmp_path}")
  assert proc.returncode == 1 and proc.stderr.strip().startswith(
      "error: [Errno 21] Is a directory"), proc.stderr[-2000:]
  seed_config = config_lib.load_config(TINY)
  seed_config.seed = 1
  _write_metrics(tmp_path / "seed_1", _seed_payload(seed_config, spearman=0.9))
  message = (f"--workdir={str(tmp_path)!r}: seed_1/ was rerun after metrics.json was "
             "written (its mean over seeds is stale); rerun the job (its other "
             "seeds are reused).")
  with pytest.raises(ValueError) as info:
    _tables.load_metrics(str(tmp_path))
  assert str(info.value) == message
  proc = _tables_cli(f"--workdir={tmp_path}", "--goals=none")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"
  # Bad flags and missing plan files: one line each (absl's FATAL block and a raw
  # [Errno 2] before).
  proc = _tables_cli(f"--workdir={tmp_path}", "--goals=bogus")
  assert (proc.returncode, proc.stderr.strip()) == (
      2, "error: flag --goals=bogus: value should be one of <default|rough|none>")
  proc = _tables_cli(f"--plans={tmp_path / 'nope.json'}")
  assert proc.returncode == 1 and proc.stderr.strip() == (
      f"error: --plans: '{tmp_path / 'nope.json'}' does not exist (write one with "
      "python -m simfluence_jax.plan ... --out=FILE).")
  # JSON that is no plan (a list: TypeError; a metrics.json: "error: 'rows'"),
  # and a README that is a directory (IsADirectoryError); review h28.
  (tmp_path / "list.json").write_text("[1, 2]")
  proc = _tables_cli(f"--plans={tmp_path / 'list.json'}")
  assert proc.returncode == 1 and proc.stderr.strip() == (
      f"error: --plans: '{tmp_path / 'list.json'}' is JSON but not a plan (no "
      "'rows'; write one with python -m simfluence_jax.plan ... --out=FILE).")
  os.remove(tmp_path / "seed_1" / "metrics.json")
  with pytest.raises(ValueError, match=(
      rf"^--workdir='{tmp_path}': seed_1/ has no metrics.json: its last main job "
      "did not finish; rerun the job")):
    _tables.load_metrics(str(tmp_path))


def test_a_multi_seed_metrics_json_without_digests_renders_with_a_warning(
    monkeypatch, tmp_path):
  _multi_seed_job(monkeypatch, tmp_path)
  metrics = _read(tmp_path / "metrics.json")
  del metrics[_tables.SEED_DIGESTS]  # written before they were recorded
  _write_metrics(tmp_path, metrics)
  os.remove(tmp_path / "seed_1" / "metrics.json")  # nothing is checked
  warnings = []
  payload = _tables.load_metrics(str(tmp_path), warn=warnings.append)
  assert payload["simfluence_linear"]["spearman_across_runs"] == pytest.approx(0.55)
  assert len(warnings) == 1 and warnings[0].startswith(
      f"--workdir={str(tmp_path)!r}: metrics.json predates its seeds' digests")


def test_a_sweep_refuses_a_cell_whose_seed_was_rerun_alone(monkeypatch, tmp_path):
  def cell(cell_config, workdir, overwrite):
    del overwrite
    return _multi_seed_job(monkeypatch, workdir, cell_config.learning_rate)

  config = config_lib.load_config(TINY)
  config.num_seeds = 2
  sweep.run(config, str(tmp_path), ["learning_rate:0.5,0.7"], run_fn=cell)
  warnings = []
  lines = _tables.sweep_table(str(tmp_path), warn=warnings.append)
  assert lines[2] == "| learning_rate=0.5 | 30% | 0.40 | 0.55 ± 0.05 / 0.50× |"
  assert not warnings
  seed_config = config_lib.load_config(TINY)
  seed_config.seed = 1
  _write_metrics(tmp_path / "learning_rate=0.7" / "seed_1",
                 _seed_payload(seed_config, spearman=0.9))
  with pytest.raises(ValueError, match=(
      rf"^--sweep='{tmp_path}': cell learning_rate=0.7: seed_1/ was rerun after "
      r"metrics.json was written \(its mean over seeds is stale\); rerun the sweep "
      r"\(its other cells are reused\)\.$")):
    _tables.sweep_table(str(tmp_path))


# --- 3. swept fields that are references -----------------------------------------

@pytest.mark.parametrize("specs", [["data.seed:0,1"], ["seed:0,1", "data.seed:0,1"]])
def test_sweeping_a_reference_is_refused_naming_the_field_to_sweep(specs, tmp_path):
  config = config_lib.load_config(TINY)
  match = (r"^--sweep=data.seed: tied to config.seed \(a reference\); sweep seed "
           r"instead\.$")
  with pytest.raises(ValueError, match=match):
    sweep.parse_sweeps(specs, config)
  ran = []
  with pytest.raises(ValueError, match=match):
    sweep.run(config, str(tmp_path), specs, run_fn=lambda *a: ran.append(a))
  assert not ran


def test_sweeping_the_referenced_field_sets_its_references_too(tmp_path):
  config = config_lib.load_config(TINY)
  seen = []

  def fake_run(cell_config, workdir, overwrite):
    seen.append((cell_config.seed, cell_config.data.seed))
    return _fake_main_job(cell_config, workdir, overwrite)

  sweep.run(config, str(tmp_path), ["seed:0,1"], run_fn=fake_run)
  assert seen == [(0, 0), (1, 1)]


def test_a_cell_whose_overrides_do_not_read_back_is_refused():
  config = config_lib.load_config(TINY)
  with pytest.raises(ValueError, match=(
      r"^--sweep=data.seed: setting it to 0 set seed=0, not 1 \(cell "
      r"seed=1,data.seed=0\): the two are tied; sweep one of them\.$")):
    sweep.cell_config(config, {"seed": 1, "data.seed": 0})
  cell = sweep.cell_config(config, {"seed": 1, "learning_rate": 0.5})
  assert (cell.seed, cell.data.seed, cell.learning_rate) == (1, 1, 0.5)


def test_a_placeholder_field_is_typed_by_its_declared_type():
  config = config_lib.load_config(TINY)
  grid = sweep.parse_sweeps(["influence.query_rank:4,8", "simulators.l2:1"], config)
  assert grid == [("influence.query_rank", [4, 8]), ("simulators.l2", [1.0])]
  assert isinstance(grid[0][1][0], int) and isinstance(grid[1][1][0], float)
  cell = sweep.cell_config(config, {"influence.query_rank": 4})
  assert cell.influence.query_rank == 4
  with pytest.raises(ValueError, match=(
      r"^--sweep=influence.query_rank:\.\.\.: '4\.5' is not an int\.$")):
    sweep.parse_sweeps(["influence.query_rank:4.5"], config)
  with pytest.raises(ValueError, match=(
      r"^--sweep=influence.query_rank: the field does not take 4\.5")):
    sweep.cell_config(config, {"influence.query_rank": 4.5})


def test_sweep_command_line_refuses_a_reference_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.sweep", f"--config={TINY}",
       f"--workdir={tmp_path}", "--sweep=seed:0,1", "--sweep=data.seed:0,1"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --sweep=data.seed: tied to config.seed (a reference); sweep seed "
      "instead.")
