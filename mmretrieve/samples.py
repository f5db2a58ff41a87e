"""Real sample images that installed packages ship (no downloads), with hand-written captions.

Used by the demo, the tests and the offline benchmarks. ``sample_images()`` lists those present on this
machine (scikit-image, scikit-learn and matplotlib each ship a few photographs). ``opencv_doc_images()``
adds the ~90 sample images of Debian's ``opencv-doc`` package when it has been unpacked
(``apt-get download opencv-doc && dpkg -x opencv-doc_*.deb DIR``; ``make opencv-doc`` does this).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    id: str
    path: str
    caption: str


#: (package, path inside the package, id, caption). Captions describe what is visible.
_PACKAGE_IMAGES = [
    ("skimage", "data/astronaut.png", "astronaut", "an astronaut in an orange spacesuit in front of a flag and a space shuttle model"),
    ("skimage", "data/camera.png", "cameraman", "a man looking through a film camera on a tripod, black and white"),
    ("skimage", "data/chelsea.png", "chelsea", "a tabby cat looking to the side"),
    ("skimage", "data/coffee.png", "coffee", "a cup of coffee with a saucer and a spoon"),
    ("skimage", "data/coins.png", "coins", "many old coins laid out in rows, black and white"),
    ("skimage", "data/horse.png", "horse", "the black silhouette of a horse"),
    ("skimage", "data/hubble_deep_field.jpg", "hubble", "galaxies and stars in deep space"),
    ("skimage", "data/ihc.png", "ihc", "a stained tissue sample under a microscope"),
    ("skimage", "data/moon.png", "moon", "the cratered surface of the moon, black and white"),
    ("skimage", "data/motorcycle_left.png", "motorcycle_left", "a red motorcycle parked in a garage"),
    ("skimage", "data/motorcycle_right.png", "motorcycle_right", "a red motorcycle parked in a workshop"),
    ("skimage", "data/page.png", "page", "a page of printed text about image segmentation"),
    ("skimage", "data/retina.jpg", "retina", "a photograph of the retina at the back of an eye"),
    ("skimage", "data/rocket.jpg", "rocket", "a rocket on the launch pad at dusk"),
    ("skimage", "data/text.png", "chalkboard", "handwritten math on a chalkboard"),
    ("skimage", "data/brick.png", "brick", "a brick wall, black and white"),
    ("skimage", "data/grass.png", "grass", "a close-up of grass, black and white"),
    ("skimage", "data/gravel.png", "gravel", "a close-up of gravel, black and white"),
    ("sklearn", "datasets/images/china.jpg", "china", "a chinese pagoda on a hill above a lake"),
    ("sklearn", "datasets/images/flower.jpg", "flower", "an orange dahlia flower"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper", "a portrait of an old woman in a navy uniform and cap"),
    ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png", "present", "a blue gift box with a silver ribbon"),
]


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent


def sample_images() -> list[Sample]:
    """The packaged sample photographs present on this machine."""
    out = []
    for pkg, rel, sid, caption in _PACKAGE_IMAGES:
        base = _package_dir(pkg)
        if base is not None and (base / rel).is_file():
            out.append(Sample(sid, str(base / rel), caption))
    return out


#: captions for opencv-doc's photographs (the rest of its images are calibration boards, drawings, etc.)
OPENCV_DOC_CAPTIONS = {
    "apple.jpg": "a red apple",
    "orange.jpg": "an orange fruit",
    "baboon.jpg": "the face of a baboon (mandrill) with a red and blue nose",
    "butterfly.jpg": "a butterfly with orange and black wings on a flower",
    "fruits.jpg": "a pile of fruits: apples, oranges, a banana and grapes",
    "messi5.jpg": "a soccer player kicking a ball on a field",
    "squirrel_cls.jpg": "a squirrel sitting on grass",
    "starry_night.jpg": "Van Gogh's painting The Starry Night",
    "building.jpg": "a tall building with many windows",
    "home.jpg": "a house with a garden",
    "lena.jpg": "a portrait of a woman wearing a hat",
    "HappyFish.jpg": "a cartoon of a happy fish",
    "smarties.png": "colourful round candies on a table",
    "board.jpg": "a chessboard with chess pieces",
    "aero1.jpg": "an aerial view of a landscape",
    "aero3.jpg": "an aerial view of a landscape",
    "graf1.png": "graffiti painted on a wall",
    "graf3.png": "graffiti painted on a wall, seen at an angle",
    "leuvenA.jpg": "houses along a street in an old european town",
    "leuvenB.jpg": "houses along a street in an old european town",
    "basketball1.png": "people playing basketball in a gym",
    "basketball2.png": "people playing basketball in a gym",
    "rubberwhale1.png": "toys on a table, including a rubber whale",
    "rubberwhale2.png": "toys on a table, including a rubber whale",
    "Blender_Suzanne1.jpg": "a rendered monkey head model",
    "Blender_Suzanne2.jpg": "a rendered monkey head model",
    "stuff.jpg": "a cluttered desk with various objects",
    "box.png": "a box of tea, black and white",
    "box_in_scene.png": "a box of tea among other objects, black and white",
    "ela_original.jpg": "a city street with cars and buildings",
    "ellipses.jpg": "a drawing of ellipses",
    "licenseplate_motion.jpg": "a motion-blurred license plate of a car",
    "pic1.png": "a drawing of geometric shapes",
    "sudoku.png": "a sudoku puzzle printed in a newspaper",
    "notes.png": "sheet music",
    "cards.png": "playing cards on a table",
    "chicky_512.png": "a photo of a small yellow chick",
    "blox.jpg": "wooden blocks",
    "detect_blob.png": "coloured blobs on a white background",
    "tsukuba_l.png": "a desk with a lamp, a statue head and a camera",
    "tsukuba_r.png": "a desk with a lamp, a statue head and a camera",
    "lena_tmpl.jpg": "part of a woman's face",
    "mask.png": "a black and white mask",
    "gradient.png": "a smooth gradient",
    "WindowsLogo.jpg": "the windows logo",
    "LinuxLogo.jpg": "the linux penguin logo",
}


def opencv_doc_dir() -> Path | None:
    """Where opencv-doc's example data was unpacked, if anywhere we know."""
    env = os.environ.get("MMRETRIEVE_OPENCV_DOC")
    candidates = [Path(env)] if env else []
    root = Path(__file__).resolve().parent.parent
    candidates += [
        root / ".cache" / "opencv-doc" / "usr/share/doc/opencv-doc/examples/data",
        Path("/usr/share/doc/opencv-doc/examples/data"),
    ]
    for c in candidates:
        if c.is_dir() and (c / "fruits.jpg").is_file():
            return c
    return None


def opencv_doc_images(photos_only: bool = True) -> list[Sample]:
    d = opencv_doc_dir()
    if d is None:
        return []
    out = []
    for f in sorted(os.listdir(d)):
        if f in OPENCV_DOC_CAPTIONS:
            out.append(Sample("opencv/" + Path(f).stem, str(d / f), OPENCV_DOC_CAPTIONS[f]))
        elif not photos_only and Path(f).suffix.lower() in (".jpg", ".png"):
            out.append(Sample("opencv/" + Path(f).stem, str(d / f), ""))
    return out


def write_manifest(samples: list[Sample], path: str | os.PathLike) -> Path:
    """A CSV manifest (path,id,caption) for ``mmretrieve index build NAME manifest.csv``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "id", "caption"])
        for s in samples:
            w.writerow([s.path, s.id, s.caption])
    return path
