"""The sampler table at N = 256: sampler x steps x eta x guidance on the quickstart LDM, each scored by
`python -m segldm.eval` (FID and mIoU with their bootstrap intervals, UNet evaluations per image counted,
generation seconds), and the fewest UNet evaluations whose FID and mIoU both fall inside the interval of
the reference, DDIM 200 steps eta 1 (CompVis inference) at the same guidance scale.

Every setting generates the same validation masks with the same per-image seeds (image i: seed i),
so the rows differ only by the sampler. Needs the quickstart model, its segmenter and the offline
Inception weights (`make train`, `make train-segmenter`, `make fid-weights`). Finished settings are
reused (their metrics.json under outputs/experiments/sampler_table/); delete that folder to measure again.

    .venv/bin/python experiments/samplers/table.py [--samples 256] [--lock /tmp/segldm-cpu.lock]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from segldm.config.hardware import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LDM = ROOT / "outputs/quickstart/ldm/checkpoints/last.ckpt"
SEGMENTER = ROOT / "outputs/segmenters/synthetic/segmenter.ckpt"
OUT = ROOT / "outputs/experiments/sampler_table"
SDE_KARRAS = "diffusers:DPMSolverMultistepScheduler(algorithm_type=sde-dpmsolver++,use_karras_sigmas=true)"


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    eta: float = 0.0
    guidance: float = 1.0

    @property
    def is_reference(self) -> bool:
        return self.sampler == "ddim" and self.steps == 200 and self.eta == 1.0

    @property
    def tag(self) -> str:
        name = re.sub(r"[^A-Za-z0-9]+", "_", self.sampler).strip("_")
        return f"g{self.guidance:g}_{name}_{self.steps}_eta{self.eta:g}"

    def overrides(self) -> list[str]:
        sampler = f"'{self.sampler}'" if "(" in self.sampler or "," in self.sampler else self.sampler
        return [
            f"eval.sampler={sampler}",
            f"eval.steps={self.steps}",
            f"eval.eta={self.eta}",
            f"eval.guidance_scale={self.guidance}",
        ]


def settings() -> list[Setting]:
    """Reference first in each guidance group; stochastic and deterministic solvers at 5-20 steps."""
    rows: list[Setting] = []
    for guidance in (1.0, 1.5):
        rows += [
            Setting("ddim", 200, 1.0, guidance),
            Setting("ddim", 20, 1.0, guidance),
            Setting("ddim", 10, 1.0, guidance),
            Setting("ddim", 5, 1.0, guidance),
            Setting("ddim", 10, 0.0, guidance),
            Setting("dpm_solver++_sde", 10, 1.0, guidance),
            Setting("dpm_solver++_sde", 5, 1.0, guidance),
            Setting("dpm_solver++", 10, 0.0, guidance),
        ]
    rows.insert(1, Setting("ddim", 200, 0.0))  # the deterministic reference (unguided only)
    rows += [
        Setting(SDE_KARRAS, 10),
        Setting(SDE_KARRAS, 5),
        Setting("diffusers:EulerAncestralDiscreteScheduler", 10),
        Setting("diffusers:UniPCMultistepScheduler", 10),
        Setting("diffusers:DEISMultistepScheduler", 10),
    ]
    return rows


def command(setting: Setting, samples: int) -> list[str]:
    return [
        sys.executable, "-m", "segldm.eval",
        f"ckpt={LDM.relative_to(ROOT)}", "data=synthetic", f"data.validation.length={samples}",
        "eval.batch_size=32", f"segmenter.ckpt={SEGMENTER.relative_to(ROOT)}", "logger=none",
        "metrics.inception.first_stage_rfid=false",  # the first stage's ceiling does not change with the sampler
        *setting.overrides(), f"hydra.run.dir={(OUT / setting.tag).relative_to(ROOT)}",
    ]  # fmt: skip


def evaluate(setting: Setting, samples: int, lock: str | None = None) -> dict:
    metrics_path = OUT / setting.tag / "metrics.json"
    if not metrics_path.exists():
        (OUT / setting.tag).mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with (OUT / f"{setting.tag}.log").open("w") as log:
            wait = ["flock", lock] if lock else []  # one CPU-heavy job at a time on a shared machine
            proc = subprocess.run(
                wait + command(setting, samples), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        if proc.returncode != 0:
            sys.exit(f"{setting.tag} failed; see {OUT / f'{setting.tag}.log'}")
        print(f"{setting.tag}: {time.monotonic() - started:.0f} s", flush=True)
    metrics = json.loads(metrics_path.read_text())
    if metrics["num_samples"] != samples:
        sys.exit(
            f"{metrics_path} has N = {metrics['num_samples']}, not {samples}: delete {OUT} to measure again"
        )
    return metrics


def interval(metrics: dict, key: str) -> tuple[float, float]:
    low, high = metrics["bootstrap"][key][:2]
    return float(low), float(high)


def reaches(metrics: dict, reference: dict) -> bool:
    """FID and mIoU both inside the reference's bootstrap interval (or better than its far end)."""
    fid_low, fid_high = interval(reference, "fid")
    miou_low, miou_high = interval(reference, "miou")
    return metrics["fid"] <= fid_high and metrics["miou"] >= miou_low


