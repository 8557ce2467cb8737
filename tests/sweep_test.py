"""The sweep entry point: grid parsing, one main job per cell, sweep.json and sweep.png."""

import json
import os
import subprocess
import sys

import pytest

from simfluence_jax import config_lib
from simfluence_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "default.py:tiny")


def test_parse_sweeps_types_values_like_the_config():
  config = config_lib.load_config(TINY)
  grid = sweep.parse_sweeps(["batch_size:2,4", "learning_rate:0.001,0.01",
                             "simulators.l2:1"], config)
  assert grid == [("batch_size", [2, 4]), ("learning_rate", [0.001, 0.01]),
                  ("simulators.l2", [1.0])]
  assert isinstance(grid[2][1][0], float)


@pytest.mark.parametrize("spec, message", [
    ("batch_size", "expected FIELD:V1,V2"),
    ("nope:1,2", "no field 'nope'"),
    ("batch_size:two", "'two' is not an int"),
    ("model:1", "not a scalar field"),
    # Set once per process: every cell ran with the first (review h28).
    ("compilation_cache_dir:/tmp/a,/tmp/b", "set once per process"),
    ("distributed:False,True", "set once per process"),
])
def test_bad_sweep_specs_are_named(spec, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_sweeps([spec], config_lib.load_config(TINY))


def test_every_cell_runs_once_with_its_overrides(tmp_path):
  config = config_lib.load_config(TINY)
  seen = []

  def fake_run(cell_config, workdir, overwrite):
    seen.append((cell_config.batch_size, cell_config.learning_rate,
                 os.path.basename(workdir), overwrite))
    rho = 0.1 * cell_config.batch_size + cell_config.learning_rate
    return {"simfluence_linear": {"spearman_across_runs": rho,
                                  "all_steps_mse_ratio": 0.5},
            "curriculum_blind": {"spearman_across_runs": float("nan"),
                                 "all_steps_mse_ratio": 1.0},
            "timings": {"data": 1.0},
            "regime": {"mean_loss_drop": 0.01 * cell_config.batch_size,
                       "final_loss_std_across_runs": cell_config.learning_rate}}

  results = sweep.run(config, str(tmp_path), ["batch_size:2,4",
                                              "learning_rate:0.001,0.003"],
                      run_fn=fake_run)
  assert [s[:2] for s in seen] == [(2, 0.001), (2, 0.003), (4, 0.001), (4, 0.003)]
  assert seen[0][2] == "batch_size=2,learning_rate=0.001"
  with open(tmp_path / "sweep.json") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(saved))
  assert saved[3]["overrides"] == {"batch_size": 4, "learning_rate": 0.003}
  assert saved[3]["metrics"]["simfluence_linear"]["spearman_across_runs"] == (
      pytest.approx(0.403))
  assert saved[0]["metrics"]["curriculum_blind"]["spearman_across_runs"] is None
  assert len(results) == 4 and "timings" not in saved[0]["metrics"]
  assert os.path.getsize(tmp_path / "sweep.png") > 0
  # The plot leaves out curriculum_blind's empty panels, and labels read on dark
  # and light cells alike (review h30: white on viridis' yellow).
  assert sweep.plotted_methods(results) == ["simfluence_linear"]
  import matplotlib  # pylint: disable=g-import-not-at-top
  viridis, norm = matplotlib.colormaps["viridis"], matplotlib.colors.Normalize(-1, 1)
  assert [sweep._text_colour(viridis, norm, v) for v in (-0.55, 0.95, float("nan"))  # pylint: disable=protected-access
          ] == ["w", "k", "k"]
  assert saved[3]["regime"] == {"mean_loss_drop": 0.04,
                                "final_loss_std_across_runs": 0.003}
  assert "std" not in saved[3] and "seeds" not in saved[3]  # one seed per cell
  # The README's regime map from it (tables defines its own --workdir flag: its own
  # process).
  printed = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.tables", f"--sweep={tmp_path}"], cwd=REPO,
      capture_output=True, text=True, timeout=300, check=True).stdout.splitlines()
  assert printed[0] == "| cell | loss drop | across-run std | simfluence_linear |"
  assert printed[5] == "| batch_size=4, learning_rate=0.003 | 4% | 0.00 | 0.40 / 0.50× |"


def test_cells_of_several_seeds_keep_the_std_and_the_seeds(tmp_path):
  config = config_lib.load_config(TINY)
  config.num_seeds = 2

  def fake_run(cell_config, workdir, overwrite):
    del workdir, overwrite
    assert cell_config.num_seeds == 2
    mean = {"spearman_across_runs": cell_config.learning_rate,
            "all_steps_mse_ratio": 0.5}
    return {"simfluence_linear": mean, "curriculum_blind": {"all_steps_mse": 1.0},
            "std": {"simfluence_linear": {"spearman_across_runs": 0.02,
                                          "all_steps_mse_ratio": 0.1},
                    "regime": {"mean_loss_drop": 0.01}},
            "seeds": [0, 1], "regime": {"mean_loss_drop": 0.3}}

  sweep.run(config, str(tmp_path), ["learning_rate:0.5,0.7"], run_fn=fake_run)
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert saved[1]["metrics"]["simfluence_linear"]["spearman_across_runs"] == 0.7
  # The methods' stds (the regime's std is not a method's).
  assert saved[1]["std"] == {"simfluence_linear": {"spearman_across_runs": 0.02,
                                                   "all_steps_mse_ratio": 0.1}}
  assert saved[1]["seeds"] == [0, 1]


