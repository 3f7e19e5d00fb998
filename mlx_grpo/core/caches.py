"""KV caches and attention hooks: batched decoding, shared-prompt and packed scoring."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache


def padded_mask(n: int, offset: int, left_padding: mx.array) -> mx.array:
    """Causal mask over left-padded rows: (B, 1, n, offset + n) booleans.

    A padding query may attend to itself so that no softmax row is empty
    (an empty row gives NaN, which would leak through 0 * NaN).
    """
    keys = mx.arange(offset + n)[None]
    queries = mx.arange(offset, offset + n)[:, None]
    causal = queries >= keys
    real = left_padding[:, None, None, None] <= keys
    return causal & (real | (queries == keys))


class PrefixCache:
    """A differentiable KV cache for scoring: keys and values grow by concatenation.

    It hands the model per-row RoPE positions and the padding mask, which
    plain `model(x)` cannot receive, and lets a prompt's keys and values be
    computed once and shared by the G completions of its group.
    """

    def __init__(
        self,
        left_padding: mx.array,  # (N,)
        keys: mx.array | None = None,  # (N, H, L, D)
        values: mx.array | None = None,
        length: int = 0,
    ):
        self.left_padding = left_padding
        self.keys, self.values, self.length = keys, values, length
        self.offset = length - left_padding

    def make_mask(self, n: int, **_kwargs) -> mx.array:
        return padded_mask(n, self.length, self.left_padding)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.hold(keys, values)
        return keys, values

    def hold(self, keys: mx.array, values: mx.array) -> None:
        """Make `keys` and `values` (N, H, L, D) the whole cache."""
        self.keys, self.values, self.length = keys, values, keys.shape[2]
        self.offset = self.length - self.left_padding

    def select(self, rows: mx.array) -> PrefixCache:
        """A cache whose row i is this cache's row rows[i]."""
        return PrefixCache(self.left_padding[rows], self.keys[rows], self.values[rows], self.length)

    def packed(self, rows: mx.array, positions: mx.array, mask: mx.array) -> PackedCache:
        """A cache for packed rows: row i continues this cache's row rows[i]."""
        kv = (self.keys[rows], self.values[rows])
        return PackedCache(self.left_padding[rows], positions, *kv, self.length, mask)

    def arrays(self) -> list[mx.array]:
        """Its arrays, in the order `rebuilt` takes them."""
        return [self.left_padding] + ([] if self.keys is None else [self.keys, self.values])

    @classmethod
    def rebuilt(cls, arrays: list[mx.array], length: int) -> PrefixCache:
        return cls(*arrays, length=length)


class PackedCache(PrefixCache):
    """A PrefixCache whose rows each hold several completions of one prompt, one after
    another: each token has its own RoPE position (`TokenRoPE`), and the mask keeps
    each completion to its prompt and itself (see `logprobs.pack`)."""

    def __init__(
        self,
        left_padding: mx.array,  # (R,)
        positions: mx.array,  # (R, L) RoPE position of each packed token
        keys: mx.array | None = None,
        values: mx.array | None = None,
        length: int = 0,
        mask: mx.array | None = None,  # (R, 1, L, length + L)
    ):
        super().__init__(left_padding, keys, values, length)
        self.positions, self.mask, self.offset = positions, mask, positions

    def make_mask(self, n: int, **_kwargs) -> mx.array:
        return self.mask

    def hold(self, keys: mx.array, values: mx.array) -> None:
        self.keys, self.values, self.length = keys, values, keys.shape[2]

    def arrays(self) -> list[mx.array]:
        return [self.left_padding, self.positions] + super().arrays()[1:]


