"""fedclip-predict: classify images with what a run trained, and export it for others.

    fedclip-predict --run outputs/<run> IMAGES_OR_FOLDER... [--top-k 3] [--out preds.csv]
    fedclip-predict --model EXPORTED_FOLDER_OR_HUB_ID IMAGES_OR_FOLDER...
    fedclip-predict --run outputs/<run> --export EXPORT_DIR [--push-to-hub USER/REPO]

One row per image (path, its class if the folder says it, the top-k classes and probabilities) goes to
--out or to stdout. A labelled folder, ROOT/<class>/<image> or ROOT/<domain>/<class>/<image> with the
run's class names, also gets its accuracy per domain next to zero-shot CLIP (on stderr). Unreadable
images are reported and skipped. Also `python -m predict`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from common.data import _is_data_dir, domain_folder
from common.sources import IMAGE_EXTENSIONS, DomainFolder
from predict.classifier import Encoded, FedClipClassifier, InputImages
from predict.export import push_to_hub

log = logging.getLogger("fedclip-predict")


@dataclass
class InputGroup:
    """Images to classify: one labelled domain (from a folder's layout), or unlabelled files (domain None)."""

    domain: str | None
    images: DomainFolder | InputImages


def input_groups(inputs: list[str], classes: list[str]) -> list[InputGroup]:
    """Files, and folders in the labelled layouts ROOT/<class>/<image> or ROOT/<domain>/<class>/<image>; any other
    folder is searched for image files, unlabelled."""
    groups, files = [], []
    for arg in inputs:
        path = Path(arg).expanduser()
        if path.is_file():
            files.append(path)
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{arg}: no such file or folder")
        subdirs = [p for p in sorted(path.iterdir()) if _is_data_dir(p)]
        if subdirs and all(p.name in classes for p in subdirs):
            groups.append(InputGroup(path.name, domain_folder(path.parent, path.name, classes)))
        elif subdirs and all(
            any(_is_data_dir(c) for c in d.iterdir()) and all(c.name in classes for c in d.iterdir() if _is_data_dir(c))
            for d in subdirs
        ):
            groups += [InputGroup(d.name, domain_folder(path, d.name, classes)) for d in subdirs]
        else:
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if files:
        groups.append(InputGroup(None, InputImages(files)))
    return groups


def accuracy(clf: FedClipClassifier, encoded: Encoded) -> float:
    return (clf.logits(encoded.features).argmax(1) == encoded.labels).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedclip-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run folder (outputs/<date-time>)")
    source.add_argument("--model", help="an export: a folder or a hub repository id")
    parser.add_argument("inputs", nargs="*", help="image files and folders")
    parser.add_argument(
        "--which",
        default="best",
        choices=["best", "final"],
        help="with --run: the weights of the best round or the last",
    )
    parser.add_argument("--zero-shot", action="store_true", help="predict with CLIP alone, without the run's weights")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--out", help="write the predictions to this CSV file instead of stdout")
    parser.add_argument("--clip", help="where the CLIP is, if not where the run had it (it must be the same files)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="precision of the CLIP"
    )
    parser.add_argument(
        "--batch-size", type=int, help="images per forward pass (default: the run's model.encode_batch_size)"
    )
    parser.add_argument(
        "--export",
        metavar="DIR",
        help="write the run's weights and the class text features as a Hugging Face-style folder",
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the exported folder to this hub model repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not args.inputs and not args.export and not args.push_to_hub:
        parser.error("give images or folders to classify, or --export / --push-to-hub")
    try:
        return run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"fedclip-predict: error: {err}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    options = dict(clip=args.clip, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    if args.run:
        clf = FedClipClassifier.from_run(args.run, which=None if args.zero_shot else args.which, **options)
    else:
        clf = FedClipClassifier.from_pretrained(args.model, **options)
        clf = clf.zero_shot() if args.zero_shot else clf
    if args.export or args.push_to_hub:
        folder = clf.export(args.export or tempfile.mkdtemp(prefix="fedclip-export-"))
        print(f"exported the {clf.info['weights']} to {folder}", file=sys.stderr)
        if args.push_to_hub:
            print(f"pushed to {push_to_hub(folder, args.push_to_hub, args.private)}", file=sys.stderr)
    if args.inputs:
        classify(clf, input_groups(args.inputs, clf.classes), args.top_k, args.out)
    return 0


def classify(clf: FedClipClassifier, groups: list[InputGroup], top_k: int, out: str | None) -> None:
    """Predict every group, write the CSV, and print the accuracy of the labelled ones next to zero-shot."""
    from tqdm import tqdm

    total = sum(len(g.images) for g in groups)
    encoded = []
    with tqdm(
        total=total, unit="img", desc="classifying", disable=total <= clf.batch_size or None, file=sys.stderr
    ) as bar:
        for group in groups:
            encoded.append(clf.encode(group.images, progress=bar.update))
    k = min(top_k, len(clf.classes))
    header = ["path", "label"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "probability")]
    with open(out, "w", newline="") if out else contextlib.nullcontext(sys.stdout) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for group, enc in zip(groups, encoded):
            for name, label, top in zip(enc.names, enc.labels.tolist(), clf.predictions(enc).top_k(k)):
                writer.writerow(
                    [name, clf.classes[label] if group.domain is not None else ""]
                    + [v for cls, p in top for v in (cls, f"{p:.4f}")]
                )
    skipped = [name for enc in encoded for name in enc.skipped]
    if skipped:
        print(
            f"skipped {len(skipped)} unreadable "
            f"image(s): {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}",
            file=sys.stderr,
        )
    labelled = [(g.domain, e) for g, e in zip(groups, encoded) if g.domain is not None and len(e.names)]
    if labelled:
        zero_shot = clf.zero_shot()
        which = clf.info["weights"] or "(none)"
        print(f"{'domain':>16} {'images':>8} {which:>12} {'zero-shot':>10}", file=sys.stderr)
        for domain, enc in labelled + ([("all", _joined([e for _, e in labelled]))] if len(labelled) > 1 else []):
            print(
                f"{domain:>16} {len(enc.names):>8} {100 * accuracy(clf, enc):>12.2f} "
                f"{100 * accuracy(zero_shot, enc):>10.2f}",
                file=sys.stderr,
            )
    if out:
        print(f"wrote {sum(len(e.names) for e in encoded)} predictions to {out}", file=sys.stderr)


def _joined(parts: list[Encoded]) -> Encoded:
    return Encoded(
        torch.cat([p.features for p in parts]),
        torch.cat([p.labels for p in parts]),
        [n for p in parts for n in p.names],
    )


if __name__ == "__main__":
    sys.exit(main())
