"""The scipy matcher under a multi-device mesh: each device's images go to its own host callback (shard_map
over the batch axis), the result equals the unsharded one, and a batch the axis does not divide still works."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs with 4 host devices (set before jax is imported); prints what the callback saw and the matchings.
SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from cvjax.ops import matching
from cvjax.train import sharding

seen = []
host = matching._scipy_match
def spy(cost, valid):
  seen.append([list(cost.shape), float(cost.reshape(-1)[0])])  # the shape and which rows (by their first cost)
  return host(cost, valid)
matching._scipy_match = spy

mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
rng = np.random.default_rng(0)
cost = rng.normal(size=(8, 6, 5)).astype(np.float32)
valid = rng.random((8, 5)) < 0.7
batch = NamedSharding(mesh, P("data"))
fn = lambda c, v: matching.match_sets(c, v, backend="scipy", batch_axis="data")
def calls(array):
  jax.block_until_ready(array)  # callbacks run as the computation does, not when it is dispatched
  found = sorted(seen)
  seen.clear()
  return found

sharded = sharding.jit_with_mesh(fn, mesh)(jax.device_put(cost, batch), jax.device_put(valid, batch))
per_device = calls(sharded)
plain = jax.jit(fn)(cost, valid)
whole = calls(plain)
odd = sharding.jit_with_mesh(fn, mesh)(cost[:3], valid[:3])   # 3 rows: the data axis (2) does not divide
print(json.dumps({"per_device": per_device, "whole": whole, "odd": calls(odd),
                  "firsts": [float(cost[0, 0, 0]), float(cost[4, 0, 0])],
                  "equal": bool((np.asarray(sharded) == np.asarray(plain)).all()),
                  "odd_equal": bool((np.asarray(odd) == np.asarray(plain)[:3]).all())}))
"""


def test_scipy_matcher_runs_per_data_shard_under_the_mesh():
  # The test session's XLA flags (conftest) plus 4 host devices.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  # Each of the 2 data shards (4 images) is solved by a callback of its own (XLA may run one per replica of the
  # 'model' axis, or fewer): no callback sees more than its shard.
  shards = result["per_device"]
  assert shards and all(shape == [4, 6, 5] for shape, _ in shards)
  assert {first for _, first in shards} == set(result["firsts"])
  assert [shape for shape, _ in result["whole"]] == [[8, 6, 5]]   # without a mesh: the whole batch at once
  assert [shape for shape, _ in result["odd"]] == [[3, 6, 5]]
  assert result["equal"] and result["odd_equal"]
