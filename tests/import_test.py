"""Imports cost nothing until used, and every public name is still where it was.

Each check runs in a fresh interpreter (a subprocess), since this process has long
imported everything.
"""

import json
import subprocess
import sys

# Packages the core never imports: optional extras, and scipy.stats (1.4 s).
OPTIONAL = ("tensorflow", "tensorflow_datasets", "seqio", "scipy.stats", "matplotlib",
            "orbax", "clu", "sklearn", "tensorboard", "grain", "libtpu", "torch")
# Entry points define absl flags (two of them define --workdir: import one).
FLAG_MODULES = ("simfluence_jax.plan", "simfluence_jax.sweep", "simfluence_jax.tables")


def _run(code: str) -> dict:
  """Runs `code` in a fresh python; it prints one JSON object as its last line."""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


_LOADED = f"""
import json, sys
def loaded():
  return sorted(m for m in {OPTIONAL!r}
                if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules))
"""


def test_importing_and_using_the_kernels_loads_no_optional_package():
  """Importing loads nothing heavy (the kernels load on first use, not even flax);
  TracIn and EK-FAC scores on a Flax model and a simulator fit then load none of
  the optional packages either (orbax neither: only saving / loading factors)."""
  result = _run(_LOADED + """
import simfluence_jax
import simfluence_jax.influence
import simfluence_jax.simulators
after_import = {"loaded": loaded(), "flax": "flax" in sys.modules}
import numpy as np
import flax.linen as nn
import jax
import simfluence_jax as sj
model = nn.Dense(3)
params = model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.float32))
task = sj.influence.ClassificationTask(model.apply)
rng = np.random.default_rng(0)
batch = {"inputs": rng.normal(size=(6, 4)).astype(np.float32),
         "labels": rng.integers(0, 3, 6).astype(np.int32)}
factors = sj.influence.fit_ekfac(task, params, [batch])
ekfac = sj.influence.ekfac_scores(task, params, factors, batch, [batch])
tracin = sj.influence.tracin_scores(task, [params], [0.1], batch, [batch])
trace = sj.Trace(batch_ids=rng.integers(0, 6, (4, 3, 2)).astype(np.int32),
                 losses=rng.uniform(1, 2, (4, 4, 5)).astype(np.float32),
                 learning_rates=np.full((4, 3), 0.1, np.float32), num_train_examples=6)
sim = sj.simulators.fit("linear", trace, l2=0.1)
mse = sj.evaluation.all_steps_mse(sim.simulate(trace.batch_ids, trace.losses[:, 0]),
                                  trace.losses)
print(json.dumps({"after_import": after_import, "loaded": loaded(),
                  "nnx": [m for m in ("flax.nnx", "IPython", "optax") if m in sys.modules],
                  "shapes": [ekfac.shape, tracin.shape],
                  "finite": bool(np.isfinite(ekfac).all() and np.isfinite(mse))}))
""")
  assert result["after_import"] == {"loaded": [], "flax": False}
  assert result["loaded"] == []
  # A linen user scoring never pays for flax.nnx (0.5-0.9 s) or optax (0.13-0.2 s).
  assert result["nnx"] == []
  assert result["shapes"] == [[6, 6], [6, 6]] and result["finite"]