def row(setting: Setting, metrics: dict, reference: dict) -> str:
    fid_low, fid_high = interval(metrics, "fid")
    miou_low, miou_high = interval(metrics, "miou")
    sampler = metrics["sampler"]
    eta = "-" if setting.sampler.startswith("diffusers:") else f"{setting.eta:g}"  # eta is DDIM's knob
    return (
        f"| {setting.guidance:g} | `{setting.sampler}` | {setting.steps} | {eta} | "
        f"{sampler['unet_evaluations_per_image']:g} | {metrics['fid']:.1f} [{fid_low:.1f}, {fid_high:.1f}] | "
        f"{metrics['miou']:.3f} [{miou_low:.3f}, {miou_high:.3f}] | {metrics['timings_s']['generate']:.0f} | "
        f"{'reference' if setting.is_reference else ('yes' if reaches(metrics, reference) else 'no')} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="built-in validation scenes per evaluation")
    parser.add_argument(
        "--lock", default=None, help="run each evaluation under `flock LOCK` (shared machines)"
    )
    args = parser.parse_args()
    for path, how in ((LDM, "make train"), (SEGMENTER, "make train-segmenter")):
        if not path.is_file():
            sys.exit(f"{path} is missing: run `{how}` first")
    results = [(s, evaluate(s, args.samples, args.lock)) for s in settings()]
    references = {s.guidance: m for s, m in results if s.is_reference}
    first = results[0][1]
    lines = [
        "# Sampler table of the quickstart LDM (`experiments/samplers/table.py`)",
        "",
        f"The quickstart LDM (`make train`), N = {first['num_samples']} built-in validation scenes "
        f"({first['data']['size']} px), image i seeded with i in every row, EMA weights. FID: torch-fidelity Inception "
        "(offline weights) against the real validation images; mIoU: the trained SegNet (real images: "
        f"{first['miou_real']:.3f}); brackets: {100 * first['bootstrap']['level']:.0f} % bootstrap intervals over the "
        f"images ({first['bootstrap']['draws']} draws). UNet evaluations per image are counted during generation "
        "(guidance doubles them); seconds: generation wall time of the N images, batch 32, on "
        f"{cpu_model()} (2 cores, one evaluation at a time).",
        "",
        "'Reaches': FID at most the top and mIoU at least the bottom of the reference's interval (DDIM 200 steps, "
        "eta 1, the CompVis inference, at the same guidance scale).",
        "",
        "| guidance | sampler | steps | eta | UNet evals / image | FID [95 % CI] | mIoU [95 % CI] | seconds | reaches |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(s, m, references[s.guidance]) for s, m in results]
    lines.append("")
    for guidance, reference in references.items():
        reaching = [
            (m["sampler"]["unet_evaluations_per_image"], s) for s, m in results if s.guidance == guidance
        ]
        reaching = [
            (n, s) for n, s in reaching if not s.is_reference and reaches(dict(results)[s], reference)
        ]
        if reaching:
            fewest, best = min(reaching, key=lambda item: item[0])
            lines.append(
                f"- Guidance {guidance:g}: the fewest UNet evaluations reaching DDIM-200 eta 1 is {fewest:g} per image "
                f"(`{best.sampler}`, {best.steps} steps, eta {best.eta:g}); the reference takes "
                f"{reference['sampler']['unet_evaluations_per_image']:g}."
            )
        else:
            lines.append(f"- Guidance {guidance:g}: no setting besides the reference reaches its interval.")
    lines += [
        "",
        "Command of one row (each row: its `eval.*` sampler overrides):",
        "",
        "```",
        " ".join(shlex.quote(part) for part in ["python", *command(results[0][0], args.samples)[1:]]),
        "```",
        "",
    ]
    (HERE / "table.md").write_text("\n".join(lines))
    summary = [{"setting": s.__dict__ | {"tag": s.tag}, **{k: m[k] for k in ("fid", "miou", "bootstrap", "sampler",
                "timings_s", "num_samples")}} for s, m in results]  # fmt: skip
    (HERE / "table.json").write_text(json.dumps({"cpu": cpu_model(), "rows": summary}, indent=1) + "\n")
    print((HERE / "table.md").read_text())


if __name__ == "__main__":
    main()
