"""The benchmark sections and the results files.

Sections (``bench.sections``):

* ``train``: one training step (loss, backward, AdamW, EMA) at each ``configs.<name>``: images/s,
  peak memory and FLOPs for segldm's defaults (fp32: the anchor of the ratios; and bf16 where native),
  each default switched off alone and each opt-in switched on; torch.compile's compile time and the
  steps it takes to pay for itself; model FLOP utilisation against the card's bf16 peak on a GPU.
* ``first_stage``: VQ encode and decode images/s (segldm's fp32 defaults vs einsum attention, bf16,
  a compiled encoder), and a check that bf16 autocast leaves the quantiser's codebook choice unchanged.
* ``sampler``: UNet evaluations/s inside DDIM sampling.
* ``data``: data-loader samples/s with the reference one-hot vs label maps, alone and up to the cond
  stage's input.
* ``eval``: images/s through the FID Inception features and through the segmenter.
* ``reference``: against the real CompVis code in its own process (:mod:`.reference`), when
  checkouts are on disk.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from segldm.condition import label_histograms
from segldm.data.datamodule import SegmentationDataModule
from segldm.data.sflckr import FlickrSegTrain
from segldm.metrics.fid import InceptionFeatures, resolve_inception_weights
from segldm.metrics.segmenters.trained import SegNet, TrainedSegmenter
from segldm.training.ldm import LatentDiffusion
from segldm_bench.building import build_model
from segldm_bench.machine import bf16_supported, describe_machine, gpu_bf16_peak_tflops, load_average
from segldm_bench.measure import (
    Run,
    Timing,
    compile_cost,
    count_flops,
    interleave,
    peak_memory,
    resident_bytes,
)
from segldm_bench.modes import (
    ANCHOR,
    BatchSource,
    ModeSwitch,
    PerfMode,
    autocast,
    make_optimizers,
    training_step,
    variant_modes,
)
from segldm_bench.reference import bench_reference
from segldm_bench.report import render_markdown

log = logging.getLogger(__name__)
MiB = 2**20


class ModelCache:
    """Each configuration's model is built once per run and shared by the sections (the seed's UNet
    alone takes seconds to initialise and 0.9 GB, 1.7 GB with its EMA copy)."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.models: dict[str, tuple[LatentDiffusion, DictConfig]] = {}
        # (config, module, precision) torch.compile'd by an earlier section: dynamo keeps the code, so
        # a later section's first call does not compile again and cannot tell what compiling costs
        self.compiled: set[tuple[str, str, str]] = set()

    def get(self, name: str) -> tuple[LatentDiffusion, DictConfig]:
        if name not in self.models:
            overrides = list(self.cfg.configs[name].overrides)
            self.models[name] = build_model(overrides, self.device, int(self.cfg.seed))
        return self.models[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def mode_fields(mode: PerfMode) -> dict[str, Any]:
    return {k: getattr(mode, k) for k in mode.__dataclass_fields__}


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------- training step
def bench_training(name: str, cfg: DictConfig, models: ModelCache) -> dict[str, Any]:
    """Time, peak memory and FLOPs of one training step in each variant of `spec.variants`."""
    started = time.perf_counter()
    spec, device = cfg.configs[name], models.device
    model, train_cfg = models.get(name)
    model.train()
    batch_size = int(spec.batch_size)
    data = BatchSource.make(batch_size, int(train_cfg.data.size), int(train_cfg.data.n_labels), int(cfg.seed))
    bf16 = bf16_supported(device)
    modes = variant_modes(device, bf16, bool(cfg.channels_last))
    unknown = sorted(set(spec.variants) - set(modes))
    if unknown:
        raise ValueError(f"configs.{name}.variants: unknown {unknown}; known: {sorted(modes)}")
    wanted = list(
        dict.fromkeys([ANCHOR, *(v for v in spec.variants if cfg.compile or not modes[v].compiles)])
    )
    switch = ModeSwitch(model)
    params = list(model.model.parameters()) + list(model.cond_stage_model.parameters())
    optimizers = make_optimizers(params, lr=1e-7, weight_decay=model.optimizer_settings["weight_decay"])

    def run_for(mode: PerfMode) -> Run:
        state: dict[str, Any] = {}

        def prepare() -> None:
            switch.apply(mode)
            state["batch"] = data.batch(mode, device)

        return Run(
            work=lambda: training_step(model, optimizers[mode.fused_optimizer], state["batch"], mode, device),
            prepare=prepare,
            finish=state.clear,
            items=batch_size,
            warmup=1 if mode.compiles else None,  # compiling: timed apart, reported as compile_s
        )

    # no warm-up otherwise: a variant's one-off costs (kernel selection, optimizer state) land in its
    # first round, which the median over rounds and the per-round ratios leave out
    timing = interleave({v: run_for(modes[v]) for v in wanted}, int(spec.rounds), device, warmup=0)
    summary = timing.summary(anchor=ANCHOR)

    memory: dict[str, dict[str, int]] = {}
    for variant in wanted:
        mode = modes[variant]
        switch.apply(mode)
        cache = model.latent_cache.latents.values() if model.latent_cache is not None else []
        optimizer = optimizers[mode.fused_optimizer]
        resident = resident_bytes([model], optimizer, extra=list(cache))
        memory[variant] = peak_memory(
            lambda mode=mode, optimizer=optimizer: training_step(
                model, optimizer, data.batch(mode, device), mode, device
            ),
            device,
            resident,
        )
    reference_mode = modes[ANCHOR].replace(compile=False, compile_first_stage=False, cached_latents=False)
    switch.apply(reference_mode)
    flops = count_flops(
        lambda: training_step(
            model, optimizers[True], data.batch(reference_mode, device), reference_mode, device
        )
    )
    peak_tflops = cfg.gpu_peak_tflops or (
        gpu_bf16_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    )
    variants: dict[str, Any] = {}
    anchor_peak = memory[ANCHOR]["peak_bytes"]
    for variant in wanted:
        row = summary[variant]
        mode = modes[variant]
        achieved = flops / row["median_s"]
        variants[variant] = {
            "mode": mode_fields(mode),
            "config_overrides": mode.config_overrides(device.type),
            "median_s": row["median_s"],
            "rounds_s": row["rounds_s"],
            "images_per_s": row["items_per_s"],
            "speedup": row["speedup"],
            "peak_memory_mib": memory[variant]["peak_bytes"] / MiB,
            "resident_memory_mib": memory[variant]["resident_bytes"] / MiB,
            "memory_ratio": memory[variant]["peak_bytes"] / anchor_peak,
            "reference_gflops_per_s": achieved / 1e9,
            "mfu": (achieved / (float(peak_tflops) * 1e12)) if peak_tflops else None,
        }
        if mode.compile:
            models.compiled.add((name, "unet", mode.precision))
        if mode.compile_first_stage:
            models.compiled.add((name, "encoder", mode.precision))
        if mode.compiles:
            variants[variant].update(
                compiled_row(
                    timing,
                    variant,
                    [k for k in wanted if modes[k] == mode.eager()],
                )
            )
    return {
        "description": str(spec.description),
        "batch_size": batch_size,
        "overrides": list(spec.overrides),
        "unet_params_m": count_params(model.model) / 1e6,
        "first_stage_params_m": count_params(model.first_stage_model) / 1e6,
        "data_shape": {"size": int(train_cfg.data.size), "n_labels": int(train_cfg.data.n_labels)},
        "bf16_native": bf16,
        "flops_per_step": flops,
        "flops_note": "matmul/conv/attention FLOPs of one step (first-stage forward, UNet forward and "
        "backward) counted by torch.utils.flop_counter in the optimised fp32 mode",
        "gpu_bf16_peak_tflops": peak_tflops,
        "rounds": int(spec.rounds),
        "load_during_rounds": timing.load,
        "anchor": ANCHOR,
        "variants": variants,
        "wall_s": time.perf_counter() - started,
    }


def compiled_row(
    timing: Timing, compiled: str, eager: list[str], compiled_earlier: bool = False
) -> dict[str, Any]:
    """Compile time and break-even calls of a compiled variant against its eager twin when timed
    (`eager`: the twin's name, or none). `compiled_earlier`: an earlier section compiled the same
    module at the same shapes, so this first call measured no compiling (compile_s None)."""
    if not eager:
        cost: dict[str, Any] = {"compile_s": timing.first_call_s[compiled] - timing.median(compiled)}
    else:
        cost = compile_cost(timing.first_call_s[compiled], timing.seconds[compiled], timing.seconds[eager[0]])
        cost["compared_with"] = eager[0]
    if compiled_earlier:
        cost.update(compile_s=None, break_even_steps=None, compiled_earlier=True)
    return cost


# ---------------------------------------------------------------------------- first stage
def first_stage_modes(bf16: bool, compile_encoder: bool) -> dict[str, PerfMode]:
    """segldm's fp32 defaults (the anchor), the CompVis attention, bf16 where native, a compiled encoder."""
    fp32 = PerfMode(precision="fp32")
    out = {ANCHOR: fp32, "-sdpa": fp32.replace(attention="einsum")}
    if bf16:
        out["optimised"] = PerfMode(precision="bf16")
    if compile_encoder:
        out["+compile"] = fp32.replace(compile_first_stage=True)
        if bf16:
            out["optimised+compile"] = out["optimised"].replace(compile_first_stage=True)
    return out


def bench_first_stage(name: str, cfg: DictConfig, models: ModelCache) -> dict[str, Any]:
    """Encode and decode images/s of the config's VQ first stage; bf16 keeps the codebook argmin."""
    spec, device = cfg.configs[name], models.device
    model, train_cfg = models.get(name)
    vq = model.first_stage_model
    batch_size = int(spec.get("first_stage_batch_size") or spec.batch_size)
    size = int(train_cfg.data.size)
    images = (
        BatchSource.make(batch_size, size, 2, int(cfg.seed))
        .images.permute(0, 3, 1, 2)
        .contiguous()
        .to(device)
    )
    modes = first_stage_modes(bf16_supported(device), bool(cfg.compile))
    switch = ModeSwitch(model)  # attention and the compiled encoder, as the other sections switch them

    def grad_mode(mode: PerfMode) -> Any:
        return torch.inference_mode() if mode.first_stage_inference_mode else torch.no_grad()

    with torch.no_grad():
        latents = vq.encode(images)

    def encode_run(mode: PerfMode) -> Run:
        def work() -> None:
            with grad_mode(mode), autocast(mode, device):
                vq.encode(images)

        return Run(work, prepare=lambda: switch.apply(mode), items=batch_size)

    def decode_run(mode: PerfMode) -> Run:
        def work() -> None:
            with grad_mode(mode), autocast(mode, device):
                vq.decode(latents)

        return Run(work, prepare=lambda: switch.apply(mode), items=batch_size)

    rounds = int(spec.rounds)
    encode_timing = interleave({k: encode_run(m) for k, m in modes.items()}, rounds, device)
    encode = encode_timing.summary(ANCHOR)
    for variant, mode in modes.items():  # the encoder alone is compiled: encode rows only
        if mode.compile_first_stage:
            eager = [k for k, m in modes.items() if m == mode.eager()]
            earlier = (name, "encoder", mode.precision) in models.compiled
            encode[variant].update(compiled_row(encode_timing, variant, eager, compiled_earlier=earlier))
            models.compiled.add((name, "encoder", mode.precision))
    decoders = {k: m for k, m in modes.items() if not m.compile_first_stage}
    decode = interleave({k: decode_run(m) for k, m in decoders.items()}, rounds, device).summary(ANCHOR)
    switch.apply(modes[ANCHOR])  # later sections find the encoder uncompiled
    with torch.no_grad():
        _, _, (_, _, fp32_indices) = vq.quantize(latents)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, _, (_, _, bf16_indices) = vq.quantize(latents)
    return {
        "description": str(spec.description),
        "batch_size": batch_size,
        "image_size": size,
        "params_m": count_params(vq) / 1e6,
        "encode": {k: _throughput_row(v, "images_per_s") for k, v in encode.items()},
        "decode": {k: _throughput_row(v, "images_per_s") for k, v in decode.items()},
        "bf16_codebook_indices_equal": bool(torch.equal(fp32_indices, bf16_indices)),
        "load_average": load_average(),
    }


def _throughput_row(row: dict[str, Any], unit: str) -> dict[str, Any]:
    extra = ("compile_s", "speedup_vs_eager", "break_even_steps", "compared_with", "compiled_earlier")
    return {
        "median_s": row["median_s"],
        "rounds_s": row["rounds_s"],
        unit: row["items_per_s"],
        "speedup": row.get("speedup"),
        **{k: row[k] for k in extra if k in row},
    }


# ---------------------------------------------------------------------------- sampler
def bench_sampler(name: str, cfg: DictConfig, models: ModelCache) -> dict[str, Any]:
    """UNet evaluations/s inside DDIM sampling (EMA weights, eta 1, as the reference inference)."""
    spec, device = cfg.configs[name], models.device
    model, train_cfg = models.get(name)
    model.eval()
    batch_size = int(spec.get("sampler_batch_size") or spec.batch_size)
    data = BatchSource.make(batch_size, int(train_cfg.data.size), int(train_cfg.data.n_labels), int(cfg.seed))
    with torch.no_grad():
        cond = model.get_learned_conditioning(data.label_maps.to(device))
    steps = int(cfg.sampler.steps)
    modes = first_stage_modes(bf16_supported(device), compile_encoder=False)
    switch = ModeSwitch(model)

    def run_for(mode: PerfMode) -> Run:
        def work() -> None:
            generators = [torch.Generator(device=device).manual_seed(i) for i in range(batch_size)]
            with autocast(mode, device):
                model.sample(cond, steps=steps, eta=1.0, generators=generators, sampler="ddim")

        return Run(work, prepare=lambda: switch.apply(mode), items=steps * batch_size)

    timing = interleave({k: run_for(m) for k, m in modes.items()}, int(spec.rounds), device)
    summary = timing.summary(ANCHOR)
    return {
        "description": str(spec.description),
        "batch_size": batch_size,
        "ddim_steps_per_call": steps,
        "variants": {k: _throughput_row(v, "unet_evals_per_s") for k, v in summary.items()},
        "load_during_rounds": timing.load,
    }


# ---------------------------------------------------------------------------- data loading
def write_sflckr_like(root: Path, n: int, n_labels: int, seed: int = 0, noise: int = 0) -> None:
    """n S-FLCKR-layout pairs: JPEGs with smaller side 256-320 px and blocky n_labels PNG masks.

    `noise` > 0 adds uniform integer pixel noise in [-noise, noise] (drawn only then, so the
    files without noise do not change).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "segmentations").mkdir(parents=True)
    names = []
    for i in range(n):
        h = int(rng.integers(256, 321))
        w = int(h * rng.uniform(1.3, 1.6))
        coarse = rng.integers(0, n_labels, size=(h // 16 + 1, w // 16 + 1))
        labels = np.kron(coarse, np.ones((16, 16), dtype=np.int64))[:h, :w].astype(np.uint8)
        colours = rng.integers(0, 256, size=(n_labels, 3), dtype=np.uint8)[labels]
        if noise > 0:
            jitter = rng.integers(-noise, noise + 1, size=colours.shape)
            colours = np.clip(colours.astype(np.int64) + jitter, 0, 255).astype(np.uint8)
        Image.fromarray(colours).save(root / "images" / f"{i:04d}.jpg", quality=90)
        Image.fromarray(labels).save(root / "segmentations" / f"{i:04d}.png")
        names.append(f"{i:04d}.jpg")
    (root / "sflckr_train.txt").write_text("\n".join(names) + "\n")


def bench_data(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Loader samples/s: the reference one-hot vs label maps, alone and up to the cond-stage input."""

    spec = cfg.data
    n_labels, size, cell = int(spec.n_labels), int(spec.size), int(spec.cell)
    with tempfile.TemporaryDirectory(prefix="segldm-bench-") as tmp:
        root = Path(tmp)
        write_sflckr_like(root, int(spec.samples), n_labels, int(cfg.seed))

        def loader(one_hot: bool) -> Any:
            dataset = FlickrSegTrain(size=size, root=str(root), one_hot=one_hot)
            dm = SegmentationDataModule(
                dataset, dataset, size=size, n_labels=n_labels, batch_size=int(spec.batch_size),
                num_workers=int(spec.workers), one_hot_in_loader=one_hot, seed=int(cfg.seed),
            )  # fmt: skip
            return dm.train_dataloader()

        def cond_input_one_hot(batch: dict[str, Any]) -> torch.Tensor:
            x = batch["segmentation"].to(device).permute(0, 3, 1, 2).contiguous().float()
            for _ in range(cell.bit_length() - 1):
                x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear")
            return x

        def cond_input_labels(batch: dict[str, Any]) -> torch.Tensor:
            return label_histograms(batch["label_map"].to(device), n_labels, cell)

        def run(one_hot: bool, convert: Callable[[dict[str, Any]], torch.Tensor] | None) -> Run:
            def work() -> None:
                for batch in loader(one_hot):
                    if convert is not None:
                        convert(batch)

            samples = (int(spec.samples) // int(spec.batch_size)) * int(spec.batch_size)
            return Run(work, items=samples)

        runs = {
            "loader_one_hot": run(True, None),
            "label_map": run(False, None),
            "loader_one_hot+cond_input": run(True, cond_input_one_hot),
            "label_map+cond_input": run(False, cond_input_labels),
        }
        timing = interleave(runs, int(spec.rounds), device, warmup=0)
    seconds = timing.seconds
    rows = {k: {"median_s": timing.median(k), "samples_per_s": timing.throughput(k)} for k in runs}
    rows["label_map"]["speedup"] = statistics.median(
        a / b for a, b in zip(seconds["loader_one_hot"], seconds["label_map"], strict=True)
    )
    rows["label_map+cond_input"]["speedup"] = statistics.median(
        a / b
        for a, b in zip(seconds["loader_one_hot+cond_input"], seconds["label_map+cond_input"], strict=True)
    )
    per_sample_one_hot = size * size * n_labels * 4
    return {
        "dataset": f"{int(spec.samples)} S-FLCKR-layout JPEG/PNG pairs, {n_labels} labels, crops of {size} px",
        "batch_size": int(spec.batch_size),
        "workers": int(spec.workers),
        "one_hot_mib_per_sample": per_sample_one_hot / MiB,
        "label_map_mib_per_sample": size * size / MiB,
        "variants": rows,
        "load_during_rounds": timing.load,
    }


# ---------------------------------------------------------------------------- evaluation
def bench_eval(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Images/s through the FID Inception features and the segmenter (skipped, with the reason, when
    their weights are not on this machine)."""
    spec = cfg.eval
    n, size = int(spec.images), int(spec.size)
    rng = np.random.default_rng(int(cfg.seed))
    images = [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]
    out: dict[str, Any] = {"images": n, "image_size": size}
    runs: dict[str, Run] = {}
    try:
        weights = resolve_inception_weights("auto", None, cfg.paths.model_dir, download=False)
        extractor = InceptionFeatures(weights, device=device, batch_size=int(spec.batch_size))
        runs["fid_inception_features"] = Run(lambda: extractor(images, desc="bench"), items=n)
        out["inception_weights"] = weights.describe()
    except (ImportError, FileNotFoundError, ValueError) as err:
        out["fid_inception_features"] = {"skipped": f"{type(err).__name__}: {str(err)[:300]}"}
    try:
        segmenter = load_segmenter(cfg, device)
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        runs["segmenter"] = Run(lambda: segmenter.predict(batch), items=n)
        out["segmenter_name"] = segmenter.name
    except (ImportError, FileNotFoundError, ValueError) as err:
        out["segmenter"] = {"skipped": f"{type(err).__name__}: {str(err)[:300]}"}
    if runs:
        timing = interleave(runs, int(spec.rounds), device)
        for name in runs:
            out[name] = {"median_s": timing.median(name), "images_per_s": timing.throughput(name)}
        out["load_during_rounds"] = timing.load
    return out


def load_segmenter(cfg: DictConfig, device: torch.device) -> Any:
    """The built-in data's trained segmenter when its checkpoint exists, else the same SegNet
    architecture with random weights (throughput does not depend on the weights)."""

    ckpt = Path(str(cfg.eval.segmenter_ckpt))
    if ckpt.is_file():
        return TrainedSegmenter(ckpt, device=device, batch_size=int(cfg.eval.batch_size))

    class RandomSegNet:
        name = f"SegNet, random weights ({ckpt} not found)"

        def __init__(self) -> None:
            self.net = SegNet(int(cfg.eval.n_classes)).to(device).eval()
            self.n_classes = self.net.n_classes

        @torch.no_grad()
        def predict(self, images: torch.Tensor) -> torch.Tensor:
            x = images.to(device).float() / 127.5 - 1.0
            return self.net(x).argmax(1).cpu()

    return RandomSegNet()


# ---------------------------------------------------------------------------- suite
def merge_previous(results: dict[str, Any], previous_path: Path, rerun: list[str]) -> dict[str, Any]:
    """`merge=true`: keep the sections of an earlier results.json this run does not rerun (e.g. after a
    later section failed), refusing when it was measured on another machine or torch."""
    if not previous_path.is_file():
        raise FileNotFoundError(f"bench merge=true: no {previous_path} to merge into; run without merge")
    previous = json.loads(previous_path.read_text())
    mine, theirs = results["machine"], previous["machine"]
    for key in ("cpu", "logical_cores", "torch", "device", "torch_threads"):
        if mine.get(key) != theirs.get(key):
            raise ValueError(
                f"bench merge=true: {previous_path} was measured with {key}={theirs.get(key)!r}, this run "
                f"has {mine.get(key)!r}; rerun every section instead"
            )
    kept = {k: v for k, v in previous["sections"].items() if k not in rerun}
    written = time.strftime("%Y-%m-%d %H:%M", time.localtime(previous_path.stat().st_mtime))
    when = previous.get("measured_at") or {}
    return {**results, "sections": kept, "measured_at": {k: when.get(k, written) for k in kept}}


def run_suite(cfg: DictConfig) -> dict[str, Any]:
    """Run the selected sections; write `out_dir/results.json` and `results.md`; return the results."""
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(str(cfg.device))
    started = time.perf_counter()
    models = ModelCache(cfg, device)
    results: dict[str, Any] = {
        "machine": describe_machine(device),
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "sections": {},
        "measured_at": {},
    }
    if cfg.merge:
        results = merge_previous(results, Path(str(cfg.out_dir)) / "results.json", list(cfg.sections))
    for section in cfg.sections:
        log.info("bench: %s", section)
        t0 = time.perf_counter()
        if section in ("train", "first_stage", "sampler"):
            fn = {"train": bench_training, "first_stage": bench_first_stage, "sampler": bench_sampler}[
                section
            ]
            names = list(cfg[section].configs)
            results["sections"][section] = {n: fn(n, cfg, models) for n in names}
        elif section == "reference":
            results["sections"]["reference"] = bench_reference(cfg)
        elif section == "data":
            results["sections"]["data"] = bench_data(cfg, device)
        elif section == "eval":
            results["sections"]["eval"] = bench_eval(cfg, device)
        else:
            raise ValueError(f"bench.sections: unknown section {section!r}")
        log.info("bench: %s took %.0f s", section, time.perf_counter() - t0)
        results["measured_at"][section] = time.strftime("%Y-%m-%d %H:%M")
        write_results(results, Path(str(cfg.out_dir)), started)  # a failing later section keeps these
    write_results(results, Path(str(cfg.out_dir)), started)
    return results


def write_results(results: dict[str, Any], out_dir: Path, started: float) -> None:
    """results.json and results.md (the sections run so far)."""

    results["machine"]["load_average_end"] = load_average()
    results["wall_s"] = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out_dir / "results.md").write_text(render_markdown(results))
