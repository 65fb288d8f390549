#!/usr/bin/env python3
"""Turns lathe run histories (<checkpoint_root>/<run_id>/history.jsonl, docs/operations.md)
into TensorBoard event files, one folder per run under --logdir:

    .venv/bin/python scripts/history_to_tensorboard.py runs/checkpoints/<run_id>/history.jsonl \\
        --logdir runs/tensorboard
    tensorboard --logdir runs/tensorboard

Scalars, at the run's optimizer step (a forward_backward counts for the step it feeds, its
line's step + 1; an optim_step line at its own step):
  train/loss_per_token   loss:sum / num_loss_tokens:sum of each forward_backward
  eval/loss_per_token    the same of each forward
  train/grad_norm, train/learning_rate         of each optim_step
  train/step_seconds, train/tokens_per_s, train/mfu   of each optim_step (when recorded)
  metrics/<type>/<name>  every other metric of the op, as it returned it
Wall times are the lines' unix_ms. A line repeated with the same op_id (a coordinator that
crashed between writing it and recording the result writes it again) counts once; lines
that do not parse (one torn by a crash) are skipped.

Needs the `tensorboard` package (requirements-dev.txt) and writes with PyTorch's
torch.utils.tensorboard.SummaryWriter (both in lathe's .venv).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_history(path: str) -> list[dict]:
    """The file's lines in order, the last of each op_id kept in its first place."""
    lines: list[dict] = []
    where: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for text in f:
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if not isinstance(line, dict):
                continue
            op = line.get("op_id")
            if op in where:
                lines[where[op]] = line
                continue
            if op is not None:
                where[op] = len(lines)
            lines.append(line)
    return lines


def scalars(line: dict):
    """(tag, step, value) of one history line."""
    kind, metrics, step = line.get("type"), line.get("metrics") or {}, int(line.get("step", 0))
    if kind in ("forward_backward", "forward"):
        step += kind == "forward_backward"
        tokens = metrics.get("num_loss_tokens:sum", 0)
        if tokens > 0 and "loss:sum" in metrics:
            prefix = "train" if kind == "forward_backward" else "eval"
            yield f"{prefix}/loss_per_token", step, metrics["loss:sum"] / tokens
    elif kind == "optim_step":
        for name, tag in (("grad_norm:mean", "train/grad_norm"), ("learning_rate:mean", "train/learning_rate")):
            if name in metrics:
                yield tag, step, metrics[name]
        for key in ("step_seconds", "tokens_per_s", "mfu"):
            if key in line:
                yield f"train/{key}", step, line[key]
    for name, value in metrics.items():
        yield f"metrics/{kind}/{name}", step, value


def convert(history: str, logdir: str, run: str | None = None) -> int:
    """Writes one run's event files under logdir/<run>; returns how many scalars."""
    from torch.utils.tensorboard import SummaryWriter

    run = run or os.path.basename(os.path.dirname(os.path.abspath(history)))
    writer = SummaryWriter(log_dir=os.path.join(logdir, run))
    n = 0
    try:
        for line in read_history(history):
            wall = line.get("unix_ms", 0) / 1000 or None
            for tag, step, value in scalars(line):
                writer.add_scalar(tag, value, global_step=step, walltime=wall)
                n += 1
    finally:
        writer.close()
    return n


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("history", nargs="+", help="history.jsonl files (each run's folder names its run)")
    p.add_argument("--logdir", required=True, help="TensorBoard log folder; one subfolder per run")
    args = p.parse_args(argv)
    for path in args.history:
        print(f"{path}: {convert(path, args.logdir)} scalars")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
