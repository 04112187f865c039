"""Paired bootstrap of the rFID difference between first stages evaluated on the same validation images.

Reads each variant's `python -m segldm.eval` output (eval_first_stage/real/*.png and reconstructed/*.png,
written by experiments/first_stage/compare.py), extracts Inception features once, then resamples the
images with replacement — the same draw for every variant, real image i always paired with its own
reconstruction — and recomputes each variant's rFID on every draw: a 95 % interval of each rFID and of
the difference to the first variant. FID on a draw uses the exact low-rank form (n samples, d = 2048):
tr sqrt(S1 S2) is the sum of the singular values of A B^T / (n - 1) for the centred feature matrices
A and B, so a draw costs one n x n SVD instead of a d x d matrix square root; it is checked against
segldm's FID (torch-fidelity's) on the full sets before resampling.

    .venv/bin/python experiments/first_stage/bootstrap_rfid.py [outputs/first_stage_compare] [--resamples 1000]

Writes experiments/first_stage/bootstrap.json and bootstrap.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from segldm.config.hardware import cpu_model
from segldm.metrics.bootstrap import fid_low_rank
from segldm.metrics.fid import InceptionFeatures, fid_kid, read_folder_images, resolve_inception_weights

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", nargs="?", default="outputs/first_stage_compare")
    parser.add_argument("--variants", nargs="+", default=["l1", "taming"])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = Path(args.folder)
    evals = {v: folder / v / "eval_first_stage" for v in args.variants}
    for variant, path in evals.items():
        if not (path / "reconstructed").is_dir():
            raise SystemExit(
                f"{path}/reconstructed not found: run experiments/first_stage/compare.py first ({variant})"
            )
    weights = resolve_inception_weights("auto", None, ROOT / "models", download=False)
    extractor = InceptionFeatures(weights, device=torch.device("cpu"), batch_size=32)
    real_images = read_folder_images(evals[args.variants[0]] / "real")
    real = extractor(real_images, desc="real")
    fakes, reported = {}, {}
    for variant, path in evals.items():
        if read_folder_images(path / "real")[0].tobytes() != real_images[0].tobytes():
            raise SystemExit(f"{path}: not the same real images as {args.variants[0]}")
        fakes[variant] = extractor(read_folder_images(path / "reconstructed"), desc=variant)
        reported[variant] = json.loads((path / "metrics.json").read_text())["rfid"]
    full = {v: fid_low_rank(f, real) for v, f in fakes.items()}
    for variant, value in full.items():  # the low-rank form is the same FID as torch-fidelity's
        reference = fid_kid(fakes[variant], real)["fid"]
        if abs(value - reference) > 1e-3 * reference:
            raise SystemExit(f"low-rank FID {value} != torch-fidelity's {reference} for {variant}")
    n = real.shape[0]
    rng = np.random.default_rng(args.seed)
    draws = {v: [] for v in fakes}
    for _ in range(args.resamples):
        idx = torch.from_numpy(rng.integers(0, n, size=n))
        for variant, fake in fakes.items():
            draws[variant].append(fid_low_rank(fake[idx], real[idx]))
    base = args.variants[0]
    rows = []
    for variant in fakes:
        values = np.array(draws[variant])
        diff = values - np.array(draws[base])
        rows.append(
            {
                "variant": variant,
                "rfid": full[variant],
                "rfid_reported_by_eval": reported[variant],
                "ci95": [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))],
                "diff_vs_" + base: float(full[variant] - full[base]),
                "diff_ci95": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
                "share_of_draws_lower_than_" + base: float((diff < 0).mean()),
            }
        )
    out = {"folder": str(folder), "images": n, "resamples": args.resamples, "cpu": cpu_model(), "rows": rows}
    (HERE / "bootstrap.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "# rFID, paired bootstrap (`experiments/first_stage/bootstrap_rfid.py`)",
        "",
        f"{n} validation images of `{folder}`, {args.resamples} paired resamples (the same images for every "
        f"variant, each real image with its own reconstruction); 95 % percentile intervals. Machine: {out['cpu']}. "
        "A draw repeats some images, which FID reads as less diverse, so the intervals of each rFID sit above its "
        "full-set value; the paired difference is the comparison.",
        "",
        f"| first stage | rFID | 95 % interval | difference to {base} | its 95 % interval | draws lower than {base} |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['rfid']:.2f} | {r['ci95'][0]:.1f} – {r['ci95'][1]:.1f} | "
            f"{r['diff_vs_' + base]:+.2f} | {r['diff_ci95'][0]:+.1f} – {r['diff_ci95'][1]:+.1f} | "
            f"{100 * r['share_of_draws_lower_than_' + base]:.1f} % |"
        )
    (HERE / "bootstrap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
