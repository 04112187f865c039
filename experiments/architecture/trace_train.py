"""Follow the config through the code: which segldm modules `segldm.train.train()` enters on its way
to the training loop, and how often a call climbs back up a layer.

Runs `python -m segldm.train` in this process (Hydra's real entry point) under a profile hook. From
the moment `train()` is entered, every Python call into a segldm module is attributed to the nearest
segldm frame below it on the stack (a call through Lightning, Hydra or torch counts as a call from the
segldm code that called them). Counting pauses inside `Trainer.fit` (the training loop: the model's
code, not the path of the config) and resumes when it returns.

- modules entered: distinct segldm modules that ran a function;
- stops: calls from one segldm module into another;
- climbs: stops whose callee sits in a higher layer than its caller (the import-linter layers of
  pyproject.toml: entry points > evaluation, sweeps > compat > runtime > training, tracking >
  pipeline > condition > models, diffusion, metrics, data > storage, config > errors), split into
  climbs by import (the caller's module names the callee's) and callbacks (a lower module calling
  a function or class it was handed, e.g. a writer callback or a class built on the meta device).

    .venv/bin/python experiments/architecture/trace_train.py [--out DIR] [--json FILE]

It trains a 2-step first stage (untraced), then traces the LDM run on it: the quickstart configs
shrunk to a few steps and scenes. To count an older commit, run this file with that commit's
package first on the path: `PYTHONPATH=<checkout> python experiments/architecture/trace_train.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from collections import Counter
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import segldm.train as entry  # the package first on the path: this checkout, or PYTHONPATH's

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data.train.length=16",
    "data.validation.length=8",
    "data.batch_size=4",
    "trainer.max_steps=2",
    "trainer.val_check_interval=1",
    "trainer.limit_val_batches=1",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.sample_grid.every_n_steps=2",
    "seed=0",
]


def layers() -> list[list[str]]:
    """The import-linter layers, top first, as lists of module prefixes."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    return [[name.strip() for name in layer.split("|")] for layer in contract["layers"]]


def layer_of(module: str, table: list[list[str]]) -> int | None:
    """Index of the layer a module belongs to (0 = top), None for segldm's root package."""
    for index, names in enumerate(table):
        if any(module == name or module.startswith(name + ".") for name in names):
            return index
    return None


class Tracer:
    """A sys.setprofile hook that records segldm -> segldm calls while counting is on."""

    def __init__(self) -> None:
        self.active = False
        self.paused_by: FrameType | None = None
        self.modules: Counter[str] = Counter()
        self.stops: Counter[tuple[str, str]] = Counter()

    @staticmethod
    def segldm_module(frame: FrameType | None) -> tuple[str | None, FrameType | None]:
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if name == "segldm" or name.startswith("segldm."):
                return name, frame
            frame = frame.f_back
        return None, None

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "return" and frame is self.paused_by:
            self.paused_by = None
            return
        if event != "call":
            return
        code = frame.f_code
        name = frame.f_globals.get("__name__", "")
        if not self.active:
            if name == "segldm.train" and code.co_name == "train":
                self.active = True
            else:
                return
        if self.paused_by is not None:
            return
        if code.co_name == "fit" and name.startswith("lightning.pytorch.trainer"):
            self.paused_by = frame
            return
        if not (name == "segldm" or name.startswith("segldm.")):
            return
        caller, _ = self.segldm_module(frame.f_back)
        self.modules[name] += 1
        if caller is not None and caller != name:
            self.stops[(caller, name)] += 1


def imports(caller: str, callee: str) -> bool:
    """Whether module ``caller`` holds a name from module ``callee`` (or the module itself): a call
    up a layer without one is a callback, a function or class the caller was handed."""
    namespace = vars(sys.modules.get(caller, ModuleType(caller)))
    return any(
        (isinstance(value, ModuleType) and value.__name__ == callee)
        or getattr(value, "__module__", None) == callee
        for value in namespace.values()
    )


def summary(tracer: Tracer) -> dict[str, Any]:
    table = layers()
    climbs = {
        (a, b): n
        for (a, b), n in tracer.stops.items()
        if layer_of(a, table) is not None
        and layer_of(b, table) is not None
        and layer_of(b, table) < layer_of(a, table)
    }
    by_import = {f"{a} -> {b}": n for (a, b), n in climbs.items() if imports(a, b)}
    callbacks = {f"{a} -> {b}": n for (a, b), n in climbs.items() if not imports(a, b)}
    return {
        "modules_entered": len(tracer.modules),
        "modules": sorted(tracer.modules),
        "distinct_stops": len(tracer.stops),
        "stops": sum(tracer.stops.values()),
        "climbs_by_import": by_import,
        "climbs_through_callbacks": callbacks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="output root (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="segldm-trace-"))
    common = [f"paths.output_root={out}", "logger.mlflow.experiment_name=trace", *TINY]
    first_stage = out / "quickstart" / "autoencoder" / "checkpoints" / "last.ckpt"
    subprocess.run(
        [sys.executable, "-m", "segldm.train", "experiment=quickstart_autoencoder", *common],
        check=True,
        cwd=Path(entry.__file__).parents[1],  # `-m` puts the working folder first on the path
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tracer = Tracer()
    sys.argv = [
        "segldm.train",
        "experiment=quickstart",
        f"model.first_stage.ckpt_path={first_stage}",
        *common,
    ]
    sys.setprofile(tracer)
    try:
        entry.main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    finally:
        sys.setprofile(None)
    result = summary(tracer) | {"package": str(Path(entry.__file__).parents[1])}
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
