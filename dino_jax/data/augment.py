"""DINO's multi-crop augmentation on the host, in numpy (REFERENCE.md §2.8).

Per crop, in the reference's order: RandomResizedCrop (bicubic) -> horizontal flip -> colour
jitter (brightness, contrast, saturation, hue in random order; p=0.8) -> grayscale (p=0.2) ->
Gaussian blur -> solarisation. The reference runs these through PIL one image at a time; here the
crops of one resolution are processed together as a float32 batch, which is what makes this path
several times faster than PIL on 32-64 px images (see bench/augment.py).

Where PIL's integer arithmetic shapes the result, it is reproduced:
- Bicubic resizing uses PIL's kernel (a=-0.5), its antialiasing support when shrinking, its
  renormalised weights at the crop border, and its horizontal-then-vertical passes with an 8-bit
  intermediate; the coefficients are precomputed per (input size, output size) and applied as
  two small matmuls. A flip is the same resize with the output columns reversed.
- Brightness, contrast and saturation are PIL blends with a degenerate image (black, the rounded
  mean luma, the luma image), truncated to 8 bits like `Image.blend`.
- Grayscale and every luma use PIL's fixed-point ITU-R 601 weights (19595, 38470, 7471)/65536.
- Blur is what PIL's GaussianBlur computes: three passes of an extended box filter whose variance
  sums to radius², edges clamped; the three passes are composed into one matrix per crop.
Where it does not, it is a float operation on purpose:
- Hue is rotated in float HSV (as torchvision does for tensors). PIL's own path stores hue in 8
  bits, a 1.4 degree step, and so perturbs every jittered pixel by up to a few levels; that noise
  is an artefact of PIL, not part of the recipe.
Random numbers come from the numpy Generator passed in, so a crop depends only on it: grain seeds
it from (seed, example index).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

# PIL's fixed-point ITU-R 601-2 luma weights ("L" conversion), with its rounding offset.
_LUMA_WEIGHTS = np.array([19595.0, 38470.0, 7471.0], np.float32)
_LUMA_ROUND = 32768.0
_LUMA_SCALE = 1.0 / 65536.0
_BOX_BLUR_PASSES = 3  # PIL approximates a Gaussian by this many box blurs.
_CHUNK_PIXELS = 1 << 16
_HUE_CENTRES = np.array([0.0, 2.0, 4.0], np.float32)[None, :, None, None]  # R, G, B in sixths.  # Crops are coloured in chunks of about this many pixels.

# Colour-jitter operations, in torchvision's parameter order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def _check_range(name, value, low, high):
  if not (len(value) == 2 and low <= value[0] <= value[1] <= high):
    raise ValueError(f"MultiCropConfig.{name}={value}: expected (min, max) with "
                     f"{low} <= min <= max <= {high}")


def _check_probability(name, value):
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"MultiCropConfig.{name}={value}: expected a probability in [0, 1]")


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
  """The multi-crop recipe. Defaults are the reference's except the crop sizes.

  Per-crop tuples (`blur_p`, `solarize_p`) are (global crop 1, global crop 2, local crops).
  Colour-jitter strengths follow torchvision: brightness b draws a factor in [max(0, 1-b), 1+b],
  hue h draws a shift in [-h, h] of a full turn.
  """
  global_size: int
  local_size: int
  num_local_crops: int
  global_scale: tuple[float, float] = (0.4, 1.0)
  local_scale: tuple[float, float] = (0.05, 0.4)
  flip_p: float = 0.5
  color_jitter_p: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_p: float = 0.2
  blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)
  aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def __post_init__(self):
    for name in ("global_size", "local_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"MultiCropConfig.{name}={getattr(self, name)}: expected >= 1 pixel")
    if self.num_local_crops < 0:
      raise ValueError(f"MultiCropConfig.num_local_crops={self.num_local_crops}: expected >= 0")
    _check_range("global_scale", self.global_scale, 1e-6, 1.0)
    _check_range("local_scale", self.local_scale, 1e-6, 1.0)
    _check_range("aspect_ratio", self.aspect_ratio, 1e-6, math.inf)
    _check_range("blur_sigma", self.blur_sigma, 1e-6, math.inf)
    for name in ("flip_p", "color_jitter_p", "grayscale_p"):
      _check_probability(name, getattr(self, name))
    for name in ("blur_p", "solarize_p"):
      value = getattr(self, name)
      if len(value) != 3:
        raise ValueError(f"MultiCropConfig.{name}={value}: expected 3 probabilities "
                         "(global 1, global 2, local)")
      for p in value:
        _check_probability(name, p)
    for name in ("brightness", "contrast", "saturation"):
      if getattr(self, name) < 0:
        raise ValueError(f"MultiCropConfig.{name}={getattr(self, name)}: expected >= 0")
    if not 0.0 <= self.hue <= 0.5:
      raise ValueError(f"MultiCropConfig.hue={self.hue}: expected a value in [0, 0.5]")

  def jitter_ranges(self) -> np.ndarray:
    """(4, 2) factor ranges for brightness, contrast, saturation (multiplicative) and hue (shift)."""
    return np.array([
        [max(0.0, 1 - self.brightness), 1 + self.brightness],
        [max(0.0, 1 - self.contrast), 1 + self.contrast],
        [max(0.0, 1 - self.saturation), 1 + self.saturation],
        [-self.hue, self.hue],
    ], np.float64)


# ----------------------------------------------------------------------------- random draws

# Every random number a crop needs comes from one row of uniforms in [0, 1), drawn from the
# example's own generator, so the whole batch can then be processed in vectorised form.
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before falling back.
_AREA = slice(0, _ATTEMPTS)
_LOG_RATIO = slice(_ATTEMPTS, 2 * _ATTEMPTS)
_TOP, _LEFT, _FLIP, _JITTER = 20, 21, 22, 23
_ORDER_KEYS = slice(24, 28)
_FACTORS = slice(28, 32)
_GRAY, _BLUR, _SIGMA, _SOLARIZE = 32, 33, 34, 35
NUM_UNIFORMS = 36


def crop_boxes(uniforms: np.ndarray, height: int, width: int, scale, ratio) -> np.ndarray:
  """RandomResizedCrop boxes from uniforms `(n, NUM_UNIFORMS)`: int `(n, 4)` (top, left, h, w).

  torchvision's sampler, vectorised over crops: up to 10 draws of an area fraction uniform in
  `scale` and a log-uniform aspect ratio in `ratio`; the first box that fits is kept; if none
  fits, the centre crop of the largest box whose aspect ratio is inside `ratio`.
  """
  rows = np.arange(len(uniforms))
  target_area = height * width * (scale[0] + (scale[1] - scale[0]) * uniforms[:, _AREA])
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = np.exp(log_low + (log_high - log_low) * uniforms[:, _LOG_RATIO])
  # np.rint rounds half to even, like Python's round() in torchvision.
  crop_w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
  crop_h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = np.argmax(fits, axis=1)
  found = fits[rows, first]
  crop_h, crop_w = crop_h[rows, first], crop_w[rows, first]
  # torch.randint(0, n + 1) is uniform on {0, ..., n}.
  top = np.floor(uniforms[:, _TOP] * (height - crop_h + 1)).astype(np.int64)
  left = np.floor(uniforms[:, _LEFT] * (width - crop_w + 1)).astype(np.int64)
  if not found.all():
    in_ratio = width / height
    if in_ratio < min(ratio):
      fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
      fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
      fallback_w, fallback_h = width, height
    crop_h = np.where(found, crop_h, fallback_h)
    crop_w = np.where(found, crop_w, fallback_w)
    top = np.where(found, top, (height - fallback_h) // 2)
    left = np.where(found, left, (width - fallback_w) // 2)
  return np.stack([top, left, crop_h, crop_w], axis=1)


# ----------------------------------------------------------------------------- resize


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
  """PIL's bicubic kernel (a = -0.5), support 2."""
  a = -0.5
  x = np.abs(x)
  return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                  np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


