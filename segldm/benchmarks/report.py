"""results.json -> results.md: one table per section, machine and load above them."""

from __future__ import annotations

import time
from typing import Any

VARIANT_NOTES = {
    "baseline": "reference: einsum attention (UNet blocks recomputed), fp32, one-hot from the loader, no_grad first stage, loop AdamW",
    "+sdpa": "baseline + scaled_dot_product_attention (no recompute)",
    "+bf16": "baseline + bf16 autocast",
    "+device_one_hot": "baseline + label maps from the loader, one-hot built on the device",
    "+label_map": "baseline + label maps, fused one-hot + rescale (no full-size one-hot)",
    "+inference_mode": "baseline + first stage under inference_mode",
    "+channels_last": "baseline + channels_last UNet and first stage",
    "+fused_adamw": "baseline + AdamW's fused kernel",
    "optimised": "segldm defaults for this device (bf16 where native)",
    "optimised_fp32": "segldm defaults in fp32 (trainer=cpu)",
    "optimised+channels_last": "optimised + channels_last UNet and first stage",
    "optimised+cached_latents": "optimised + model.performance.cache_latents (data without random crops)",
    "optimised+compile": "optimised + model.performance.compile (torch.compile of the UNet)",
}


def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def _load(rounds: list[Any] | None) -> str:
    values = [r[0] for r in (rounds or []) if r]
    return f"{min(values):.1f}–{max(values):.1f}" if values else "–"


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    flags = ", ".join(k for k, v in m["cpu_flags"].items() if v)
    lines = [
        "# segldm benchmarks (`make bench`)",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by `python -m segldm.benchmarks` in {results['wall_s']:.0f} s. "
        "Every ratio compares two ways of computing the same thing, measured in the same rounds on the "
        "same model (median over rounds of the per-round ratio); absolute times on a shared machine move "
        "with its load, the ratios much less.",
        "",
        f"Machine: {m['cpu']} ({m['logical_cores']} logical cores, torch threads {m['torch_threads']}), "
        f"{m['memory_gib']} GiB, {m['platform']}, Python {m['python']}, torch {m['torch']}; "
        f"device `{m['device']}`; CPU flags: {flags}; native bf16: {m['cpu_native_bf16']}. "
        f"Load average (1/5/15 min) at start {m['load_average']}, at end {m.get('load_average_end')}.",
    ]
    if m.get("gpu"):
        g = m["gpu"]
        lines.append(
            f"GPU: {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB, bf16 peak {g['bf16_peak_tflops']} TFLOP/s)."
        )
    goals = results.get("goals") or {}
    if goals:
        lines += [
            "",
            f"**Goals at the `{goals['config']}` config** (optimised vs baseline, this run): training step "
            f"{goals['train_speedup']:.2f}x faster (goal >= {goals['train_speedup_goal']}x: "
            f"{'met' if goals['train_speedup_met'] else 'NOT met'}), peak memory "
            f"{goals['train_memory_ratio']:.2f}x (goal <= {goals['train_memory_ratio_goal']}x: "
            f"{'met' if goals['train_memory_met'] else 'NOT met'}).",
        ]
    sections = results["sections"]
    if "reference" in sections:
        lines += render_reference(sections["reference"])
    for name, r in (sections.get("train") or {}).items():
        lines += [
            "",
            f"## Training step: `{name}` — {r['description']}",
            "",
            f"Batch {r['batch_size']}, UNet {r['unet_params_m']:.1f} M parameters, first stage "
            f"{r['first_stage_params_m']:.1f} M, {r['data_shape']['size']} px, {r['data_shape']['n_labels']} labels; "
            f"{r['rounds']} interleaved rounds, load (1 min) {_load(r['load_during_rounds'])}. "
            f"One step = {r['flops_per_step'] / 1e9:.1f} GFLOP (fwd+bwd).",
            "",
            *baseline_validation(sections.get("reference") or {}, name),
            "| variant | what it is | config | s/step | images/s | speed-up | peak MiB | memory vs baseline | GFLOP/s | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, v in r["variants"].items():
            overrides = " ".join(f"`{o}`" for o in v["config_overrides"]) or "(defaults)"
            lines.append(
                f"| {variant} | {VARIANT_NOTES.get(variant, '')} | {overrides} | {v['median_s']:.3f} | "
                f"{v['images_per_s']:.2f} | {_f(v['speedup_vs_baseline'], 2, 'x')} | {v['peak_memory_mib']:.0f} | "
                f"{_f(v['memory_vs_baseline'], 2, 'x')} | {v['reference_gflops_per_s']:.1f} | "
                f"{_f(None if v['mfu'] is None else 100 * v['mfu'], 1, '%')} |"
            )
        if not r.get("gpu_bf16_peak_tflops"):
            lines.append("")
            lines.append(
                "MFU (model FLOPs / time / the card's dense bf16 peak) is computed on GPUs only; "
                "GFLOP/s counts the reference step's FLOPs, so skipped work (cached latents) shows as a higher rate."
            )
    if sections.get("first_stage"):
        lines += [
            "",
            "## First stage (VQ) encode / decode",
            "",
            "| config | variant | encode images/s | speed-up | decode images/s | speed-up | bf16 keeps codebook choice |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in sections["first_stage"].items():
            for variant in r["encode"]:
                e, d = r["encode"][variant], r["decode"][variant]
                lines.append(
                    f"| `{name}` ({r['params_m']:.1f} M, batch {r['batch_size']}, {r['image_size']} px) | {variant} | "
                    f"{e['images_per_s']:.2f} | {_f(e['speedup_vs_baseline'], 2, 'x')} | {d['images_per_s']:.2f} | "
                    f"{_f(d['speedup_vs_baseline'], 2, 'x')} | {r['bf16_codebook_indices_equal']} |"
                )
        lines.append("")
        lines.append(
            "baseline: einsum attention, fp32, no_grad; optimised: fused attention, inference_mode (and bf16 autocast)."
        )
    if sections.get("sampler"):
        lines += [
            "",
            "## Sampler (DDIM, EMA weights, eta 1)",
            "",
            "| config | variant | UNet evaluations/s | speed-up |",
            "|---|---|---|---|",
        ]
        for name, r in sections["sampler"].items():
            for variant, v in r["variants"].items():
                lines.append(
                    f"| `{name}` (batch {r['batch_size']}) | {variant} | {v['unet_evals_per_s']:.2f} | "
                    f"{_f(v['speedup_vs_baseline'], 2, 'x')} |"
                )
        lines.append("")
        lines.append(
            "Fewer evaluations for the same quality: DPM-Solver++ at 20-25 steps vs DDIM at 200 — "
            "see `experiments/samplers/results.md`."
        )
    if sections.get("data"):
        r = sections["data"]
        lines += [
            "",
            "## Data loading",
            "",
            f"{r['dataset']}; batch {r['batch_size']}, {r['workers']} workers; one-hot {r['one_hot_mib_per_sample']:.1f} MiB "
            f"per sample vs label map {r['label_map_mib_per_sample']:.3f} MiB; load (1 min) {_load(r['load_during_rounds'])}.",
            "",
            "| variant | samples/s | speed-up |",
            "|---|---|---|",
        ]
        for variant, v in r["variants"].items():
            lines.append(f"| {variant} | {v['samples_per_s']:.1f} | {_f(v.get('speedup'), 2, 'x')} |")
        lines.append("")
        lines.append(
            "`+cond_input`: up to the tensor the cond stage's 1x1 conv reads (reference: permute + two bilinear "
            "halvings of the one-hot; segldm: label histograms per 4x4 cell, bit-identical)."
        )
    if sections.get("eval"):
        r = sections["eval"]
        lines += ["", "## Evaluation", "", "| what | images/s |", "|---|---|"]
        for key in ("fid_inception_features", "segmenter"):
            v = r.get(key) or {}
            value = f"{v['images_per_s']:.1f}" if "images_per_s" in v else f"skipped: {v.get('skipped')}"
            lines.append(f"| {key} ({r['images']} images of {r['image_size']} px) | {value} |")
        if r.get("segmenter_name"):
            lines.append("")
            lines.append(f"Segmenter: {r['segmenter_name']}.")
    return "\n".join(lines) + "\n"


def render_reference(section: dict[str, Any]) -> list[str]:
    """The section against the real CompVis code: one table per configuration, the check above it."""
    lines = ["", "## Against the real CompVis code (`reference` section)", ""]
    if "skipped" in section:
        return [*lines, f"Skipped: {section['skipped']}"]
    lines += [
        f"The reference's own modules (`{section['latent_diffusion']}`, `{section['taming_transformers']}`) and "
        "segldm, each in its own process, built from one CompVis config and checkpoint; the sides take turns "
        "round by round (order flipped every round). speed-up = reference time / segldm time, median over "
        "rounds of the per-round ratio; peak memory = resident tensors (weights, EMA, optimizer state) + the "
        "step's allocation peak, each in its own process.",
    ]
    if section.get("goals"):
        lines += ["", "| goal | this run | met |", "|---|---|---|"]
        for g in section["goals"]:
            met = "not measured" if g["met"] is None else ("met" if g["met"] else "**NOT met**")
            lines.append(
                f"| `{g['config']}` {g['comparison']} {g['metric']} {g['goal']} | {_f(g['value'], 3)} | {met} |"
            )
    for name, r in section["configs"].items():
        w = r["workers"]["segldm"]
        check = r["check"]
        worst = max(check["relative_errors"].items(), key=lambda kv: kv[1])
        lines += [
            "",
            f"### `{name}` — {r['description']}",
            "",
            f"Batch {r['batch_size']}, UNet {w['unet_params'] / 1e6:.1f} M parameters, first stage "
            f"{w['first_stage_params'] / 1e6:.1f} M, {r['data_shape']['size']} px, {r['data_shape']['n_labels']} labels, "
            f"{r['threads']} threads; {r['rounds']} rounds, load (1 min) {_load(r['load_during_rounds'])}. "
            f"Checked equal before timing ({len(check['relative_errors'])} outputs: latents, conditioning, UNet "
            f"output, loss, UNet gradients, DDIM samples): largest relative error {worst[1]:.1e} ({worst[0]}), "
            f"tolerance {check['tolerance']:.0e}.",
            "",
            "| comparison | reference s | segldm s | speed-up | peak MiB reference / segldm | memory ratio |",
            "|---|---|---|---|---|---|",
        ]
        for c in r["comparisons"].values():
            memory = f"{c['reference_mib']:.0f} / {c['segldm_mib']:.0f}" if "reference_mib" in c else "–"
            extra = (
                f" ({c['reference_unet_evals_per_s']:.1f} vs {c['segldm_unet_evals_per_s']:.1f} UNet evaluations/s)"
                if "segldm_unet_evals_per_s" in c
                else ""
            )
            if "segldm_share_of_step_fp32" in c:
                extra += f" (segldm: {100 * c['segldm_share_of_step_fp32']:.1f} % of its fp32 step)"
            lines.append(
                f"| {c['what']}{extra} | {c['reference_s']:.3f} | {c['segldm_s']:.3f} | {c['speedup']:.2f}x | "
                f"{memory} | {_f(c.get('memory_ratio'), 2, 'x')} |"
            )
        lines += render_profiles(r.get("profiles") or {}, r["comparisons"])
    return lines


def render_profiles(profiles: dict[str, Any], comparisons: dict[str, Any]) -> list[str]:
    """Where each side's time goes (profiler self time by kernel kind), and the speed-up a change that
    leaves the convolutions as they are could reach at most: reference time / segldm's convolution time."""
    if not profiles:
        return []
    kinds = list(next(iter(profiles.values()))["reference"])
    lines = [
        "",
        "Where the time goes (one profiled call, seconds of kernel self time by kind):",
        "",
        "| comparison | side | "
        + " | ".join(kinds)
        + " | convolution share | bound without faster convolutions |",
        "|---|---|" + "---|" * len(kinds) + "---|---|",
    ]
    for name, sides in profiles.items():
        for side in ("reference", "segldm"):
            seconds = sides[side]
            total = sum(seconds.values())
            share = seconds["convolution"] / total if total else 0.0
            bound = (
                f"{sum(sides['reference'].values()) / seconds['convolution']:.2f}x"
                if side == "segldm" and seconds["convolution"]
                else "–"
            )
            lines.append(
                f"| {comparisons[name]['what'].split(',')[0]} | {side} | "
                + " | ".join(f"{seconds[k]:.3f}" for k in kinds)
                + f" | {100 * share:.0f} % | {bound} |"
            )
    return lines


def baseline_validation(reference: dict[str, Any], config: str) -> list[str]:
    """The train section's baseline is segldm's emulation of the CompVis code; where this run also timed
    the real code at the same config, say how close the emulation came (within 5 % validates it)."""
    row = reference.get("configs", {}).get(config, {}).get("comparisons", {}).get("emulated_baseline")
    if not row:
        return [
            "The baseline is segldm's emulation of the CompVis code, not validated against the real code in "
            "this run (the `reference` section, with SEGLDM_REF_DIR, does that).",
            "",
        ]
    ratio = row["speedup"]  # real reference time / emulated time
    verdict = (
        "within 5 %: the emulation stands for the reference here"
        if abs(ratio - 1.0) <= 0.05
        else "outside 5 %: the speed-ups below are against the emulation only; the `reference` section has "
        "the figures against the real code"
    )
    return [
        f"The baseline is segldm's emulation of the CompVis code; against the real code in this run (same "
        f"config, own processes): real time / emulated time = {ratio:.2f} ({verdict}).",
        "",
    ]
