"""A tiny character-level GPT in Flax NNX, trained on the Zen of Python, ready for influence functions.

The corpus is the Zen of Python: the text of the standard library's ``this`` module (``this.s`` decoded with its
ROT13 table ``this.d``), 856 characters and 45 distinct ones, the same in every Python 3 — installed with Python,
no download, deterministic. Training sequences are windows of ``seq_len + 1`` characters taken every ``stride``
characters.

The model is decoder-only: token and position embeddings, ``layers`` pre-LayerNorm blocks (causal self-attention
with ``nnx.MultiHeadAttention``, a GELU MLP), a final LayerNorm and an untied (or, with ``tied=True``, tied) readout.
With ``scan=True`` the blocks are built as ONE block whose weights have a leading layer axis (``nnx.vmap``) and
applied with ``jax.lax.scan`` over that axis, as Flax/MaxText-style language models are (``nnx.scan`` over the
module fails when the parameters are tracers of an outer transform: "Cannot extract graph node from different trace
level").

Functions a notebook or a test calls::

    lm = build("tiny")                      # or "default", "direct" (small enough for jaxinf.direct())
    params, history = train(lm, steps=200)  # optax Adam, one jitted step
    train_data = lm.sequences()             # (tokens (n, T + 1), mask (n, T)): the batch format everywhere
    lm.loss_fn(params, batch)               # mean over the batch of each sequence's summed next-token cross-entropy
    lm.completion_logprob(params, query)    # mean over the batch of log p(completion | prompt)

Run ``python tiny_gpt.py [--size tiny|direct|default] [--scan]`` to train one and print its losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def zen_text() -> str:
    """The Zen of Python (``import this``), decoded from the module's ROT13 text without printing it."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing ``this`` prints the text the first time
        import this
    return "".join(this.d.get(c, c) for c in this.s)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the model, the data and the training run."""

    d_model: int
    layers: int
    heads: int
    seq_len: int  # T: positions per training sequence (each sequence holds T + 1 characters)
    mlp_ratio: int = 4
    stride: int = 4  # a training sequence every `stride` characters
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3


SIZES = {
    "tiny": Config(d_model=8, layers=1, heads=2, seq_len=8, mlp_ratio=2, stride=8, steps=150, learning_rate=1e-2),
    "direct": Config(d_model=8, layers=1, heads=2, seq_len=16, mlp_ratio=2, stride=8, steps=800, learning_rate=1e-2),
    "default": Config(d_model=64, layers=2, heads=4, seq_len=32, stride=1, steps=400, batch_size=64),
}


def causal_attention(query, key, value, mask=None, **_):
    """Softmax attention over earlier positions only, in the inputs' dtype (``...qhd``, ``...khd`` -> ``...qhd``)."""
    del mask  # the causal mask is built here
    t = query.shape[-3]
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key) / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(logits.dtype).min), axis=-1)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: Config, *, dtype, rngs: nnx.Rngs):
        d, kw = cfg.d_model, {"param_dtype": dtype, "rngs": rngs}
        self.ln1, self.ln2 = nnx.LayerNorm(d, **kw), nnx.LayerNorm(d, **kw)
        self.attn = nnx.MultiHeadAttention(
            cfg.heads, d, decode=False, attention_fn=causal_attention, keep_rngs=False, **kw
        )
        self.up, self.down = nnx.Linear(d, cfg.mlp_ratio * d, **kw), nnx.Linear(cfg.mlp_ratio * d, d, **kw)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class GPT(nnx.Module):
    """Decoder-only transformer over ``vocab_size`` tokens, ``cfg.seq_len`` positions."""

    def __init__(self, cfg: Config, vocab_size: int, *, scan: bool = False, tied: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs):  # fmt: skip
        kw = {"param_dtype": dtype, "rngs": rngs}
        self.scan, self.tied = scan, tied
        self.embed = nnx.Embed(vocab_size, cfg.d_model, embedding_init=nnx.initializers.normal(0.1), **kw)
        self.pos = nnx.Embed(cfg.seq_len, cfg.d_model, embedding_init=nnx.initializers.normal(0.1), **kw)
        if scan:

            @nnx.split_rngs(splits=cfg.layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(r):
                return Block(cfg, dtype=dtype, rngs=r)

            self.blocks = stacked(rngs)  # one Block whose weights have a leading (layers,) axis
        else:
            self.blocks = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, **kw)
        self.head = None if tied else nnx.Linear(cfg.d_model, vocab_size, **kw)

    def __call__(self, ids):
        x = self.embed(ids) + self.pos(jnp.arange(ids.shape[-1]))  # learned positions, looked up as nanoGPT does
        if self.scan:  # jax.lax.scan over the stacked weights (one step per block), as MaxText-style models do
            block_def, stacked = nnx.split(self.blocks)
            x, _ = jax.lax.scan(lambda h, state: (nnx.merge(block_def, state)(h), None), x, stacked)
        else:
            for block in self.blocks:
                x = block(x)
        x = self.ln_f(x)
        return self.embed.attend(x) if self.tied else self.head(x)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: its bound methods key jaxinf's compile caches
