"""Watch the projector during ordinary forwards and generation, without a trace (a monitor's cheap path).

``observe(handle, point, fn)`` is a context manager: while it is open, every call of the projector
(inside ``handle.model(**kw)``, ``handle.model.generate``, a pipeline, or the engine's own traces)
calls ``fn(act)`` with the point's activation, detached; nothing is changed and ``fn``'s return is
ignored. It is one torch forward (pre-)hook on the projector module, registered on entry and removed
on exit, also when the body raises. Unlike a ``Hook`` edit in ``run`` / ``generate`` it opens no
nnsight trace, so it costs one Python call per projector forward (BENCHMARKS.md, "Audit: runtime
guard"), but it sees the whole activation, ``[n_images, tokens, d]``, with no token selector: only
``projector.in`` and ``projector.out`` of a batched layout (every token an image token) are offered.
The hook fires for any forward of the model while open, in any thread.
"""

from __future__ import annotations

import contextlib

from ..errors import ProjLensError
from ..model.handle import ModelHandle

POINTS = ("projector.in", "projector.out")


@contextlib.contextmanager
def observe(handle: ModelHandle, point: str, fn):
    """Call ``fn(act)`` at each forward of ``point`` (``projector.in`` | ``projector.out``) while open."""
    if point not in POINTS:
        raise ProjLensError(f"observe watches {' or '.join(POINTS)} (every token an image token), got {point!r}; "
                            "for other points use run / generate with a Hook edit")
    if handle.adapter.layout != "batched":
        raise ProjLensError(f"{handle.adapter.family}: observe needs a batched projector output [images, tokens, d]; "
                            f"this family's is {handle.adapter.layout!r}: use run / generate with a Hook edit")
    if not callable(fn):
        raise ProjLensError(f"observe needs a function act -> None, got {type(fn).__name__}")
    module = handle.module("projector")
    if point == "projector.in":
        def pre(mod, args, kwargs):
            act = args[0] if args else next(iter(kwargs.values()))
            fn(act.detach())
        remove = module.register_forward_pre_hook(pre, with_kwargs=True).remove
    else:
        def post(mod, args, out):
            fn((out[0] if isinstance(out, tuple) else out).detach())
        remove = module.register_forward_hook(post).remove
    try:
        yield
    finally:
        remove()