@functools.lru_cache(maxsize=4096)
def resize_matrix(in_size: int, out_size: int, flip: bool = False) -> np.ndarray:
  """(out_size, in_size) float32 weights of PIL's bicubic resize along one axis.

  Follows Pillow's `precompute_coeffs`: sample centres at (x + 0.5) * scale, the kernel widened
  by the scale when shrinking (antialiasing), taps clipped to the input and renormalised.
  `flip=True` reverses the output order, which is a horizontal flip of the resized image.
  """
  scale = in_size / out_size
  filter_scale = max(scale, 1.0)
  support = 2.0 * filter_scale
  weights = np.zeros((out_size, in_size), np.float64)
  for out_index in range(out_size):
    centre = (out_index + 0.5) * scale
    first = max(int(centre - support + 0.5), 0)
    last = min(int(centre + support + 0.5), in_size)
    taps = np.arange(first, last)
    tap_weights = _pil_bicubic((taps - centre + 0.5) / filter_scale)
    total = tap_weights.sum()
    weights[out_index, first:last] = tap_weights / total if total != 0 else tap_weights
  if flip:
    weights = weights[::-1]
  weights = np.ascontiguousarray(weights, np.float32)
  weights.setflags(write=False)
  return weights


def _round_to_uint8_range(x: np.ndarray) -> np.ndarray:
  """In place: round half up and clip to [0, 255], as PIL stores a float result in 8 bits."""
  np.add(x, 0.5, out=x)
  np.floor(x, out=x)
  np.clip(x, 0.0, 255.0, out=x)
  return x


