"""Benchmark workers: one side of a comparison per process, driven over a line protocol.

Comparing segldm with the real CompVis code means two model stacks that must not share a process
(the reference needs its own imports, and neither side should inherit the other's allocator state,
threads or kernel caches). The orchestrator (:mod:`segldm_bench.reference`) starts one worker
per side; both load the same CompVis config, checkpoint and inputs (a setup file), then answer
commands one JSON line at a time on stdin; replies go to stdout behind :data:`REPLY` so that what
the model code prints on its own is logged, not parsed.

A worker subclasses :class:`BenchWorker` with its tasks (the timed work, one call each) and the
tensors of its equality check; timing, warm-up and peak memory are the same code for both sides.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from segldm_bench.measure import peak_memory, resident_bytes

REPLY = "@@segldm-bench@@ "


KERNEL_KINDS = ("convolution", "attention", "matmul", "normalization", "other")


def kernel_kind(op: str) -> str:
    """The kind of an aten op, for the profile breakdown (which part of a step could get faster)."""
    name = op.removeprefix("aten::")
    if "convolution" in name or name.startswith("conv"):
        return "convolution"
    if "scaled_dot_product" in name or "softmax" in name or name in ("bmm", "baddbmm"):
        return "attention"
    if name in ("mm", "addmm", "linear", "matmul"):
        return "matmul"
    if "norm" in name:
        return "normalization"
    return "other"


def checked_parameters(unet: torch.nn.Module) -> list[str]:
    """UNet parameters whose gradients the check compares: the first two, the last two and the
    first attention qkv (input conv, output conv, attention: where an implementation would differ)."""
    names = [n for n, _ in unet.named_parameters()]
    qkv = [n for n in names if ".qkv." in n][:2]
    return list(dict.fromkeys(names[:2] + names[-2:] + qkv))


class BenchWorker:
    """Timed tasks over one model built from a setup file (see :func:`write_setup` in .reference).

    Subclasses fill :attr:`tasks` (name -> one call of the work) and implement :meth:`outputs`
    (named tensors the orchestrator compares between the sides before timing anything) and
    :meth:`holders` (modules and optimizer whose tensors are resident during a task).
    """

    def __init__(self, setup_path: str | Path) -> None:
        self.setup: dict[str, Any] = torch.load(setup_path, weights_only=True)
        torch.set_num_threads(int(self.setup["threads"]))
        self.device = torch.device("cpu")
        self.tasks: dict[str, Callable[[], Any]] = {}
        self.prepare: dict[str, Callable[[], None]] = {}  # untimed, before a task (switch modes)
        self.warm: set[str] = set()
        self.first_call_s: dict[str, float] = {}  # the untimed first call (compiling, kernel selection)

    # --------------------------------------------------------------- the shared check
    # Both sides expose CompVis's LatentDiffusion interface (p_losses, apply_model, model.diffusion_model)
    # and set: model, optimizer (None until a step task ran), z (latents), c (conditioning), x_noisy.
    model: Any
    optimizer: torch.optim.Optimizer | None = None
    z: torch.Tensor
    c: torch.Tensor
    x_noisy: torch.Tensor

    def samples(self) -> torch.Tensor:
        """DDIM (eta 0) from the setup's x_T with the EMA weights, fp32."""
        raise NotImplementedError

    def outputs(self) -> dict[str, torch.Tensor]:
        """What the sides must agree on: latents, conditioning, UNet output, loss, UNet gradients, samples."""
        s, model = self.setup, self.model
        with torch.no_grad():
            loss, _ = model.p_losses(self.z, self.c, s["t"], noise=s["noise"])
            eps = model.apply_model(self.x_noisy, s["t"], self.c)
        unet = model.model.diffusion_model
        (s["noise"] - model.apply_model(self.x_noisy, s["t"], self.c)).abs().mean().backward()
        checked = checked_parameters(unet)
        grads = {f"grad:{n}": p.grad.clone() for n, p in unet.named_parameters() if n in checked}
        model.model.zero_grad(set_to_none=True)
        return {
            "latent": self.z,
            "conditioning": self.c,
            "unet_output": eps,
            "loss": loss.reshape(1),
            **grads,
            "ddim_samples": self.samples(),
        }

    def holders(self, task: str) -> tuple[list[torch.nn.Module], torch.optim.Optimizer | None]:
        """Modules and optimizer whose tensors are resident while `task` runs."""
        return [self.model], (self.optimizer if task.startswith("step") else None)

    side: str = ""  # the name the results give this side

    def describe(self) -> dict[str, Any]:
        """Which side, and the parameter counts (the same model on both sides)."""

        def count(module: torch.nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        return {
            "side": self.side,
            "unet_params": count(self.model.model),
            "first_stage_params": count(self.model.first_stage_model),
        }

    # --------------------------------------------------------------- commands
    def cmd_info(self) -> dict[str, Any]:
        return {"tasks": sorted(self.tasks), "threads": torch.get_num_threads(), **self.describe()}

    def cmd_check(self, out: str) -> dict[str, Any]:
        torch.save({k: v.detach().float().cpu() for k, v in self.outputs().items()}, out)
        return {"path": out}

    def cmd_time(self, task: str, repeat: int = 1) -> dict[str, Any]:
        """Seconds per call of `task`."""
        work = self._task(task)
        start = time.perf_counter()
        for _ in range(repeat):
            work()
        return {"seconds": (time.perf_counter() - start) / repeat, "first_call_s": self.first_call_s[task]}

    def cmd_memory(self, task: str) -> dict[str, Any]:
        """Peak bytes of one call: resident tensors (weights, EMA, optimizer state) + the call's peak."""
        work = self._task(task)
        modules, optimizer = self.holders(task)
        return peak_memory(work, self.device, resident_bytes(modules, optimizer))

    def cmd_profile(self, task: str) -> dict[str, Any]:
        """Seconds of one call by kind of kernel (torch profiler, self time of the aten ops)."""
        work = self._task(task)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            work()
        seconds: dict[str, float] = dict.fromkeys(KERNEL_KINDS, 0.0)
        for event in prof.key_averages():
            if event.key.startswith("aten::"):
                seconds[kernel_kind(event.key)] += event.self_cpu_time_total / 1e6
        return {"seconds_by_kind": seconds}

    def _task(self, task: str) -> Callable[[], Any]:
        """The task's work, after its untimed preparation and, the first time, one untimed call (kernel
        selection, allocator, the optimizer's state, which exists from the second call on)."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this worker has {sorted(self.tasks)}")
        if task in self.prepare:
            self.prepare[task]()
        if task not in self.warm:
            start = time.perf_counter()
            self.tasks[task]()
            self.first_call_s[task] = time.perf_counter() - start
            self.warm.add(task)
            self.after_first_call(task)
        return self.tasks[task]

    def after_first_call(self, task: str) -> None:
        """Checks a task needs once it has run (segldm: a compiled UNet against the eager one)."""

    # --------------------------------------------------------------- loop
    def serve(self, stdin: IO[str] = sys.stdin, stdout: IO[str] = sys.stdout) -> None:
        """Answer commands until 'quit' or end of input; a failing command replies with its error."""
        reply(stdout, {"ok": True, "ready": True, **self.cmd_info()})
        for line in stdin:
            message = json.loads(line)
            if message["cmd"] == "quit":
                break
            try:
                handler = getattr(self, f"cmd_{message['cmd']}")
                reply(stdout, {"ok": True, **handler(**message.get("args", {}))})
            except Exception as err:  # noqa: BLE001 - reported to the orchestrator, which raises it
                reply(
                    stdout,
                    {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()},
                )


def reply(stdout: IO[str], message: dict[str, Any]) -> None:
    stdout.write(REPLY + json.dumps(message, default=str) + "\n")
    stdout.flush()


class WorkerError(RuntimeError):
    """A worker failed to start or a command failed; the message names the side and its log."""


class WorkerProcess:
    """The orchestrator's handle on one worker: start it, send commands, read replies, log the rest."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log_path = name, log_path
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            bufsize=1,
        )
        self.info = self._read()

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                message = json.loads(line[len(REPLY) :])
                if not message.get("ok"):
                    raise WorkerError(f"{self.name}: {message['error']}\n{message.get('trace', '')}")
                return message
            self.log.write(line)
        self.proc.wait()
        self.log.flush()
        tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-25:])
        raise WorkerError(
            f"{self.name} worker exited (code {self.proc.returncode}); log {self.log_path}:\n{tail}"
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call_quit()
            finally:
                self.proc.wait(timeout=60)
        self.log.close()

    def call_quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
