"""The ablation report: grids of training runs x seeds -> tables with intervals and plots.

    python -m raycg.report                     # sim + tmall grids, 3 seeds -> report/
"""
