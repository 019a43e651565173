"""python -m raycg.export run_dir=runs/<name> [out=<dir>]  -- TorchScript towers + feature spec."""
import sys

from raycg.model.export import export_towers
from raycg.model.checkpoint import load_model
from raycg.model.checkpoint import evaluation_checkpoint
from raycg.train.runs import parse_overrides


def main(argv: list[str]) -> None:
    args = parse_overrides(argv, {"run_dir": None, "out": ""})
    ckpt = evaluation_checkpoint(args["run_dir"])  # <run>/best, else the newest intact one
    model, _ = load_model(ckpt)
    paths = export_towers(model, args["out"] or f"{args['run_dir'].rstrip('/')}/export")
    print(f"[raycg] exported {ckpt}:")
    for name, path in paths.items():
        print(f"  {name:<13} {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
