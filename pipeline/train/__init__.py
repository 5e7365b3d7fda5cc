"""Training: one loop (loop.py) and its pluggable methods (methods.py), pure diffusion math
(losses.py), side jobs as hooks (hooks.py), the worker's view of Ray Train (dist.py), the
training-data plan (data.py) and the Ray Train driver (trainer.py)."""

import time

# When this process began importing the training package: on a Ray Train worker, when Ray began
# unpickling the loop, which imports the model code (hooks.StartupTimes: Ray's setup before it,
# the imports after it).
IMPORT_STARTED = time.time()