def resized_crops(images_Bx3xHxW: np.ndarray, source_image: np.ndarray, boxes: np.ndarray,
                  flips: np.ndarray, size: int) -> np.ndarray:
  """Crops `boxes` of planar float32 images, resizes each to `size` (PIL bicubic), flips some.

  Crop n is taken from image `source_image[n]`. Returns float32 `(n, 3, size, size)` holding
  integers in [0, 255].
  """
  num_crops = len(boxes)
  height = images_Bx3xHxW.shape[2]
  # Horizontal pass first, into an 8-bit intermediate, as Pillow does it; rows past a crop's
  # height stay unused, which lets one rounding call cover every crop.
  rows = np.zeros((num_crops, 3, height, size), np.float32)
  for n, (image, (top, left, crop_h, crop_w), flip) in enumerate(
      zip(source_image.tolist(), boxes.tolist(), flips.tolist())):
    np.matmul(images_Bx3xHxW[image, :, top:top + crop_h, left:left + crop_w],
              resize_matrix(crop_w, size, flip).T, out=rows[n, :, :crop_h])
  _round_to_uint8_range(rows)
  out = np.empty((num_crops, 3, size, size), np.float32)
  for n, crop_h in enumerate(boxes[:, 2].tolist()):
    np.matmul(resize_matrix(crop_h, size), rows[n, :, :crop_h], out=out[n])
  return _round_to_uint8_range(out)


# ----------------------------------------------------------------------------- colour


def luma(x_Nx3xHxW: np.ndarray) -> np.ndarray:
  """PIL's "L" conversion of integer-valued RGB: (N, H, W) float32 integers in [0, 255]."""
  weighted = np.einsum("nchw,c->nhw", x_Nx3xHxW, _LUMA_WEIGHTS)
  return np.floor((weighted + _LUMA_ROUND) * _LUMA_SCALE)


