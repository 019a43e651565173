"""python -m raycg.evaluate run_dir=runs/<name> [eval.KEY=VALUE ...]  -- evaluate a run's latest checkpoint.

Uses the data paths and eval settings stored with the checkpoint (override any `eval.` key,
e.g. `eval.ks=[10,100,1000] eval.baselines=[popularity]`); prints the recall table and
writes <run_dir>/eval.json.
"""
import os
import sys

from omegaconf import OmegaConf

from raycg.eval.evaluate import evaluate_checkpoint, format_table, timing_line, write_results
from raycg.model.checkpoint import load_model, evaluation_checkpoint
from raycg.train.driver import init_ray
from raycg.train.runs import parse_overrides


def main(argv: list[str]) -> None:
    eval_args = [a for a in argv if a.startswith("eval.")]
    args = parse_overrides([a for a in argv if not a.startswith("eval.")], {"run_dir": None})
    ckpt = evaluation_checkpoint(args["run_dir"])  # <run>/best, else the newest intact one
    _, config = load_model(ckpt)
    eval_cfg = OmegaConf.to_container(OmegaConf.merge(
        {"eval": config["eval"]}, OmegaConf.from_dotlist(eval_args)), resolve=True)["eval"]
    init_ray(OmegaConf.create(config))  # the run's own Ray settings (embedded: loopback only)
    results = evaluate_checkpoint(ckpt, config["data"], eval_cfg,
                                  history_length=config["model"]["history"]["length"],
                                  seed=config["seed"],
                                  quarantine_dir=os.path.join(args["run_dir"], "quarantine", "eval"))
    results["checkpoint"] = ckpt
    path = write_results(args["run_dir"], results)
    print("\n" + format_table(results))
    print(timing_line(results, path))


if __name__ == "__main__":
    main(sys.argv[1:])
