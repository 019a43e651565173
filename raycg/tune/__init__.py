"""Ray Tune sweeps over raycg runs (raycg.tune.sweep); the command is `python tune/sweep.py`
(tune/README.md)."""
