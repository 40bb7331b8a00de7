"""Swin window ops against NumPy references of microsoft/Swin-Transformer's ``swin_transformer.py`` and HF's SwinLayer.

The semantics checked: windows batch-major then row-major over the window grid, tokens row-major inside a
window; ``relative_position_index`` as Swin's ``(dy + ws - 1) * (2 ws - 1) + (dx + ws - 1)``; the shifted-window
mask labels the 9 regions of the rolled map by slice assignment and puts -100 between tokens of different
regions; maps are zero-padded at the bottom and right to a window multiple; when ``min(H, W) <= window_size``
the window shrinks to ``min(H, W)`` and the shift is 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvjax.ops.window_attention import (crop_window_padding, effective_window_and_shift,
                                        pad_to_window_multiple, relative_position_index, shifted_window_mask,
                                        window_attention, window_partition, window_reverse)


def numpy_region_mask(height, width, window_size, shift):
  """Swin's construction: label 9 regions by slice assignment, partition, -100 where labels differ."""
  labels = np.zeros((height, width))
  slices = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
  count = 0
  for rows in slices:
    for cols in slices:
      labels[rows, cols] = count
      count += 1
  windows = []
  for r in range(0, height, window_size):
    for c in range(0, width, window_size):
      windows.append(labels[r:r + window_size, c:c + window_size].reshape(-1))
  windows = np.stack(windows)
  return np.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0)


def numpy_attention(q, k, v, bias, mask):
  """softmax(q k^T / sqrt(d) + bias + mask) v for one window: q, k, v [heads, N, d]."""
  logits = np.einsum("hnd,hmd->hnm", q, k) / np.sqrt(q.shape[-1]) + bias + mask
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("hnm,hmd->hnd", weights, v)


def test_partition_layout_and_roundtrip():
  x = np.random.default_rng(0).standard_normal((2, 6, 9, 4)).astype(np.float32)
  windows = np.asarray(window_partition(jnp.asarray(x), 3))
  assert windows.shape == (2 * 2 * 3, 3, 3, 4)
  i = 0
  for b in range(2):  # batch-major, then row-major over the window grid
    for r in range(2):
      for c in range(3):
        np.testing.assert_array_equal(windows[i], x[b, 3 * r:3 * r + 3, 3 * c:3 * c + 3])
        i += 1
  np.testing.assert_array_equal(window_reverse(jnp.asarray(windows), 3, 6, 9), x)
  with pytest.raises(ValueError, match="multiples"):
    window_partition(jnp.asarray(x), 4)


@pytest.mark.parametrize("window_size", [2, 7, (3, 5)])
def test_relative_position_index_formula(window_size):
  wh, ww = (window_size, window_size) if isinstance(window_size, int) else window_size
  index = np.asarray(relative_position_index(window_size))
  assert index.dtype == np.int32 and index.shape == (wh * ww, wh * ww)
  for i in range(wh * ww):
    for j in range(wh * ww):
      dh, dw = i // ww - j // ww, i % ww - j % ww  # query minus key
      assert index[i, j] == (dh + wh - 1) * (2 * ww - 1) + (dw + ww - 1)
  assert set(index.ravel()) == set(range((2 * wh - 1) * (2 * ww - 1)))


@pytest.mark.parametrize("height,width,window_size,shift", [(8, 8, 4, 2), (12, 8, 4, 2), (14, 21, 7, 3),
                                                            (6, 9, 3, 1)])
def test_shifted_window_mask_matches_region_labels(height, width, window_size, shift):
  mask = np.asarray(shifted_window_mask(height, width, window_size, shift))
  assert mask.dtype == np.float32
  np.testing.assert_array_equal(mask, numpy_region_mask(height, width, window_size, shift))
  np.testing.assert_array_equal(shifted_window_mask(height, width, window_size, 0), 0.0)


def test_window_attention_matches_numpy_with_bias_and_mask():
  rng = np.random.default_rng(1)
  batch, windows, heads, n, d = 2, 4, 3, 16, 5
  q, k, v = (rng.standard_normal((batch * windows, heads, n, d)).astype(np.float32) for _ in range(3))
  bias = rng.standard_normal((heads, n, n)).astype(np.float32)
  mask = np.asarray(shifted_window_mask(8, 8, 4, 2))
  out, weights = window_attention(*map(jnp.asarray, (q, k, v, bias, mask)), return_weights=True)
  assert out.shape == q.shape and weights.shape == (batch * windows, heads, n, n)
  for w in range(batch * windows):
    np.testing.assert_allclose(out[w], numpy_attention(q[w], k[w], v[w], bias, mask[w % windows]),
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="mask"):
    window_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.zeros((3, n, n)))


