"""Training: one loop (loop.py) and its pluggable methods (methods.py), pure diffusion math
(losses.py), side jobs as hooks (hooks.py), the worker's view of Ray Train (dist.py), the
training-data plan (data.py) and the Ray Train driver (trainer.py)."""