def _blend_step(x, op, factor, apply):
  """One colour-jitter step, in place, for the crops whose op at this step is a blend.

  Brightness, contrast and saturation are all PIL `Image.blend(degenerate, image, factor)` =
  truncate(degenerate + factor * (image - degenerate)); only the degenerate image differs, so
  one vectorised expression serves every crop whatever its op. The arithmetic keeps PIL's form
  so the truncation lands on the same integers.
  """
  is_blend = apply & (op != HUE)
  needs_luma = is_blend & ((op == SATURATION) | (op == CONTRAST))
  degenerate = np.zeros((len(x), 1, 1, 1), np.float32)
  if needs_luma.any():
    gray = luma(x)
    mean_gray = np.floor(gray.mean(axis=(1, 2)) + 0.5)
    degenerate = np.where((op == SATURATION)[:, None, None], gray,
                          np.where(op == CONTRAST, mean_gray, 0.0)[:, None, None])[:, None]
  factor = np.where(is_blend, factor, 1.0).astype(np.float32)[:, None, None, None]
  np.subtract(x, degenerate, out=x)
  np.multiply(x, factor, out=x)
  np.add(x, degenerate, out=x)
  np.clip(x, 0.0, 255.0, out=x)
  return np.floor(x, out=x)


def _rotate_hue(x_Nx3xHxW: np.ndarray, shift: np.ndarray) -> np.ndarray:
  """Rotates hue by `shift` (N,) turns (|shift| <= 0.5) in float HSV; value and saturation kept."""
  red, green, blue = x_Nx3xHxW[:, 0], x_Nx3xHxW[:, 1], x_Nx3xHxW[:, 2]
  maxc = np.maximum(np.maximum(red, green), blue)
  chroma = maxc - np.minimum(np.minimum(red, green), blue)
  inv_chroma = 1.0 / np.where(chroma > 0, chroma, 1.0)
  # Hue in sixths of a turn, in [-1, 5): red is centred on 0, green on 2, blue on 4.
  hue6 = np.where(red == maxc, (green - blue) * inv_chroma,
                  np.where(green == maxc, (blue - red) * inv_chroma + 2.0,
                           (red - green) * inv_chroma + 4.0))
  hue6 += (6.0 * np.asarray(shift, np.float32))[:, None, None]
  # HSV -> RGB: a channel is at max within 1 sixth of its centre, at min beyond 2, linear
  # between. hue6 lies in (-4, 8), so min(d, |d - 6|) is the distance around the circle.
  distance = np.abs(hue6[:, None] - _HUE_CENTRES)
  np.minimum(distance, np.abs(distance - 6.0), out=distance)
  np.subtract(distance, 1.0, out=distance)
  np.clip(distance, 0.0, 1.0, out=distance)
  np.multiply(distance, chroma[:, None], out=distance)
  out = np.subtract(maxc[:, None], distance, out=distance)
  # Values stay within [min, max] of the input, so rounding needs no clipping.
  np.add(out, 0.5, out=out)
  return np.floor(out, out=out)


def color_jitter(x_Nx3xHxW: np.ndarray, apply: np.ndarray, order: np.ndarray,
                 factors: np.ndarray) -> np.ndarray:
  """torchvision ColorJitter with given parameters, per crop.

  apply (N,) bool; order (N, 4) a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE) per
  crop; factors (N, 4) brightness, contrast, saturation factors and the hue shift, indexed by op.
  """
  x = x_Nx3xHxW
  rows = np.arange(len(x))
  for step in range(4):
    op = order[:, step]
    factor = factors[rows, op]
    if np.any(apply & (op != HUE)):
      x = _blend_step(x, op, factor, apply)
    hue_rows = np.nonzero(apply & (op == HUE))[0]
    if hue_rows.size:
      x[hue_rows] = _rotate_hue(x[hue_rows], factor[hue_rows])
  return x


# ----------------------------------------------------------------------------- blur


def pil_box_radius(sigma: np.ndarray) -> np.ndarray:
  """Pillow's extended-box radius whose `_BOX_BLUR_PASSES` passes have variance sigma²."""
  sigma2 = np.asarray(sigma, np.float64) ** 2 / _BOX_BLUR_PASSES
  box_length = np.sqrt(12.0 * sigma2 + 1.0)
  whole = np.floor((box_length - 1.0) / 2.0)
  frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
  frac /= 6 * (sigma2 - (whole + 1) * (whole + 1))
  return whole + frac