def test_shifted_block_equals_brute_force_roll_and_window_loops():
  rng = np.random.default_rng(2)
  batch, height, width, heads, d, ws = 2, 8, 12, 2, 4, 4
  shift = ws // 2
  q, k, v = (rng.standard_normal((batch, height, width, heads, d)).astype(np.float32) for _ in range(3))
  table = rng.standard_normal(((2 * ws - 1) ** 2, heads)).astype(np.float32)

  def cvjax_block(q, k, v):
    def to_windows(t):
      t = jnp.roll(t.reshape(batch, height, width, heads * d), (-shift, -shift), axis=(1, 2))
      return window_partition(t, ws).reshape(-1, ws * ws, heads, d).transpose(0, 2, 1, 3)
    bias = jnp.asarray(table)[relative_position_index(ws)].transpose(2, 0, 1)
    out = window_attention(to_windows(q), to_windows(k), to_windows(v), bias,
                           shifted_window_mask(height, width, ws, shift))
    out = window_reverse(out.transpose(0, 2, 1, 3).reshape(-1, ws, ws, heads * d), ws, height, width)
    return jnp.roll(out, (shift, shift), axis=(1, 2)).reshape(batch, height, width, heads, d)

  out = np.asarray(jax.jit(cvjax_block)(q, k, v))

  # Brute force: roll, then every window separately, with its own region labels and relative offsets.
  labels = np.zeros((height, width))
  for i, rows in enumerate((slice(0, -ws), slice(-ws, -shift), slice(-shift, None))):
    for j, cols in enumerate((slice(0, -ws), slice(-ws, -shift), slice(-shift, None))):
      labels[rows, cols] = 3 * i + j
  rolled = [np.roll(t, (-shift, -shift), axis=(1, 2)) for t in (q, k, v)]
  expected = np.zeros_like(q)
  coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij"), -1).reshape(-1, 2)
  for b in range(batch):
    for r in range(0, height, ws):
      for c in range(0, width, ws):
        qw, kw, vw = (t[b, r:r + ws, c:c + ws].reshape(ws * ws, heads, d).transpose(1, 0, 2) for t in rolled)
        lab = labels[r:r + ws, c:c + ws].reshape(-1)
        mask = np.where(lab[:, None] == lab[None, :], 0.0, -100.0)
        bias = np.zeros((heads, ws * ws, ws * ws))
        for i in range(ws * ws):
          for j in range(ws * ws):
            dh, dw = coords[i] - coords[j]
            bias[:, i, j] = table[(dh + ws - 1) * (2 * ws - 1) + dw + ws - 1]
        window_out = numpy_attention(qw, kw, vw, bias, mask).transpose(1, 0, 2)
        expected[b, r:r + ws, c:c + ws] = window_out.reshape(ws, ws, heads, d)
  expected = np.roll(expected, (shift, shift), axis=(1, 2))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_window_attention_grad_and_vmap():
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal((3, 4, 2, 9, 4)), jnp.float32) for _ in range(3))
  mask = shifted_window_mask(6, 6, 3, 1)
  batched = jax.jit(jax.vmap(lambda q, k, v: window_attention(q, k, v, mask=mask)))(q, k, v)
  for i in range(3):
    np.testing.assert_allclose(batched[i], window_attention(q[i], k[i], v[i], mask=mask), rtol=1e-6)
  grads = jax.grad(lambda q: jnp.sum(window_attention(q, k[0], v[0], mask=mask) ** 2))(q[0])
  assert np.all(np.isfinite(np.asarray(grads))) and np.any(np.asarray(grads) != 0)


def test_padding_and_small_map_rule():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 9, 2)), jnp.float32)
  padded, pad = pad_to_window_multiple(x, 4)
  assert padded.shape == (1, 8, 12, 2) and pad == (3, 3)
  np.testing.assert_array_equal(padded[:, 5:], 0.0)
  np.testing.assert_array_equal(padded[:, :, 9:], 0.0)
  np.testing.assert_array_equal(crop_window_padding(padded, pad), x)
  assert pad_to_window_multiple(x, 1)[1] == (0, 0)
  assert effective_window_and_shift(56, 56, 7, 3) == (7, 3)
  assert effective_window_and_shift(7, 9, 7, 3) == (7, 0)  # min(H, W) <= ws: one window, no shift
  assert effective_window_and_shift(4, 9, 7, 3) == (4, 0)


def test_matches_hf_swin_buffers_and_attention():
  torch = pytest.importorskip("torch")
  swin = pytest.importorskip("transformers.models.swin.modeling_swin")
  from transformers import SwinConfig
  config = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[2], num_heads=[2], window_size=4)
  layer = swin.SwinLayer(config, dim=8, input_resolution=(8, 12), num_heads=2, shift_size=2).eval()
  hf_mask = layer.get_attn_mask(8, 12, dtype=torch.float32, device="cpu").numpy()
  np.testing.assert_array_equal(shifted_window_mask(8, 12, 4, 2), hf_mask)
  attention = layer.attention
  hf_index = attention.relative_position_bias.relative_position_index.numpy().reshape(16, 16)
  np.testing.assert_array_equal(relative_position_index(4), hf_index)

  rng = np.random.default_rng(5)
  with torch.no_grad():
    attention.relative_position_bias.relative_position_bias_table.normal_()
    hidden = torch.tensor(rng.standard_normal((2 * 6, 16, 8)), dtype=torch.float32)  # B=2, nW=6
    expected = attention(hidden, torch.tensor(hf_mask))[0].numpy()
  params = {n: p.detach().numpy() for n, p in attention.named_parameters()}

  def heads(name):
    x = hidden.numpy() @ params[f"{name}.weight"].T + params[f"{name}.bias"]
    return jnp.asarray(x.reshape(12, 16, 2, 4).transpose(0, 2, 1, 3))

  table = params["relative_position_bias.relative_position_bias_table"]
  bias = jnp.asarray(table)[relative_position_index(4)].transpose(2, 0, 1)
  out = window_attention(heads("q_proj"), heads("k_proj"), heads("v_proj"), bias, jnp.asarray(hf_mask))
  out = np.asarray(out).transpose(0, 2, 1, 3).reshape(12, 16, 8) @ params["o_proj.weight"].T + params["o_proj.bias"]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, (7,), (7, -1), 2.5])
def test_bad_window_size_is_a_clear_error(bad):
  with pytest.raises(ValueError, match=r"window_size must be a positive int or a pair"):
    relative_position_index(bad)
