"""The `retina-jax` command (docs/usage.md, "The retina-jax command"): one entry point with a
subcommand per tool, the same tools as the `python -m` forms, one flag style and one way of
reporting a user's mistake.

Flag style: flag names are written with underscores, as config fields are (`--data_root`,
`--image_size`, `--config.train.log_every=8`); the hyphenated spelling of a flag name
(`--data-root`) is accepted by every subcommand and means the same flag.

A user's mistake (`errors.UserError`: a bad config, a missing checkpoint, a bad data row, a file
that is not a checkpoint) ends the command with one line on stderr, `error: <what and the fix>`,
and exit code 2. Anything else is a programming error and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from retina_jax.errors import UserError

PROG = "retina-jax"
# name -> (module, what it does, an example); each module's `main(argv)` (argparse) or `run()` (absl).
COMMANDS = {
    "train": ("retina_jax.main", "pretrain a model from a config (FLAIR, KeepFIT, KeepFIT V2, ViLReF)",
              "retina-jax train --config configs/flair.py:demo --workdir workdirs/flair_demo"),
    "evaluate": ("retina_jax.evaluate", "evaluate a run's checkpoint (its config is read from the run directory)",
                 "retina-jax evaluate --workdir workdirs/flair_demo --eval transfer_linear_probe --step 64"),
    "predict": ("retina_jax.predict", "zero-shot class probabilities of image files",
                "retina-jax predict --checkpoint workdirs/flair_demo --image a.jpg --classes \"normal,glaucoma\""),
    "convert": ("retina_jax.convert", "convert a released PyTorch / Hugging Face checkpoint",
                "retina-jax convert --from hf-bert Bio_ClinicalBERT/ --out ckpt/bert"),
    "export": ("retina_jax.data.export", "write the synthetic corpus in a real dataset format",
               "retina-jax export --format flair_csv --out data/synthetic_csv --size 512"),
    "build": ("retina_jax.data.build", "build an ArrayRecord dataset (tfds) from a CSV, JSONL or LMDB dataset",
              "retina-jax build --format flair_csv --input data/x/dataframe.csv --out data/x_ar"),
    "gallery": ("retina_jax.data.gallery", "draw a contact sheet of synthetic examples",
                "retina-jax gallery --out workdirs/gallery.png --n 12"),
}
ABSL_COMMANDS = ("train", "evaluate")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [FLAGS]    ({PROG} COMMAND --help lists a command's flags)", "", "commands:"]
    for name, (_, what, example) in COMMANDS.items():
        lines += [f"  {name.ljust(width)}  {what}", f"  {' ' * width}    e.g. {example}"]
    lines += ["", "Flags are written with underscores (--data_root); the hyphenated spelling (--data-root) works too.",
              "Each command is also `python -m <module>`: " + ", ".join(
                  f"{name} = {module}" for name, (module, _, _) in COMMANDS.items()) + "."]
    return "\n".join(lines)


def normalize_flags(argv):
    """`--image-size=96` -> `--image_size=96`: the name part of every long flag, never its value."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's flag style: names with underscores, hyphens accepted."""

    def parse_args(self, args=None, namespace=None):
        return super().parse_args(normalize_flags(sys.argv[1:] if args is None else args), namespace)


def report_user_error(e: BaseException) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def user_errors():
    """A UserError raised inside becomes one `error:` line and exit code 2 (SystemExit)."""
    try:
        yield
    except UserError as e:
        raise SystemExit(report_user_error(e)) from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)} ({PROG} --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if name in ABSL_COMMANDS:
        sys.argv = [f"{PROG} {name}", *rest]
        module.run()  # absl exits itself
        return 0
    sys.argv = [f"{PROG} {name}", *rest]  # argparse's prog in usage lines
    with user_errors():
        result = module.main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
