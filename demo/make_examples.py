"""Write example inputs for the README's curl commands (deterministic).

``star.png``: a held-out synthetic shapes image, upscaled 4x so the overlay is
easy to see (the handler resizes it back); ``review.txt``: a held-out review.
"""
import argparse
import json
from pathlib import Path

from PIL import Image

from tsexplain.tools.synthetic import reviews, shapes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="build/examples")
    parser.add_argument("--training", default="build/demo/shapes/training.json", help="the shapes model's record")
    args = parser.parse_args(argv)
    size = json.loads(Path(args.training).read_text())["image_size"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = shapes.generate(50, seed=7, size=size)
    star = next(s for s in samples if shapes.SHAPE_CLASSES[s.label] == "star")
    star.image.resize((size * 4,) * 2, Image.LANCZOS).save(out / "star.png")
    review = next(r for r in reviews.generate(50, seed=7) if r.label == 1 and len(r.cue_spans) == 2)
    (out / "review.txt").write_text(review.text)
    print(f"wrote {out / 'star.png'} and {out / 'review.txt'}")


if __name__ == "__main__":
    main()
