"""The package's own image-caption data: procedurally drawn shapes with captions, and a shifted domain.

Every image shows one shape of one colour and size at one position on a background, drawn at
`image_size` pixels (supersampled twice for smooth edges); its caption names all four attributes,
e.g. "a small red triangle on the left". Nothing is downloaded; the same seed gives the same images
on every machine (CPU float32 arithmetic only).

Domains (`generate(n, domain=...)`):
- "train": the training backgrounds, every colour-shape combination except `HELD_OUT`.
- "test": drawn like "train" (other seeds give other images), for in-domain evaluation.
- "shifted": the shift a deployed model meets: backgrounds never seen in training (stripes,
  checkerboards, speckle), Gaussian blur and pixel noise of random strength, and half of the
  images in the colour-shape combinations `HELD_OUT` from training.

`tokenize(captions)` maps captions to token ids for the default model's text tower: 0 pads, the
start token is `vocab_size - 2` and the end token `vocab_size - 1` (the largest id, which open_clip's
text tower pools at).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SHAPES", "COLOURS", "SIZES", "POSITIONS", "HELD_OUT", "ShapesData", "generate", "caption",
           "VOCABULARY", "CONTEXT_LENGTH", "tokenize", "normalise_images"]

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {  # RGB in [0, 1]
    "red": (0.85, 0.15, 0.15), "green": (0.20, 0.70, 0.25), "blue": (0.15, 0.30, 0.85),
    "yellow": (0.90, 0.85, 0.20), "purple": (0.55, 0.25, 0.70), "orange": (0.95, 0.55, 0.10),
}
SIZES = {"small": 0.17, "large": 0.29}  # the shape's radius as a fraction of the image side
POSITIONS = {  # the shape's centre (x, y) as fractions of the image side; y grows downwards
    "on the left": (0.30, 0.50), "on the right": (0.70, 0.50), "at the top": (0.50, 0.30),
    "at the bottom": (0.50, 0.70), "in the centre": (0.50, 0.50),
}
# Colour-shape combinations never shown in training: one colour per shape, every colour once.
HELD_OUT = tuple((colour, shape) for shape, colour in zip(SHAPES, ("purple", "orange", "green", "red", "yellow",
                                                                   "blue")))
TRAIN_BACKGROUNDS = ("dark", "light", "gradient")
SHIFTED_BACKGROUNDS = ("stripes", "checkerboard", "speckle")
DOMAINS = ("train", "test", "shifted")
SUPERSAMPLE = 2
CHUNK = 1024  # images drawn at a time


@dataclass
class ShapesData:
    """A generated set: images and the attributes that produced each caption."""

    images: Tensor  # [N, 3, S, S] float32 in [0, 1]
    shape: Tensor  # [N] int64 index into SHAPES
    colour: Tensor  # [N] int64 index into COLOURS
    size: Tensor  # [N] int64 index into SIZES
    position: Tensor  # [N] int64 index into POSITIONS
    captions: list[str]  # N captions

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def caption_ids(self) -> Tensor:  # [N] int64: equal ids <=> equal captions
        return ((self.size * len(COLOURS) + self.colour) * len(SHAPES) + self.shape) * len(POSITIONS) + self.position


def caption(shape: int, colour: int, size: int, position: int) -> str:
    """"a small red triangle on the left" from attribute indices."""
    return f"a {list(SIZES)[size]} {list(COLOURS)[colour]} {SHAPES[shape]} {list(POSITIONS)[position]}"


def generate(
    n: int,
    domain: str = "train",
    seed: int = 0,
    image_size: int = 32,
) -> ShapesData:
    """`n` image-caption pairs of `domain` ("train", "test" or "shifted"), reproducible from `seed`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"argument 'n' must be a non-negative int, got {n!r}")
    if domain not in DOMAINS:
        raise ValueError(f"argument 'domain' must be one of {DOMAINS}, got {domain!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"argument 'image_size' must be an int >= 8, got {image_size!r}")
    # One stream per (seed, domain): "test" never repeats "train"'s images.
    g = torch.Generator().manual_seed(seed * len(DOMAINS) + DOMAINS.index(domain))
    shape, colour = _combinations(n, domain, g)
    size = torch.randint(len(SIZES), (n,), generator=g)
    position = torch.randint(len(POSITIONS), (n,), generator=g)
    images = torch.empty(n, 3, image_size, image_size)
    for start in range(0, n, CHUNK):  # chunks keep the supersampled canvases in cache
        rows = slice(start, start + CHUNK)
        images[rows] = _draw(shape[rows], colour[rows], size[rows], position[rows], image_size, domain, g)
    captions = [caption(*map(int, attrs)) for attrs in zip(shape, colour, size, position)]
    return ShapesData(images, shape, colour, size, position, captions)


def _draw(shape: Tensor, colour: Tensor, size: Tensor, position: Tensor, image_size: int, domain: str,
          g: torch.Generator) -> Tensor:  # [n, 3, image_size, image_size] in [0, 1]
    n, side = shape.shape[0], image_size * SUPERSAMPLE
    backgrounds = SHIFTED_BACKGROUNDS if domain == "shifted" else TRAIN_BACKGROUNDS
    canvas = _backgrounds(n, side, backgrounds, g)  # [n, 3, side, side]
    mask = _shape_masks(shape, size, position, side, g)[:, None]  # [n, 1, side, side]
    rgb = torch.tensor(list(COLOURS.values()))[colour]  # [n, 3]
    rgb = (rgb + 0.06 * torch.randn(n, 3, generator=g)).clamp(0, 1)  # a little colour jitter everywhere
    images = torch.nn.functional.avg_pool2d(torch.lerp(canvas, rgb[:, :, None, None].expand_as(canvas), mask),
                                            SUPERSAMPLE)
    if domain == "shifted":
        images = _blur(images, 0.4 + 0.8 * torch.rand(n, generator=g))
        images = images + (0.04 + 0.12 * torch.rand(n, 1, 1, 1, generator=g)) * torch.randn(images.shape, generator=g)
    return images.clamp(0, 1)


def normalise_images(images: Tensor) -> Tensor:  # [N, 3, S, S] in [0, 1] -> model input
    """The default model's input normalisation: zero mean, unit scale over the [0, 1] range."""
    return (images - 0.5) / 0.25


# ---- captions to tokens ----------------------------------------------------------------------------------
def _words() -> tuple[str, ...]:
    words = {"a"} | set(SHAPES) | set(COLOURS) | set(SIZES)
    for phrase in POSITIONS:
        words |= set(phrase.split())
    return tuple(sorted(words))


VOCABULARY = _words()  # word i has token id i + 1; 0 pads; then the start and end tokens
VOCAB_SIZE = len(VOCABULARY) + 3
START, END = VOCAB_SIZE - 2, VOCAB_SIZE - 1
CONTEXT_LENGTH = 10  # start + the longest caption (7 words) + end, with room to spare
_TOKEN = {word: i + 1 for i, word in enumerate(VOCABULARY)}


def tokenize(
    captions: list[str] | str,
    context_length: int = CONTEXT_LENGTH,
) -> Tensor:  # [N, context_length] int64
    """Token ids of captions over `VOCABULARY`; raises ValueError naming an unknown word."""
    if isinstance(captions, str):
        captions = [captions]
    tokens = torch.zeros(len(captions), context_length, dtype=torch.int64)
    for row, text in enumerate(captions):
        words = text.lower().split()
        unknown = [w for w in words if w not in _TOKEN]
        if unknown:
            raise ValueError(f"argument 'captions': {text!r} has words outside the vocabulary: {unknown}")
        ids = [START] + [_TOKEN[w] for w in words] + [END]
        if len(ids) > context_length:
            raise ValueError(f"argument 'captions': {text!r} needs {len(ids)} tokens, more than context_length="
                             f"{context_length}")
        tokens[row, :len(ids)] = torch.tensor(ids)
    return tokens


# ---- drawing --------------------------------------------------------------------------------------------
def _combinations(n: int, domain: str, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(shape, colour) indices: training combinations only, or half held out for "shifted"."""
    names = list(COLOURS)
    held = torch.tensor([[names.index(c), SHAPES.index(s)] for c, s in HELD_OUT])  # [H, 2]
    every = torch.cartesian_prod(torch.arange(len(COLOURS)), torch.arange(len(SHAPES)))  # [C*S, 2]
    seen = every[~(every[:, None, :] == held[None]).all(-1).any(1)]
    pick = seen[torch.randint(len(seen), (n,), generator=g)]
    if domain == "shifted":
        unseen = held[torch.randint(len(held), (n,), generator=g)]
        pick = torch.where((torch.rand(n, generator=g) < 0.5)[:, None], unseen, pick)
    return pick[:, 1].contiguous(), pick[:, 0].contiguous()


def _shape_masks(shape: Tensor, size: Tensor, position: Tensor, side: int, g: torch.Generator) -> Tensor:
    """[N, side, side] float masks of the shapes, centred with a small jitter, with a random rotation."""
    n = shape.shape[0]
    centres = torch.tensor(list(POSITIONS.values()))[position] + 0.03 * torch.randn(n, 2, generator=g)
    radius = torch.tensor(list(SIZES.values()))[size] * (1 + 0.08 * torch.randn(n, generator=g))
    angle = (torch.rand(n, generator=g) - 0.5) * (math.pi / 6)  # +-15 degrees: a triangle stays a triangle
    grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    dx = grid[None, None, :] - centres[:, 0, None, None]  # [N, 1, side]
    dy = grid[None, :, None] - centres[:, 1, None, None]  # [N, side, 1]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    inv = 1 / radius[:, None, None]
    masks = torch.empty(n, side, side)
    for index, name in enumerate(SHAPES):
        r = (shape == index).nonzero().flatten()
        if r.numel() == 0:
            continue
        x = (cos[r] * dx[r] + sin[r] * dy[r]) * inv[r]  # [m, side, side], rotated, in units of the radius
        y = (cos[r] * dy[r] - sin[r] * dx[r]) * inv[r]
        masks[r] = _inside(name, x, y).float()
    return masks


def _inside(name: str, x: Tensor, y: Tensor) -> Tensor:
    """Whether the points (x, y), in units of the radius about the centre, lie inside the shape."""
    if name == "circle":
        return x * x + y * y <= 1
    if name == "square":
        return torch.maximum(x.abs(), y.abs()) <= 0.8
    if name == "triangle":  # apex up
        return (y <= 0.6) & (y >= 1.8 * x.abs() - 0.9)
    if name == "diamond":
        return x.abs() + y.abs() <= 1
    if name == "cross":
        ax, ay = x.abs(), y.abs()
        return ((ax <= 0.3) & (ay <= 1)) | ((ay <= 0.3) & (ax <= 1))
    if name == "ring":
        squared = x * x + y * y
        return (squared <= 1) & (squared >= 0.55**2)
    raise AssertionError(name)


def _backgrounds(n: int, side: int, kinds: tuple[str, ...], g: torch.Generator) -> Tensor:
    """[N, 3, side, side] backgrounds of the given kinds, each with a random tint."""
    kind = torch.randint(len(kinds), (n,), generator=g)
    tint = 0.85 + 0.3 * torch.rand(n, 3, 1, 1, generator=g)
    grid = torch.arange(side, dtype=torch.float32) / side
    yy, xx = grid[:, None].expand(side, side), grid[None, :].expand(side, side)
    canvas = torch.empty(n, 3, side, side)
    for k, name in enumerate(kinds):
        rows = (kind == k).nonzero().flatten()
        m = rows.numel()
        if m == 0:
            continue
        if name == "dark":
            plain = 0.08 + 0.12 * torch.rand(m, 1, 1, 1, generator=g)
            canvas[rows] = plain.expand(m, 3, side, side)
        elif name == "light":
            plain = 0.70 + 0.15 * torch.rand(m, 1, 1, 1, generator=g)
            canvas[rows] = plain.expand(m, 3, side, side)
        elif name == "gradient":
            turn = torch.rand(m, 1, 1, 1, generator=g) * 2 * math.pi
            ramp = turn.cos() * xx + turn.sin() * yy
            canvas[rows] = (0.25 + 0.4 * (ramp - ramp.amin((2, 3), True)) / 1.5).expand(m, 3, side, side)
        elif name == "stripes":
            period = 4 + 6 * torch.rand(m, 1, 1, 1, generator=g)
            turn = torch.rand(m, 1, 1, 1, generator=g) * math.pi
            phase = (turn.cos() * xx + turn.sin() * yy) * side / period
            canvas[rows] = (0.35 + 0.3 * (torch.sin(2 * math.pi * phase) > 0).float()).expand(m, 3, side, side)
        elif name == "checkerboard":
            cell = torch.randint(3, 8, (m, 1, 1, 1), generator=g).float()
            board = ((xx * side / cell).floor() + (yy * side / cell).floor()) % 2
            canvas[rows] = (0.3 + 0.35 * board).expand(m, 3, side, side)
        elif name == "speckle":
            coarse = torch.rand(m, 3, side // 4, side // 4, generator=g)
            canvas[rows] = 0.2 + 0.5 * torch.nn.functional.interpolate(coarse, size=side, mode="nearest")
        else:  # pragma: no cover - the names above are the only ones
            raise AssertionError(name)
    return (canvas * tint).clamp(0, 1)


def _blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur with a per-image sigma [N] (pixels): one separable depthwise convolution, reflect padding."""
    radius = 3
    n, c, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*c, 2r+1], one per channel
    planes = images.reshape(1, n * c, h, w)
    planes = torch.nn.functional.pad(planes, (radius, radius, radius, radius), mode="reflect")
    planes = torch.nn.functional.conv2d(planes, kernel[:, None, None, :], groups=n * c)
    planes = torch.nn.functional.conv2d(planes, kernel[:, None, :, None], groups=n * c)
    return planes.reshape(n, c, h, w)
