"""How much the pixel rounding of generate.py moves the metrics, measured on a finished quickstart.

    python scripts/measure_pixel_rounding.py --quickstart-dir quickstart_out

Samples each quickstart run again with REPA's rounding (floor(127.5 x + 127.5), the default) and DiT's
(floor(127.5 x + 128)): the same checkpoints, seed and sampler, so the latents are identical and only the last
step differs. Scores both with the quickstart's own metrics (a digit classifier retrained exactly as the quickstart
trains it: class accuracy, Frechet distance in its feature space); no Inception weights are needed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quickstart_runs import ARMS, REPO, generate_command, subprocess_env  # noqa: E402  (torch-free)

import cli  # noqa: E402

ROUNDINGS = ("repa", "dit")


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--quickstart-dir", default="quickstart_out", help="a finished quickstart's --output-dir")
    p.add_argument("--runs", nargs="+", choices=ARMS, default=list(ARMS),
                   help="which of the quickstart's runs to sample again")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    out = Path(args.quickstart_dir).resolve()
    if not (out / "quickstart_args.json").is_file():
        p.error(f"--quickstart-dir {out}: no quickstart_args.json (run scripts/quickstart.py first)")
    import numpy as np
    import torch
    from quickstart_images import LabelledImages
    from quickstart_scoring import classify, frechet_distance, train_classifier

    qs = argparse.Namespace(**json.loads((out / "quickstart_args.json").read_text()))
    device = torch.device(qs.device)
    image_dir = Path(qs.data_dir).resolve() if qs.data_dir else out / "images"
    data = LabelledImages.load(image_dir, qs.resolution, qs.held_out, qs.seed)
    torch.manual_seed(qs.seed)
    classifier = train_classifier(data.images[data.train_idx], data.labels[data.train_idx], data.num_classes,
                                  qs.classifier_epochs, device, qs.seed)
    _, real_features = classify(classifier, data.images[data.test_idx], device)

    rows = []
    for arm in args.runs:
        samples = {}
        for rounding in ROUNDINGS:
            cmd = generate_command(qs, out, arm)
            cmd[cmd.index("--sample-dir") + 1] = str(out / "samples-rounding" / arm)
            subprocess.run(cmd + ["--pixel-rounding", rounding], check=True, cwd=REPO,
                           env=subprocess_env(qs.device), stdout=subprocess.DEVNULL)
            found = [f for f in (out / "samples-rounding" / arm).glob("*.npz")
                     if f.stem.endswith("-dit-pixels") == (rounding == "dit")]
            samples[rounding] = np.load(found[0])["arr_0"]
        wanted = np.arange(len(samples["repa"])) % data.num_classes
        diff = samples["dit"].astype(int) - samples["repa"].astype(int)
        for rounding in ROUNDINGS:
            pred, features = classify(classifier, samples[rounding], device)
            rows.append({"run": arm, "rounding": rounding, "accuracy": float(np.mean(pred == wanted)),
                         "fd": frechet_distance(features, real_features),
                         "pixels_one_level_brighter": float(np.mean(diff == 1)) if rounding == "dit" else 0.0})
    print(f"{'run':10s} {'rounding':9s} {'accuracy':>9s} {'FD':>9s} {'pixels +1 vs repa':>18s}")
    for r in rows:
        print(f"{r['run']:10s} {r['rounding']:9s} {r['accuracy']:9.4f} {r['fd']:9.4f} "
              f"{r['pixels_one_level_brighter']:18.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"quickstart_dir": str(out), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
