"""Chip specifications for the roofline, and TPU topologies by name.

Each TPU entry is the per-chip figure of Google's Cloud TPU system-architecture page
for that generation (cited per entry). The pages write HBM capacity as "GB" but mean
GiB (the v5p page's own table says "HBM capacity per chip (GiB) 95", and XLA:TPU
reports 15.75 GiB available on a 16 "GB" v5e: the capacity less its reserve), so
capacities are GiB here. A plan compares against what XLA can use per device
(`chip_of` reads it from XLA:TPU's own out-of-memory message: 15.75 GiB on a v5e), not
the capacity.

A chip's figures are shared by the devices on it (same `coords`): a v4 or v5p chip
is one device in megacore mode, as JAX runs on a real slice (`devices.
topology_devices` asks libtpu for it; its default for v4 makes each TensorCore a
device, `core_on_chip` 0 and 1, each with half the chip's HBM, FLOP/s and
bandwidth), and a v5e or v6e chip is one device.

A topology name is what `jax.experimental.topologies.get_topology_desc` takes
("v5e:16x16", "v5p:4x4x4"); `topology_name` also accepts a Cloud accelerator type
("v5litepod-256", "v5p-128", "v4-32", "v6e-256"), where v4 and v5p count TensorCores
(two per chip) and v5e / v6e count chips.
"""

import dataclasses
import math
import os
import re
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from simfluence_jax.planning import costs

_GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Capacity and speed of one chip (`CHIPS`) or of one device (`chip_of`).

  Attributes:
    name: generation ("v5e", ...), or "cpu" for this machine.
    hbm_bytes: device memory (of one chip in `CHIPS`; what one device can use in
      `chip_of` / `measure_host`: what every fit check compares with).
    peak_flops: bf16 peak FLOP/s (XLA:TPU runs float32 matmuls at the default
      precision in bf16 passes, so this is the float32 matmul rate too).
    hbm_bandwidth: bytes/s.
    source: where the numbers come from.
    devices_per_chip: devices sharing one chip (its figures divided among them).
    hbm_source: where `hbm_bytes` comes from ("" = `source`).
  """

  name: str
  hbm_bytes: float
  peak_flops: float
  hbm_bandwidth: float
  source: str
  devices_per_chip: int = 1
  hbm_source: str = ""

  def roofline_seconds(self, flops: float, bytes_accessed: float) -> float:
    """max(FLOPs / peak, bytes / bandwidth): the time bound of a memory- or
    compute-bound program that overlaps both perfectly."""
    return max(flops / self.peak_flops, bytes_accessed / self.hbm_bandwidth)


CHIPS = {
    # https://cloud.google.com/tpu/docs/v4 ("Peak compute per chip 275 teraflops
    # (bf16 or int8); HBM2 capacity and bandwidth 32 GiB, 1200 GBps").
    "v4": ChipSpec("v4", 32 * _GIB, 275e12, 1200e9,
                   "https://cloud.google.com/tpu/docs/v4"),
    # https://cloud.google.com/tpu/docs/v5e ("Peak compute per chip (bf16) 197
    # TFLOPs; HBM2 capacity and bandwidth 16 GB, 819 GBps").
    "v5e": ChipSpec("v5e", 16 * _GIB, 197e12, 819e9,
                    "https://cloud.google.com/tpu/docs/v5e"),
    # https://cloud.google.com/tpu/docs/v5p ("Peak compute per chip (bf16) 459
    # TFLOPs; HBM2e capacity and bandwidth 95GB, 2765 GBps").
    "v5p": ChipSpec("v5p", 95 * _GIB, 459e12, 2765e9,
                    "https://cloud.google.com/tpu/docs/v5p"),
    # https://cloud.google.com/tpu/docs/v6e ("Peak compute per chip (bf16) 918
    # TFLOPs; HBM capacity per chip 32 GB; HBM bandwidth per chip 1638 GBps").
    "v6e": ChipSpec("v6e", 32 * _GIB, 918e12, 1638e9,
                    "https://cloud.google.com/tpu/docs/v6e"),
}

# `device.device_kind` of each generation's TPU devices.
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e",
                 "TPU v5p": "v5p", "TPU v5": "v5p", "TPU v6 lite": "v6e",
                 "TPU v6e": "v6e"}

# Chips -> slice shape of the standard single-slice topologies (Cloud TPU docs'
# configuration tables): 3-D tori for v4 / v5p, 2-D for v5e / v6e.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
              128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16",
              2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
              128: "8x16", 256: "16x16"}
_ACCELERATOR = re.compile(r"^(v4|v5p|v5litepod|v5e|v6e)-(\d+)$")


def topology_name(name: str) -> str:
  """"v5e:16x16" unchanged; "v5litepod-256" -> "v5e:16x16", "v5p-128" -> "v5p:4x4x4".

  Raises:
    ValueError: an unknown generation or slice size.
  """
  generation, sep, shape = name.partition(":")
  if sep:
    if generation not in CHIPS or not re.fullmatch(r"\d+(x\d+)+", shape):
      raise ValueError(f"--topology={name!r}: expected GENERATION:SHAPE with a "
                       f"generation in {sorted(CHIPS)} (e.g. v5e:16x16), or an "
                       "accelerator type (e.g. v5litepod-256).")
    return name
  match = _ACCELERATOR.match(name)
  if not match:
    raise ValueError(f"--topology={name!r}: expected a topology (v5e:16x16, "
                     "v5p:4x4x4) or an accelerator type (v5litepod-256, v5p-128, "
                     "v4-32, v6e-256), or 'cpu'.")
  kind, count = match.group(1), int(match.group(2))
  generation = {"v5litepod": "v5e"}.get(kind, kind)
  # v4-N and v5p-N count TensorCores, two per chip.
  if generation in ("v4", "v5p") and count % 2:
    raise ValueError(f"--topology={name!r}: {kind}-N counts TensorCores, two per "
                     f"chip; {count} is odd.")
  chips = count // 2 if generation in ("v4", "v5p") else count
  shapes = _SHAPES_3D if generation in ("v4", "v5p") else _SHAPES_2D
  if chips not in shapes:
    raise ValueError(f"--topology={name!r}: no standard {generation} slice of "
                     f"{chips} chips; give the topology (e.g. {generation}:"
                     f"{next(iter(shapes.values()))}).")
  return f"{generation}:{shapes[chips]}"


def _chip_spec(kind: str) -> Optional[ChipSpec]:
  if kind in _DEVICE_KINDS:
    return CHIPS[_DEVICE_KINDS[kind]]
  for prefix, name in sorted(_DEVICE_KINDS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return CHIPS[name]
  return None


def devices_per_chip(devices: Sequence[jax.Device]) -> int:
  """Most devices on one chip: devices with the same `coords` (and slice) share it
  (a v4's two TensorCores); 1 for devices without coords (CPU)."""
  counts = {}
  for device in devices:
    coords = getattr(device, "coords", None)
    if coords is None:
      return 1
    key = (getattr(device, "slice_index", 0), tuple(coords))
    counts[key] = counts.get(key, 0) + 1
  return max(counts.values()) if counts else 1


def xla_hbm_limit(device: jax.Device) -> Optional[float]:
  """Bytes XLA can use on `device`, from its own out-of-memory message for a 1 TiB
  program (compiled, never run: well under a second), or None if it names none."""
  placed = jax.sharding.SingleDeviceSharding(device)
  big = jax.ShapeDtypeStruct((256, 1 << 30), jnp.float32, sharding=placed)
  try:
    jax.jit(lambda x: x[:, :2] * 2).lower(big).compile()
  except Exception as e:  # pylint: disable=broad-except
    return costs.oom_bytes(e)[1]
  return None


def chip_of(devices: Sequence[jax.Device], read_limit: bool = True
            ) -> Optional[ChipSpec]:
  """What one of `devices` has (by `device_kind`), or None if the kind is unknown.

  The chip's HBM, FLOP/s and bandwidth are divided among the devices on one chip
  (`devices_per_chip`); with `read_limit`, `hbm_bytes` is what XLA can use on a
  device (`xla_hbm_limit`), else (or if XLA names no limit) the chip's share, and
  `hbm_source` says which.
  """
  chip = _chip_spec(devices[0].device_kind)
  if chip is None:
    return None
  share = devices_per_chip(devices)
  hbm = chip.hbm_bytes / share
  hbm_source = (f"the chip's {chip.hbm_bytes / _GIB:.0f} GiB" + (
      f" / {share} devices per chip" if share > 1 else ""))
  limit = xla_hbm_limit(devices[0]) if read_limit else None
  if limit is not None:
    hbm, hbm_source = limit, f"usable per device, read from XLA; {hbm_source}"
  elif read_limit:
    hbm_source += " (XLA named no usable limit)"
  return dataclasses.replace(
      chip, hbm_bytes=hbm, peak_flops=chip.peak_flops / share,
      hbm_bandwidth=chip.hbm_bandwidth / share, devices_per_chip=share,
      hbm_source=hbm_source)


def _best_seconds(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def measure_host(device: Optional[jax.Device] = None) -> ChipSpec:
  """This machine's CPU as a chip: measured float32 matmul FLOP/s and copy bandwidth.

  A 1024² matmul gives the peak (best of 5), a jitted `x + 1` over 64 MiB the
  bandwidth (read + write), both timed on one device running alone; memory, peak and
  bandwidth are divided by the local CPU devices
  (`--xla_force_host_platform_device_count` devices share the host's RAM and cores:
  each got the whole machine's FLOP/s before, so an SPMD program's roofline read
  about that many times too fast, review h23). About a second.
  """
  device = device or jax.devices("cpu")[0]
  size = 1024
  a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  matmul = jax.jit(lambda x: x @ x)
  peak = 2 * size ** 3 / _best_seconds(matmul, a)
  # In place (donated): a fresh 64 MiB output per call would time page faults.
  add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  state = [jax.device_put(jnp.ones((16 << 20,), jnp.float32), device)]

  def step():
    state[0] = add(state[0])
    return state[0]

  bandwidth = 2 * state[0].nbytes / _best_seconds(step)
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  sharing = len(jax.local_devices(backend="cpu"))
  return ChipSpec("cpu", float(memory) / sharing, peak / sharing, bandwidth / sharing,
                  "measured on this machine (1024² float32 matmul, 64 MiB x + 1)"
                  + (f", shared by {sharing} local CPU devices" if sharing > 1 else ""),
                  hbm_source=f"RAM {memory / _GIB:.1f} GiB / {sharing} local CPU "
                             "device(s)")
