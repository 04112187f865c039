"""results.json -> results.md: one table per section, machine and load above them."""

from __future__ import annotations

import time
from typing import Any

VARIANT_NOTES = {
    "optimised_fp32": "segldm defaults in fp32 (trainer=cpu): the anchor of the ratios",
    "-sdpa": "anchor with CompVis's attention: materialised einsum softmax, UNet attention blocks recomputed in backward",
    "-fused_label_map": "anchor with the one-hot built on the device from label maps, rescaled by interpolation",
    "-label_map": "anchor with CompVis's data path: the loader ships the float one-hot, the model rescales it",
    "-inference_mode": "anchor with the first stage under no_grad instead of inference_mode",
    "-fused_adamw": "anchor with torch's per-tensor loop AdamW",
    "+channels_last": "anchor + channels_last UNet and first stage",
    "+compile": "anchor + model.performance.compile (torch.compile of the UNet)",
    "+compile_first_stage": "anchor + model.performance.compile_first_stage (torch.compile of the frozen encoder)",
    "optimised": "segldm defaults for this device (bf16 where native)",
    "optimised+channels_last": "optimised + channels_last UNet and first stage",
    "optimised+cached_latents": "optimised + model.performance.cache_latents (data without random crops)",
    "optimised+compile": "optimised + model.performance.compile (torch.compile of the UNet)",
    "optimised+compile_first_stage": "optimised + model.performance.compile_first_stage (torch.compile of the frozen encoder)",
}


def compile_note(row: dict[str, Any]) -> str:
    """torch.compile's one-off cost and when it pays, for a compiled variant's row."""
    if "compile_s" not in row:
        return ""
    earlier = bool(row.get("compiled_earlier"))
    parts = [
        "compiled by an earlier section of this run" if earlier else f"compiling {row['compile_s']:.0f} s"
    ]
    if row.get("speedup_vs_eager") is not None:
        parts.append(f"{row['speedup_vs_eager']:.2f}x the eager twin")
        if not earlier:
            steps = row.get("break_even_steps")
            parts.append(f"pays back after {steps:.0f} calls" if steps is not None else "never pays back")
    return f" ({', '.join(parts)})"


def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def measured_note(results: dict[str, Any]) -> str:
    """Where a run kept sections of an earlier one (merge=true): when each section was measured."""
    when = results.get("measured_at") or {}
    if len(set(when.values())) <= 1:
        return ""
    return " (sections measured at: " + ", ".join(f"{k} {v}" for k, v in when.items()) + ")"


def _met(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "**NOT met**")


def _load(rounds: list[Any] | None) -> str:
    values = [r[0] for r in (rounds or []) if r]
    return f"{min(values):.1f}–{max(values):.1f}" if values else "–"


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    flags = ", ".join(k for k, v in m["cpu_flags"].items() if v)
    lines = [
        "# segldm benchmarks (`make bench`)",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by `python experiments/bench/run.py` in {results['wall_s']:.0f} s"
        f"{measured_note(results)}. "
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
            "Ratios against `optimised_fp32` (segldm's defaults in fp32) in the same rounds: `-x` rows switch one "
            "default back to the CompVis code's way (what that choice buys alone), `+x` rows add an opt-in one. "
            "Against the real CompVis code: the `reference` section.",
            "",
            "| variant | what it is | config | s/step | images/s | speed-up | peak MiB | memory ratio | GFLOP/s | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, v in r["variants"].items():
            overrides = " ".join(f"`{o}`" for o in v["config_overrides"]) or "(defaults)"
            lines.append(
                f"| {variant} | {VARIANT_NOTES.get(variant, '')}{compile_note(v)} | {overrides} | {v['median_s']:.3f} | "
                f"{v['images_per_s']:.2f} | {_f(v['speedup'], 2, 'x')} | {v['peak_memory_mib']:.0f} | "
                f"{_f(v['memory_ratio'], 2, 'x')} | {v['reference_gflops_per_s']:.1f} | "
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
                e, d = r["encode"][variant], r["decode"].get(variant, {})
                lines.append(
                    f"| `{name}` ({r['params_m']:.1f} M, batch {r['batch_size']}, {r['image_size']} px) | "
                    f"{variant}{compile_note(e)} | {e['images_per_s']:.2f} | {_f(e['speedup'], 2, 'x')} | "
                    f"{_f(d.get('images_per_s'), 2)} | {_f(d.get('speedup'), 2, 'x')} | {r['bf16_codebook_indices_equal']} |"
                )
        lines.append("")
        lines.append(
            "optimised_fp32 (the anchor): fused attention, inference_mode, fp32; -sdpa: CompVis's einsum attention; "
            "optimised: bf16 autocast where native; +compile: torch.compile of the encoder (encode only)."
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
                    f"{_f(v['speedup'], 2, 'x')} |"
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
        lines += [
            "",
            "| goal | segldm defaults | met | best opt-in setting | value | met |",
            "|---|---|---|---|---|---|",
        ]
        for g in section["goals"]:
            lines.append(
                f"| `{g['config']}` {g['comparison']} {g['metric']} {g['goal']} | {_f(g['value'], 3)} | "
                f"{_met(g['met'])} | {g.get('best_opt_in', '–')} | {_f(g.get('best_opt_in_value'), 3)} | "
                f"{_met(g.get('best_opt_in_met')) if 'best_opt_in' in g else '–'} |"
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
            extra += compile_note(c)
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
