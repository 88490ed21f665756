"""Write the example images in examples/ (scenes fixed here, drawn by training/shapes.py).

    python -m training.make_examples [FOLDER]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.shapes import Scene, Shape, render  # noqa: E402

# name -> (scene, resolution in pixels)
EXAMPLES: dict[str, tuple[Scene, int]] = {
    "shapes.png": (
        Scene(
            (
                Shape("circle", "red", 0.27, 0.30, 0.34),
                Shape("triangle", "blue", 0.72, 0.36, 0.36),
                Shape("square", "yellow", 0.45, 0.74, 0.30),
            ),
            background=(236, 236, 228),
        ),
        256,
    ),
    "two_shapes.png": (
        Scene(
            (
                Shape("triangle", "green", 0.30, 0.62, 0.40),
                Shape("circle", "orange", 0.72, 0.32, 0.32),
            ),
            background=(24, 34, 74),
        ),
        200,
    ),
    "one_shape.png": (
        Scene((Shape("square", "purple", 0.55, 0.45, 0.42),), background=(250, 236, 170)),
        300,
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (scene, resolution) in EXAMPLES.items():
        render(scene, resolution).save(folder / name, format="PNG", optimize=True)
        print(folder / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
