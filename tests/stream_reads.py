"""Run by tests/test_stream.py in each of 2 processes (``python -m jaxtrain.launch``):
trains two moons streamed and resident on 2 x 2 devices, and writes the rows
this process read per epoch (``reads_<rank>.npy``) and whether both runs agree."""

from __future__ import annotations

import pathlib
import sys


def main(out: pathlib.Path) -> None:
  from jaxtrain.engine import distributed

  distributed.initialize()  # from the launcher's JAX_* variables
  import jax
  import numpy as np

  import jaxtrain
  from jaxtrain import data

  moons = data.load("two_moons", key=jax.random.key(0), n_samples=534)
  train = data.take(moons.train, 0, 320)  # 10 full batches of 32 per epoch
  reads = []

  class Counting(data.ArraySource):
    def _read(self, indices):
      if len(indices) > 1:  # not the one-row peeks at the set's fields
        reads.append(np.asarray(indices).copy())
      return super()._read(indices)

  def train_once(where, source):
    state = jaxtrain.create_train_state(
        jaxtrain.models.MLP(hidden_sizes=(16,), outputs=2),
        jaxtrain.make_optimizer("adam", 0.01), jax.random.key(1), train["inputs"][:1],
        loss_fn=jaxtrain.losses.cross_entropy)
    config = jaxtrain.FitConfig(epochs=3, batch_size=32, devices=4, data=where,
                                evaluate_train=False, progress=False)
    return jaxtrain.fit(state, source, val=moons.val, config=config, log=lambda line: None)

  resident = train_once("device", train)
  streamed = train_once("stream", Counting(train))
  rank = jax.process_index()
  rows = np.concatenate(reads)  # 30 steps x 16 rows: this process's two devices
  np.save(out / f"reads_{rank}.npy", rows.reshape(3, -1))
  same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(resident.state.params),
                                                  jax.tree.leaves(streamed.state.params)))
  if rank == 0:
    (out / "same").write_text(str(same and resident.history["epoch"]["val_loss"]
                                  == streamed.history["epoch"]["val_loss"]))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
