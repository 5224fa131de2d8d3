"""Started by Python itself (site.py imports ``sitecustomize`` from sys.path) when
bench/pipeline_vs_bare.py puts this directory first on PYTHONPATH for its pipeline child, so
that the child's command line stays exactly ``python -m optimizer run RECIPE -o DIR -q``.

With ``BENCH_PROBE_OUT`` set it installs phase_probe's observers and writes what they saw to
that file when the interpreter exits (atexit: also after ``sys.exit``); without it, nothing.
A ``sitecustomize`` further down sys.path (a distribution's) still runs: this one shadows it.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))

for _entry in sys.path:
    _other = os.path.join(_entry or ".", "sitecustomize.py")
    if os.path.abspath(_entry or ".") != _here and os.path.isfile(_other):
        import importlib.util

        _spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", _other)
        if _spec is not None and _spec.loader is not None:
            _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break

if os.environ.get("BENCH_PROBE_OUT"):
    import atexit

    sys.path.insert(0, _here)
    import phase_probe

    _phases = phase_probe.Phases()
    phase_probe.install_pipeline_probes(_phases)
    atexit.register(_phases.write, os.environ["BENCH_PROBE_OUT"])