def test_an_invalid_cell_fails_before_any_cell_runs(tmp_path):
  config = config_lib.load_config(TINY)
  ran = []
  with pytest.raises(ValueError, match="config.batch_size=1000"):
    sweep.run(config, str(tmp_path), ["batch_size:2,1000"],
              run_fn=lambda *a: ran.append(a))
  assert not ran


def test_command_line_error_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.sweep", f"--config={TINY}",
       f"--workdir={tmp_path}", "--sweep=batch_size:x"], cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --sweep=batch_size:...: 'x' is not an int.")


def test_a_cell_in_use_refuses_the_sweep(tmp_path):
  # A cell rerun alone and the sweep each took only their own folder's lock, and
  # wrote the cell at the same time.
  from simfluence_jax import pipeline  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(TINY)
  ran = []
  with pipeline.workdir_lock(str(tmp_path / "batch_size=4")):
    with pytest.raises(ValueError, match=r"batch_size=4'? is in use by another job"):
      sweep.run(config, str(tmp_path), ["batch_size:2,4"],
                run_fn=lambda cell, workdir, overwrite: ran.append(workdir) or {})
  assert [os.path.basename(w) for w in ran] == ["batch_size=2"]


def test_values_holding_slashes_get_sibling_folders(tmp_path):
  # A path (or a dataset name like "glue/sst2") as a value: one folder per cell,
  # side by side in the sweep's workdir, not one cell's folder inside another's.
  config = config_lib.load_config(TINY)
  seen = []

  def fake_run(cell_config, workdir, overwrite):
    del overwrite
    seen.append((cell_config.model.checkpoint, workdir))
    return {"simfluence_linear": {"spearman_across_runs": 0.5,
                                  "all_steps_mse_ratio": 0.5}}

  sweep.run(config, str(tmp_path), ["model.checkpoint:ckpt,ckpt/b,100%/c"],
            run_fn=fake_run)
  folders = ["model.checkpoint=ckpt", "model.checkpoint=ckpt%2Fb",
             "model.checkpoint=100%25%2Fc"]
  assert seen == [(value, os.path.join(str(tmp_path), folder)) for value, folder in
                  zip(("ckpt", "ckpt/b", "100%/c"), folders)]
  with open(tmp_path / "sweep.json") as f:
    assert [cell["workdir"] for cell in json.load(f)] == folders


def test_cell_folders_do_not_depend_on_the_flags_order(tmp_path):
  # Review h30: reversing two --sweep flags named every cell's folder anew, and the
  # sweep retrained every cell beside the finished ones.
  config = config_lib.load_config(TINY)
  seen = []

  def fake_run(cell_config, workdir, overwrite):
    del cell_config, overwrite
    seen.append(os.path.basename(workdir))
    os.makedirs(workdir, exist_ok=True)
    return {"simfluence_linear": {"spearman_across_runs": 0.5,
                                  "all_steps_mse_ratio": 0.5}}

  specs = ["learning_rate:0.001,0.003", "batch_size:2"]
  sweep.run(config, str(tmp_path), specs, run_fn=fake_run)
  sweep.run(config, str(tmp_path), specs[::-1], run_fn=fake_run)
  names = ["batch_size=2,learning_rate=0.001", "batch_size=2,learning_rate=0.003"]
  assert seen == names + names
  # A folder named in another order by an earlier version is reused.
  os.rename(tmp_path / names[0], tmp_path / "learning_rate=0.001,batch_size=2")
  seen.clear()
  sweep.run(config, str(tmp_path), specs, run_fn=fake_run)
  assert seen == ["learning_rate=0.001,batch_size=2", names[1]]
  assert sorted(os.listdir(tmp_path)) == sorted(
      [names[1], "learning_rate=0.001,batch_size=2", "sweep.json", "sweep.png"])


def test_ctrl_c_ends_in_one_line_and_frees_the_workdir(tmp_path, capsys):
  # Review h30: Ctrl-C ended main and sweep in a KeyboardInterrupt traceback.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from simfluence_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from simfluence_jax import pipeline  # pylint: disable=g-import-not-at-top

  def interrupted(config, workdir, overwrite):
    del config, workdir, overwrite
    raise KeyboardInterrupt

  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["sweep", f"--config={TINY}", f"--workdir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
      try:
        main_lib.run_main(interrupted)
      except KeyboardInterrupt:
        pytest.fail("run_main let the KeyboardInterrupt through")
  flags.FLAGS.unparse_flags()
  assert exit_info.value.code == 130
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"interrupted: the finished stages in {tmp_path} are kept; rerun the same "
      "command to resume.")
  with pipeline.workdir_lock(str(tmp_path)):  # released
    pass


def test_a_cell_folder_name_over_255_bytes_is_refused(tmp_path):
  config = config_lib.load_config(TINY)
  with pytest.raises(ValueError, match=r"^--sweep: cell 'model.checkpoint=c+' names "
                     r"a folder of 273 bytes, over the 255 a filesystem takes"):
    sweep.run(config, str(tmp_path), [f"model.checkpoint:a,{'c' * 256}"],
              run_fn=lambda *a: pytest.fail("no cell may run"))
