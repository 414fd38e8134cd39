"""Experiments on real models: the demo, the α × LR × rank sweep and its fit.

Nothing here is imported by :mod:`alpha_tuner` itself. The modules need the assets that
``bash scripts/setup_assets.sh`` installs (:mod:`.assets` says which and where), plus
``matplotlib`` and ``tqdm`` for plots and progress bars (the ``examples`` extra).

* :mod:`.assets`  locate (and for SmolLM2, convert once) the offline model and data files
* :mod:`.data`    the review corpus, its fixed held-out split, batching and encoding
* :mod:`.models`  base models and LoRA attachment for each method compared
* :mod:`.train`   the shared train/eval loop and the record of one run
* :mod:`.demo`    ``alpha-tuner demo``: four methods on one task, table and figure
* :mod:`.sweep`   ``alpha-tuner sweep``: resumable grid (JSON lines) and the bar runs
* :mod:`.fit`     pure analysis of sweep records: best α per rank, power-law fit, claims
* :mod:`.plots`   the figures
"""

from __future__ import annotations
