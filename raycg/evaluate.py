"""python -m raycg.evaluate run_dir=runs/<name>  -- evaluate a run's latest checkpoint.

Uses the data paths and eval settings stored with the checkpoint; prints the recall table
and writes <run_dir>/eval.json.
"""
import sys

import ray

from raycg.eval.evaluate import evaluate_checkpoint, format_table, write_results
from raycg.train.checkpoint import load_model
from raycg.train.runs import latest_checkpoint, parse_overrides


def main(argv: list[str]) -> None:
    args = parse_overrides(argv, {"run_dir": None})
    ckpt = latest_checkpoint(args["run_dir"])
    _, config = load_model(ckpt)
    ray.init(address="local", _node_ip_address="127.0.0.1") if not ray.is_initialized() else None
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = evaluate_checkpoint(ckpt, config["data"], config["eval"],
                                  history_length=config["model"].get("history", {}).get("length", 0))
    results["checkpoint"] = ckpt
    path = write_results(args["run_dir"], results)
    print("\n" + format_table(results))
    print(f"[raycg] eval: results -> {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
