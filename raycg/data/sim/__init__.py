"""The simulator's parts, by job; `raycg.data.simulate` puts them together (`simulate`,
`write_dataset`, the command line).

    config.py    SimConfig, the simulated event schema, the data format version
    world.py     categories, advertisers, items and users; the item and user tables; meta
    events.py    requests -> impressions -> events
    parallel.py  the scale-out path: user blocks simulated and written by Ray tasks
"""
