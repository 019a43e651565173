"""Ray Tune sweeps over raycg runs (raycg.tune.sweep); the command is `raycg-tune` or
`python tune/sweep.py` (tune/README.md)."""
