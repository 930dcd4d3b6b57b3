"""VinDr-CXR detection on the VinDr-like phantom: mAP@0.4 against the "No finding"-only baseline.

    python -m experiments.detection_phantom --out runs/detection_phantom             # generate + train
    python -m experiments.detection_phantom --data data/vindr --out runs/dp          # an existing vindr tree
    python -m experiments.detection_phantom --out runs/dp train.epochs=30            # config overrides

Writes (or reads with ``--data``) the phantom's vindr preset (three simulated readers per image,
boxes in the plate's original pixels, ``train_meta.csv``), trains the tiny Faster R-CNN (the
shipped ``detector_tiny`` config at ``--size``, CPU-sized below) on its patient-level training
split, and scores the best checkpoint's detections on the validation and held-out splits:
mAP@0.4 with "No finding" the competition's way and over the findings alone, beside the
baseline that calls every image "No finding" (the row ``14 1 0 0 1 1``). The "No finding"
threshold is reported at the config's 0.5 and at the value that maximises validation mAP (chosen
on validation, as the trainer does at each validation, and applied to held-out). Then ``cxr detect``'s code path writes the held-out
images' submission rows in original pixels, and their mAP, scored against the readers' fused
boxes in original pixels, must equal the grid figure (IoU does not change under the per-axis
scaling that maps one to the other). Prints a table and writes ``detection.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from classifiers.detection_data import grid_to_stored, load_detection_set, stored_to_original  # noqa: E402
from classifiers.detector import (  # noqa: E402
    DetectorConfig,
    assemble,
    detect_records,
    load_detector,
    predict_grid,
    train,
    truth_grid,
)
from cxr.configs import shipped_config  # noqa: E402
from cxr.engine.config import load_config  # noqa: E402
from cxr.metrics.detection import (  # noqa: E402
    Boxes,
    competition_scores,
    no_finding_baseline,
    tune_no_finding_threshold,
)
from cxr.phantom.generate import PhantomConfig, generate  # noqa: E402

# CPU-sized: 128², a tiny backbone of 16/32/64 channels with a 32-channel FPN
DEFAULTS = ["device=cpu", "model.width=16", "model.fpn_channels=32", "model.anchor_sizes=[8,16,32,64]",
            "model.head_dim=128", "model.rpn_batch=128", "model.roi_batch=128", "model.rpn_post_nms_train=300",
            "model.rpn_post_nms_test=300", "train.batch_size=8", "train.epochs=16", "train.eval_every=2",
            "train.log_every=20"]


def _row(name: str, s: dict) -> str:
    return f"| {name} | {s['map']:.4f} | {s['map_findings']:.4f} | {s['called_no_finding']}/{s['images']} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="an existing `cxr phantom --preset vindr` tree")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, default=1000, help="phantom images to generate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="detector config overrides, e.g. train.epochs=30")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    args.out.mkdir(parents=True, exist_ok=True)
    tree = args.data
    t0 = time.perf_counter()
    if tree is None:
        tree = args.out / "vindr"
        if not (tree / "train.csv").is_file():
            generate(PhantomConfig(preset="vindr", out=tree, size=args.size, n=args.n, seed=0, overwrite=True))
    t_data = time.perf_counter() - t0
    cfg = load_config(DetectorConfig, shipped_config("detector_tiny"),
                      [f"data.train={tree}", f"data.size={args.size}", *DEFAULTS, *args.overrides])
    run_dir = args.out / "run"
    t1 = time.perf_counter()
    result = train(cfg, run_dir, resume=(run_dir / "checkpoints").is_dir(), echo=print)
    t_train = time.perf_counter() - t1

    # the best checkpoint's raw detections on each split, scored at several "No finding" thresholds
    device = torch.device("cpu")
    net, _, ckpt = load_detector(run_dir, device)
    parts = assemble(cfg.data)  # the same patient-level split the run trained on
    sets = {k: load_detection_set(v, cfg.data.size, cfg.fusion) for k, v in parts.items() if v and k != "train"}
    preds = {k: predict_grid(net, s.images, 16, device) for k, s in sets.items()}
    truths = {k: truth_grid(s) for k, s in sets.items()}
    iou = cfg.eval.iou_threshold
    chosen, sweep = tune_no_finding_threshold(preds["val"], truths["val"], cfg.eval.no_finding_threshold, iou)
    table = {}
    for k in sets:
        table[k] = {"baseline": competition_scores(no_finding_baseline(len(truths[k])), truths[k], 0.5, iou),
                    "detector_t0.5": competition_scores(preds[k], truths[k], cfg.eval.no_finding_threshold, iou),
                    f"detector_t{chosen}": competition_scores(preds[k], truths[k], chosen, iou)}

    # cxr detect's path on the held-out images: submission rows in original pixels, scored there
    held = sets["heldout"]
    rows = detect_records(net, held.records, cfg.data.size, device, chosen)
    orig_truth = [Boxes.make(stored_to_original(_stored(t.boxes, hw, cfg.data.size), *hw, r.original_size), t.labels)
                  for t, hw, r in zip(truths["heldout"], held.stored, held.records)]
    # the rows already carry the call: threshold 0 keeps every row as written (a box scores >= 0)
    orig = competition_scores([b for _, b in rows], orig_truth, 0.0, iou)
    grid_map = table["heldout"][f"detector_t{chosen}"]["map"]

    print(f"\ntiny Faster R-CNN, {cfg.data.size}², {result.epochs_done} epochs ({result.steps_done} steps), "
          f"data {t_data:.0f} s, training {t_train:.0f} s, {torch.get_num_threads()} thread(s); best {ckpt}")
    print(f"'No finding' threshold chosen on validation: {chosen} (validation mAP {sweep[chosen]:.4f})")
    for k in sets:
        print(f"\n{k} ({len(truths[k])} images)\n| predictor | mAP@{iou:g} with No finding | mAP@{iou:g} findings only "
              "| called No finding |\n|---|---|---|---|")
        for name, s in table[k].items():
            print(_row(name, s))
    print(f"\nheld-out from the submission rows in original pixels: mAP {orig['map']:.4f} (grid {grid_map:.4f})")
    payload = {"config": str(run_dir / "config.yaml"), "checkpoint": str(ckpt), "epochs": result.epochs_done,
               "steps": result.steps_done, "seconds_data": t_data, "seconds_train": t_train,
               "history_val_map40": result.history, "threshold_sweep_val": sweep, "chosen_threshold": chosen,
               "scores": table, "heldout_original_pixels_map": orig["map"]}
    (args.out / "detection.json").write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    return 0


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def _stored(grid_boxes: np.ndarray, hw: tuple[int, int], size: int) -> np.ndarray:
    return grid_to_stored(grid_boxes, hw[0], hw[1], size)


if __name__ == "__main__":
    sys.exit(main())