def blur_matrices(sigma: np.ndarray, size: int) -> np.ndarray:
  """(N, size, size) float32 operators of PIL's GaussianBlur(radius=sigma) along one axis.

  One pass averages a window of radius r = l + a (weight 1 on |d| <= l, a on |d| = l + 1,
  normalised by 2r + 1) with edge pixels repeated; three passes are composed into one matrix.
  A sigma of 0 gives the identity.
  """
  sigma = np.asarray(sigma, np.float64)
  radius = pil_box_radius(np.maximum(sigma, 1e-6))
  whole = np.floor(radius)
  frac = radius - whole
  reach = int(whole.max()) + 1
  distance = np.arange(-reach, reach + 1, dtype=np.float64)
  weights = np.where(np.abs(distance) <= whole[:, None], 1.0,
                     np.where(np.abs(distance) == whole[:, None] + 1, frac[:, None], 0.0))
  weights /= (2.0 * radius + 1.0)[:, None]
  # Edge clamping: a tap at row y + d reads row clip(y + d, 0, size - 1).
  rows = np.arange(size)
  source = np.clip(rows[:, None] + distance.astype(np.int64)[None, :], 0, size - 1)
  one_pass = np.zeros((len(sigma), size, size), np.float32)
  for tap in range(len(distance)):
    one_pass[:, rows, source[:, tap]] += weights[:, tap][:, None]
  operator = one_pass
  for _ in range(_BOX_BLUR_PASSES - 1):
    operator = np.matmul(one_pass, operator)
  operator[sigma <= 0] = np.eye(size)
  return operator


def gaussian_blur(x_Nx3xSxS: np.ndarray, sigma: np.ndarray) -> np.ndarray:
  """Blurs each crop with its own sigma (pixels of the crop); sigma 0 leaves a crop as it is."""
  operator = blur_matrices(sigma, x_Nx3xSxS.shape[-1])[:, None]
  blurred = np.matmul(np.matmul(operator, x_Nx3xSxS), np.swapaxes(operator, -1, -2))
  return _round_to_uint8_range(blurred)


# ----------------------------------------------------------------------------- the recipe


def _colour_and_filters(x, u, config: MultiCropConfig, blur_p, solarize_p):
  """Colour jitter, grayscale, blur and solarisation of crops x (n, 3, S, S), per their uniforms."""
  jitter = u[:, _JITTER] < config.color_jitter_p
  order = np.argsort(u[:, _ORDER_KEYS], axis=1)  # A uniform random permutation of the 4 ops.
  ranges = config.jitter_ranges()
  factors = ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * u[:, _FACTORS]
  x = color_jitter(x, jitter, order, factors)

  gray = u[:, _GRAY] < config.grayscale_p
  if gray.any():
    x[gray] = luma(x[gray])[:, None]

  # The reference blurs when random() <= p and solarises when random() < p.
  blur = u[:, _BLUR] <= blur_p
  if blur.any():
    sigma = config.blur_sigma[0] + (config.blur_sigma[1] - config.blur_sigma[0]) * u[blur, _SIGMA]
    x[blur] = gaussian_blur(x[blur], sigma)

  solarize = u[:, _SOLARIZE] < solarize_p
  if solarize.any():
    x[solarize] = np.where(x[solarize] >= 128.0, 255.0 - x[solarize], x[solarize])
  return x


