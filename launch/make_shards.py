"""Write webdataset shards (train-000000.tar, val-000000.tar, ...) and manifest.json.

    python launch/make_shards.py --source digits --out data/digits
    python launch/make_shards.py --source /data/imagenet/train --out /data/shards --workers 8 --verify
    python launch/make_shards.py --source /data/imagenet/train --out s3://bucket/imagenet --workers 8

An ``s3://`` --out is written to a local temporary folder first (under $TMPDIR), then uploaded
with boto3 (credentials and endpoint as the AWS tools take them), the manifest last.

SRC is a folder with one subfolder per class (ImageNet's layout), a folder of images without class
subfolders (unlabeled: no ``.cls``, for mae/simmim pretraining), or the word ``digits``
(scikit-learn's 1,797 handwritten digits, shipped with the package). ``--unlabeled`` writes no
labels even where SRC has classes. Files that cannot be read (dangling symlinks, I/O errors)
and, with --verify, images the loader could not decode are left out and listed by source path.
Exit code 2: a usage error.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from pipeline.data.shards import ShardsError, check_destination, publish, write_shards


class Progress:
    """tqdm bar over samples, fed as shards complete."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, unit="img", desc="make_shards", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def report_dropped(dropped: list[dict], shown: int = 50) -> None:
    """List what was left out on stderr (all of it is in manifest.json's "dropped")."""
    if not dropped:
        return
    print(f"make_shards: left out {len(dropped)} images (all listed in manifest.json under 'dropped'):",
          file=sys.stderr)
    for entry in dropped[:shown]:
        print(f"  {entry['source']}: {entry['reason']}", file=sys.stderr)
    if len(dropped) > shown:
        print(f"  ... and {len(dropped) - shown} more", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True,
                        help="image folder (<class>/<image>, or images without class folders) or 'digits'")
    parser.add_argument("--out", required=True, help="output directory, or s3://bucket/prefix")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of each class for val")
    parser.add_argument("--workers", type=int, default=1, help="writer processes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--verify", action="store_true",
                        help="decode every image as training will and leave out (and list) those that fail")
    parser.add_argument("--unlabeled", action="store_true",
                        help="write no labels (.cls), e.g. for mae/simmim pretraining; the manifest names no classes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    progress = None if args.quiet else Progress()
    remote = args.out.startswith("s3://")
    staging = tempfile.TemporaryDirectory(prefix="make_shards-") if remote else None
    try:
        out = Path(staging.name) if remote else args.out
        if remote:
            check_destination(args.out, overwrite=args.overwrite)
        manifest = write_shards(args.source, out, shard_size=args.shard_size, val_fraction=args.val_fraction,
                                workers=args.workers, seed=args.seed, overwrite=args.overwrite or remote,
                                verify=args.verify, unlabeled=args.unlabeled, progress=progress)
        if remote:
            publish(out, args.out)
    except ShardsError as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.close()
        if staging is not None:
            staging.cleanup()
    report_dropped(manifest["dropped"])
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_samples']} samples in {info['num_shards']} shards: {args.out}/{info['pattern']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
