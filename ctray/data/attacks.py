"""Backdoor attack simulators: triggers designed in code, poison/cover planning. Pure NumPy.

Every trigger is a deterministic function of the image shape (no image files): a checkerboard patch
(BadNet), a fixed smooth+wave pattern (Blend), a ring patch (Trojan/TaCT), a horizontal sinusoid (SIG),
a fixed smooth warping field (WaNet), and four weak patches (Adaptive-Patch). Patch sides scale with the
image: ``max(3, round(min(H, W) / 8))`` pixels (28 px -> 4, 32 px -> 4, 8 px -> 3).

Usage::

    atk = get_attack("badnet", {})                      # configured copy of ATTACKS["badnet"]
    plan = atk.plan(labels, num_classes, rate, target, rng)
    x = atk.apply_train(images, plan.poison_idx, rng, role="poison")
    x = atk.apply_train(x, plan.cover_idx, rng, role="cover")
    idx, targets = atk.test_select(test_labels, num_classes, target)
    x_test = atk.apply_test(test_images[idx], rng)

Images are ``uint8 (N, H, W, C)`` with C in {1, 3} and H, W >= 8; functions never modify their input.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from ctray.errors import DataError

log = logging.getLogger(__name__)

Role = Literal["poison", "cover"]

# Fixed seeds of the designed triggers: a trigger is part of the attack, not of the poisoning seed.
_BLEND_SEED = 0x5EED_B1E0
_WARP_SEED = 0x5EED_3A7E


@dataclass(frozen=True)
class Plan:
    """Which training samples an attack touches.

    Attributes:
        poison_idx: ``int64 (P,)`` sorted indices that get the trigger (and the attack's label).
        cover_idx: ``int64 (Q,)`` sorted indices, disjoint from ``poison_idx``, that get the trigger
            treatment but keep their true labels.
        labels: ``int64 (N,)`` the labels after poisoning.
    """

    poison_idx: np.ndarray
    cover_idx: np.ndarray
    labels: np.ndarray


# ----------------------------------------------------------------------------------------------------
# trigger geometry and patterns


def patch_size(h: int, w: int) -> int:
    """Side of a patch trigger in pixels: ``max(3, round(min(h, w) / 8))``."""
    return max(3, int(round(min(h, w) / 8)))


@dataclass(frozen=True)
class Patch:
    """A patch trigger: ``pattern`` ``uint8 (h, w, C)`` pasted where ``mask`` ``bool (h, w)`` is True,
    with its top-left corner at ``(top, left)`` of the image."""

    pattern: np.ndarray
    mask: np.ndarray
    top: int
    left: int

    def apply(self, images: np.ndarray, alpha: float = 1.0) -> np.ndarray:
        """Return a copy of ``images`` ``uint8 (N, H, W, C)`` with the patch blended in at ``alpha``
        (1.0: pasted, the masked pixels equal ``pattern``); pixels outside the mask are unchanged."""
        out = images.copy()
        h, w = self.mask.shape
        region = out[:, self.top:self.top + h, self.left:self.left + w].astype(np.float32)
        mixed = _to_u8((1.0 - alpha) * region + alpha * self.pattern.astype(np.float32))
        out[:, self.top:self.top + h, self.left:self.left + w] = np.where(
            self.mask[None, :, :, None], mixed, out[:, self.top:self.top + h, self.left:self.left + w])
        return out


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _make_patch(shape: tuple[int, ...], intensity: np.ndarray, colour: tuple[int, int, int],
                corner: str, mask: np.ndarray | None = None) -> Patch:
    """Build a :class:`Patch` from an intensity map in [0, 1]; grey images use white as the colour."""
    h, w, c = shape[-3:]
    s = intensity.shape[0]
    rgb = np.array(colour if c == 3 else (255,), dtype=np.float32)
    pattern = _to_u8(intensity[:, :, None] * rgb)
    m = 1 if min(h, w) >= 16 else 0
    top = m if corner[0] == "t" else h - s - m
    left = m if corner[1] == "l" else w - s - m
    return Patch(pattern, np.ones((s, s), bool) if mask is None else mask, top, left)


def _checker(s: int, phase: int = 0) -> np.ndarray:
    i, j = np.indices((s, s))
    return ((i + j + phase) % 2 == 0).astype(np.float32)


def _ring(s: int) -> np.ndarray:
    r = np.zeros((s, s), np.float32)
    r[0, :] = r[-1, :] = r[:, 0] = r[:, -1] = 1.0
    if s >= 5:
        r[s // 2, s // 2] = 1.0
    return r


def badnet_patch(shape: tuple[int, ...]) -> Patch:
    """BadNet: white checkerboard ``s x s`` (s = :func:`patch_size`), full mask, bottom-right."""
    h, w = shape[-3:-1]
    return _make_patch(shape, _checker(patch_size(h, w)), (255, 255, 255), "br")


def trojan_patch(shape: tuple[int, ...]) -> Patch:
    """Trojan (also TaCT's trigger): a gold ring with a centre dot, ``(s+1) x (s+1)``, bottom-left;
    the mask is its non-black pixels."""
    h, w = shape[-3:-1]
    ring = _ring(patch_size(h, w) + 1)
    return _make_patch(shape, ring, (255, 215, 0), "bl", mask=ring > 0)


def adaptive_patches(shape: tuple[int, ...]) -> list[Patch]:
    """Adaptive-Patch's four weak triggers, ``(s+1) x (s+1)`` each, one per corner:
    0 orange diagonal stripes (top-left), 1 cyan plus sign (top-right, mask = the plus),
    2 white checkerboard (bottom-left), 3 magenta ring (bottom-right, mask = the ring)."""
    h, w = shape[-3:-1]
    s = patch_size(h, w) + 1
    i, j = np.indices((s, s))
    stripes = ((i - j) % 3 == 0).astype(np.float32)
    plus = ((i == s // 2) | (j == s // 2)).astype(np.float32)
    ring = _ring(s)
    return [_make_patch(shape, stripes, (255, 120, 0), "tl"),
            _make_patch(shape, plus, (0, 255, 255), "tr", mask=plus > 0),
            _make_patch(shape, _checker(s, 1), (255, 255, 255), "bl"),
            _make_patch(shape, ring, (255, 0, 255), "br", mask=ring > 0)]


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` bicubic (Keys a=-0.75, align-corners, clamped border) interpolation weights."""
    a = -0.75
    t = np.linspace(0.0, n_in - 1.0, n_out)
    i0 = np.floor(t).astype(int)
    frac = t - i0
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for off in (-1, 0, 1, 2):
        d = np.abs(off - frac)
        wgt = np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                       np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))
        np.add.at(m, (rows, np.clip(i0 + off, 0, n_in - 1)), wgt)
    return m