def _crop_group(images_Bx3xHxW, uniforms_BxNxU, config: MultiCropConfig, size, scale,
                blur_p: np.ndarray, solarize_p: np.ndarray) -> np.ndarray:
  """One resolution's crops of a batch through the whole recipe: uint8 (B, N, size, size, 3).

  `blur_p` and `solarize_p` are (N,) probabilities, one per crop slot.
  """
  batch, num_crops = uniforms_BxNxU.shape[:2]
  if num_crops == 0:
    return np.zeros((batch, 0, size, size, 3), np.uint8)
  _, _, height, width = images_Bx3xHxW.shape
  u = uniforms_BxNxU.reshape(batch * num_crops, NUM_UNIFORMS)
  boxes = crop_boxes(u, height, width, scale, config.aspect_ratio)
  flips = u[:, _FLIP] < config.flip_p
  source_image = np.repeat(np.arange(batch), num_crops)
  x = resized_crops(images_Bx3xHxW, source_image, boxes, flips, size)

  # The colour ops pass over the pixels ~40 times; in chunks that stay in the CPU cache they
  # run about twice as fast as over the whole batch at once.
  chunk = max(1, _CHUNK_PIXELS // (size * size))
  blur_p = np.tile(blur_p, batch)
  solarize_p = np.tile(solarize_p, batch)
  for start in range(0, len(x), chunk):
    rows = slice(start, start + chunk)
    x[rows] = _colour_and_filters(x[rows], u[rows], config, blur_p[rows], solarize_p[rows])
  crops = x.astype(np.uint8).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(crops).reshape(batch, num_crops, size, size, 3)


def draw_uniforms(rng: np.random.Generator, config: MultiCropConfig) -> np.ndarray:
  """All random numbers one image's crops use: (2 + num_local_crops, NUM_UNIFORMS) in [0, 1)."""
  return rng.random((2 + config.num_local_crops, NUM_UNIFORMS))


def multicrop_from_uniforms(images_BxHxWx3: np.ndarray, uniforms: np.ndarray,
                            config: MultiCropConfig) -> tuple[np.ndarray, np.ndarray]:
  """The recipe on a batch, given each image's `draw_uniforms` rows stacked as (B, 2 + L, U)."""
  images = np.asarray(images_BxHxWx3)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"multicrop: expected uint8 images of shape (B, H, W, 3), got "
                     f"{images.dtype} {images.shape}")
  expected = (len(images), 2 + config.num_local_crops, NUM_UNIFORMS)
  if uniforms.shape != expected:
    raise ValueError(f"multicrop: uniforms have shape {uniforms.shape}; expected {expected}")
  images_Bx3xHxW = np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32)
  global_crops = _crop_group(
      images_Bx3xHxW, uniforms[:, :2], config, config.global_size, config.global_scale,
      np.array(config.blur_p[:2]), np.array(config.solarize_p[:2]))
  local_crops = _crop_group(
      images_Bx3xHxW, uniforms[:, 2:], config, config.local_size, config.local_scale,
      np.full(config.num_local_crops, config.blur_p[2]),
      np.full(config.num_local_crops, config.solarize_p[2]))
  return global_crops, local_crops


def multicrop_batch(images_BxHxWx3: np.ndarray, rngs, config: MultiCropConfig
                    ) -> tuple[np.ndarray, np.ndarray]:
  """`multicrop` of each image with its own generator, computed together (much faster).

  Returns (uint8 (B, 2, G, G, 3), uint8 (B, L, l, l, 3)); row b equals
  `multicrop(images[b], rngs[b], config)` for generators in the same state.
  """
  uniforms = np.stack([draw_uniforms(rng, config) for rng in rngs])
  return multicrop_from_uniforms(images_BxHxWx3, uniforms, config)


def multicrop(image: np.ndarray, rng: np.random.Generator,
              config: MultiCropConfig) -> tuple[np.ndarray, np.ndarray]:
  """DINO multi-crop of one image.

  Args:
    image: uint8 (H, W, 3).
    rng: the only source of randomness; the same generator state gives the same crops.
    config: the recipe.
  Returns:
    (global_crops uint8 (2, G, G, 3) in the order [global 1, global 2],
     local_crops uint8 (L, l, l, 3)).
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"multicrop: expected a uint8 (H, W, 3) image, got {image.dtype} "
                     f"{image.shape}")
  global_crops, local_crops = multicrop_batch(image[None], [rng], config)
  return global_crops[0], local_crops[0]
