"""The generated datasets are the same on every CPU: what they are drawn from must not
depend on numpy's SIMD code paths (its AVX-512 float64 ``exp`` and ``log`` round differently
from libm's), or benchmark records made on one machine stop matching the data on another."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCENES = 150
_BOXES = f"""
import json
import numpy as np
from dinodet.data.synthetic import _render
from dinodet.data.synthetic_hard import hard_scene
rng = np.random.default_rng(0)
boxes = {{"hard": [hard_scene((0, 0, i), 256, 256).objects for i in range({SCENES})],
          "demo": [_render(rng, 256, 256, 6, 6)[1] for i in range({SCENES})]}}
"""


def _avx512_groups() -> list[str]:
    """The SIMD groups beyond AVX2 that this numpy found on this CPU (by its names)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    return [name for name in __cpu_dispatch__
            if (name.startswith("AVX512") or name == "X86_V4") and __cpu_features__.get(name)]


def test_scenes_do_not_depend_on_numpy_simd():
    groups = _avx512_groups()
    if not groups:
        pytest.skip("numpy runs no AVX-512 code on this CPU: nothing to switch off")
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(groups)}
    code = _BOXES + "print(json.dumps(boxes))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    there = json.loads(out.stdout)
    scope: dict = {}
    exec(_BOXES, scope)  # the same code here, with every SIMD path numpy found
    here = json.loads(json.dumps(scope["boxes"]))
    for name in ("hard", "demo"):
        assert sum(len(objects) for objects in here[name]) > 400
        assert here[name] == there[name], (
            f"the {name} dataset's boxes differ with numpy's {groups} switched off")