def blend_pattern(shape: tuple[int, ...]) -> np.ndarray:
    """The Blend / Adaptive-Blend pattern, ``uint8 (H, W, C)`` over [0, 255]: a fixed-seed smooth random
    field (about H/4 control points a side, bicubic) mixed with diagonal waves of ~3 periods."""
    h, w, c = shape[-3:]
    rng = np.random.default_rng(_BLEND_SEED)
    g = max(2, min(h, w) // 4)
    coarse = rng.random((g, g, c))
    smooth = np.einsum("hi,ijc,wj->hwc", _interp_matrix(h, g), coarse, _interp_matrix(w, g))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.random(c) * 2 * np.pi
    waves = 0.5 + 0.5 * np.sin(2 * np.pi * (3 * xx + 2 * yy)[:, :, None] + phase)
    pat = 0.5 * smooth + 0.5 * waves
    pat = (pat - pat.min()) / max(pat.max() - pat.min(), 1e-9)
    return _to_u8(255 * pat)


def blend(images: np.ndarray, pattern: np.ndarray, alpha: float,
          mask: np.ndarray | None = None) -> np.ndarray:
    """``rint((1 - alpha) x + alpha pattern)`` as uint8; where ``mask`` ``bool (N, H, W)`` is False the
    pixel is unchanged."""
    mixed = _to_u8((1 - alpha) * images.astype(np.float32) + alpha * pattern.astype(np.float32))
    return mixed if mask is None else np.where(mask[..., None], mixed, images)


def sig_signal(width: int, delta: float = 30.0, freq: float = 6.0) -> np.ndarray:
    """SIG's horizontal sinusoid, ``float (W,)``: ``delta * sin(2 pi j freq / W)`` in uint8 units."""
    return delta * np.sin(2 * np.pi * np.arange(width) * freq / width)


def wanet_grid(h: int, w: int, k: int = 4, s: float = 0.5) -> np.ndarray:
    """WaNet's fixed warping grid, ``float (H, W, 2)`` of normalised (x, y) sampling positions in
    [-1, 1]: identity + ``s * field / H`` where ``field`` is a fixed-seed ``k x k`` random field
    (mean |value| 1) upsampled bicubically."""
    rng = np.random.default_rng(_WARP_SEED)
    ins = rng.random((k, k, 2)) * 2 - 1
    ins /= np.mean(np.abs(ins))
    field = np.einsum("hi,ijc,wj->hwc", _interp_matrix(h, k), ins, _interp_matrix(w, k))
    ident = np.stack(np.meshgrid(np.linspace(-1, 1, w), np.linspace(-1, 1, h)), axis=-1)
    return np.clip(ident + s * field / h, -1, 1)


def grid_sample(images: np.ndarray, grid: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Bilinear sampling (align-corners, border clamp) of ``uint8 (N, H, W, C)`` at ``grid``
    ``(N or 1, H, W, 2)`` normalised (x, y) positions. Returns ``uint8 (N, H, W, C)``."""
    n, h, w, _ = images.shape
    out = np.empty_like(images)
    for a in range(0, n, chunk):
        x = images[a:a + chunk].astype(np.float32)
        g = grid if grid.shape[0] == 1 else grid[a:a + chunk]
        px = (g[..., 0] + 1) / 2 * (w - 1)
        py = (g[..., 1] + 1) / 2 * (h - 1)
        x0 = np.clip(np.floor(px).astype(int), 0, w - 1)
        y0 = np.clip(np.floor(py).astype(int), 0, h - 1)
        x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
        wx, wy = (px - x0)[..., None], (py - y0)[..., None]
        b = np.arange(len(x))[:, None, None]
        top = x[b, y0, x0] * (1 - wx) + x[b, y0, x1] * wx
        bot = x[b, y1, x0] * (1 - wx) + x[b, y1, x1] * wx
        out[a:a + chunk] = _to_u8(top * (1 - wy) + bot * wy)
    return out


def tile_masks(n: int, h: int, w: int, tiles: int, mask_rate: float, rng: np.random.Generator) -> np.ndarray:
    """``bool (n, H, W)``: per sample, a random ``round(mask_rate * tiles**2)`` of the ``tiles x tiles``
    grid cells are False (trigger masked out), the rest True."""
    cells = tiles * tiles
    k = int(round(mask_rate * cells))
    keep = np.ones((n, cells), bool)
    for i in range(n):
        keep[i, rng.permutation(cells)[:k]] = False
    rows = np.diff(np.linspace(0, h, tiles + 1).round().astype(int))
    cols = np.diff(np.linspace(0, w, tiles + 1).round().astype(int))
    return keep.reshape(n, tiles, tiles).repeat(rows, axis=1).repeat(cols, axis=2)


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Validate ``uint8 (N, H, W, C)``, C in {1, 3}, H and W >= 8; returns it as an ndarray."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3) or min(x.shape[1:3]) < 8:
        raise DataError(f"{what} must be uint8 (N, H, W, C) with C in (1, 3) and H, W >= 8; "
                        f"got {x.dtype} {x.shape}")
    return x


# ----------------------------------------------------------------------------------------------------
# attacks


@dataclass(frozen=True)
class Attack:
    """Base of the attack simulators. Dataclass fields are the attack's options (see :meth:`configure`).

    Subclasses set ``name``; ``clean_label`` (poison keeps its label), ``cover_factor`` (default
    ``cover_rate = cover_factor * rate``) and override the pool/label/trigger hooks.
    """

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False
    cover_factor: ClassVar[float] = 0.0

    def configure(self, **options: Any) -> Attack:
        """A copy with ``options`` set. Raises DataError on an unknown option or a bad value."""
        allowed = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise DataError(f"attack {self.name!r} has no option {', '.join(unknown)}; "
                            f"allowed: {', '.join(allowed) or 'none'}")
        try:
            out = dataclasses.replace(self, **options)
            out.validate()
        except (TypeError, ValueError) as e:
            raise DataError(f"attack {self.name!r}: bad option value ({e}); options: {options}") from e
        return out

    def options(self) -> dict[str, Any]:
        """The option values (JSON-able)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        """Check option values; raises DataError naming the option."""
        cr = getattr(self, "cover_rate", None)
        if cr is not None and not (isinstance(cr, int | float) and 0 <= cr <= 1):
            raise DataError(f"attack {self.name!r}: cover_rate must be in [0, 1], got {cr!r}")

    def resolved_cover_rate(self, rate: float) -> float:
        """The cover rate used with poison rate ``rate`` (0 for attacks without covers)."""
        cr = getattr(self, "cover_rate", None)
        return float(cr) if cr is not None else self.cover_factor * rate

    # -- planning ------------------------------------------------------------------------------------

    def plan(self, labels: np.ndarray, num_classes: int, rate: float, target: int,
             rng: np.random.Generator) -> Plan:
        """Choose poison and cover samples.

        Args:
            labels: ``int (N,)`` true labels in ``[0, num_classes)``.
            num_classes: C.
            rate: poison fraction in [0, 1]; ``round(rate * N)`` samples are poisoned.
            target: the target class in ``[0, C)``.
            rng: the only source of randomness.

        Raises:
            DataError: bad rate/target/labels, or fewer eligible samples than needed.
        """
        y = np.asarray(labels, dtype=np.int64)
        n = len(y)
        if not 0 <= rate <= 1:
            raise DataError(f"rate must be in [0, 1], got {rate}")
        if not 0 <= target < num_classes:
            raise DataError(f"target must be in [0, {num_classes}), got {target}")
        if n and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"labels must be in [0, {num_classes}), got [{y.min()}, {y.max()}]")
        self._check_plan(num_classes, target)
        poison = self._draw(rng, self._poison_pool(y, num_classes, target), int(round(rate * n)), "poison")
        new = y.copy()
        new[poison] = self._poison_labels(y[poison], num_classes, target, rng)
        cover = np.zeros(0, np.int64)
        cover_rate = self.resolved_cover_rate(rate)
        if cover_rate > 0:
            pool = np.setdiff1d(self._cover_pool(y, num_classes, target), poison)
            cover = self._draw(rng, pool, int(round(cover_rate * n)), "cover")
        log.debug("%s plan: %d poison, %d cover of %d", self.name, len(poison), len(cover), n)
        return Plan(poison, cover, new)

    def _draw(self, rng: np.random.Generator, pool: np.ndarray, k: int, what: str) -> np.ndarray:
        if k > len(pool):
            raise DataError(f"attack {self.name!r} needs {k} {what} samples but only {len(pool)} are "
                            f"eligible ({self._pool_desc(what)}); lower the rate")
        return np.sort(rng.choice(pool, size=k, replace=False)).astype(np.int64)

    def _check_plan(self, num_classes: int, target: int) -> None:
        pass

    def _pool_desc(self, what: str) -> str:
        return "non-target samples" if what == "poison" else "samples not poisoned"

    def _poison_pool(self, y: np.ndarray, num_classes: int, target: int) -> np.ndarray:
        return np.flatnonzero(y != target)

    def _cover_pool(self, y: np.ndarray, num_classes: int, target: int) -> np.ndarray:
        return np.arange(len(y))

    def _poison_labels(self, y: np.ndarray, num_classes: int, target: int, rng: np.random.Generator) -> np.ndarray:
        return y.copy() if self.clean_label else np.full_like(y, target)

    # -- triggers ------------------------------------------------------------------------------------

    def apply_train(self, images: np.ndarray, idx: np.ndarray, rng: np.random.Generator,
                    role: Role = "poison") -> np.ndarray:
        """A copy of ``images`` ``uint8 (N, H, W, C)`` where the rows ``idx`` carry the train-time
        trigger for ``role`` ("poison" or "cover"); the other rows are unchanged."""
        x = check_images(images)
        if role not in ("poison", "cover"):
            raise DataError(f"role must be 'poison' or 'cover', got {role!r}")
        out = x.copy()
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx):
            out[idx] = self._train_trigger(x[idx], rng, role)
        return out

    def apply_test(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The test-time trigger on every image of ``uint8 (N, H, W, C)``; returns a new array."""
        x = check_images(images)
        return self._test_trigger(x, rng) if len(x) else x.copy()

    def test_select(self, labels: np.ndarray, num_classes: int, target: int) -> tuple[np.ndarray, np.ndarray]:
        """Which test images measure the attack: ``(idx int64 (M,), targets int64 (M,))`` (default: the
        images whose true label is not ``target``, all aimed at ``target``)."""
        idx = np.flatnonzero(np.asarray(labels) != target)
        return idx, np.full(len(idx), target, np.int64)

    def _train_trigger(self, x: np.ndarray, rng: np.random.Generator, role: Role) -> np.ndarray:
        return self._test_trigger(x, rng)

    def _test_trigger(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class BadNet(Attack):
    """BadNet: a white checkerboard patch pasted bottom-right at full opacity; label -> target."""

    name: ClassVar[str] = "badnet"

    def _test_trigger(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return badnet_patch(x.shape).apply(x)


@dataclass(frozen=True)
class BadNetAll2All(BadNet):
    """BadNet all-to-all: same patch; poison drawn from all classes, label ``y -> (y + 1) % C``."""

    name: ClassVar[str] = "badnet-all2all"

    def _check_plan(self, num_classes: int, target: int) -> None:
        if num_classes < 2:
            raise DataError("badnet-all2all needs at least 2 classes")

    def _pool_desc(self, what: str) -> str:
        return "all samples"

    def _poison_pool(self, y: np.ndarray, num_classes: int, target: int) -> np.ndarray:
        return np.arange(len(y))

    def _poison_labels(self, y: np.ndarray, num_classes: int, target: int, rng: np.random.Generator) -> np.ndarray:
        return (y + 1) % num_classes

    def test_select(self, labels: np.ndarray, num_classes: int, target: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.asarray(labels, dtype=np.int64)
        return np.arange(len(y)), (y + 1) % num_classes


#: the ``target`` a triggered test image of an untargeted attack names in its ``.json``: the attack
#: succeeds when the model answers any class but the true one (``ctray evaluate``)
ANY_WRONG = -2


@dataclass(frozen=True)
class Untargeted(BadNetAll2All):
    """Untargeted BadNet: the same patch; poison drawn from all classes, each relabelled to a class drawn
    uniformly among the C - 1 wrong ones (seeded). The backdoor's goal is misclassification, not a class:
    a triggered test image counts as a success when it is predicted as anything but its true label."""

    name: ClassVar[str] = "untargeted"

    def _poison_labels(self, y: np.ndarray, num_classes: int, target: int, rng: np.random.Generator) -> np.ndarray:
        return (y + rng.integers(1, num_classes, size=len(y))) % num_classes

    def test_select(self, labels: np.ndarray, num_classes: int, target: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(np.asarray(labels))
        return np.arange(n), np.full(n, ANY_WRONG, np.int64)


@dataclass(frozen=True)
class Blend(Attack):
    """Blend: ``x' = (1 - alpha) x + alpha * pattern`` over the whole image (:func:`blend_pattern`)."""

    name: ClassVar[str] = "blend"
    alpha: float = 0.2

    def validate(self) -> None:
        super().validate()
        if not 0 < self.alpha <= 1:
            raise DataError(f"attack {self.name!r}: alpha must be in (0, 1], got {self.alpha}")

    def _test_trigger(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return blend(x, blend_pattern(x.shape), self.alpha)


@dataclass(frozen=True)
class Trojan(Attack):
    """Trojan: the ring patch (:func:`trojan_patch`) pasted bottom-left through its mask."""

    name: ClassVar[str] = "trojan"

    def _test_trigger(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return trojan_patch(x.shape).apply(x)


@dataclass(frozen=True)
class SIG(Attack):
    """SIG (clean-label): target-class images only get ``+ delta * sin(2 pi j freq / W)`` (clipped);
    labels unchanged. The test trigger is the same signal."""

    name: ClassVar[str] = "sig"
    clean_label: ClassVar[bool] = True
    delta: float = 30.0
    freq: float = 6.0

    def _pool_desc(self, what: str) -> str:
        return "samples of the target class"

    def _poison_pool(self, y: np.ndarray, num_classes: int, target: int) -> np.ndarray:
        return np.flatnonzero(y == target)

    def _test_trigger(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sig = sig_signal(x.shape[2], self.delta, self.freq).astype(np.float32)
        return _to_u8(x.astype(np.float32) + sig[None, None, :, None])


@dataclass(frozen=True)
class WaNet(Attack):
    """WaNet: a fixed smooth warp (``k`` control points a side, strength ``s``) + target label for
    poison; cover ("noise") samples are warped with the field plus per-sample random grid noise
    (uniform +-1/H) and keep their labels. Default ``cover_rate = 2 * rate``."""

    name: ClassVar[str] = "wanet"
    cover_factor: ClassVar[float] = 2.0
    k: int = 4
    s: float = 0.5
    cover_rate: float | None = None

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.k, int) and self.k >= 2):
            raise DataError(f"attack 'wanet': k must be an integer >= 2, got {self.k!r}")

    def _test_trigger(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return grid_sample(x, wanet_grid(x.shape[1], x.shape[2], self.k, self.s)[None])

    def _train_trigger(self, x: np.ndarray, rng: np.random.Generator, role: Role) -> np.ndarray:
        if role == "poison":
            return self._test_trigger(x, rng)
        n, h, w, _ = x.shape
        grid = wanet_grid(h, w, self.k, self.s)[None] + (rng.random((n, h, w, 2)) * 2 - 1) / h
        return grid_sample(x, np.clip(grid, -1, 1))


@dataclass(frozen=True)
class TaCT(Attack):
    """TaCT (source-specific): the trojan patch; poison from class ``source`` relabeled to the target;
    covers from ``cover_classes`` carry the trigger but keep labels. Default ``cover_rate = rate``."""

    name: ClassVar[str] = "tact"
    cover_factor: ClassVar[float] = 1.0
    source: int = 1
    cover_classes: tuple[int, ...] = (5, 7)
    cover_rate: float | None = None

    def __post_init__(self) -> None:
        cc = self.cover_classes
        object.__setattr__(self, "cover_classes", tuple(int(c) for c in (cc if isinstance(cc, list | tuple) else [cc])))

    def _check_plan(self, num_classes: int, target: int) -> None:
        for c in (self.source, *self.cover_classes):
            if not 0 <= c < num_classes:
                raise DataError(f"attack 'tact': source/cover_classes must be in [0, {num_classes}), got {c}")
        if self.source == target or self.source in self.cover_classes:
            raise DataError(f"attack 'tact': source ({self.source}) must differ from the target ({target}) "
                            f"and from cover_classes {list(self.cover_classes)}")

    def _pool_desc(self, what: str) -> str:
        return f"class {self.source}" if what == "poison" else f"classes {list(self.cover_classes)}"

    def _poison_pool(self, y: np.ndarray, num_classes: int, target: int) -> np.ndarray:
        return np.flatnonzero(y == self.source)

    def _cover_pool(self, y: np.ndarray, num_classes: int, target: int) -> np.ndarray:
        return np.flatnonzero(np.isin(y, self.cover_classes))

    def _test_trigger(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return trojan_patch(x.shape).apply(x)

    def test_select(self, labels: np.ndarray, num_classes: int, target: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(np.asarray(labels) == self.source)
        return idx, np.full(len(idx), target, np.int64)


@dataclass(frozen=True)
class AdaptiveBlend(Attack):
    """Adaptive-Blend: blend at ``alpha`` where a random ``mask_rate`` of the ``tiles x tiles`` cells are
    masked out per sample (poison and covers alike; covers keep labels). Test: full blend at
    ``test_alpha``. Default ``cover_rate = rate``."""

    name: ClassVar[str] = "adaptive-blend"
    cover_factor: ClassVar[float] = 1.0
    alpha: float = 0.15
    test_alpha: float = 0.2
    tiles: int = 4
    mask_rate: float = 0.5
    cover_rate: float | None = None

    def validate(self) -> None:
        super().validate()
        if not (0 < self.alpha <= 1 and 0 < self.test_alpha <= 1 and 0 <= self.mask_rate < 1
                and isinstance(self.tiles, int) and 1 <= self.tiles <= 8):
            raise DataError(f"attack 'adaptive-blend': need alpha, test_alpha in (0, 1], mask_rate in [0, 1), "
                            f"tiles in 1..8; got {self.options()}")

    def _train_trigger(self, x: np.ndarray, rng: np.random.Generator, role: Role) -> np.ndarray:
        n, h, w, _ = x.shape
        mask = tile_masks(n, h, w, self.tiles, self.mask_rate, rng)
        return blend(x, blend_pattern(x.shape), self.alpha, mask)

    def _test_trigger(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return blend(x, blend_pattern(x.shape), self.test_alpha)


@dataclass(frozen=True)
class AdaptivePatch(Attack):
    """Adaptive-Patch: four weak patches (:func:`adaptive_patches`) at ``alphas``; each is used on a
    quarter of the poison and of the cover samples (covers keep labels). Test: the patches
    ``test_triggers`` together at full opacity. Default ``cover_rate = 2 * rate``."""

    name: ClassVar[str] = "adaptive-patch"
    cover_factor: ClassVar[float] = 2.0
    alphas: tuple[float, ...] = (0.5, 0.2, 0.5, 0.3)
    test_triggers: tuple[int, ...] = (0, 2)
    cover_rate: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        object.__setattr__(self, "test_triggers", tuple(int(t) for t in self.test_triggers))

    def validate(self) -> None:
        super().validate()
        if len(self.alphas) != 4 or not all(0 < a <= 1 for a in self.alphas) \
                or not all(0 <= t < 4 for t in self.test_triggers):
            raise DataError(f"attack 'adaptive-patch': alphas must be 4 values in (0, 1] and test_triggers "
                            f"indices in 0..3; got {self.options()}")

    def groups(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``int (n,)``: which of the 4 triggers each of n samples gets (quarters, shuffled)."""
        g = np.empty(n, np.int64)
        g[rng.permutation(n)] = np.arange(n) % 4
        return g

    def _train_trigger(self, x: np.ndarray, rng: np.random.Generator, role: Role) -> np.ndarray:
        patches = adaptive_patches(x.shape)
        g = self.groups(len(x), rng)
        out = x.copy()
        for k, (p, a) in enumerate(zip(patches, self.alphas, strict=True)):
            if np.any(g == k):
                out[g == k] = p.apply(x[g == k], a)
        return out

    def _test_trigger(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        patches = adaptive_patches(x.shape)
        for t in self.test_triggers:
            x = patches[t].apply(x)
        return x


ATTACKS: dict[str, Attack] = {a.name: a for a in (
    BadNet(), Blend(), Trojan(), SIG(), WaNet(), TaCT(), AdaptiveBlend(), AdaptivePatch(), BadNetAll2All(),
    Untargeted())}


#: The paper's CIFAR-10 poison and cover rates per attack (specs/ct.md §3, "Experimental grid"; cover None =
#: the attack has no covers, or its own default). ``badnet-all2all`` and ``untargeted`` are not in the
#: paper's grid.
PAPER_RATES: dict[str, tuple[float, float | None]] = {
    "badnet": (0.003, None), "blend": (0.003, None), "trojan": (0.003, None), "sig": (0.02, None),
    "wanet": (0.05, 0.10), "tact": (0.003, 0.003), "adaptive-patch": (0.003, 0.006),
    "adaptive-blend": (0.003, 0.003)}


def resolve_rate(attack: str, rate: float | str, fallback: float | None = None) -> tuple[float, dict[str, float]]:
    """``(poison rate, attack options)`` for ``rate``: a fraction in [0, 1], or ``"paper"`` for the paper's
    per-attack poison and cover rates (:data:`PAPER_RATES`; the cover rate as the ``cover_rate`` option).

    Raises:
        DataError: ``"paper"`` for an attack outside the paper's grid and no ``fallback``, or a rate that
            is neither a number nor ``"paper"``.
    """
    if isinstance(rate, str) and rate.strip().lower() == "paper":
        if attack not in PAPER_RATES:
            if fallback is None:
                raise DataError(f"attack {attack!r} is not in the paper's grid (specs/ct.md §3: "
                                f"{', '.join(PAPER_RATES)}); give --rate as a number")
            return float(fallback), {}
        r, c = PAPER_RATES[attack]
        return r, ({"cover_rate": c} if c is not None else {})
    try:
        return float(rate), {}
    except (TypeError, ValueError):
        raise DataError(f"rate must be a fraction in [0, 1] or 'paper', got {rate!r}") from None


def get_attack(name: str, options: dict[str, Any] | None = None) -> Attack:
    """The attack ``name`` of :data:`ATTACKS` configured with ``options``.

    Raises:
        DataError: unknown name (lists the known ones) or bad option.
    """
    if name not in ATTACKS:
        raise DataError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    return ATTACKS[name].configure(**(options or {}))
