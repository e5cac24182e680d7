"""Einsum: an equation resolved against the operand shapes into a plain one (every axis a letter,
broadcast axes dropped), whose forward and VJP are numpy einsums.

Separate from :mod:`.linalg` (the BLAS products and their fusions) because it is mostly a parser
of equations, with none of the products' BLAS machinery.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from gradserve.worker.graph import Node
from gradserve.worker.ops.batch import BatchRule, BatchView, Rows, refuse
from gradserve.worker.ops.registry import OpError, family, per_element, str_attr

defop = family(flops=per_element)


# An equation is first rewritten into a plain one with every axis named by a letter: each ellipsis
# becomes fresh letters (right-aligned across operands, as broadcasting aligns them), an operand's
# size-1 axes that broadcast against a larger size are dropped (the operand is reshaped to lose them,
# so a broadcast axis is just a label the operand lacks), and an implicit output is spelled out.
# Forward and VJP are then einsums of the plain equation, and numpy never has to broadcast.
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class _Einsum:
    """An einsum equation resolved against operand shapes."""

    terms: tuple[str, ...]  # each operand's letters, broadcast axes dropped
    shapes: tuple[tuple[int, ...], ...]  # each operand's shape with those axes dropped
    out: str  # the output's letters
    sizes: dict  # letter -> size


def _parse_einsum(equation: str, shapes: tuple[tuple[int, ...], ...], node: str = "") -> _Einsum:
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise OpError(f"{node}: Einsum '{equation}' has {len(terms)} operands, got {len(shapes)} inputs")
    used = set(eq) - set(".,->")
    if not used <= set(_LETTERS):
        raise OpError(f"{node}: Einsum '{equation}' may only use letters, '...', ',' and '->'")
    # ellipsis ranks: what each operand's rank leaves over after its letters
    ranks = []
    for t, s in zip(terms, shapes):
        n_letters = len(t.replace("...", ""))
        if t.count("...") > 1 or (t.count("...") == 0 and n_letters != len(s)) or n_letters > len(s):
            raise OpError(f"{node}: Einsum term '{t}' does not fit an operand of shape {s}")
        ranks.append(len(s) - n_letters if "..." in t else 0)
    fresh = [ch for ch in _LETTERS if ch not in used]
    n_ell = max(ranks, default=0)
    if n_ell > len(fresh):
        raise OpError(f"{node}: Einsum '{equation}' needs more axis letters than there are")
    ell = "".join(fresh[:n_ell])
    terms = [t.replace("...", ell[n_ell - r:]) for t, r in zip(terms, ranks)]
    if arrow:
        if rhs.count("...") > 1:
            raise OpError(f"{node}: Einsum output '{rhs}' has more than one ellipsis")
        # An explicit output without '...' sums the ellipsis axes away (numpy refuses this case).
        out = rhs.replace("...", ell)
        if len(set(out)) != len(out) or not set(out) <= set("".join(terms)):
            raise OpError(f"{node}: Einsum output '{rhs}' repeats a letter or names one no operand has")
    else:
        # ONNX (and numpy): the letters that appear exactly once, in ASCII order (upper case first),
        # after the ellipsis axes.
        counts = collections.Counter(lhs.replace("...", "").replace(",", ""))
        out = ell + "".join(sorted(ch for ch, n in counts.items() if n == 1))
    sizes: dict[str, int] = {}
    for t, s in zip(terms, shapes):
        for ch, d in zip(t, s):
            if d != 1 or ch not in sizes:
                if sizes.get(ch, 1) not in (1, d):
                    raise OpError(f"{node}: Einsum '{equation}': axis '{ch}' has sizes {sizes[ch]} and {d}")
                sizes[ch] = d
    # drop size-1 axes that broadcast; all other sizes now agree
    kept_terms, kept_shapes = [], []
    for t, s in zip(terms, shapes):
        keep = [i for i, (ch, d) in enumerate(zip(t, s)) if not (d == 1 and sizes[ch] != 1)]
        kept_terms.append("".join(t[i] for i in keep))
        kept_shapes.append(tuple(s[i] for i in keep))
    return _Einsum(tuple(kept_terms), tuple(kept_shapes), out, sizes)


def _einsum_spec(c, shapes) -> _Einsum:
    equation = str_attr(c.attr("equation"), "")
    return _parse_einsum(equation, tuple(tuple(s) for s in shapes), c.node)


def _einsum(c, *xs):
    spec = _einsum_spec(c, [x.shape for x in xs])
    c.save(spec=spec)
    ops = [x.reshape(s) for x, s in zip(xs, spec.shapes)]
    y = np.einsum(f"{','.join(spec.terms)}->{spec.out}", *ops, optimize=len(ops) > 1)
    return np.asarray(y, dtype=xs[0].dtype)  # a 0-d result comes back as a numpy scalar


def _einsum_vjp(c, g):
    spec: _Einsum = c.saved["spec"]
    ops = [x.reshape(s) for x, s in zip(c.inputs, spec.shapes)]
    grads: list[np.ndarray | None] = []
    for k, (term, x) in enumerate(zip(spec.terms, c.inputs)):
        if not c.needs[k]:
            grads.append(None)
            continue
        others = [(t, o) for j, (t, o) in enumerate(zip(spec.terms, ops)) if j != k]
        letters = "".join(dict.fromkeys(term))  # distinct, in order
        # Letters that only operand k has were summed over it alone: their error is a broadcast.
        elsewhere = set(spec.out).union(*[set(t) for t, _ in others])
        inner = "".join(ch for ch in letters if ch in elsewhere)
        gi = np.einsum(f"{','.join([spec.out] + [t for t, _ in others])}->{inner}", g, *[o for _, o in others],
                       optimize=len(others) > 0)
        lone = [ch for ch in letters if ch not in elsewhere]
        if lone:
            gi = np.asarray(gi).reshape(np.shape(gi) + (1,) * len(lone))
            gi = np.transpose(gi, [(inner + "".join(lone)).index(ch) for ch in letters])
            gi = np.broadcast_to(gi, [spec.sizes[ch] for ch in letters])
        if len(letters) == len(term):
            # copy a broadcast (read-only, zero-stride) error; an einsum result or a view of g will do
            dx = np.array(gi, dtype=x.dtype) if lone else np.asarray(gi, dtype=x.dtype)
        else:
            # A repeated letter reads a diagonal: its error goes onto that diagonal of a zero array,
            # written through einsum's (writeable) diagonal view.
            dx = np.zeros(spec.shapes[k], x.dtype)
            np.einsum(f"{term}->{letters}", dx)[...] = gi
        grads.append(dx.reshape(x.shape))
    return tuple(grads)


def _einsum_batch(view: BatchView, node: Node, tags: list) -> Rows:
    """Exact when every batched operand's batch index is one letter, kept in the output (not
    summed) and absent from the unbatched operands."""
    eq = str(node.attrs.get("equation", "")).replace(" ", "")
    if "->" not in eq or "." in eq:
        raise refuse(node, "has an equation without an explicit output or with '...'")
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    letters = {terms[k][t.axis] for k, t in enumerate(tags) if isinstance(t, Rows) and t.axis < len(terms[k])}
    if len(letters) != 1:
        raise refuse(node, "gives its batched operands different batch indices")
    (b,) = letters
    if b not in out or any(b in terms[k] for k, t in enumerate(tags) if not isinstance(t, Rows)):
        raise refuse(node, f"sums over the batch index '{b}' or shares it with an unbatched operand")
    return view.rows(out.index(b))


defop("Einsum", _einsum, _einsum_vjp, keep="x", batch=BatchRule(_einsum_batch))