class TokenRoPE(nn.Module):
    """A RoPE that also takes one position per token: an offset of shape (B, L)."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.inner = rope

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if not (isinstance(offset, mx.array) and offset.ndim == 2):
            return self.inner(x, offset=offset)
        # each token its own sequence of one, at its own offset
        b, h, n, d = x.shape
        flat = x.transpose(0, 2, 1, 3).reshape(b * n, h, 1, d)
        out = self.inner(flat, offset=offset.reshape(-1))
        return out.reshape(b, n, h, d).transpose(0, 2, 1, 3)


def takes_token_positions(model: nn.Module) -> bool:
    """Whether `allow_token_positions` was applied to the model."""
    return isinstance(getattr(getattr(model.layers[0], "self_attn", None), "rope", None), TokenRoPE)


def allow_token_positions(model: nn.Module) -> bool:
    """Let every attention's RoPE take one position per token (packed rows, in place).

    False, and nothing changed, where a block has no `self_attn.rope`.
    """
    attentions = [getattr(layer, "self_attn", None) for layer in model.layers]
    if not all(isinstance(getattr(a, "rope", None), nn.Module) for a in attentions):
        return False
    for a in attentions:
        if not isinstance(a.rope, TokenRoPE):
            a.rope = TokenRoPE(a.rope)
    return True


class RolloutCache(BatchKVCache):
    """mlx-lm's batched KV cache with a mask that is safe for padding rows."""

    def make_mask(self, n: int, return_array: bool = False, **kwargs) -> mx.array:
        return padded_mask(n, self._idx, self.left_padding)

    def repeat(self, g: int, room: int = 0) -> None:
        """Give every row g copies, in place: (B, ...) -> (B * g, ...).

        `room` reserves space for that many more positions, so decoding them
        never reallocates (nor over-allocates) the keys and values.
        """
        self.keys, self.values = (
            _repeat_rows(a[..., : self._idx, :], g, room) for a in (self.keys, self.values)
        )
        self.offset = mx.repeat(self.offset, g)
        self.left_padding = mx.repeat(self.left_padding, g)


def _repeat_rows(a: mx.array, g: int, room: int) -> mx.array:
    b, h, n, d = a.shape
    out = mx.zeros((b * g, h, n + room, d), dtype=a.dtype)
    out[..., :n, :] = mx.repeat(a, g, axis=0)
    return out


def recompute_activations(model: nn.Module) -> None:
    """Recompute each transformer block's activations during backward.

    Only blocks marked here and only in training mode are affected, so other
    models of the same class in the process keep their plain forward.
    """
    cls = type(model.layers[0])
    for layer in model.layers:
        layer._recompute_activations = True
    if getattr(cls, "_plain_call", None) is not None:
        return
    cls._plain_call = plain = cls.__call__

    def call(self, x, mask=None, cache=None, **kwargs):
        recompute = self.training and getattr(self, "_recompute_activations", False)
        if not recompute or not isinstance(cache, (PrefixCache, type(None))):
            return plain(self, x, mask, cache, **kwargs)
        # Every array the block reads (the mask, the cache's padding, keys and
        # values) passes through the checkpoint as an explicit input, and its new
        # keys and values as outputs: later blocks' gradients reach them only that
        # way, and a compiled trace must not find its own arrays held by the
        # function it recorded (a cycle that would outlive the trace and keep the
        # weights alive). The backward pass calls `inner` again, on the inputs.
        masked = isinstance(mask, mx.array)
        fixed_mask = None if masked else mask  # "causal" or None
        state = [] if cache is None else cache.arrays()
        kind, length = type(cache), 0 if cache is None else cache.length

        def inner(params, h, *arrays):
            self.update(params)
            m, arrays = (arrays[0], arrays[1:]) if masked else (fixed_mask, arrays)
            if kind is type(None):
                return (plain(self, h, m, None, **kwargs),)
            c = kind.rebuilt(list(arrays), length)
            return plain(self, h, m, c, **kwargs), c.keys, c.values

        outs = mx.checkpoint(inner)(
            self.trainable_parameters(), x, *([mask] if masked else []), *state
        )
        if cache is not None:
            cache.hold(outs[1], outs[2])
        return outs[0]

    cls.__call__ = call
