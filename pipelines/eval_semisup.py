"""Stage `eval_semisup`: the whole encoder plus a linear head fine-tuned on each label subset of
data/label_subsets.json, against the same backbone trained from scratch on the same images; mean and spread
over eval.seeds, on val and test; picture: accuracy against the label fraction."""

import csv
import json

import torch

from pipelines.common import (
    ENCODER,
    LABEL_SUBSETS,
    METRICS,
    PLOTS,
    evaluation_data,
    log_to_encoder_run,
    missing_labels,
    read_params,
    run_stage,
    write_json,
    write_skipped,
)
from selfsup.data.arrays import Manifest, load_split
from selfsup.errors import DatasetError
from selfsup.eval.features import extract_features
from selfsup.eval.linear import topk_accuracy
from selfsup.eval.pictures import LABEL_FRACTION_KEYS, plot_label_fraction
from selfsup.eval.protocol import summarise_over_seeds
from selfsup.eval.semisup import fine_tune
from selfsup.models import Encoder, load_encoder


def main() -> None:
    params = read_params()
    config = params.eval.semisup
    folder = evaluation_data()
    manifest = Manifest.read(folder)
    if reason := missing_labels(manifest):
        tables = [(PLOTS / "label_fraction.csv", LABEL_FRACTION_KEYS)]
        write_skipped("eval_semisup", reason, METRICS / "eval_semisup.json", (PLOTS / "label_fraction.png",), tables)
        return
    subsets = json.loads(LABEL_SUBSETS.read_text())
    if subsets["train_sha256"] != manifest.splits["train"]["sha256"]:
        raise DatasetError(f"{LABEL_SUBSETS} was drawn from another training split: run `dvc repro label_subsets`")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train, evaluated = load_split(folder, "train"), {split: load_split(folder, split) for split in ("val", "test")}
    pretrained, _ = load_encoder(ENCODER)
    metrics, rows = {}, []
    for fraction, indices in subsets["subsets"].items():
        scores: dict[str, list[float]] = {}
        for seed in params.eval.seeds:
            # The scratch baseline's initial weights. Its BatchNorm statistics are not re-estimated as the frozen
            # baseline's are: fine-tuning trains them (100 steps at momentum 0.1 leave 3e-5 of the start).
            torch.manual_seed(seed)
            scratch = Encoder(params.model, manifest.mean, manifest.std, image_size=manifest.image_size[0])
            for name, encoder in (("top1", pretrained), ("baseline_top1", scratch)):
                model = fine_tune(
                    encoder,
                    train.images[indices],
                    train.labels[indices],
                    len(manifest.class_names),
                    config,
                    seed,
                    device,
                )
                for split, data in evaluated.items():
                    logits = torch.from_numpy(extract_features(model, data.images, params.eval.batch_size, device))
                    scores.setdefault(f"{split}.{name}", []).append(topk_accuracy(logits, data.labels))
        key = f"{float(fraction) * 100:g}pct"
        metrics[key] = {"images": len(indices), **summarise_over_seeds(scores)}
        test = metrics[key]["test"]
        rows.append(
            {
                "fraction": float(fraction),
                "pretrained_mean": test["top1"]["mean"],
                "pretrained_std": test["top1"]["std"],
                "baseline_mean": test["baseline_top1"]["mean"],
                "baseline_std": test["baseline_top1"]["std"],
            }
        )
        print(
            f"{float(fraction):.0%} labels ({len(indices)} images), test top-1: {test['top1']['mean']:.2%} ± "
            f"{test['top1']['std']:.2%} fine-tuned vs {test['baseline_top1']['mean']:.2%} ± "
            f"{test['baseline_top1']['std']:.2%} from scratch"
        )
    write_json(METRICS / "eval_semisup.json", metrics)
    PLOTS.mkdir(exist_ok=True)
    with open(PLOTS / "label_fraction.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    picture = plot_label_fraction(rows, PLOTS / "label_fraction.png")
    log_to_encoder_run(params, "semisup", metrics, [picture])


if __name__ == "__main__":
    run_stage(main)
