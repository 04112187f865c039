"""Paired bootstrap of mIoU differences between eval runs on the same masks (same names, same seeds).

Re-labels each run's generated/*.png with the segmenter, keeps one confusion matrix per image, and
resamples images (with replacement, the same draw for every run) to get a 95% interval of each
run's mIoU and of the difference to the last run.

    .venv/bin/python experiments/eval/bootstrap.py outputs/eval/quickstart256_step0000500 ... [--segmenter S]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segldm.metrics.miou import confusion_matrix, scores_from_confusion
from segldm.metrics.segmenters.trained import TrainedSegmenter

torch.set_num_threads(1)


def per_image_matrices(
    folder: Path, segmenter: TrainedSegmenter, labels: dict[str, np.ndarray]
) -> np.ndarray:
    names = sorted(labels)
    images = torch.from_numpy(np.stack([np.asarray(Image.open(folder / "generated" / n)) for n in names]))
    pred = segmenter.predict(images.permute(0, 3, 1, 2).contiguous())
    return np.stack([confusion_matrix(pred[i], labels[n], segmenter.n_classes) for i, n in enumerate(names)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--segmenter", default="outputs/segmenters/synthetic/segmenter.ckpt")
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args()
    segmenter = TrainedSegmenter(args.segmenter)
    from segldm.data.synthetic import SyntheticScenes

    first = json.loads((Path(args.runs[0]) / "metrics.json").read_text())
    n = first["num_samples"]
    val = SyntheticScenes(size=64, length=n, seed=1, one_hot=False)  # the built-in data's validation split
    labels = {f"val_{i:05d}.png": val.scene(i)[1].astype(np.int64) for i in range(n)}
    matrices = {run: per_image_matrices(Path(run), segmenter, labels) for run in args.runs}
    rng = np.random.default_rng(0)
    draws = rng.integers(0, n, size=(args.draws, n))
    miou = {
        run: np.array([scores_from_confusion(m[d].sum(0)).miou for d in draws]) for run, m in matrices.items()
    }
    last = args.runs[-1]
    for run in args.runs:
        point = scores_from_confusion(matrices[run].sum(0)).miou
        lo, hi = np.percentile(miou[run], [2.5, 97.5])
        diff = miou[last] - miou[run]
        dlo, dhi = np.percentile(diff, [2.5, 97.5])
        print(
            f"{Path(run).name}: mIoU {point:.4f} [{lo:.4f}, {hi:.4f}]; {Path(last).name} minus this: "
            f"{scores_from_confusion(matrices[last].sum(0)).miou - point:+.4f} [{dlo:+.4f}, {dhi:+.4f}]"
        )


if __name__ == "__main__":
    main()
