"""``python tests/helpers/kill_during_save.py STEP LAUNCH_ARGS...``: the launcher, SIGKILLed in the middle of
saving checkpoint STEP (after the state's files are written, before orbax commits the checkpoint), to test
that a crash never loses the previous checkpoint."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app, logging  # noqa: E402

import launch  # noqa: E402
from cvjax.train import checkpoint  # noqa: E402


def main():
  step, launch_args = sys.argv[1], sys.argv[2:]
  save = checkpoint.DataStateHandler.save

  def save_then_die(self, directory, args):
    save(self, directory, args)
    if f"/{step}." in str(directory):  # orbax's temporary directory of that step, not yet committed
      os.kill(os.getpid(), signal.SIGKILL)

  checkpoint.DataStateHandler.save = save_then_die
  logging.set_verbosity(logging.WARNING)
  app.run(launch.main, argv=[launch.__file__, *launch_args])


if __name__ == "__main__":
  main()
