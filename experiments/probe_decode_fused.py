import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_decode import (
    HEADS,
    PAPER,
    looped,
    nsa_bytes,
    nsa_step,
    random_cache,
    selection_kwargs,
    sets_for,
    time_loop,
)
from experiments.measure import relative_error
from nsa_jax import registry
from pallas_kernels.gpu import decode_fused
from pallas_kernels.gpu.decode_fused import FusedLaunch as L

out_path = sys.argv[1]
results = []
ORIGINAL = decode_fused.task_table


def emit(**r):
    results.append(r)
    print(json.dumps(r), flush=True)
    json.dump(results, open(out_path, "w"), indent=1)


def fused(launch, dk):
    kw = dict(selection_kwargs(dk), window=PAPER["window"])
    return lambda q, c: decode_fused.fused_decode_step(
        q, c.k_cmp, c.v_cmp, c.keys, c.values, c.lengths, **kw, launch=launch
    )


def phased(*a):
    t = ORIGINAL(*a)
    order = np.argsort(t[:, 0] * 10 - (t[:, 0] == 2) * (t[:, 2] >= a[3]) * 5, kind="stable")
    return t[order]


VARIANTS = [
    ("default", L(), False, None),
    ("lag33_8", L(selection_lag=33, reads_lag=8), False, None),
    ("vol_default", L(), True, None),
    ("vol_lag33_8", L(selection_lag=33, reads_lag=8), True, None),
    ("vol_lag48_16", L(selection_lag=48, reads_lag=16), True, None),
    ("vol_c4_phased", L(chunks=4), True, phased),
    ("vol_c8_phased", L(), True, phased),
    ("vol_parts8_lag33", L(parts=8, selection_lag=33, reads_lag=8), True, None),
]
batch, length = 16, 65536
key = jax.random.key(length + batch)
for dk in (128, 192):
    dv = 128
    nsets = sets_for(nsa_bytes(batch, length, dk, dv))
    sets = tuple(
        (random_cache(jax.random.fold_in(key, 100 + i), batch=batch, length=length, dk=dk, dv=dv),)
        for i in range(nsets)
    )
    q = jax.random.normal(jax.random.fold_in(key, 1), (batch, HEADS, dk), jnp.bfloat16)
    cache = sets[0][0]
    ref = jax.jit(nsa_step("xla"))(q, cache)
    args = (q, cache.k_cmp, cache.v_cmp, cache.lengths)
    ref_idx = np.asarray(
        jax.jit(
            lambda *a: registry.resolve("decode_compressed_selection", "xla", *a, **selection_kwargs(dk))(
                *a, **selection_kwargs(dk)
            )[1]
        )(*args)
    )

    def t(name, step):
        fn, ran = looped(step, nsets, 96)
        emit(dk=dk, path=name, ms=time_loop(fn, (q, sets), ran, 5))

    t("new", nsa_step("new"))
    for name, launch, vol, table in VARIANTS if dk == 128 else VARIANTS[:4]:
        jax.clear_caches()
        decode_fused._VOLATILE_POLL = vol
        decode_fused.task_table = table or ORIGINAL
        outs = jax.jit(fused(launch, dk))(q, cache)
        err = max(relative_error(o, r) for o, r in zip(outs[:3], ref))
        diff = int(np.sum(np.any(np.asarray(outs[3]) != ref_idx, axis=-1)))
        emit(dk=dk, name=name, rel_err=float(err), index_rows_differing=diff)
        step = fused(launch, dk)
        t("fused_" + name, lambda q, c: step(q, c)[:3])
    decode_fused.task_table = ORIGINAL
    t("new_again", nsa_step("new"))
    del sets, cache
