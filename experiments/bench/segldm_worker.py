"""segldm's side of the comparison with the real CompVis code (`python experiments/bench/segldm_worker.py SETUP`).

Loads the CompVis config and checkpoint of the setup file with :func:`segldm.compat.compvis.load_compvis`
(what a CompVis user does), then serves the tasks below; its counterpart for the reference code is
``experiments/bench/compvis_worker.py``. Tasks (one call each):

* ``unet_fp32`` / ``unet_bf16``: UNet forward at fixed noisy latents, timesteps and conditioning,
  L1 to the noise, backward (the network alone);
* ``step_fp32`` / ``step_bf16``: the whole training step as segldm runs it (label maps from the
  loader, first stage under inference mode, loss, backward, fused AdamW, EMA update);
* ``sample_fp32`` / ``sample_bf16``: DDIM (eta 0) from fixed noise with the EMA weights;
* ``*_channels_last``: the unet/step tasks with ``model.performance.channels_last=true``
  (``*_channels_last_compile_first_stage``: and the encoder compiled);
* ``*_compile``: the unet/step tasks with ``model.performance.compile=true`` (torch.compile of the
  UNet); after its first call (the compiling one) its UNet output is checked against the eager UNet's;
* ``step_*_compile_first_stage``: the step with ``model.performance.compile_first_stage=true`` (the
  encoder compiled; its latents checked against the eager encoder's the same way);
* ``ema``: the EMA update of the UNet's weights alone (what follows every optimizer step).
"""

from __future__ import annotations

import sys

import torch

from segldm.compat.compvis import load_compvis
from segldm.training.ldm import LatentDiffusion
from segldm_bench.modes import ModeSwitch, PerfMode, autocast, training_step, variant_modes
from segldm_bench.reference import relative_error
from segldm_bench.workers import BenchWorker

# opt-in settings (PerfMode fields = model.performance keys) a unet/step task can add, alone or together
OPT_IN_COMBINATIONS = (
    ("channels_last",),
    ("compile",),
    ("compile_first_stage",),
    ("channels_last", "compile_first_stage"),
)


class SegldmWorker(BenchWorker):
    side = "segldm"

    def __init__(self, setup_path: str) -> None:
        super().__init__(setup_path)
        s = self.setup
        self.model: LatentDiffusion = load_compvis(s["config_path"], s["ckpt_path"]).train()
        self.switch = ModeSwitch(self.model)
        self.modes = variant_modes(self.device, bf16=True, channels_last=False)
        self.optimizer: torch.optim.Optimizer | None = None
        images, label_maps = s["images"], s["label_maps"]
        one_hot = torch.nn.functional.one_hot(label_maps.long(), int(s["n_labels"])).float()
        self.label_batch = {"image": images, "label_map": label_maps, "index": torch.arange(len(images))}
        self.one_hot_batch = {**self.label_batch, "segmentation": one_hot}
        self.switch.apply(self.modes["optimised_fp32"])
        with torch.no_grad():
            self.z = self.model.get_first_stage_encoding(
                self.model.encode_first_stage(images.permute(0, 3, 1, 2).contiguous())
            )
            self.c = self.model.get_learned_conditioning(label_maps)
            self.x_noisy = self.model.q_sample(self.z, s["t"], s["noise"])
        base = {
            "unet_fp32": ("optimised_fp32", self.unet_step),
            "unet_bf16": ("optimised", self.unet_step),
            "step_fp32": ("optimised_fp32", self.step),
            "step_bf16": ("optimised", self.step),
            "sample_fp32": ("optimised_fp32", self.sample),
            "sample_bf16": ("optimised", self.sample),
        }
        modes = {name: (mode_name, work, ()) for name, (mode_name, work) in base.items()}
        for name in ("unet_fp32", "unet_bf16", "step_fp32", "step_bf16"):
            for extras in OPT_IN_COMBINATIONS:  # + model.performance.<extra>=true for each
                modes["_".join((name, *extras))] = (*base[name], extras)
        self.compile_errors: dict[str, float] = {}
        self.task_modes: dict[str, PerfMode] = {}
        for name, (mode_name, work, extras) in modes.items():
            mode = self.modes[mode_name].replace(**dict.fromkeys(extras, True))
            self.task_modes[name] = mode
            # switching modes (memory format included) happens before the clock starts
            self.prepare[name] = lambda mode=mode: self.switch.apply(mode)
            self.tasks[name] = lambda work=work, mode=mode: work(mode)
        self.tasks["ema"] = lambda: self.model.model_ema(self.model.model)

    def after_first_call(self, task: str) -> None:
        """A compiled module computes what the eager one does: relative error of the UNet's training-
        mode output (the graph the timed calls run) or of the encoder's latents, within the setup's
        tolerance; 2e-2 under bf16 (fusion changes which intermediates are rounded to bf16)."""
        mode = self.task_modes.get(task)
        if mode is None or not mode.compiles:
            return
        tolerance = 2e-2 if mode.precision == "bf16" else float(self.setup.get("tolerance", 1e-4))
        images = self.setup["images"].permute(0, 3, 1, 2).contiguous()
        checks = {  # compiled module's switch, and what it computes
            "UNet's output": (
                mode.compile,
                self.switch.compiled_unet,
                lambda: self.model.apply_model(self.x_noisy, self.setup["t"], self.c).detach(),
            ),
            "encoder's latents": (
                mode.compile_first_stage,
                self.switch.compiled_encoder,
                lambda: self.model.encode_first_stage(images),  # under inference_mode, as in the step
            ),
        }
        for what, (on, switch, compute) in checks.items():
            if not on:
                continue
            outputs = []
            for compiled in (True, False):
                switch.use(compiled)
                with autocast(mode, self.device):
                    outputs.append(compute().float())
            switch.use(True)
            error = relative_error(outputs[0], outputs[1])
            if not error <= tolerance:
                raise ValueError(
                    f"{task}: the compiled {what} differ from the eager ones by {error:.2e} (relative L2) "
                    f"> {tolerance}; nothing of it was timed"
                )
            self.compile_errors[task] = max(error, self.compile_errors.get(task, 0.0))

    def cmd_compile_checks(self) -> dict[str, dict[str, float]]:
        return {"relative_errors": self.compile_errors}

    def unet_step(self, mode: PerfMode) -> None:
        with autocast(mode, self.device):
            out = self.model.apply_model(self.x_noisy, self.setup["t"], self.c)
        (self.setup["noise"] - out.float()).abs().mean().backward()
        self.model.model.zero_grad(set_to_none=True)

    def step(self, mode: PerfMode) -> None:
        if self.optimizer is None:  # segldm's AdamW (fused) over what the reference optimises too
            params = [*self.model.model.parameters(), *self.model.cond_stage_model.parameters()]
            self.optimizer = self.model.make_optimizer(params, float(self.setup["lr"]))
        batch = self.one_hot_batch if mode.masks == "loader_one_hot" else self.label_batch
        training_step(self.model, self.optimizer, batch, mode, self.device)

    def sample(self, mode: PerfMode) -> torch.Tensor:
        steps = int(self.setup["sampler_steps"])
        with autocast(mode, self.device):
            return self.model.sample(self.c, steps=steps, eta=0.0, x_T=self.setup["x_T"], sampler="ddim")

    def samples(self) -> torch.Tensor:
        return self.sample(self.modes["optimised_fp32"])

    def outputs(self) -> dict[str, torch.Tensor]:
        self.switch.apply(self.modes["optimised_fp32"])
        return super().outputs()


if __name__ == "__main__":
    SegldmWorker(sys.argv[1]).serve()
