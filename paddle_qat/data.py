"""ImageNet-style folder data for the training scripts: ``ROOT/{train,val}/<class>/<image>``.

Decoding and augmentation run in a thread pool with Pillow (a Paddle dependency):
training takes a random-resized crop (area 8-100 %, aspect 3/4-4/3) and a horizontal flip,
evaluation resizes the short side and takes a centre crop; both normalise with the ImageNet
mean and standard deviation. Each rank reads its own 1/N of every epoch's shuffled order,
the same order on every rank (seeded by epoch), as DeepLearningExamples' RN50 does.
``--dali`` uses NVIDIA DALI instead when it is installed (GPU machines).

Example::

    folder = image_folder("/imagenet/train")
    for batch in train_batches(folder, ImageSpec(224), batch=256, epoch=0):
        exe.run(main, feed=batch)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QATError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]


@dataclass(frozen=True)
class ImageSpec:
    """Crop size, the short side evaluation resizes to (224 and 256 for ImageNet) and the
    range of image area a training crop covers."""

    crop: int = 224
    resize_short: int = 256
    crop_area: tuple[float, float] = (0.08, 1.0)


def image_folder(root, classes: tuple[str, ...] | None = None) -> ImageFolder:
    """Index ``root/<class>/<image>``; ``classes`` fixes the label order (use the training
    folder's for the validation folder)."""
    root = Path(root)
    if not root.is_dir():
        raise QATError(f"image folder {root} does not exist; --image-root must hold train/ and "
                       f"val/ with one sub-folder of images per class")
    found = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    classes = found if classes is None else classes
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise QATError(f"{root} has classes the training folder lacks: {unknown[:5]}")
    samples = tuple((path, label) for label, name in enumerate(classes)
                    for path in sorted((root / name).glob("*"))
                    if path.suffix.lower() in IMAGE_SUFFIXES)
    if not samples:
        raise QATError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class "
                       f"sub-folders")
    return ImageFolder(root, classes, samples)


def _load(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise QATError(f"cannot decode image {path}: {error}") from None


def _normalise(image, size: int) -> np.ndarray:
    array = np.asarray(image.resize((size, size)) if image.size != (size, size) else image,
                       np.float32).transpose(2, 0, 1) / 255.0
    return (array - MEAN) / STD


def train_image(path: Path, spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    """Random-resized crop to ``spec.crop`` and a random horizontal flip, normalised CHW."""
    from PIL import Image

    image = _load(path)
    width, height = image.size
    size = spec.crop
    for _ in range(10):
        area = width * height * rng.uniform(*spec.crop_area)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            break
    else:  # fall back to the whole image
        left, top, w, h = 0, 0, width, height
    image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return _normalise(image, size)


def eval_image(path: Path, spec: ImageSpec) -> np.ndarray:
    """Resize the short side to ``spec.resize_short``, centre-crop ``spec.crop``."""
    from PIL import Image

    image = _load(path)
    width, height = image.size
    scale = spec.resize_short / min(width, height)
    image = image.resize((max(spec.crop, round(width * scale)),
                          max(spec.crop, round(height * scale))), Image.BILINEAR)
    left = (image.size[0] - spec.crop) // 2
    top = (image.size[1] - spec.crop) // 2
    return _normalise(image.crop((left, top, left + spec.crop, top + spec.crop)), spec.crop)


def _rank_share(count: int, rank: int, nranks: int, order: np.ndarray) -> np.ndarray:
    per_rank = count // nranks  # equal step counts on every rank, or collectives hang
    return order[rank * per_rank:(rank + 1) * per_rank]


def train_batches(folder: ImageFolder, spec: ImageSpec, batch: int, epoch: int, *,
                  rank: int = 0, nranks: int = 1, seed: int = 42, workers: int = 4,
                  max_steps: int | None = None):
    """This rank's training batches of one epoch (the last partial batch is dropped)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(folder.samples))
    mine = _rank_share(len(order), rank, nranks, order)
    steps = len(mine) // batch if max_steps is None else min(max_steps, len(mine) // batch)
    if steps == 0:
        raise QATError(f"{folder.root}: {len(mine)} images per rank is less than one batch of "
                       f"{batch}; lower --batch-size")
    with ThreadPoolExecutor(workers) as pool:
        for step in range(steps):
            index = mine[step * batch:(step + 1) * batch]
            # One generator per image: the same augmentation whatever the thread timing.
            rngs = [np.random.default_rng([seed, epoch, int(i)]) for i in index]
            images = list(pool.map(lambda i, r: train_image(folder.samples[i][0], spec, r),
                                   index, rngs))
            labels = [[folder.samples[i][1]] for i in index]
            yield {"image": np.stack(images), "label": np.array(labels, np.int64)}


def eval_batches(folder: ImageFolder, spec: ImageSpec, batch: int, *, rank: int = 0,
                 nranks: int = 1, workers: int = 4, max_steps: int | None = None):
    """This rank's share of the evaluation images, in order, last batch kept."""
    mine = np.arange(len(folder.samples))[rank::nranks]
    batches = [mine[i:i + batch] for i in range(0, len(mine), batch)][:max_steps]
    with ThreadPoolExecutor(workers) as pool:
        for index in batches:
            images = list(pool.map(lambda i: eval_image(folder.samples[i][0], spec), index))
            labels = [[folder.samples[i][1]] for i in index]
            yield {"image": np.stack(images), "label": np.array(labels, np.int64)}


def dali_train_batches(folder: ImageFolder, spec: ImageSpec, batch: int, *, rank: int,
                       nranks: int, device_id: int, seed: int = 42, workers: int = 4):
    """NVIDIA DALI's GPU decoding and augmentation, same crop/flip/normalise as above."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.paddle import DALIGenericIterator
    except ImportError:
        raise QATError("--dali needs NVIDIA DALI: pip install --extra-index-url "
                       "https://pypi.nvidia.com nvidia-dali-cuda120 (or drop --dali to use "
                       "the Pillow loader)") from None

    @pipeline_def(batch_size=batch, num_threads=workers, device_id=device_id, seed=seed)
    def pipeline():
        jpegs, labels = fn.readers.file(
            files=[str(p) for p, _ in folder.samples], labels=[c for _, c in folder.samples],
            shard_id=rank, num_shards=nranks, random_shuffle=True, name="reader")
        images = fn.decoders.image_random_crop(jpegs, device="mixed", output_type=types.RGB,
                                               random_area=list(spec.crop_area),
                                               random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, resize_x=spec.crop, resize_y=spec.crop)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=(MEAN.ravel() * 255).tolist(),
                                          std=(STD.ravel() * 255).tolist(),
                                          mirror=fn.random.coin_flip())
        return images, labels.gpu()

    pipe = pipeline()
    pipe.build()
    for data in DALIGenericIterator([pipe], ["image", "label"], reader_name="reader"):
        yield {"image": data[0]["image"], "label": data[0]["label"]}


def write_digits_folder(root, size: int = 32, val_share: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's bundled handwritten digits as an ImageNet-style folder
    (``root/{train,val}/<digit>/<n>.png``, RGB, ``size`` px): a real dataset, no download,
    to try the training scripts on a CPU. Returns ``root``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    val_count = int(len(order) * val_share)
    root = Path(root)
    for position, index in enumerate(order):
        split = "val" if position < val_count else "train"
        folder = root / split / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        gray = (digits.images[index] * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(gray).resize((size, size), Image.BILINEAR).convert("RGB")
        image.save(folder / f"{index}.png")
    return root