def test_nnx_kinds_are_registered_once_nnx_is_imported_and_user_kinds_stay():
  """The NNX layer kinds register on the first lookup after `import flax.nnx`; a
  kind the user registered for an NNX class before that is kept."""
  result = _run("""
import json, sys
import numpy as np
import jax
import simfluence_jax as sj
from simfluence_jax.influence import _blocks
linen_first = [c.__name__ for c in _blocks.registered_module_classes()]
from flax import nnx
class Mine(_blocks.DenseBlock):
  name = "mine"
sj.influence.register_layer_kind(nnx.Linear, Mine)
classes = {f"{c.__module__.split('.')[1]}.{c.__name__}":
           _blocks.block_for_module_class(c).name
           for c in _blocks.registered_module_classes()}
model = nnx.Sequential(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), nnx.relu,
                       nnx.Conv(5, 3, (1,), rngs=nnx.Rngs(1)))
task = sj.influence.ClassificationTask(model)
batch = {"inputs": np.ones((2, 4), np.float32), "labels": np.zeros(2, np.int32)}
layers = sj.influence.find_layers(task.loss, nnx.state(model, nnx.Param), batch,
                                  warn=False)
print(json.dumps({"linen_first": linen_first, "classes": classes,
                  "blocks": [s.block for s in layers]}))
""")
  assert result["linen_first"] == ["Dense", "DenseGeneral", "Conv", "Embed"]
  assert result["classes"]["nnx.Linear"] == "mine"  # the user's, not ours
  assert result["classes"]["nnx.LinearGeneral"] == "dense"
  assert result["classes"]["nnx.Conv"] == "conv"
  assert result["blocks"] == ["mine", "conv"]


def test_no_module_of_the_package_imports_seqio_or_tensorflow():
  """Only data/tasks.py may import seqio / TF / TFDS, and only the functions that
  need it import tasks.py: importing every other module loads none of them."""
  result = _run(_LOADED + f"""
import importlib, pkgutil
import simfluence_jax
names = [m.name for m in pkgutil.walk_packages(simfluence_jax.__path__,
                                              "simfluence_jax.")
         if m.name not in ("simfluence_jax.data.tasks",) + {FLAG_MODULES!r}]
for name in names:
  importlib.import_module(name)
print(json.dumps({{"loaded": loaded(), "count": len(names)}}))
""")
  # The pipeline and training checkpoint with orbax (core); nothing else loads.
  assert result["loaded"] == ["orbax"], result
  assert result["count"] > 40


PACKAGES = ("simfluence_jax", "simfluence_jax.influence", "simfluence_jax.simulators",
            "simfluence_jax.evaluation", "simfluence_jax.data", "simfluence_jax.models",
            "simfluence_jax.kernels", "simfluence_jax.training")


def test_every_public_name_resolves_and_is_listed():
  result = _run(f"""
import importlib, json
out = {{}}
for name in {PACKAGES!r}:
  package = importlib.import_module(name)
  scope = {{}}
  exec(f"from {{name}} import *", scope)
  try:
    package.no_such_name
    bad = "no AttributeError"
  except AttributeError as error:
    bad = str(error)
  out[name] = {{
      "missing": [n for n in package.__all__ if not hasattr(package, n)],
      "unlisted": sorted(set(package.__all__) - set(dir(package))),
      "star": sorted(set(package.__all__) - set(scope)),
      "bad": bad, "count": len(package.__all__)}}
print(json.dumps(out))
""")
  for package, checks in result.items():
    assert checks["missing"] == checks["unlisted"] == checks["star"] == [], package
    assert checks["bad"] == f"module {package!r} has no attribute 'no_such_name'"
    assert checks["count"] > 0, package


def test_lazy_names_are_the_defining_objects():
  """`sj.influence.fit_ekfac` is `_ekfac.fit_ekfac` (not a wrapper), the README's
  spellings work, and private submodules stay reachable as attributes."""
  result = _run("""
import json
import simfluence_jax as sj
from simfluence_jax import evaluation
from simfluence_jax.influence import fit_ekfac, tracin_scores
from simfluence_jax.influence import _ekfac, _tracin
from simfluence_jax.evaluation import _report
print(json.dumps({
    "same": [fit_ekfac is _ekfac.fit_ekfac, tracin_scores is _tracin.tracin_scores,
             sj.influence.fit_ekfac is fit_ekfac, sj.influence._ekfac is _ekfac,
             evaluation.write_report is _report.write_report,
             sj.Trace is sj.trace.Trace, sj.training.train_runs is not None],
    "modules": [sj.influence.fit_ekfac.__module__, sj.Trace.__module__]}))
""")
  assert all(result["same"]), result
  assert result["modules"] == ["simfluence_jax.influence._ekfac", "simfluence_jax.trace"]
