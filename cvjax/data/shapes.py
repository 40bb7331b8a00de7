"""The `shapes` TFDS dataset: synthetic images of coloured geometric shapes, generated locally.

Nothing is downloaded: `prepare_shapes` renders the images with `cvjax.data.shapes_render` (PIL + NumPy) and
TFDS writes them as `array_record` files into `data_dir/shapes/<config>/<version>/`, which is read back with
`builder.as_data_source(split)` without TensorFlow (images are handed to TFDS as PNG bytes for that reason).

Configs (see `BUILDER_CONFIGS`):
  classification_{32,64}: exactly one shape per image; features `image` uint8 [S, S, 3], `label` (class
    index), `image_id` (index of the example in its split).
  detection_{32,64,128}: several shapes that occlude each other; features `image`, `image_id`,
    `objects` (sequence: `bbox` normalised (ymin, xmin, ymax, xmax) of the visible part, `label`, `mask`
    uint8 [S, S, 1] in {0, 1} = visible part, `area` = visible pixels), `segmentation` uint8 [S, S, 1]
    (0 = background, label + 1), `panoptic` uint8 [S, S, 1] (0 = background, n + 1 for `objects[n]`).

Every example is a pure function of (seed, split, index), so the same seed gives byte-identical files and the
three splits are independent draws. Changing what the renderer produces requires bumping `Shapes.VERSION`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import os
from typing import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cvjax.data import shapes_render

CLASS_NAMES = shapes_render.CLASS_NAMES
SPLITS = ('train', 'validation', 'test')
TASKS = ('classification', 'detection')


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """A `shapes` variant.

  Attributes:
    task: 'classification' (one shape, a `label`) or 'detection' (several shapes with `objects`).
    image_size: side of the square images in pixels.
    num_examples: examples per split, as ((split, count), ...) over `SPLITS`.
    seed: generation seed; with `(split, index)` it determines every example.
    min_objects, max_objects: shapes drawn per image before occluded ones are dropped.
    radius_range: (low, high) shape circumradius as a fraction of `image_size`.
  """

  task: str = 'classification'
  image_size: int = 32
  num_examples: tuple[tuple[str, int], ...] = (('train', 10_000), ('validation', 1_000), ('test', 1_000))
  seed: int = 0
  min_objects: int = 1
  max_objects: int = 1
  radius_range: tuple[float, float] = (0.25, 0.45)

  def render_options(self) -> shapes_render.RenderOptions:
    return shapes_render.RenderOptions(image_size=self.image_size, min_objects=self.min_objects,
                                       max_objects=self.max_objects, radius_range=self.radius_range)


def _classification_config(size: int) -> ShapesConfig:
  return ShapesConfig(name=f'classification_{size}', task='classification', image_size=size,
                      description=f'One shape per {size}x{size} image, labelled with its class.')


def _detection_config(size: int, max_objects: int, radius_range: tuple[float, float],
                      num_train: int = 5_000) -> ShapesConfig:
  num_eval = num_train // 10
  return ShapesConfig(
      name=f'detection_{size}', task='detection', image_size=size,
      num_examples=(('train', num_train), ('validation', num_eval), ('test', num_eval)),
      min_objects=1, max_objects=max_objects, radius_range=radius_range,
      description=f'Up to {max_objects} occluding shapes per {size}x{size} image with boxes and masks.')


BUILDER_CONFIGS = (
    _classification_config(32),
    _classification_config(64),
    _detection_config(32, max_objects=4, radius_range=(0.14, 0.32)),
    _detection_config(64, max_objects=6, radius_range=(0.1, 0.28)),
    # Fewer examples at 128 keep its generation under half a minute on 2 cores.
    _detection_config(128, max_objects=8, radius_range=(0.08, 0.25), num_train=2_000),
)


def _png(array: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W, 3] or [H, W] array (deterministic for a given array)."""
  buffer = io.BytesIO()
  # Fastest zlib level: noisy images barely compress better at higher levels, which cost ~40% more time.
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic coloured shapes on noisy gradient backgrounds (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = list(BUILDER_CONFIGS)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # TFDS looks for a checksums file next to the builder's code to verify downloads; `shapes` downloads
    # nothing, and TFDS's lookup of a package's code path needs the `importlib_resources` backport.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    image = tfds.features.Image(shape=(size, size, 3), encoding_format='png')
    label = tfds.features.ClassLabel(names=CLASS_NAMES)
    image_id = tfds.features.Scalar(np.int64, doc='Index of the example in its split.')
    if config.task == 'classification':
      features = {'image': image, 'label': label, 'image_id': image_id}
    elif config.task == 'detection':
      single_channel = lambda: tfds.features.Image(shape=(size, size, 1), encoding_format='png')
      features = {
          'image': image,
          'image_id': image_id,
          'objects': tfds.features.Sequence({
              'bbox': tfds.features.BBoxFeature(),
              'label': label,
              'mask': single_channel(),
              'area': tfds.features.Scalar(np.int64, doc='Visible pixels.'),
          }),
          'segmentation': single_channel(),
          'panoptic': single_channel(),
      }
    else:
      raise ValueError(f'ShapesConfig.task must be one of {TASKS}, got {config.task!r}')
    return tfds.core.DatasetInfo(
        builder=self,
        description='Synthetic coloured geometric shapes (cvjax); generated locally, no download.',
        features=tfds.features.FeaturesDict(features),
        supervised_keys=('image', 'label') if config.task == 'classification' else None,
        # Examples are i.i.d. draws already; keeping index order makes record index == image_id.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    counts = dict(self.builder_config.num_examples)
    return {split: self._generate_examples(split, counts[split]) for split in SPLITS}

  def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    options = config.render_options()
    for index in range(count):
      yield index, render_example(config.task, options, config.seed, split, index)


def render_example(task: str, options: shapes_render.RenderOptions, seed: int, split: str,
                   index: int) -> dict:
  """The TFDS feature dict of example `index` of `split`, a pure function of its arguments."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  drawn = shapes_render.render(rng, options)
  if task == 'classification':
    if len(drawn.labels) != 1:
      raise AssertionError(f'classification example {split}[{index}] has {len(drawn.labels)} shapes')
    return {'image': _png(drawn.image), 'label': int(drawn.labels[0]), 'image_id': index}
  return {
      'image': _png(drawn.image),
      'image_id': index,
      'objects': {
          'bbox': [tfds.features.BBox(*map(float, box)) for box in drawn.boxes],
          'label': [int(label) for label in drawn.labels],
          'mask': [_png(mask.astype(np.uint8)) for mask in drawn.masks],
          'area': [int(mask.sum()) for mask in drawn.masks],
      },
      'segmentation': _png(drawn.semantic),
      'panoptic': _png(drawn.panoptic),
  }


def shapes_config(config_name: str, num_examples: Mapping[str, int] | None = None,
                  seed: int = 0) -> ShapesConfig:
  """The builder config `config_name`, with split sizes and seed optionally overridden.

  An override gets its own config name (and so its own folder in `data_dir`), e.g.
  `classification_32_n200-50-50_seed3`, so differently sized variants never overwrite each other.
  """
  by_name = {config.name: config for config in BUILDER_CONFIGS}
  if config_name not in by_name:
    raise ValueError(f'unknown shapes config {config_name!r}; valid configs: {", ".join(by_name)}')
  base = by_name[config_name]
  counts = dict(base.num_examples)
  num_examples = dict(num_examples or {})
  unknown = set(num_examples) - set(SPLITS)
  if unknown:
    raise ValueError(f'num_examples has unknown splits {sorted(unknown)}; valid splits: {SPLITS}')
  counts.update(num_examples)
  if any(int(n) < 1 for n in counts.values()):
    raise ValueError(f'num_examples must be positive for every split, got {counts}')
  counts = tuple((split, int(counts[split])) for split in SPLITS)
  if counts == base.num_examples and seed == base.seed:
    return base
  sizes = '-'.join(str(n) for _, n in counts)
  return dataclasses.replace(base, name=f'{config_name}_n{sizes}_seed{seed}', num_examples=counts, seed=seed)


@contextlib.contextmanager
def _file_lock(path: str):
  """Exclusive advisory lock on `path` (created if needed), held for the `with` block."""
  with open(path, 'a') as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_shapes(data_dir: str, config: ShapesConfig) -> Shapes:
  """Returns the `Shapes` builder for `config`, generating its files into `data_dir` on first use.

  Safe to call from several processes at once (e.g. every host of a multi-process run): generation holds an
  `fcntl` lock file in `data_dir`, and a process that gets the lock after another one finished finds the
  dataset prepared and only reads it. TFDS writes into a temporary folder and renames it when complete, so
  an interrupted generation leaves no half-written dataset behind.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  os.makedirs(data_dir, exist_ok=True)
  with _file_lock(os.path.join(data_dir, f'.shapes-{config.name}.lock')):
    builder = Shapes(data_dir=data_dir, config=config, file_format='array_record')
    if not builder.is_prepared():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