class LM:
    """A built model's structure, vocabulary and sizes, with the functions that take ``params`` and a batch.

    A batch is ``(tokens, mask)``: ``tokens`` ``(n, T + 1)`` int32 characters, ``mask`` ``(n, T)`` float weights of
    the next-token targets ``tokens[:, 1:]`` (all ones for training text; the completion's positions for a query).
    """

    graphdef: nnx.GraphDef
    config: Config
    chars: str  # the vocabulary: character i is token i
    text: str

    def encode(self, s: str) -> np.ndarray:
        return np.array([self.chars.index(c) for c in s], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids))

    def model_fn(self, params, batch):
        """Next-token logits ``(n, T, V)`` for the first ``T`` tokens of each sequence."""
        return nnx.merge(self.graphdef, params)(batch[0][:, :-1])

    @staticmethod
    def token_nll(logits, batch):
        """Per-token cross-entropy ``(n, T)`` of the targets ``tokens[:, 1:]`` (not masked)."""
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[0][:, 1:])

    def output_loss(self, logits, batch):
        """Mean over sequences of the mask-weighted SUM of next-token cross-entropies (nats per sequence).

        Summed over positions as Grosse et al. (2023) do, so that ``jaxinf.ekfac(likelihood="categorical")``, which
        draws one label per position, samples the Gauss-Newton of this loss at its scale. Per character: divide by
        ``config.seq_len``.
        """
        mask = batch[1].astype(logits.dtype)
        return jnp.mean(jnp.sum(self.token_nll(logits, batch) * mask, -1))

    def loss_fn(self, params, batch):
        """The training loss: mean over the batch's leading axis of each sequence's summed next-token cross-entropy."""
        return self.output_loss(self.model_fn(params, batch), batch)

    def completion_logprob(self, params, batch):
        """Mean over the batch of ``log p(completion | prompt) = Σ_t mask[t] · log p(tokens[t + 1] | tokens[≤ t])``."""
        logits = self.model_fn(params, batch)
        return jnp.mean(jnp.sum(-self.token_nll(logits, batch) * batch[1].astype(logits.dtype), -1))

    def sequences(self, dtype=jnp.float32):
        """The training data: every window of ``T + 1`` characters starting at a multiple of ``stride``."""
        ids, t = self.encode(self.text), self.config.seq_len + 1
        starts = range(0, len(ids) - t + 1, self.config.stride)
        tokens = np.stack([ids[s : s + t] for s in starts])
        return jnp.asarray(tokens), jnp.ones((len(tokens), t - 1), dtype)

    def query(self, prompt: str, completion: str, dtype=jnp.float32):
        """A one-sequence batch: the last ``T + 1 - len(completion)`` characters of ``prompt`` (left-padded with
        spaces), then ``completion``; the mask selects the completion's characters as targets."""
        t = self.config.seq_len + 1
        if not 0 < len(completion) < t:
            raise ValueError(f"completion must have 1 to {t - 1} characters (seq_len={t - 1}), got {len(completion)}.")
        text = (prompt.rjust(t) + completion)[-t:]
        mask = np.zeros((1, t - 1))
        mask[0, t - 1 - len(completion) :] = 1.0
        return jnp.asarray(self.encode(text))[None], jnp.asarray(mask, dtype)

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the corpus's character frequencies: the loss per character of the best context-free
        model."""
        counts = np.array(list(Counter(self.text).values()), np.float64)
        p = counts / counts.sum()
        return float(-(p * np.log(p)).sum())


def build(size: str | Config = "default", *, scan: bool = False, tied: bool = False, dtype=jnp.float32,
          seed: int = 0):  # fmt: skip
    """``(lm, params)``: the model of ``size`` (a name of :data:`SIZES` or a :class:`Config`), initialised."""
    cfg = SIZES[size] if isinstance(size, str) else size
    text = zen_text()
    chars = "".join(sorted(set(text)))
    model = GPT(cfg, len(chars), scan=scan, tied=tied, dtype=dtype, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return LM(graphdef, cfg, chars, text), params


def train(lm: LM, params, *, steps: int | None = None, seed: int = 0, log_every: int = 0):
    """Adam on minibatches of :meth:`LM.sequences`; returns ``(params, losses)`` (the minibatch loss of each step)."""
    cfg = lm.config
    tokens, mask = lm.sequences(dtype=jax.tree.leaves(params)[0].dtype)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.learning_rate))

    @jax.jit
    def step(params, opt_state, key):
        idx = jax.random.randint(key, (cfg.batch_size,), 0, tokens.shape[0])
        loss, grads = jax.value_and_grad(lm.loss_fn)(params, (tokens[idx], mask[idx]))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    for i, key in enumerate(jax.random.split(jax.random.key(seed), cfg.steps if steps is None else steps)):
        params, opt_state, loss = step(params, opt_state, key)
        losses.append(loss)
        if log_every and i % log_every == 0:
            print(f"step {i:5d}  loss {float(loss) / cfg.seq_len:.3f} nats/char", flush=True)
    return params, np.asarray(jax.device_get(losses))


def sample(lm: LM, params, prompt: str, n: int = 60) -> str:
    """Greedy continuation of ``prompt`` by ``n`` characters."""
    t, text = lm.config.seq_len, prompt
    forward = jax.jit(lm.model_fn)
    for _ in range(n):
        window = lm.encode(text[-t:].rjust(t))
        logits = forward(params, (jnp.asarray(np.append(window, 0))[None], None))
        text += lm.chars[int(jnp.argmax(logits[0, -1]))]
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=sorted(SIZES))
    parser.add_argument("--scan", action="store_true", help="stack the blocks and apply them with jax.lax.scan")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    lm, params = build(args.size, scan=args.scan)
    n_params = sum(a.size for a in jax.tree.leaves(params))
    data = lm.sequences()
    print(f"{args.size}{' (scan)' if args.scan else ''}: {n_params} parameters, {data[0].shape[0]} sequences of "
          f"{lm.config.seq_len + 1} characters, vocabulary {len(lm.chars)}")  # fmt: skip
    start = time.perf_counter()
    params, losses = train(lm, params, steps=args.steps, log_every=100)
    seconds = time.perf_counter() - start
    full = float(jax.jit(lm.loss_fn)(params, data)) / lm.config.seq_len
    print(f"trained {len(losses)} steps in {seconds:.1f} s; loss on all sequences {full:.3f} nats/char "
          f"(unigram entropy {lm.unigram_entropy():.3f}, uniform {math.log(len(lm.chars)):.3f})")  # fmt: skip
    print(repr(sample(lm, params, "Sparse is better than ", 40)))


if __name__ == "__main__":
    main()
